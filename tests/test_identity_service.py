"""
Unit tests for the identity service and the proxy's side of it, without sockets: the hand-written
protobuf (checked against the protobuf runtime), gRPC framing, request checks, token reviews, the rate
limiter, the renewal schedule, the Certify handler, the store in identity-service mode, the proxy options,
and unary gRPC over h2 between in-memory protocols.
"""

import base64
import datetime
import json
import os
import random
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.config import ConfigError, parse_config
from linkproxy.core.backoff import Backoff
from linkproxy.identity import ca, certify, grpcwire, tokenreview
from linkproxy.identity.client import CERTIFY_PATH, make_csr, read_token
from linkproxy.identity.h2grpc import GrpcServerFactory, unary_call
from linkproxy.identity.messages import CertifyRequest, CertifyResponse, MessageError
from linkproxy.identity.renewal import RenewalSchedule
from linkproxy.identity.server import CertifyHandler
from linkproxy.identity.store import IdentityStore
from tests.identity_support import compiled_proto

TD = "linkproxy.local"
WEB = f"web.default.serviceaccount.identity.{TD}"
API = f"api.default.serviceaccount.identity.{TD}"


def _pb2():
    modules = compiled_proto()
    if modules is None:
        raise SkipTest("grpcio-tools is not installed")
    return modules[0]


class MessageTests(SynchronousTestCase):
    """
    The hand-written encoding of CertifyRequest and CertifyResponse agrees with the protobuf runtime, byte
    for byte on encoding and value for value on decoding.
    """

    def test_request_matches_runtime(self):
        """
        Requests with every field, none, and non-ASCII names encode as protobuf does, and decode what
        protobuf encodes.
        """
        pb2 = _pb2()
        for identity, token, csr in [(WEB, b"tok", b"\x30\x82csr"), ("", b"", b""), ("ñame", b"\x00" * 300, b"")]:
            ours = CertifyRequest(identity, token, csr)
            theirs = pb2.CertifyRequest(identity=identity, token=token, certificate_signing_request=csr)
            self.assertEqual(ours.encode(), theirs.SerializeToString())
            self.assertEqual(CertifyRequest.decode(theirs.SerializeToString()), ours)

    def test_response_matches_runtime(self):
        """
        Responses with intermediates (one empty), a timestamp with nanos, a negative one and a zero one
        (present but empty) round-trip both ways.
        """
        pb2 = _pb2()
        for intermediates, until in [((b"issuer", b"root"), (1796400000, 123456789)), ((b"",), (-5, 0)),
                                     ((), (0, 0)), ((), None)]:
            ours = CertifyResponse(b"leaf", intermediates, until)
            theirs = pb2.CertifyResponse(leaf_certificate=b"leaf", intermediate_certificates=list(intermediates))
            if until is not None:
                theirs.valid_until.seconds, theirs.valid_until.nanos = until
            self.assertEqual(ours.encode(), theirs.SerializeToString())
            self.assertEqual(CertifyResponse.decode(theirs.SerializeToString()), ours)

    def test_protobuf_merge_rules(self):
        """
        Decoding follows protobuf: the last scalar wins, repeated fields accumulate, embedded messages merge,
        and unknown fields (or known ones with another wire type) are skipped; the runtime agrees.
        """
        pb2 = _pb2()
        data = (b"\x0a\x01a" + b"\x08\x07" + b"\x0a\x01b" + b"\x15\x01\x02\x03\x04" + b"\x12\x02t1"
                + b"\x22\x03xyz" + b"\x1b\x08\x01\x1c" + b"\x1a\x01c")
        theirs = pb2.CertifyRequest()
        theirs.ParseFromString(data)
        ours = CertifyRequest.decode(data)
        self.assertEqual((ours.identity, ours.token, ours.certificate_signing_request),
                         (theirs.identity, theirs.token, theirs.certificate_signing_request))
        response = b"\x1a\x02\x08\x05" + b"\x12\x01x" + b"\x1a\x02\x10\x09" + b"\x12\x01y"
        theirs = pb2.CertifyResponse()
        theirs.ParseFromString(response)
        ours = CertifyResponse.decode(response)
        self.assertEqual(ours.valid_until, (theirs.valid_until.seconds, theirs.valid_until.nanos))
        self.assertEqual(ours.intermediate_certificates, tuple(theirs.intermediate_certificates))

    def test_malformed(self):
        """
        Truncated fields, bad lengths, invalid field numbers, end-group tags out of place and non-UTF-8
        identities are refused with MessageError; the runtime refuses them too.
        """
        pb2 = _pb2()
        from google.protobuf.message import DecodeError
        for data in (b"\x0a\x05ab", b"\x0a", b"\x80", b"\x00\x01", b"\x0c", b"\x0a\x02\xff\xfe",
                     b"\xff" * 11, b"\x1b\x0a\x01a"):
            self.assertRaises(MessageError, CertifyRequest.decode, data)
            self.assertRaises(DecodeError, pb2.CertifyRequest().ParseFromString, data)

    def test_timestamp(self):
        """
        valid_until is built from an aware datetime, and read back as seconds.
        """
        when = datetime.datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=datetime.timezone.utc)
        response = CertifyResponse(b"x", (), CertifyResponse.timestamp(when))
        self.assertEqual(response.valid_until, (int(when.timestamp()), 600000000))
        self.assertAlmostEqual(response.valid_until_seconds, when.timestamp())


