"""
C{linkproxy-identity serve}: the identity service.

It holds the trust domain's issuer (the only process that does), serves Linkerd's Identity API
(C{io.linkerd.proxy.identity.Identity/Certify}) over TLS with its own identity, checks every request's CSR
and token, and signs a short-lived leaf for exactly the identity the token proves. An admin listener serves
C{/live}, C{/ready} and C{/metrics}, as the proxy's does.

L{load_settings} checks every option and reports every problem at once, before anything binds (the command
exits 78); L{make_identity_service} wires the process; L{run} runs it.
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.identity import ca, certify, grpcwire
from linkproxy.identity.client import CERTIFY_PATH
from linkproxy.identity.messages import MAX_MESSAGE_LENGTH, CertifyRequest, CertifyResponse, MessageError

__all__ = ["ServeSettings", "load_settings", "CertifyHandler", "make_identity_service", "run",
           "DEFAULT_AUDIENCE", "DEFAULT_NAMESPACE", "EX_CONFIG"]

log = Logger(namespace="linkproxy.identity.server")

#: The audience proxies' projected tokens are minted for, and the service asks TokenReview about.
DEFAULT_AUDIENCE = "identity.linkproxy.io"
#: The namespace the service's own identity names when it is not running in a cluster.
DEFAULT_NAMESPACE = "linkproxy"
#: sysexits' EX_CONFIG, as the proxy uses for a bad configuration.
EX_CONFIG = 78


class ConfigError(Exception):
    """
    Every problem with the options, one line each.
    """

    def __init__(self, problems):
        super().__init__(problems)
        self.problems = list(problems)

    def __str__(self):
        count = len(self.problems)
        return "\n".join([f"invalid configuration ({count} problem{'s' if count != 1 else ''}):"]
                         + [f"  - {p}" for p in self.problems])


@dataclass
class ServeSettings:
    """
    The checked configuration of the identity service.

    @ivar directory: the trust domain's directory (C{ca.pem}, C{issuer.pem}, C{issuer-key.pem}).
    @ivar listen: server endpoint description of the gRPC (TLS) listener.
    @ivar admin: server endpoint description of the admin listener.
    @ivar token_review: C{"kubernetes"} or C{"file:PATH"}.
    @ivar lifetime: seconds a signed leaf lasts.
    @ivar identity_name: the service's own identity.
    @ivar trust_domain: the issuer's trust domain.
    @ivar audience: the audience tokens must be valid for.
    @ivar rate_burst: requests an identity may make at once.
    @ivar rate_period: seconds in which C{rate_burst} requests come back.
    @ivar log_level: the log level name.
    @ivar issuer: C{(issuer certificate, its key, intermediates to send, anchors)}.
    @ivar reviewer: the token reviewer.
    """

    directory: str
    listen: str
    admin: str
    token_review: str
    lifetime: float
    identity_name: str
    trust_domain: str
    audience: str
    rate_burst: int
    rate_period: float
    log_level: str
    issuer: tuple
    reviewer: object
    kubeconfig: Optional[str] = None

    def redacted(self):
        """The settings for C{/env.json}: no key material, no tokens."""
        return {
            "directory": self.directory, "listen": self.listen, "admin": self.admin,
            "token_review": self.token_review, "lifetime": self.lifetime, "identity_name": self.identity_name,
            "trust_domain": self.trust_domain, "audience": self.audience,
            "rate_limit": f"{self.rate_burst}/{self.rate_period:g}s", "log_level": self.log_level,
            "kubeconfig": self.kubeconfig,
        }


class _NoReactor:
    def __getattr__(self, name):
        raise AttributeError(f"endpoint description used the reactor ({name}) while being checked")


def _check_description(text, what, problems):
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(_NoReactor(), text)
    except Exception as e:
        problems.append(f"{what}: invalid listen address {text!r}: {e}")


def _parse_rate(text):
    burst_text, sep, period_text = text.partition("/")
    from linkproxy.identity.cli import parse_duration
    if not sep:
        raise ValueError
    burst = int(burst_text)
    if burst < 1:
        raise ValueError
    return burst, parse_duration(period_text).total_seconds()


def _default_namespace(service_account_dir):
    try:
        with open(os.path.join(service_account_dir, "namespace")) as f:
            return f.read().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def load_settings(args, env=None, *, reactor=None, service_account_dir=None):
    """
    Check every option of C{serve} and load the issuer and the token reviewer.

    @param args: the parsed C{argparse} namespace (values still text).
    @param env: the environment (for C{KUBECONFIG} and the in-cluster variables).
    @return: L{ServeSettings}.
    @raise ConfigError: listing every problem.
    """
    import argparse
    from linkproxy.identity import tokenreview
    from linkproxy.identity.cli import parse_duration

    env = os.environ if env is None else env
    sa_dir = service_account_dir or tokenreview.SERVICE_ACCOUNT_DIR
    problems = []
    _check_description(args.listen, "--listen", problems)
    _check_description(args.admin, "--admin", problems)
    lifetime = None
    try:
        lifetime = parse_duration(args.lifetime).total_seconds()
        if lifetime < 1:
            problems.append(f"--lifetime: a leaf must last at least 1 s, got {args.lifetime!r}")
    except argparse.ArgumentTypeError as e:
        problems.append(f"--lifetime: {e}")
    rate = None
    try:
        rate = _parse_rate(args.rate_limit)
    except (ValueError, argparse.ArgumentTypeError):
        problems.append(f"--rate-limit: expected BURST/PERIOD such as 10/1m, got {args.rate_limit!r}")
    from linkproxy.admin.loglevel import LEVEL_NAMES
    if args.log_level not in LEVEL_NAMES:
        problems.append(f"--log-level: expected one of {', '.join(LEVEL_NAMES)}, got {args.log_level!r}")

    issuer = trust_domain = None
    try:
        anchors = ca.load_certs(os.path.join(args.dir, ca.CA_FILE))
        issuer_cert, issuer_key = ca.load_issuer(args.dir)
        chain = ca.load_certs(os.path.join(args.dir, ca.ISSUER_FILE))
        trust_domain = ca.trust_domain_of(issuer_cert)
        if trust_domain is None:
            raise ca.IdentityError(f"{os.path.join(args.dir, ca.ISSUER_FILE)} names no trust domain")
        ca.verify_chain(chain, anchors)
        issuer = (issuer_cert, issuer_key, tuple(chain), tuple(anchors))
    except ca.IdentityError as e:
        problems.append(f"DIR: {e}")

    identity_name = args.identity_name
    if identity_name is None and trust_domain is not None:
        namespace = args.namespace or _default_namespace(sa_dir)
        identity_name = f"identity.{namespace}.serviceaccount.identity.{trust_domain}"
    if identity_name is not None:
        try:
            _, _, domain = ca.parse_identity_name(identity_name)
            if trust_domain is not None and domain != trust_domain:
                problems.append(f"--identity-name: {identity_name!r} is not in the issuer's trust domain "
                                f"{trust_domain!r}")
        except ca.IdentityError as e:
            problems.append(f"--identity-name: {e}")

    reviewer = None
    if args.token_review == "kubernetes":
        try:
            api = tokenreview.kube_api_from_environment(args.kubeconfig, env, sa_dir)
            reviewer = tokenreview.KubernetesTokenReviewer(api, reactor=reactor)
        except tokenreview.ConfigProblem as e:
            problems.append(f"--token-review kubernetes: {e}")
    elif args.token_review.startswith("file:") and args.token_review[len("file:"):].strip():
        try:
            reviewer = tokenreview.StaticTokenReviewer(args.token_review[len("file:"):].strip())
        except tokenreview.ConfigProblem as e:
            problems.append(f"--token-review: {e}")
    else:
        problems.append(f"--token-review: expected 'kubernetes' or 'file:PATH', got {args.token_review!r}")

    if problems:
        raise ConfigError(problems)
    return ServeSettings(
        directory=args.dir, listen=args.listen, admin=args.admin, token_review=args.token_review,
        lifetime=lifetime, identity_name=identity_name, trust_domain=trust_domain, audience=args.audience,
        rate_burst=rate[0], rate_period=rate[1], log_level=args.log_level, issuer=issuer, reviewer=reviewer,
        kubeconfig=args.kubeconfig)


class _Registry:
    """What the admin app reads metrics from: one prometheus registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry(auto_describe=True)


