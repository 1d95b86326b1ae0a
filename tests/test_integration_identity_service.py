"""
The identity service as a real C{linkproxy-identity serve} process, called by grpcio (a client this project
did not write) with stubs grpcio-tools compiles from the project's C{identity.proto}; and the same service
checking tokens with a stand-in for the Kubernetes TokenReview API.
"""

import base64
import datetime
import json
import os
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SkipTest, TestCase

from linkproxy.identity import ca
from linkproxy.identity.client import make_csr
from tests.identity_support import IDENTITY_CLI, IdentityService, compiled_proto, identity_cli, service_name
from tests.proc import ROOT, free_port, http_get

try:
    import grpc
except ImportError:  # pragma: no cover - grpcio is in the test extras
    grpc = None

TD = "linkproxy.local"
WEB = f"web.default.serviceaccount.identity.{TD}"
API = f"api.default.serviceaccount.identity.{TD}"
BURST = f"burst.default.serviceaccount.identity.{TD}"
TOKENS = {
    "tok-web": "system:serviceaccount:default:web",
    "tok-api": "system:serviceaccount:default:api",
    "tok-burst": "system:serviceaccount:default:burst",
}


def _modules():
    if grpc is None:
        raise SkipTest("grpcio is not installed")
    modules = compiled_proto()
    if modules is None:
        raise SkipTest("grpcio-tools is not installed")
    return modules


class _Client:
    """A grpcio channel to the service, verifying it against ca.pem and by its identity name."""

    def __init__(self, testcase, service, directory):
        self.pb2, pb2_grpc = _modules()
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            self.anchors_pem = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=self.anchors_pem)
        self.channel = grpc.secure_channel(service.address, credentials,
                                           options=[("grpc.ssl_target_name_override", service_name())])
        testcase.addCleanup(self.channel.close)
        self.stub = pb2_grpc.IdentityStub(self.channel)

    def certify(self, identity, token, csr):
        request = self.pb2.CertifyRequest(identity=identity, token=token, certificate_signing_request=csr)
        return self.stub.Certify(request, timeout=10)

    def refused(self, testcase, identity, token, csr):
        """@return: the C{grpc.RpcError} of a call that must fail."""
        try:
            self.certify(identity, token, csr)
        except grpc.RpcError as e:
            return e
        testcase.fail(f"Certify({identity!r}) was not refused")


def _trust_domain(testcase):
    directory = os.path.abspath(testcase.mktemp())
    identity_cli("init", directory)
    return directory


def _token_file(testcase, tokens=TOKENS):
    path = os.path.abspath(testcase.mktemp() + ".yaml")
    with open(path, "w") as f:
        json.dump(tokens, f)
    return path


def _verify(testcase, response, anchors_pem, name):
    """
    Check a CertifyResponse with cryptography's own verifier: the chain leads to the anchor, the leaf names
    exactly C{name}, and valid_until is its notAfter.
    """
    leaf = x509.load_der_x509_certificate(response.leaf_certificate)
    intermediates = [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates]
    anchors = x509.load_pem_x509_certificates(anchors_pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    verifier = (verification.PolicyBuilder().store(verification.Store(anchors)).time(now)
                .build_server_verifier(verification.DNSName(name)))
    verifier.verify(leaf, intermediates)
    testcase.assertEqual(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), [name])
    testcase.assertEqual(len(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value), 1)
    testcase.assertEqual(response.valid_until.seconds, int(leaf.not_valid_after_utc.timestamp()))
    return leaf


def _bad_signature(csr_der):
    """The same CSR with one bit of its signature flipped."""
    raw = bytearray(csr_der)
    raw[-3] ^= 0x01
    return bytes(raw)