class GrpcWireTests(SynchronousTestCase):
    """
    Framing and status of unary gRPC.
    """

    def test_frame_roundtrip(self):
        """One message, framed and unframed."""
        self.assertEqual(grpcwire.frame(b"abc"), b"\x00\x00\x00\x00\x03abc")
        self.assertEqual(grpcwire.unframe(grpcwire.frame(b"abc"), 10), b"abc")
        self.assertEqual(grpcwire.unframe(grpcwire.frame(b""), 10), b"")

    def test_unframe_refusals(self):
        """
        Truncated, doubled, oversized and compressed messages get the status a gRPC server gives them.
        """
        cases = [(b"\x00\x00", grpcwire.INTERNAL), (grpcwire.frame(b"ab")[:-1], grpcwire.INTERNAL),
                 (grpcwire.frame(b"a") * 2, grpcwire.INTERNAL), (grpcwire.frame(b"a" * 11), grpcwire.RESOURCE_EXHAUSTED),
                 (b"\x01\x00\x00\x00\x01a", grpcwire.UNIMPLEMENTED), (b"\x02\x00\x00\x00\x01a", grpcwire.INTERNAL)]
        for body, code in cases:
            e = self.assertRaises(grpcwire.GrpcError, grpcwire.unframe, body, 10)
            self.assertEqual(e.code, code, body)

    def test_status(self):
        """
        Trailers carry the code and a percent-encoded message, which parse_status reads back.
        """
        block = grpcwire.trailers(grpcwire.PERMISSION_DENIED, "token belongs to système:x\n100%")
        self.assertEqual(grpcwire.parse_status(block),
                         (grpcwire.PERMISSION_DENIED, "token belongs to système:x\n100%"))
        self.assertEqual(grpcwire.parse_status(grpcwire.response_headers()), None)
        self.assertEqual(grpcwire.parse_status([(b"grpc-status", b"x")]), (grpcwire.UNKNOWN, ""))