class CertifyHandler:
    """
    The C{Certify} method: checks, token review, rate limit, signature; counts every outcome.
    """

    def __init__(self, *, issuer_cert, issuer_key, intermediates, trust_domain, reviewer, audience, lifetime,
                 limiter, clock, registry=None):
        """
        @param intermediates: DER-able certificates sent after the leaf, the issuer first.
        @param reviewer: has C{review(token, audience)} returning a Deferred of a L{certify.TokenReview},
            failing with L{linkproxy.identity.tokenreview.ReviewUnavailable} when it cannot tell.
        @param lifetime: seconds each leaf lasts.
        @param limiter: a L{certify.RateLimiter}.
        @param clock: an C{IReactorTime}.
        @param registry: a prometheus registry for C{identity_certified_total} and C{identity_refused_total}.
        """
        from cryptography.hazmat.primitives.serialization import Encoding
        self._issuer_cert = issuer_cert
        self._issuer_key = issuer_key
        self._intermediates = tuple(c.public_bytes(Encoding.DER) for c in intermediates)
        self._trust_domain = trust_domain
        self._reviewer = reviewer
        self._audience = audience
        self._lifetime = lifetime
        self._limiter = limiter
        self._clock = clock
        self._certified = self._refused = None
        if registry is not None:
            from prometheus_client import Counter
            self._certified = Counter("identity_certified", "Certificates signed", registry=registry)
            self._refused = Counter("identity_refused", "Certify requests refused, by reason",
                                    ["reason", "grpc_status"], registry=registry)

    def __call__(self, message):
        """
        @param message: the encoded C{CertifyRequest}.
        @return: a Deferred firing with the encoded C{CertifyResponse}, or failing with
            L{grpcwire.GrpcError}.
        """
        request = None
        try:
            try:
                request = CertifyRequest.decode(message)
            except MessageError as e:
                raise certify.Refused(grpcwire.INVALID_ARGUMENT, "invalid_request",
                                      f"not a CertifyRequest: {e}") from None
            checked = certify.check_request(request, self._trust_domain)
            now = self._clock.seconds()
            if not self._limiter.allow(checked.identity, now):
                wait = self._limiter.retry_after(checked.identity, now)
                raise certify.Refused(grpcwire.RESOURCE_EXHAUSTED, "rate_limited",
                                      f"too many requests for {checked.identity}; retry in {wait:.1f} s")
        except certify.Refused as refused:
            return defer.fail(self._refuse(refused, request.identity if request is not None else ""))
        d = defer.maybeDeferred(self._reviewer.review, request.token, self._audience)
        d.addCallback(self._decide, checked)
        d.addErrback(self._failed, checked)
        return d

    def _decide(self, review, checked):
        certify.check_review(checked, review, self._audience)
        leaf = certify.sign(checked, self._issuer_cert, self._issuer_key, self._clock.seconds(), self._lifetime)
        from cryptography.hazmat.primitives.serialization import Encoding
        response = CertifyResponse(leaf.public_bytes(Encoding.DER), self._intermediates,
                                   CertifyResponse.timestamp(leaf.not_valid_after_utc))
        if self._certified is not None:
            self._certified.inc()
        log.info("certified {identity} until {until}", identity=checked.identity,
                 until=leaf.not_valid_after_utc.isoformat())
        return response.encode()

    def _failed(self, failure, checked):
        from linkproxy.identity.tokenreview import ReviewUnavailable
        if failure.check(certify.Refused):
            refused = failure.value
        elif failure.check(ReviewUnavailable):
            refused = certify.Refused(grpcwire.UNAVAILABLE, "token_review_unavailable",
                                      f"the token cannot be reviewed now: {failure.value}")
        else:
            log.failure("certifying {identity} failed", failure, identity=checked.identity)
            refused = certify.Refused(grpcwire.INTERNAL, "internal", "internal error")
        raise self._refuse(refused, checked.identity)

    def _refuse(self, refused, identity):
        if self._refused is not None:
            self._refused.labels(refused.reason, str(refused.code)).inc()
        log.info("refused {identity}: {reason}: {message}", identity=identity or "(none)",
                 reason=refused.reason, message=refused.message)
        return grpcwire.GrpcError(refused.code, refused.message)