class GrpcioCertifyTests(TestCase):
    """
    grpcio calls Certify on a real service with a static token file.
    """

    def setUp(self):
        self.dir = _trust_domain(self)
        self.service = IdentityService(self, self.dir, "--token-review", f"file:{_token_file(self)}",
                                       "--lifetime", "1h", "--rate-limit", "3/1h")
        self.client = _Client(self, self.service, self.dir)

    def test_certify_and_refusals(self):
        """
        A DER CSR and a PEM CSR are certified: the chain verifies against ca.pem, the leaf's only SAN is the
        identity, and it lasts the configured hour. A wrong token is UNAUTHENTICATED, another account's
        token PERMISSION_DENIED, a foreign trust domain and a CSR whose signature does not match
        INVALID_ARGUMENT; one identity asking too often is RESOURCE_EXHAUSTED. Every outcome is counted.
        """
        key = ca.new_key()
        csr = make_csr(WEB, key)
        response = self.client.certify(WEB, b"tok-web", csr)
        leaf = _verify(self, response, self.client.anchors_pem, WEB)
        self.assertEqual(leaf.public_key().public_numbers(), key.public_key().public_numbers())
        lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        self.assertTrue(datetime.timedelta(minutes=59) < lifetime <= datetime.timedelta(hours=1), lifetime)

        pem = x509.load_der_x509_csr(make_csr(API, ca.new_key())).public_bytes(serialization.Encoding.PEM)
        _verify(self, self.client.certify(API, b"tok-api", pem), self.client.anchors_pem, API)

        cases = [
            (WEB, b"wrong-token", csr, grpc.StatusCode.UNAUTHENTICATED, "not valid"),
            (WEB, b"tok-api", csr, grpc.StatusCode.PERMISSION_DENIED, "system:serviceaccount:default:api"),
            ("web.default.serviceaccount.identity.example.org", b"tok-web",
             make_csr("web.default.serviceaccount.identity.example.org", key),
             grpc.StatusCode.INVALID_ARGUMENT, "trust domain"),
            (WEB, b"tok-web", _bad_signature(csr), grpc.StatusCode.INVALID_ARGUMENT, "signature"),
            (WEB, b"tok-web", b"not a csr", grpc.StatusCode.INVALID_ARGUMENT, "PKCS#10"),
        ]
        for identity, token, request_csr, code, fragment in cases:
            error = self.client.refused(self, identity, token, request_csr)
            self.assertEqual(error.code(), code, (identity, token, error.details()))
            self.assertIn(fragment, error.details())

        burst_csr = make_csr(BURST, ca.new_key())
        for _ in range(3):
            self.client.certify(BURST, b"tok-burst", burst_csr)
        error = self.client.refused(self, BURST, b"tok-burst", burst_csr)
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("retry in", error.details())

        self.assertEqual(self.service.metric("identity_certified_total"), 5)
        for reason, status in [("token_rejected", "16"), ("identity_mismatch", "7"),
                               ("foreign_trust_domain", "3"), ("csr_signature", "3"), ("invalid_csr", "3"),
                               ("rate_limited", "8")]:
            self.assertEqual(self.service.metric("identity_refused_total", reason=reason, grpc_status=status), 1,
                             reason)
        # init left the root key beside the issuer; the service says it does not belong there.
        self.assertIn("keep the root key offline", self.service.log())
        self.assertEqual(self.service.stop(), 0)

    def test_service_tls_identity(self):
        """
        The service presents its own identity, identity.linkproxy.serviceaccount.identity.<trust domain>,
        signed by the issuer it holds; a client expecting another name refuses it.
        """
        with open(os.path.join(self.dir, "ca.pem"), "rb") as f:
            anchors = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=anchors)
        pb2, pb2_grpc = _modules()
        channel = grpc.secure_channel(self.service.address, credentials, options=[
            ("grpc.ssl_target_name_override", f"other.linkproxy.serviceaccount.identity.{TD}")])
        self.addCleanup(channel.close)
        with self.assertRaises(grpc.RpcError) as raised:
            pb2_grpc.IdentityStub(channel).Certify(pb2.CertifyRequest(identity=WEB), timeout=5)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)