def _csr(name=WEB, key=None, sans=None, cn=None, hash_=None):
    key = key or ca.new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hash_ or hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class RequestCheckTests(SynchronousTestCase):
    """
    L{certify.check_request}: what is refused before any token review.
    """

    def check(self, identity=WEB, token=b"t", csr=None):
        return certify.check_request(CertifyRequest(identity, token, make_csr(WEB, ca.new_key()) if csr is None
                                                    else csr), TD)

    def refused(self, **kw):
        return self.assertRaises(certify.Refused, self.check, **kw)

    def test_accepted(self):
        """
        A DER or PEM CSR for the identity (as CN and SAN, or naming nothing) is accepted and split into
        account and namespace.
        """
        checked = self.check()
        self.assertEqual((checked.identity, checked.account, checked.namespace), (WEB, "web", "default"))
        pem = x509.load_der_x509_csr(make_csr(WEB, ca.new_key())).public_bytes(serialization.Encoding.PEM)
        self.assertEqual(self.check(csr=pem).identity, WEB)
        self.assertEqual(self.check(csr=_csr()).identity, WEB)
        self.assertEqual(self.check(csr=_csr(key=rsa.generate_private_key(65537, 2048))).identity, WEB)

    def test_identity(self):
        """
        An empty or malformed identity, or one of another trust domain, is INVALID_ARGUMENT.
        """
        for identity, reason in [("", "invalid_identity"), ("Web.default", "invalid_identity"),
                                 ("web.default.svc.cluster.local", "invalid_identity"),
                                 ("web.default.serviceaccount.identity.example.org", "foreign_trust_domain"),
                                 ("web.default.serviceaccount.identity.evil.linkproxy.local", "foreign_trust_domain")]:
            e = self.refused(identity=identity)
            self.assertEqual((e.code, e.reason), (grpcwire.INVALID_ARGUMENT, reason), identity)

    def test_token_required(self):
        """No token is UNAUTHENTICATED, before the CSR is even parsed."""
        e = self.refused(token=b"", csr=b"junk")
        self.assertEqual((e.code, e.reason), (grpcwire.UNAUTHENTICATED, "missing_token"))

    def test_csr(self):
        """
        Garbage, a broken signature, weak or exotic keys and CSRs asking for other names are
        INVALID_ARGUMENT, each with its own reason.
        """
        good = bytearray(make_csr(WEB, ca.new_key()))
        good[-3] ^= 1
        cases = [
            (b"junk", "invalid_csr"), (b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", "invalid_csr"),
            (bytes(good), "csr_signature"),
            (_csr(key=ec.generate_private_key(ec.SECP256K1())), "unsupported_key"),
            (_csr(key=rsa.generate_private_key(65537, 1024)), "unsupported_key"),
            (_csr(cn=API), "csr_names"),
            (_csr(sans=[x509.DNSName(WEB), x509.DNSName("example.com")]), "csr_names"),
            (_csr(sans=[x509.UniformResourceIdentifier("spiffe://x/y")]), "csr_names"),
        ]
        for csr, reason in cases:
            e = self.refused(csr=csr)
            self.assertEqual((e.code, e.reason), (grpcwire.INVALID_ARGUMENT, reason), reason)


class ReviewTests(SynchronousTestCase):
    """
    L{certify.check_review} and the reviewers' parsing.
    """

    def setUp(self):
        self.checked = certify.check_request(CertifyRequest(WEB, b"t", make_csr(WEB, ca.new_key())), TD)

    def test_verdicts(self):
        """
        The right service account for the audience passes; an invalid token or a missing audience is
        UNAUTHENTICATED; another account is PERMISSION_DENIED and says whose token it was.
        """
        aud = ("identity.linkproxy.io",)
        certify.check_review(self.checked, certify.TokenReview(True, "system:serviceaccount:default:web", aud),
                             aud[0])
        cases = [
            (certify.TokenReview(False, error="expired"), grpcwire.UNAUTHENTICATED, "expired"),
            (certify.TokenReview(True, "system:serviceaccount:default:web", ("other",)), grpcwire.UNAUTHENTICATED,
             "audience"),
            (certify.TokenReview(True, "system:serviceaccount:default:web", None), grpcwire.UNAUTHENTICATED,
             "audience"),
            (certify.TokenReview(True, "system:serviceaccount:other:web", aud), grpcwire.PERMISSION_DENIED,
             "system:serviceaccount:other:web"),
            (certify.TokenReview(True, "system:serviceaccount:default:api", aud), grpcwire.PERMISSION_DENIED,
             "default:api"),
            (certify.TokenReview(True, "alice", aud), grpcwire.PERMISSION_DENIED, "alice"),
        ]
        for review, code, fragment in cases:
            e = self.assertRaises(certify.Refused, certify.check_review, self.checked, review, aud[0])
            self.assertEqual(e.code, code, review)
            self.assertIn(fragment, e.message)

    def test_parse_review(self):
        """
        A TokenReview answer is read as the API reference shapes it; one without a status is no answer.
        """
        review = tokenreview.parse_review(json.dumps({"status": {
            "authenticated": True, "user": {"username": "system:serviceaccount:default:web"},
            "audiences": ["identity.linkproxy.io"]}}))
        self.assertEqual(review, certify.TokenReview(True, "system:serviceaccount:default:web",
                                                     ("identity.linkproxy.io",)))
        self.assertEqual(tokenreview.parse_review(b'{"status": {"authenticated": false, "error": "bad"}}'),
                         certify.TokenReview(False, error="bad"))
        for payload in (b"{}", b"nonsense", b'{"status": 3}'):
            self.assertRaises(tokenreview.ReviewUnavailable, tokenreview.parse_review, payload)

    def test_static_reviewer(self):
        """
        The static map authenticates its tokens for any audience, nothing else, and follows file changes.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("tok-web: system:serviceaccount:default:web\n")
        reviewer = tokenreview.StaticTokenReviewer(path)
        self.assertEqual(self.successResultOf(reviewer.review(b"tok-web", "aud")),
                         certify.TokenReview(True, "system:serviceaccount:default:web", ("aud",)))
        self.assertFalse(self.successResultOf(reviewer.review(b"tok-we", "aud")).authenticated)
        with open(path + ".new", "w") as f:
            f.write("tok-2: system:serviceaccount:default:api\n")
        os.replace(path + ".new", path)
        self.assertFalse(self.successResultOf(reviewer.review(b"tok-web", "aud")).authenticated)
        self.assertTrue(self.successResultOf(reviewer.review(b"tok-2", "aud")).authenticated)
        with open(path, "w") as f:
            f.write("[1, 2]")
        self.assertRaises(tokenreview.ConfigProblem, tokenreview.StaticTokenReviewer, path)

    def test_kubeconfig(self):
        """
        A kubeconfig gives the server, the CA (a file relative to it, or inline) and the token (inline or a
        file); an insecure or incomplete one is a configuration problem, and so is no cluster at all.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "ca.crt"), "wb") as f:
            f.write(b"PEM")
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(" from-file\n")

        def kubeconfig(cluster, user):
            path = os.path.join(directory, "config")
            with open(path, "w") as f:
                json.dump({"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                           "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}]}, f)
            return path

        api = tokenreview.kube_api_from_environment(
            kubeconfig({"server": "https://10.0.0.1:6443/", "certificate-authority": "ca.crt"}, {"tokenFile": "token"}),
            {})
        self.assertEqual((api.server, api.ca_pem, api.bearer()), ("https://10.0.0.1:6443", b"PEM", "from-file"))
        api = tokenreview.kube_api_from_environment(None, {"KUBECONFIG": kubeconfig(
            {"server": "https://k:1", "certificate-authority-data": base64.b64encode(b"X").decode()},
            {"token": "inline"})})
        self.assertEqual((api.ca_pem, api.bearer()), (b"X", "inline"))
        for cluster, user in [({"server": "http://k:1", "certificate-authority": "ca.crt"}, {"token": "t"}),
                              ({"server": "https://k:1", "insecure-skip-tls-verify": True}, {"token": "t"}),
                              ({"server": "https://k:1", "certificate-authority": "ca.crt"}, {})]:
            self.assertRaises(tokenreview.ConfigProblem, tokenreview.kube_api_from_environment,
                              kubeconfig(cluster, user), {})
        e = self.assertRaises(tokenreview.ConfigProblem, tokenreview.kube_api_from_environment, None, {})
        self.assertIn("KUBERNETES_SERVICE_HOST", str(e))
        api = tokenreview.kube_api_from_environment(
            None, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, directory)
        self.assertEqual((api.server, api.bearer()), ("https://[fd00::1]:443", "from-file"))


