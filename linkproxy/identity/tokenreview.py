"""
Token reviewers: who a token belongs to, as a L{linkproxy.identity.certify.TokenReview}.

 - L{KubernetesTokenReviewer} asks the API server (C{POST /apis/authentication.k8s.io/v1/tokenreviews},
   with an audience), authenticating with the service's own service-account token or a kubeconfig.
 - L{StaticTokenReviewer} reads a static map of tokens to service accounts, for development and tests.

L{kube_api_from_environment} finds the API server as every Kubernetes client does: a kubeconfig when one is
named, else the in-cluster variables and files.
"""

import hmac
import io
import json
import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from linkproxy.identity.certify import TokenReview

__all__ = [
    "ReviewUnavailable", "KubeAPI", "kube_api_from_environment", "StaticTokenReviewer",
    "KubernetesTokenReviewer", "SERVICE_ACCOUNT_DIR", "TOKEN_REVIEW_PATH",
]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

# A TokenReview answer is a few hundred bytes; a megabyte is a broken or hostile server.
_MAX_BODY = 1024 * 1024

_log = Logger(namespace="linkproxy.identity.tokenreview")


class ReviewUnavailable(Exception):
    """
    The reviewer could not give an answer (the API server is unreachable, refused the review, or answered
    nonsense); the caller should try again later, it has not been told no.
    """