class ProxyClientTests(TestCase):
    """
    The proxy's client (L{ServiceCertifier}) against the real service: it certifies, and it refuses a
    service that does not prove the configured name or does not chain to the anchors.
    """

    def setUp(self):
        self.dir = _trust_domain(self)
        self.service = IdentityService(self, self.dir, "--token-review", f"file:{_token_file(self)}")
        self.token = os.path.abspath(self.mktemp())
        with open(self.token, "w") as f:
            f.write("tok-web\n")
        self.anchors = ca.load_certs(os.path.join(self.dir, "ca.pem"))

    def certify(self, name=None, anchors=None):
        from linkproxy.identity.client import ServiceCertifier
        certifier = ServiceCertifier(("127.0.0.1", self.service.port), name or service_name(), self.token,
                                     timeout=5)
        key = ca.new_key()
        return key, certifier(WEB, key, anchors or self.anchors)

    def test_certified(self):
        """The answer is a chain for our key and name that verifies against ca.pem."""
        key, d = self.certify()

        def check(chain):
            self.assertTrue(ca.key_matches(chain[0], key))
            self.assertEqual(ca.dns_names(chain[0]), [WEB])
            ca.verify_chain(chain, self.anchors)
        return d.addCallback(check)

    def test_wrong_service_name(self):
        """A service whose certificate names another identity is not talked to: UNAVAILABLE, no request."""
        from linkproxy.identity.grpcwire import UNAVAILABLE, GrpcError
        _, d = self.certify(name=f"impostor.linkproxy.serviceaccount.identity.{TD}")
        d = self.assertFailure(d, GrpcError)
        d.addCallback(lambda e: self.assertEqual(e.code, UNAVAILABLE))
        d.addCallback(lambda _: self.assertEqual(self.service.metric("identity_certified_total"), 0))
        return d

    def test_untrusted_service(self):
        """A service that does not chain to our anchors is refused the same way."""
        from linkproxy.identity.grpcwire import UNAVAILABLE, GrpcError
        other = _trust_domain(self)
        _, d = self.certify(anchors=ca.load_certs(os.path.join(other, "ca.pem")))
        d = self.assertFailure(d, GrpcError)
        d.addCallback(lambda e: self.assertEqual(e.code, UNAVAILABLE))
        return d


class ServeConfigTests(TestCase):
    """
    The service's runtime conventions: every problem at once, exit 78, nothing bound.
    """

    def test_config_errors_listed_at_once(self):
        """
        Several bad options and a directory without an issuer: one message lists each, the exit status is
        78, and the admin port was never bound.
        """
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        admin = free_port()
        out = subprocess.run(
            [IDENTITY_CLI, "serve", empty, "--listen", "nonsense:1", "--admin", f"tcp:{admin}:interface=127.0.0.1",
             "--lifetime", "soon", "--token-review", "file:/nonexistent/tokens.yaml", "--rate-limit", "0/1m"],
            capture_output=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        self.assertEqual(out.returncode, 78, out.stderr)
        text = out.stderr.decode()
        self.assertIn("5 problems", text)
        for fragment in ("--listen", "--lifetime", "--rate-limit", "tokens.yaml", "DIR"):
            self.assertIn(fragment, text)
        with self.assertRaises(OSError):
            http_get(f"http://127.0.0.1:{admin}/live", timeout=1)

    def test_kubernetes_without_cluster(self):
        """
        --token-review kubernetes with neither a kubeconfig nor in-cluster variables is a config error.
        """
        directory = _trust_domain(self)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
        out = subprocess.run([IDENTITY_CLI, "serve", directory, "--token-review", "kubernetes"],
                             capture_output=True, timeout=30, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
        self.assertEqual(out.returncode, 78, out.stderr)
        self.assertIn("KUBERNETES_SERVICE_HOST", out.stderr.decode())


# --- a stand-in for the Kubernetes TokenReview API ---------------------------------------------------------


def _server_cert(directory):
    """A self-signed CA and a serving certificate for 127.0.0.1, as a test API server's."""
    key = ca.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-apiserver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "api.pem"), os.path.join(directory, "api-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class TokenReviewAPI:
    """
    HTTPS on 127.0.0.1 answering C{POST /apis/authentication.k8s.io/v1/tokenreviews} as the Kubernetes API
    does: only for the service's own bearer token, authenticating the tokens it knows for the audiences they
    were minted for.

    @ivar reviews: the C{spec} of every review it answered.
    """

    def __init__(self, testcase, bearer, tokens):
        """
        @param tokens: C{{token: (username, audiences)}}.
        """
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
        self.ca_path, key_path = _server_cert(directory)
        self.reviews = []
        self.unauthorized = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    return self._answer(404, {"kind": "Status", "code": 404})
                if self.headers.get("authorization") != f"Bearer {bearer}":
                    api.unauthorized += 1
                    return self._answer(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                review = json.loads(body)
                if review.get("apiVersion") != "authentication.k8s.io/v1" or review.get("kind") != "TokenReview":
                    return self._answer(400, {"kind": "Status", "code": 400})
                spec = review["spec"]
                api.reviews.append(spec)
                known = tokens.get(spec.get("token"))
                wanted = spec.get("audiences") or ["https://kubernetes.default.svc"]
                status = {"authenticated": False, "error": "invalid bearer token"}
                if known is not None:
                    username, audiences = known
                    common = [a for a in wanted if a in audiences]
                    if common:
                        status = {"authenticated": True, "audiences": common,
                                  "user": {"username": username, "uid": "1234",
                                           "groups": ["system:serviceaccounts"]}}
                    else:
                        status = {"authenticated": False, "error": "token audiences are invalid"}
                self._answer(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "spec": spec, "status": status})

            def _answer(self, code, doc):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_path, key_path)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

        def stop():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
        testcase.addCleanup(stop)

    def kubeconfig(self, testcase, bearer, inline_ca=False):
        """A kubeconfig naming this server, its CA and the bearer token."""
        cluster = {"server": f"https://127.0.0.1:{self.port}"}
        if inline_ca:
            with open(self.ca_path, "rb") as f:
                cluster["certificate-authority-data"] = base64.b64encode(f.read()).decode()
        else:
            cluster["certificate-authority"] = self.ca_path
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
               "clusters": [{"name": "test", "cluster": cluster}],
               "users": [{"name": "identity", "user": {"token": bearer}}],
               "contexts": [{"name": "test", "context": {"cluster": "test", "user": "identity",
                                                          "namespace": "linkproxy"}}]}
        path = os.path.abspath(testcase.mktemp() + ".kubeconfig")
        with open(path, "w") as f:
            json.dump(doc, f)
        return path