class RateLimiterTests(SynchronousTestCase):
    """
    L{certify.RateLimiter}: a bounded token bucket per identity.
    """

    def test_burst_and_refill(self):
        """
        A key gets its burst at once, then one request per period/burst; other keys are independent.
        """
        limiter = certify.RateLimiter(3, 60.0)
        self.assertEqual([limiter.allow("a", 0) for _ in range(4)], [True, True, True, False])
        self.assertTrue(limiter.allow("b", 0))
        self.assertAlmostEqual(limiter.retry_after("a", 0), 20.0)
        self.assertFalse(limiter.allow("a", 19.9))
        self.assertTrue(limiter.allow("a", 20.0))
        self.assertFalse(limiter.allow("a", 20.1))
        self.assertEqual([limiter.allow("a", 1000) for _ in range(4)], [True, True, True, False])
        self.assertEqual(limiter.retry_after("b", 1000), 0.0)

    def test_bounded(self):
        """
        No more than max_keys buckets are kept: full buckets go first, then the least recently used.
        """
        limiter = certify.RateLimiter(2, 10.0, max_keys=3)
        for key in "abcdef":
            limiter.allow(key, 0)
        self.assertLessEqual(len(limiter), 3)
        limiter.allow("x", 100)
        self.assertLessEqual(len(limiter), 3)
        self.assertRaises(ValueError, certify.RateLimiter, 0, 1)
        self.assertRaises(ValueError, certify.RateLimiter, 1, 0)


class RenewalScheduleTests(SynchronousTestCase):
    """
    L{RenewalSchedule}: renewal at 70 % of what is left, jittered backoff on failure, never past expiry.
    """

    def test_success(self):
        """A new leaf is renewed at 70 % of its remaining lifetime."""
        schedule = RenewalSchedule(random.Random(1))
        self.assertAlmostEqual(schedule.succeeded(1000.0, 1000.0 + 86400), 0.7 * 86400)
        self.assertEqual(schedule.succeeded(1000.0, 900.0), 0.0)

    def test_backoff_with_jitter(self):
        """
        Without a certificate, failures back off from 1 s, doubling to 60 s, each delay within its jitter
        bounds; a seeded generator gives the same delays, another seed others; a success starts over.
        """
        delays = []
        schedule = RenewalSchedule(random.Random(7))
        for attempt in range(10):
            delay = schedule.failed(0.0)
            low, high = schedule.backoff.bounds(attempt)
            self.assertTrue(low <= delay <= high, (attempt, delay))
            delays.append(delay)
        self.assertEqual(delays[-1] <= 60.0, True)
        again = RenewalSchedule(random.Random(7))
        self.assertEqual([again.failed(0.0) for _ in range(10)], delays)
        other = RenewalSchedule(random.Random(8))
        self.assertNotEqual([other.failed(0.0) for _ in range(10)], delays)
        schedule.succeeded(0.0, 10.0)
        self.assertLessEqual(schedule.failed(0.0), 1.5)

    def test_retries_fit_before_expiry(self):
        """
        With a valid certificate a retry waits at most half the time it has left (0.1 s at least), and
        those shortened retries do not grow the backoff for after the expiry.
        """
        schedule = RenewalSchedule(random.Random(3), backoff=Backoff(1.0, 60.0, 0.5))
        now, not_after = 0.0, 3.0
        while now < not_after:
            delay = schedule.failed(now, not_after)
            self.assertLessEqual(delay, max(0.1, (not_after - now) / 2) + 1e-9)
            now += delay
        self.assertGreater(schedule.attempts, 3)
        self.assertLessEqual(schedule.failed(now, not_after), schedule.backoff.bounds(schedule.failures - 1)[1])
        self.assertLess(schedule.failures, 4)

    def test_bad_fraction(self):
        """Fractions outside (0, 1) are refused."""
        self.assertRaises(ValueError, RenewalSchedule, random.Random(), 1.0)


class _Reviewer:
    def __init__(self, result):
        self.result = result
        self.calls = []

    def review(self, token, audience):
        self.calls.append((token, audience))
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