@implementer(IOpenSSLServerConnectionCreator)
class _H2ServerCreator:
    """
    The mesh server context of the service's own identity, plus ALPN: gRPC clients require C{h2}.
    """

    def __init__(self, contexts):
        self._contexts = contexts
        self._context = None

    def serverConnectionForTLS(self, tls):
        from OpenSSL import SSL
        context = self._contexts.getContext()
        if context is not self._context:
            # A new context per identity generation: it gets the callback once.
            context.set_alpn_select_callback(_select_h2)
            self._context = context
        return SSL.Connection(context, None)


def _select_h2(connection, offered):
    from OpenSSL import SSL
    return b"h2" if b"h2" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class IdentityServer(MultiService):
    """
    The identity service process: the gRPC listener, the admin listener, and the service's own identity.
    """

    def __init__(self, reactor):
        MultiService.__init__(self)
        self._reactor = reactor
        self.listeners = []
        self.draining = False
        self.failed = False
        self.store = None

    def readiness(self):
        """What is not ready, one line each; empty when ready."""
        problems = ["draining"] if self.draining else []
        for listener in self.listeners:
            if not listener.bound:
                problems.append(f"listener {listener.name} not bound ({listener.description})")
        reason = self.store.not_ready_reason() if self.store is not None else "no identity"
        if reason:
            problems.append(reason)
        return problems

    def listen_failed(self, failure):
        """A listener could not bind: exit non-zero."""
        self.failed = True
        if self._reactor.running:
            self._reactor.stop()

    def shutdown(self):
        """Stop the process (C{POST /shutdown}), as SIGTERM does."""
        self._reactor.stop()

    def stopService(self):
        self.draining = True
        return MultiService.stopService(self)