class ConfigProblem(Exception):
    """
    The reviewer cannot be configured; the message is one line for an operator.
    """


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigProblem(f"cannot read {what} {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class KubeAPI:
    """
    How to reach the Kubernetes API server.

    @ivar server: its base URL, C{https://host:port}.
    @ivar ca_pem: the PEM bundle it is verified against.
    @ivar token: a fixed bearer token, or C{None}.
    @ivar token_file: a file holding the bearer token, read afresh for every request (projected and
        in-cluster tokens rotate), or C{None}.
    @ivar namespace: the namespace the service runs in, when known.
    """

    server: str
    ca_pem: bytes
    token: Optional[str] = None
    token_file: Optional[str] = None
    namespace: Optional[str] = None

    def bearer(self):
        """
        @return: the bearer token to send now.
        @raise ReviewUnavailable: if the token file cannot be read.
        """
        if self.token_file is not None:
            try:
                with open(self.token_file, "rb") as f:
                    return f.read().decode("ascii").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ReviewUnavailable(f"cannot read the API token {self.token_file}: {e}") from None
        return self.token or ""


def _kubeconfig(path):
    import yaml
    raw = _read(path, "kubeconfig")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigProblem(f"kubeconfig {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigProblem(f"kubeconfig {path} is not a mapping")
    base = os.path.dirname(os.path.abspath(path))

    def named(kind, name):
        for entry in doc.get(kind + "s") or ():
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry.get(kind) or {}
        raise ConfigProblem(f"kubeconfig {path}: no {kind} named {name!r}")

    context_name = doc.get("current-context")
    if not context_name:
        raise ConfigProblem(f"kubeconfig {path} has no current-context")
    context = named("context", context_name)
    cluster = named("cluster", context.get("cluster"))
    user = named("user", context.get("user")) if context.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or urlsplit(server).scheme != "https":
        raise ConfigProblem(f"kubeconfig {path}: cluster server must be an https:// URL, got {server!r}")
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigProblem(f"kubeconfig {path}: insecure-skip-tls-verify is refused: the token review "
                            "decides who gets certificates")
    if cluster.get("certificate-authority-data"):
        import base64
        try:
            ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        except ValueError:
            raise ConfigProblem(f"kubeconfig {path}: certificate-authority-data is not base64") from None
    elif cluster.get("certificate-authority"):
        ca_path = os.path.join(base, cluster["certificate-authority"])
        ca_pem = _read(ca_path, "cluster CA")
    else:
        raise ConfigProblem(f"kubeconfig {path}: the cluster names no certificate-authority")
    token, token_file = user.get("token"), user.get("tokenFile")
    if token_file:
        token_file = os.path.join(base, token_file)
    if not token and not token_file:
        raise ConfigProblem(f"kubeconfig {path}: the user has no token or tokenFile "
                            "(client certificates and exec plugins are not supported)")
    namespace = context.get("namespace")
    return KubeAPI(server.rstrip("/"), ca_pem, token=token, token_file=token_file, namespace=namespace)


def kube_api_from_environment(kubeconfig=None, env=None, service_account_dir=SERVICE_ACCOUNT_DIR):
    """
    Find the API server: C{kubeconfig} (or C{$KUBECONFIG}), else the in-cluster configuration
    (C{KUBERNETES_SERVICE_HOST}/C{_PORT}, with the token and C{ca.crt} under C{service_account_dir}).

    @raise ConfigProblem: if neither gives a usable configuration.
    """
    env = os.environ if env is None else env
    path = kubeconfig or env.get("KUBECONFIG")
    if path:
        return _kubeconfig(path)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigProblem("no Kubernetes API: give --kubeconfig (or KUBECONFIG), or run in a cluster "
                            "(KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are unset)")
    if ":" in host:
        host = f"[{host}]"
    ca_pem = _read(os.path.join(service_account_dir, "ca.crt"), "cluster CA")
    token_file = os.path.join(service_account_dir, "token")
    _read(token_file, "service-account token")
    namespace = None
    try:
        with open(os.path.join(service_account_dir, "namespace")) as f:
            namespace = f.read().strip() or None
    except OSError:
        pass
    return KubeAPI(f"https://{host}:{port}", ca_pem, token_file=token_file, namespace=namespace)


class StaticTokenReviewer:
    """
    A static map of tokens to service-account usernames, for development and tests::

        # token: system:serviceaccount:NAMESPACE:NAME
        dev-token-web: system:serviceaccount:default:web

    The file is re-read when it changes. Anything not in it is not authenticated. It has no notion of
    audiences (its tokens are good for any), and they never expire: never use it where they could leak.
    """

    def __init__(self, path):
        """
        @raise ConfigProblem: if the file cannot be read or is not such a map.
        """
        self.path = path
        self._seen = None
        self._tokens = ()
        self._load()

    def _load(self):
        import yaml
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ConfigProblem(f"cannot read token file {self.path}: {e.strerror or e}") from None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        try:
            doc = yaml.safe_load(_read(self.path, "token file"))
        except yaml.YAMLError as e:
            raise ConfigProblem(f"token file {self.path} is not valid YAML: {e}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
            raise ConfigProblem(f"token file {self.path}: expected a mapping of token to "
                                "system:serviceaccount:NAMESPACE:NAME")
        self._tokens = tuple((k.encode("utf-8"), v) for k, v in doc.items())
        self._seen = seen

    def review(self, token, audience):
        """
        @return: a Deferred firing with a L{TokenReview}.
        """
        try:
            self._load()
        except ConfigProblem as e:
            # Keep the last good map: a file being rewritten is not a reason to refuse everyone.
            _log.warn("{error}; using the last good token map", error=str(e))
        username = ""
        # Compare with every entry, in constant time each: no early exit to time.
        for known, user in self._tokens:
            if hmac.compare_digest(known, bytes(token)):
                username = user
        if not username:
            return defer.succeed(TokenReview(False, error="unknown token"))
        # No audiences here: whatever audience the service wants, these tokens are for it.
        return defer.succeed(TokenReview(True, username, (audience,) if audience else None))


class _Body(Protocol):
    def __init__(self, finished):
        self._finished = finished
        self._data = bytearray()

    def dataReceived(self, data):
        self._data += data
        if len(self._data) > _MAX_BODY:
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if len(self._data) > _MAX_BODY:
            self._finished.errback(ReviewUnavailable("TokenReview response too large"))
        else:
            self._finished.callback(bytes(self._data))


class KubernetesTokenReviewer:
    """
    Reviews tokens with the Kubernetes TokenReview API (C{authentication.k8s.io/v1}).

    The service account it runs as needs C{create} on C{tokenreviews} (see C{deploy/kubernetes/}).
    """

    def __init__(self, api, *, reactor=None, timeout=10.0):
        """
        @param api: a L{KubeAPI}.
        @param timeout: seconds for each review.
        """
        if reactor is None:
            from twisted.internet import reactor
        from twisted.internet.ssl import Certificate, trustRootFromCertificates
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        try:
            from cryptography import x509
            anchors = [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in x509.load_pem_x509_certificates(api.ca_pem)]
        except ValueError:
            raise ConfigProblem("the cluster CA is not a PEM certificate bundle") from None
        self.api = api
        self._reactor = reactor
        self._timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        self._agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRootFromCertificates(anchors)),
                            pool=pool)
        self._url = (api.server + TOKEN_REVIEW_PATH).encode("ascii")

    @defer.inlineCallbacks
    def review(self, token, audience):
        """
        @param token: the token to review.
        @param audience: the audience it must be valid for, or C{None}.
        @return: a Deferred firing with a L{TokenReview}, or failing with L{ReviewUnavailable}.
        """
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        try:
            text = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            return TokenReview(False, error="the token is not ASCII")
        spec = {"token": text}
        if audience:
            spec["audiences"] = [audience]
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "spec": spec}).encode("utf-8")
        headers = Headers({b"content-type": [b"application/json"], b"accept": [b"application/json"],
                           b"authorization": [b"Bearer " + self.api.bearer().encode("ascii")]})
        d = self._agent.request(b"POST", self._url, headers, FileBodyProducer(io.BytesIO(body)))
        d.addTimeout(self._timeout, self._reactor)
        try:
            response = yield d
            finished = defer.Deferred()
            response.deliverBody(_Body(finished))
            finished.addTimeout(self._timeout, self._reactor)
            payload = yield finished
        except ReviewUnavailable:
            raise
        except Exception as e:
            raise ReviewUnavailable(f"TokenReview request to {self.api.server} failed: {e}") from None
        if response.code not in (200, 201):
            raise ReviewUnavailable(f"TokenReview answered HTTP {response.code}: "
                                    f"{payload[:200].decode('utf-8', 'replace')}")
        return parse_review(payload)


def parse_review(payload):
    """
    Read a TokenReview answer.

    @param payload: the JSON body.
    @return: a L{TokenReview}.
    @raise ReviewUnavailable: if it is not a TokenReview.
    """
    try:
        doc = json.loads(payload)
        status = doc["status"]
        if not isinstance(status, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ReviewUnavailable("TokenReview answer has no status") from None
    authenticated = status.get("authenticated") is True
    user = status.get("user") or {}
    username = user.get("username", "") if isinstance(user, dict) else ""
    audiences = status.get("audiences")
    if audiences is not None:
        audiences = tuple(a for a in audiences if isinstance(a, str)) if isinstance(audiences, list) else ()
    error = status.get("error") or ""
    return TokenReview(authenticated, username if isinstance(username, str) else "", audiences,
                       error if isinstance(error, str) else "")