class CertifyHandlerTests(SynchronousTestCase):
    """
    L{CertifyHandler}: the whole decision for one request, on a clock.
    """

    def setUp(self):
        self.dir = self.mktemp()
        ca.init_trust_domain(self.dir)
        self.issuer, self.issuer_key = ca.load_issuer(self.dir)
        self.anchors = ca.load_certs(os.path.join(self.dir, "ca.pem"))
        self.clock = Clock()
        self.clock.advance(time.time())
        self.registry = CollectorRegistry()

    def handler(self, review, burst=5):
        self.reviewer = _Reviewer(review)
        self.registry = CollectorRegistry()
        return CertifyHandler(issuer_cert=self.issuer, issuer_key=self.issuer_key, intermediates=[self.issuer],
                              trust_domain=TD, reviewer=self.reviewer, audience="aud", lifetime=10.0,
                              limiter=certify.RateLimiter(burst, 3600), clock=self.clock, registry=self.registry)

    def call(self, handler, identity=WEB, token=b"tok"):
        key = ca.new_key()
        return key, handler(CertifyRequest(identity, token, make_csr(identity, key)).encode())

    def refused_count(self, reason):
        return self.registry.get_sample_value("identity_refused_total", {"reason": reason,
                                                                          "grpc_status": _status_of(reason)})

    def test_certifies(self):
        """
        A request whose token proves the identity gets a leaf for its key with only that SAN, lasting the
        configured 10 s from now, chained to the issuer; the reviewer was asked about the token and the
        audience; it is counted.
        """
        handler = self.handler(certify.TokenReview(True, "system:serviceaccount:default:web", ("aud",)))
        key, d = self.call(handler)
        response = CertifyResponse.decode(self.successResultOf(d))
        leaf = x509.load_der_x509_certificate(response.leaf_certificate)
        self.assertTrue(ca.key_matches(leaf, key))
        self.assertEqual(ca.dns_names(leaf), [WEB])
        self.assertEqual(leaf.not_valid_after_utc.timestamp(), int(self.clock.seconds() + 10))
        self.assertEqual(response.valid_until[0], int(leaf.not_valid_after_utc.timestamp()))
        self.assertEqual(response.intermediate_certificates, (self.issuer.public_bytes(serialization.Encoding.DER),))
        ca.verify_chain([leaf, self.issuer], self.anchors, self.clock.seconds())
        self.assertEqual(self.reviewer.calls, [(b"tok", "aud")])
        self.assertEqual(self.registry.get_sample_value("identity_certified_total"), 1)

    def test_refusals(self):
        """
        A refused review, another account, an unreachable reviewer and an exhausted rate become gRPC
        errors with their statuses, each counted by reason; the rate limit is checked before the reviewer
        is bothered, and malformed requests never reach it.
        """
        cases = [
            (certify.TokenReview(False, error="nope"), grpcwire.UNAUTHENTICATED, "token_rejected"),
            (certify.TokenReview(True, "system:serviceaccount:default:api", ("aud",)), grpcwire.PERMISSION_DENIED,
             "identity_mismatch"),
            (tokenreview.ReviewUnavailable("down"), grpcwire.UNAVAILABLE, "token_review_unavailable"),
            (RuntimeError("bug"), grpcwire.INTERNAL, "internal"),
        ]
        for review, code, reason in cases:
            _, d = self.call(self.handler(review))
            e = self.failureResultOf(d, grpcwire.GrpcError).value
            self.assertEqual(e.code, code, reason)
            self.assertEqual(self.refused_count(reason), 1, reason)
        self.flushLoggedErrors(RuntimeError)

        handler = self.handler(certify.TokenReview(True, "system:serviceaccount:default:web", ("aud",)), burst=1)
        self.successResultOf(self.call(handler)[1])
        e = self.failureResultOf(self.call(handler)[1], grpcwire.GrpcError).value
        self.assertEqual(e.code, grpcwire.RESOURCE_EXHAUSTED)
        self.assertEqual(len(self.reviewer.calls), 1)

        e = self.failureResultOf(handler(b"\x0a\x05ab"), grpcwire.GrpcError).value
        self.assertEqual((e.code, self.refused_count("invalid_request")), (grpcwire.INVALID_ARGUMENT, 1))
        e = self.failureResultOf(self.call(handler, identity="web.default.serviceaccount.identity.x.org")[1],
                                 grpcwire.GrpcError).value
        self.assertEqual(e.code, grpcwire.INVALID_ARGUMENT)
        self.assertEqual(len(self.reviewer.calls), 1)


def _status_of(reason):
    return str({"token_rejected": 16, "identity_mismatch": 7, "token_review_unavailable": 14, "internal": 13,
                "invalid_request": 3}[reason])