class _StoreService(MultiService):
    def __init__(self, store):
        MultiService.__init__(self)
        self._store = store

    def stopService(self):
        self._store.stop()
        return MultiService.stopService(self)


def make_identity_service(settings, reactor, log_level=None):
    """
    Wire the identity service. Nothing binds until it starts; its own TLS identity is issued here.

    @param settings: L{ServeSettings}.
    @return: an L{IdentityServer}.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.web.server import Site

    from linkproxy.admin.app import AdminApp
    from linkproxy.admin.loglevel import LogLevelControl
    from linkproxy.identity.h2grpc import GrpcServerFactory
    from linkproxy.identity.store import IdentityStore
    from linkproxy.net.tls import server_context_factory
    from linkproxy.service import Listener

    server = IdentityServer(reactor)
    metrics = _Registry()
    issuer_cert, issuer_key, chain, anchors = settings.issuer
    if os.path.exists(os.path.join(settings.directory, ca.CA_KEY_FILE)):
        log.warn("{path} is here too: the identity service needs only the issuer; keep the root key offline",
                 path=os.path.join(settings.directory, ca.CA_KEY_FILE))
    # The service's own leaf is self-issued from the issuer it holds, in memory, and renewed like a
    # proxy's; its expiry is on /metrics as identity_cert_expiration_timestamp_seconds.
    store = IdentityStore(settings.directory, settings.identity_name, reactor=reactor, metrics=metrics)
    store.start()
    server.store = store
    _StoreService(store).setServiceParent(server)
    from prometheus_client import Gauge
    Gauge("identity_issuer_expiration_timestamp_seconds", "Unix time at which the issuer certificate expires",
          registry=metrics.registry).set(issuer_cert.not_valid_after_utc.timestamp())

    handler = CertifyHandler(
        issuer_cert=issuer_cert, issuer_key=issuer_key, intermediates=chain, trust_domain=settings.trust_domain,
        reviewer=settings.reviewer, audience=settings.audience, lifetime=settings.lifetime,
        limiter=certify.RateLimiter(settings.rate_burst, settings.rate_period), clock=reactor,
        registry=metrics.registry)
    grpc = GrpcServerFactory({CERTIFY_PATH.encode("ascii"): handler}, MAX_MESSAGE_LENGTH, clock=reactor)
    tls = TLSMemoryBIOFactory(_H2ServerCreator(server_context_factory(store, require_client_cert=False)),
                              False, grpc)
    tls.noisy = False
    listener = Listener("identity", serverFromString(reactor, settings.listen), tls, settings.listen,
                        on_error=server.listen_failed)
    server.listeners.append(listener)
    listener.setServiceParent(server)

    control = log_level or LogLevelControl(settings.log_level)
    admin = AdminApp(metrics=metrics, readiness=server.readiness, config_dump=settings.redacted,
                     log_level=control, shutdown=server.shutdown, reactor=reactor)
    site = Site(admin.app.resource())
    site.noisy = False
    site.log = lambda request: None
    admin_listener = Listener("admin", serverFromString(reactor, settings.admin), site, settings.admin,
                              on_error=server.listen_failed)
    server.listeners.append(admin_listener)
    admin_listener.setServiceParent(server)
    server.metrics = metrics
    log.info("identity service {name} for trust domain {domain}: leaves of {lifetime:g} s, token review "
             "{review}", name=settings.identity_name, domain=settings.trust_domain, lifetime=settings.lifetime,
             review=settings.token_review)
    return server


def run(args, stderr=None):
    """
    Run C{serve} until SIGTERM, SIGINT or C{POST /shutdown}.

    @return: the exit status: 0 after a clean stop, 78 for a bad configuration, 1 when a listener cannot bind.
    """
    stderr = stderr or sys.stderr
    from twisted.internet import reactor
    try:
        settings = load_settings(args, reactor=reactor)
    except ConfigError as e:
        print(f"linkproxy-identity serve: {e}", file=stderr, flush=True)
        return EX_CONFIG
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from linkproxy.admin.loglevel import LogLevelControl
    control = LogLevelControl(settings.log_level, everything=True)
    globalLogBeginner.beginLoggingTo([control.observer(textFileLogObserver(stderr))],
                                     redirectStandardIO=False)
    try:
        server = make_identity_service(settings, reactor, control)
    except ca.IdentityError as e:
        log.critical("identity: {error}", error=str(e))
        return EX_CONFIG
    reactor.callWhenRunning(server.startService)
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
    return 1 if server.failed else 0