class TokenReviewTests(TestCase):
    """
    --token-review kubernetes against the stand-in API server, reached through a kubeconfig.
    """

    def test_token_review_decides(self):
        """
        The service authenticates to the API with the kubeconfig's bearer token and asks about the proxy's
        token for the linkproxy audience; a token for the service account the identity names is
        certified, one for another account is PERMISSION_DENIED, one the API does not know or minted for
        another audience is UNAUTHENTICATED.
        """
        bearer = "service-account-token-of-the-identity-service"
        api = TokenReviewAPI(self, bearer, {
            "jwt-web": ("system:serviceaccount:default:web", ["identity.linkproxy.io"]),
            "jwt-api": ("system:serviceaccount:default:api", ["identity.linkproxy.io"]),
            "jwt-web-kube": ("system:serviceaccount:default:web", ["https://kubernetes.default.svc"]),
        })
        directory = _trust_domain(self)
        service = IdentityService(self, directory, "--token-review", "kubernetes",
                                  "--kubeconfig", api.kubeconfig(self, bearer))
        client = _Client(self, service, directory)
        csr = make_csr(WEB, ca.new_key())
        _verify(self, client.certify(WEB, b"jwt-web", csr), client.anchors_pem, WEB)
        self.assertEqual(api.reviews[0], {"token": "jwt-web", "audiences": ["identity.linkproxy.io"]})
        self.assertEqual(api.unauthorized, 0)

        error = client.refused(self, WEB, b"jwt-api", csr)
        self.assertEqual(error.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("system:serviceaccount:default:api", error.details())
        for token in (b"jwt-unknown", b"jwt-web-kube"):
            error = client.refused(self, WEB, token, csr)
            self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED, token)
        self.assertEqual(service.metric("identity_refused_total", reason="token_rejected"), 2)

    def test_api_refuses_the_service(self):
        """
        An API server that refuses the service's own credentials (HTTP 401) is not a verdict on the token:
        the caller gets UNAVAILABLE, to try again, and the CA in the kubeconfig may be inline.
        """
        api = TokenReviewAPI(self, "the-right-bearer", {})
        directory = _trust_domain(self)
        service = IdentityService(self, directory, "--token-review", "kubernetes",
                                  "--kubeconfig", api.kubeconfig(self, "a-wrong-bearer", inline_ca=True))
        client = _Client(self, service, directory)
        error = client.refused(self, WEB, b"jwt-web", make_csr(WEB, ca.new_key()))
        self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("401", error.details())
        self.assertEqual(api.unauthorized, 1)