class _Certifier:
    """A stand-in for the identity service: each call waits for the test to answer it."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, key, anchors):
        d = defer.Deferred()
        self.calls.append((name, key, anchors, d))
        return d


class ServiceStoreTests(SynchronousTestCase):
    """
    L{IdentityStore} with a C{certify} function: the proxy's side of the identity service, on a clock.
    """

    def setUp(self):
        self.domain = self.mktemp()
        ca.init_trust_domain(self.domain)
        self.issuer, self.issuer_key = ca.load_issuer(self.domain)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        with open(os.path.join(self.domain, "ca.pem"), "rb") as src, open(os.path.join(self.dir, "ca.pem"), "wb") as dst:
            dst.write(src.read())
        self.clock = Clock()
        # Whole seconds: certificates keep no fractions, and the schedule is checked to the second.
        self.clock.advance(int(time.time()))
        self.metrics = Metrics(process=False)
        self.certifier = _Certifier()
        self.store = IdentityStore(self.dir, WEB, reactor=self.clock, metrics=self.metrics, certify=self.certifier,
                                   random=random.Random(5))
        self.addCleanup(self.store.stop)

    def sample(self, name):
        return self.metrics.registry.get_sample_value(name)

    def answer(self, lifetime=10.0, name=WEB, key=None):
        _, requested_key, _, d = self.certifier.calls[-1]
        checked = certify.CheckedRequest(name, name.split(".")[0], "default",
                                         x509.load_der_x509_csr(make_csr(name, key or requested_key)))
        leaf = certify.sign(checked, self.issuer, self.issuer_key, self.clock.seconds(), lifetime)
        d.callback([leaf, self.issuer])
        return leaf

    def test_first_certificate_and_renewal(self):
        """
        Start asks for a certificate at once and is not ready until it comes; the key stays in memory;
        renewal comes at 70 % of the remaining lifetime with a new key; the metrics follow.
        """
        self.assertIsNone(self.store.start())
        self.assertFalse(self.store.ready)
        self.assertIn("not certified yet", self.store.not_ready_reason())
        self.assertEqual(len(self.certifier.calls), 1)
        name, key, anchors, _ = self.certifier.calls[0]
        self.assertEqual((name, len(anchors)), (WEB, 1))
        leaf = self.answer()
        self.assertIsNone(self.store.not_ready_reason())
        self.assertEqual(self.store.current.leaf, leaf)
        self.assertIs(self.store.current.key, key)
        self.assertEqual(os.listdir(self.dir), ["ca.pem"])
        self.assertEqual(self.sample("identity_cert_refreshes_total"), 1)
        self.assertEqual(self.sample("identity_cert_refresh_total"), 1)
        self.assertEqual(self.sample("identity_cert_expiration_timestamp_seconds"), self.store.current.not_after)
        self.assertEqual(self.sample("identity_cert_refresh_timestamp_seconds"), self.clock.seconds())

        self.clock.advance(6.9)
        self.assertEqual(len(self.certifier.calls), 1)
        self.clock.advance(0.2)
        self.assertEqual(len(self.certifier.calls), 2)
        self.assertIsNot(self.certifier.calls[1][1], key)
        self.answer()
        self.assertEqual(self.store.current.generation, 2)
        self.assertEqual(self.sample("identity_cert_refreshes_total"), 2)

    def test_failures_keep_the_old_certificate(self):
        """
        While the service fails, the old certificate stays in use and ready until it expires, retries come
        with backoff, each is counted; after the expiry /ready says so; a later success recovers.
        """
        self.store.start()
        first = self.answer()
        self.clock.advance(7.0)
        attempts = 0
        while self.clock.seconds() < first.not_valid_after_utc.timestamp() - 0.01:
            if len(self.certifier.calls) > attempts + 1:
                attempts = len(self.certifier.calls) - 1
                self.certifier.calls[-1][3].errback(grpcwire.GrpcError(grpcwire.UNAVAILABLE, "down"))
                self.assertEqual(self.store.current.leaf, first)
                self.assertIsNone(self.store.not_ready_reason())
            self.clock.advance(0.05)
        self.assertGreaterEqual(self.sample("identity_cert_refresh_failures_total"), 3)
        self.clock.advance(0.1)
        self.assertIn("expired", self.store.not_ready_reason())
        self.clock.advance(120)
        self.answer()
        self.assertIsNone(self.store.not_ready_reason())

    def test_wrong_answers_refused(self):
        """
        A certificate for another key or another name, or from another trust domain, is not installed; the
        store retries.
        """
        self.store.start()
        self.answer(key=ca.new_key())
        self.assertIsNone(self.store.current)
        self.clock.advance(2)
        self.answer(name=API)
        self.assertIsNone(self.store.current)
        self.clock.advance(4)
        other = self.mktemp()
        ca.init_trust_domain(other)
        self.issuer, self.issuer_key = ca.load_issuer(other)
        self.answer()
        self.assertIsNone(self.store.current)
        self.assertEqual(self.sample("identity_cert_refresh_failures_total"), 3)

    def test_anchor_reload(self):
        """
        A new ca.pem is used for the current identity (a new generation with the same leaf) and for the next
        request; the leaf counters do not move.
        """
        self.store.start()
        self.answer()
        other = self.mktemp()
        anchor = ca.init_trust_domain(other)
        with open(os.path.join(self.dir, "ca.pem"), "ab") as f:
            f.write(anchor.public_bytes(serialization.Encoding.PEM))
        self.clock.advance(5.1)
        self.assertEqual(len(self.store.current.anchors), 2)
        self.assertEqual(self.store.current.generation, 2)
        self.assertEqual(self.sample("identity_cert_refreshes_total"), 1)
        self.clock.advance(5)
        self.assertEqual(len(self.certifier.calls[-1][2]), 2)

    def test_start_checks(self):
        """
        A missing ca.pem, or a certifier whose check fails (no token), is an error at start.
        """
        os.remove(os.path.join(self.dir, "ca.pem"))
        self.assertRaises(ca.IdentityError, self.store.start)

        class Checked(_Certifier):
            def check(self):
                read_token("/nonexistent/token")
        store = IdentityStore(self.domain, WEB, reactor=self.clock, certify=Checked())
        e = self.assertRaises(ca.IdentityError, store.start)
        self.assertIn("/nonexistent/token", str(e))

    def test_issuer_key_unused(self):
        """
        A proxy whose directory still holds an issuer key does not use it with an identity service, and
        says so.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store = IdentityStore(self.domain, WEB, reactor=self.clock, certify=self.certifier)
        self.addCleanup(store.stop)
        store.start()
        self.assertIsNone(store.current)
        self.assertEqual(len([e for e in logged if "is not used with an identity service" in e.get("log_format", "")]), 1)

    def test_expired_files_not_ready(self):
        """
        Without an identity service too, /ready's reason turns to "expired" once the leaf's notAfter has
        passed (a cert.pem nobody renewed).
        """
        ca.issue_leaf(self.domain, WEB, lifetime=100)
        store = IdentityStore(self.domain, WEB, reactor=self.clock)
        self.addCleanup(store.stop)
        store.start()
        self.assertIsNone(store.not_ready_reason())
        self.clock.advance(100)
        self.assertIn("expired", store.not_ready_reason())

    def test_stop(self):
        """stop() cancels the request in flight and every timer."""
        self.store.start()
        self.store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.certifier.calls[0][3].called)
        self.assertIsNone(self.store.current)


class ProxyOptionTests(SynchronousTestCase):
    """
    The proxy's identity-service options, from every source, checked together.
    """

    def test_sources(self):
        """
        Each option has an environment twin and a YAML key; the service name defaults from the trust domain.
        """
        env = {"LINKPROXY_IDENTITY_SERVICE": "identity.linkproxy.svc:8080",
               "LINKPROXY_IDENTITY_TOKEN_FILE": "/var/run/secrets/tokens/linkproxy-identity"}
        config = parse_config({}, env, {"identity_dir": "/id", "identity_name": WEB})
        self.assertEqual(config.identity_service, "identity.linkproxy.svc:8080")
        self.assertEqual(config.identity_service_name, f"identity.linkproxy.serviceaccount.identity.{TD}")
        config = parse_config({"identity_service_name": "identity.x.serviceaccount.identity.linkproxy.local"}, {}, {
            "identity_dir": "/id", "identity_name": WEB, "identity_service": "10.0.0.1:8080",
            "identity_token_file": "/t"})
        self.assertEqual(config.identity_service_name, "identity.x.serviceaccount.identity.linkproxy.local")
        self.assertEqual(config.redacted()["identity_service"], "10.0.0.1:8080")

    def test_errors_at_once(self):
        """
        A service without a name, directory and token, and a token or service name without a service, are
        all reported in one error.
        """
        e = self.assertRaises(ConfigError, parse_config, {"identity_service": "h:1"}, {}, None)
        self.assertEqual(len(e.problems), 2)
        self.assertIn("--identity-name", e.problems[0])
        self.assertIn("--identity-token-file", e.problems[1])
        e = self.assertRaises(ConfigError, parse_config, {}, {"LINKPROXY_IDENTITY_TOKEN_FILE": "/t",
                                                            "LINKPROXY_IDENTITY_SERVICE_NAME": WEB}, None)
        self.assertEqual(len(e.problems), 2)
        self.assertTrue(all("only used with an identity service" in p for p in e.problems))
        e = self.assertRaises(ConfigError, parse_config, {"identity_service": "h:1", "identity_dir": "/d",
                                                          "identity_name": "web", "identity_token_file": "/t"}, {}, None)
        self.assertIn("--identity-service-name", str(e))


class _MemoryEndpoint:
    """An endpoint whose connections go to a server factory in memory; the test pumps the bytes."""

    def __init__(self, server_factory, clock):
        self._server_factory = server_factory
        self._clock = clock
        self.pump = None

    def connect(self, factory):
        client = factory.buildProtocol(None)
        server = self._server_factory.buildProtocol(None)
        self.pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                                  greet=False, clock=self._clock)
        return defer.succeed(client)


class H2GrpcTests(SynchronousTestCase):
    """
    The h2 glue: L{unary_call} against L{GrpcServerFactory}, in memory.
    """

    def setUp(self):
        self.clock = Clock()
        self.statuses = []

    def call(self, handler, message=b"hello", path=CERTIFY_PATH, max_message=1024):
        server = GrpcServerFactory({CERTIFY_PATH.encode(): handler}, max_message, on_status=self.statuses.append,
                                   clock=self.clock)
        endpoint = _MemoryEndpoint(server, self.clock)
        d = unary_call(self.clock, endpoint, "identity.test", path, message, max_message=max_message, timeout=10)
        endpoint.pump.flush()
        return d, endpoint

    def test_roundtrip(self):
        """A message goes to the handler and its answer comes back; large answers respect flow control."""
        seen = []

        def handler(message):
            seen.append(message)
            return defer.succeed(message * 20000)
        d, _ = self.call(handler, max_message=200000)
        self.assertEqual(self.successResultOf(d), b"hello" * 20000)
        self.assertEqual((seen, self.statuses), ([b"hello"], [grpcwire.OK]))

    def test_errors(self):
        """
        A handler's GrpcError reaches the caller with its code and message; an unknown method is
        UNIMPLEMENTED; an oversized request RESOURCE_EXHAUSTED.
        """
        def refuse(message):
            return defer.fail(grpcwire.GrpcError(grpcwire.PERMISSION_DENIED, "not yours: ñ"))
        d, _ = self.call(refuse)
        e = self.failureResultOf(d, grpcwire.GrpcError).value
        self.assertEqual((e.code, e.message), (grpcwire.PERMISSION_DENIED, "not yours: ñ"))
        d, _ = self.call(refuse, path="/other/Method")
        self.assertEqual(self.failureResultOf(d, grpcwire.GrpcError).value.code, grpcwire.UNIMPLEMENTED)
        d, _ = self.call(refuse, message=b"x" * 2000)
        self.assertEqual(self.failureResultOf(d, grpcwire.GrpcError).value.code, grpcwire.RESOURCE_EXHAUSTED)

    def test_deadline(self):
        """A handler that never answers is a DEADLINE_EXCEEDED after the timeout."""
        d, _ = self.call(lambda message: defer.Deferred())
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertEqual(self.failureResultOf(d, grpcwire.GrpcError).value.code, grpcwire.DEADLINE_EXCEEDED)


class ManifestTests(SynchronousTestCase):
    """
    C{deploy/kubernetes/}: the identity service's manifests and the sidecar snippet agree with the code.
    """

    def load(self, name):
        import yaml
        from tests.proc import ROOT
        with open(os.path.join(ROOT, "deploy", "kubernetes", name)) as f:
            return [doc for doc in yaml.safe_load_all(f) if doc]

    def test_identity_service(self):
        """
        The service's account may only create tokenreviews; it runs serve with the Kubernetes token review
        for the audience proxies' tokens carry, and mounts the issuer Secret; its account and namespace
        give the identity proxies expect by default.
        """
        from linkproxy.identity.server import DEFAULT_AUDIENCE
        docs = {(d["kind"], d["metadata"]["name"]): d for d in self.load("identity.yaml")}
        role = docs[("ClusterRole", "linkproxy-identity")]
        self.assertEqual(role["rules"], [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                                          "verbs": ["create"]}])
        binding = docs[("ClusterRoleBinding", "linkproxy-identity")]
        self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": "identity",
                                                "namespace": "linkproxy"}])
        pod = docs[("Deployment", "linkproxy-identity")]["spec"]["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], "identity")
        args = pod["containers"][0]["args"]
        self.assertEqual(args[:2], ["linkproxy-identity", "serve"])
        self.assertEqual(args[args.index("--token-review") + 1], "kubernetes")
        self.assertEqual(args[args.index("--audience") + 1], DEFAULT_AUDIENCE)
        self.assertEqual(pod["volumes"][0]["secret"]["secretName"], "linkproxy-identity-issuer")
        secret = self.load("issuer-secret.yaml")[0]
        self.assertEqual(sorted(secret["stringData"]), ["ca.pem", "issuer-key.pem", "issuer.pem"])

    def test_sidecar(self):
        """
        The sidecar's environment is a valid proxy configuration for the identity service; its projected
        token is for the service's audience; no Secret (so no issuer key) is mounted in the application pod.
        """
        from linkproxy.identity.server import DEFAULT_AUDIENCE
        docs = self.load("sidecar.yaml")
        deployment = [d for d in docs if d["kind"] == "Deployment"][0]
        pod = deployment["spec"]["template"]["spec"]
        sidecar = [c for c in pod["containers"] if c["name"] == "linkproxy"][0]
        values = {"POD_NAMESPACE": deployment["metadata"]["namespace"], "POD_SERVICE_ACCOUNT": pod["serviceAccountName"]}
        env = {}
        for item in sidecar["env"]:
            if "value" in item:
                value = item["value"]
                for name, known in values.items():
                    value = value.replace(f"$({name})", known)
                env[item["name"]] = value
        config = parse_config({}, env, None)
        self.assertEqual(config.identity_name, WEB)
        self.assertEqual(config.identity_service_name, f"identity.linkproxy.serviceaccount.identity.{TD}")
        self.assertEqual(deployment["spec"]["template"]["metadata"]["annotations"]["linkproxy.io/identity"], WEB)
        for volume in pod["volumes"]:
            self.assertNotIn("secret", volume)
        projected = [v for v in pod["volumes"] if "projected" in v][0]["projected"]["sources"][0]["serviceAccountToken"]
        self.assertEqual(projected["audience"], DEFAULT_AUDIENCE)
        mount = [m for m in sidecar["volumeMounts"] if m["name"] == "linkproxy-identity-token"][0]["mountPath"]
        self.assertEqual(os.path.join(mount, projected["path"]), config.identity_token_file)
