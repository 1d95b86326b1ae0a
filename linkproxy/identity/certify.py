"""
What the identity service decides, without I/O: whether a C{Certify} request is well formed, whether a token
review proves the identity asked for, whether an identity has asked too often, and the leaf it gets.

Every refusal is a L{Refused} carrying a gRPC status, a short reason (the C{reason} label of the refusal
counter) and a one-line message for the caller. Time is always a parameter.
"""

import datetime
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from linkproxy.identity import ca, grpcwire

__all__ = [
    "Refused", "CheckedRequest", "TokenReview", "RateLimiter", "parse_csr", "check_request", "check_review",
    "service_account_username", "sign",
]

# Keys a proxy may ask a leaf for: what TLS 1.3 peers (linkproxy's and Linkerd's) all verify.
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_MIN_BITS, _RSA_MAX_BITS = 2048, 8192


class Refused(Exception):
    """
    A request the service will not sign.

    @ivar code: the gRPC status code.
    @ivar reason: a short label for metrics, e.g. C{"token_rejected"}.
    @ivar message: what the caller is told.
    """

    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class CheckedRequest:
    """
    A request that passed every check that needs no token review.

    @ivar identity: the identity name.
    @ivar account: its service account.
    @ivar namespace: its namespace.
    @ivar csr: the parsed L{x509.CertificateSigningRequest}.
    """

    identity: str
    account: str
    namespace: str
    csr: x509.CertificateSigningRequest


@dataclass(frozen=True)
class TokenReview:
    """
    What a token reviewer found, in the shape of a Kubernetes C{TokenReview} status.

    @ivar authenticated: whether the token is valid at all.
    @ivar username: who it belongs to, e.g. C{system:serviceaccount:default:web}.
    @ivar audiences: the audiences the token is valid for, or C{None} when the reviewer does not say.
    @ivar error: the reviewer's reason when the token is not valid.
    """

    authenticated: bool
    username: str = ""
    audiences: Optional[Tuple[str, ...]] = None
    error: str = ""


def service_account_username(namespace, account):
    """
    @return: the Kubernetes username of a service account: C{system:serviceaccount:NS:NAME}.
    """
    return f"system:serviceaccount:{namespace}:{account}"


def parse_csr(data):
    """
    @param data: a PKCS#10 request, DER or PEM.
    @return: an L{x509.CertificateSigningRequest}.
    @raise Refused: C{INVALID_ARGUMENT} if it is neither.
    """
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise Refused(grpcwire.INVALID_ARGUMENT, "invalid_csr",
                      "certificate_signing_request is not a PKCS#10 request (DER or PEM)") from None


def _check_key(public):
    if isinstance(public, ec.EllipticCurvePublicKey):
        if isinstance(public.curve, _EC_CURVES):
            return
        raise Refused(grpcwire.INVALID_ARGUMENT, "unsupported_key",
                      f"unsupported elliptic curve {public.curve.name}: use P-256 or P-384")
    if isinstance(public, rsa.RSAPublicKey):
        if _RSA_MIN_BITS <= public.key_size <= _RSA_MAX_BITS:
            return
        raise Refused(grpcwire.INVALID_ARGUMENT, "unsupported_key",
                      f"RSA key of {public.key_size} bits: use {_RSA_MIN_BITS} to {_RSA_MAX_BITS}")
    raise Refused(grpcwire.INVALID_ARGUMENT, "unsupported_key",
                  f"unsupported key type {type(public).__name__}: use ECDSA P-256 or P-384, or RSA")


def _check_csr_names(csr, identity):
    """
    A CSR may name the identity (as CN or DNS SAN) or nothing; the leaf carries only the identity either way,
    but a CSR asking for something else is a confused or hostile caller, better told than silently narrowed.
    """
    for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if attr.value != identity:
            raise Refused(grpcwire.INVALID_ARGUMENT, "csr_names",
                          f"the CSR's common name {attr.value!r} is not the identity {identity!r}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError:
        raise Refused(grpcwire.INVALID_ARGUMENT, "invalid_csr", "the CSR's extensions are malformed") from None
    for name in san:
        if not isinstance(name, x509.DNSName) or name.value != identity:
            raise Refused(grpcwire.INVALID_ARGUMENT, "csr_names",
                          f"the CSR asks for {name.value!r}; only the identity {identity!r} can be certified")


def check_request(request, trust_domain):
    """
    Every check on a request that needs neither the token reviewer nor the clock.

    @param request: a L{linkproxy.identity.messages.CertifyRequest}.
    @param trust_domain: the trust domain this service issues for.
    @return: a L{CheckedRequest}.
    @raise Refused: C{INVALID_ARGUMENT} for a malformed identity, one outside the trust domain, or a bad CSR
        (unparseable, a signature that does not match its key, an unsupported key, other names);
        C{UNAUTHENTICATED} when there is no token.
    """
    identity = request.identity
    if not identity:
        raise Refused(grpcwire.INVALID_ARGUMENT, "invalid_identity", "identity is empty")
    try:
        account, namespace, domain = ca.parse_identity_name(identity)
    except ca.IdentityError as e:
        raise Refused(grpcwire.INVALID_ARGUMENT, "invalid_identity", str(e)) from None
    if domain != trust_domain:
        raise Refused(grpcwire.INVALID_ARGUMENT, "foreign_trust_domain",
                      f"identity {identity!r} is not in this service's trust domain {trust_domain!r}")
    if not request.token:
        raise Refused(grpcwire.UNAUTHENTICATED, "missing_token", "no token was sent to prove the identity")
    csr = parse_csr(request.certificate_signing_request)
    try:
        public = csr.public_key()
    except (ValueError, TypeError):
        raise Refused(grpcwire.INVALID_ARGUMENT, "unsupported_key", "the CSR's public key cannot be read") from None
    _check_key(public)
    if not csr.is_signature_valid:
        raise Refused(grpcwire.INVALID_ARGUMENT, "csr_signature",
                      "the CSR's signature does not match its public key")
    _check_csr_names(csr, identity)
    return CheckedRequest(identity, account, namespace, csr)


def check_review(checked, review, audience):
    """
    Whether a token review proves the identity of a checked request.

    @param checked: a L{CheckedRequest}.
    @param review: the L{TokenReview} of its token.
    @param audience: the audience the service asked the token to be valid for, or C{None}.
    @raise Refused: C{UNAUTHENTICATED} for a token that is invalid or not meant for this audience;
        C{PERMISSION_DENIED} for a valid token of another service account.
    """
    if not review.authenticated:
        detail = f": {review.error}" if review.error else ""
        raise Refused(grpcwire.UNAUTHENTICATED, "token_rejected", f"the token is not valid{detail}")
    # The TokenReview API's own advice: a client that asks for audiences checks that one came back, so that
    # an API server that ignores audiences cannot pass a token minted for something else.
    if audience and (review.audiences is None or audience not in review.audiences):
        raise Refused(grpcwire.UNAUTHENTICATED, "token_audience",
                      f"the token is not valid for the audience {audience!r}")
    expected = service_account_username(checked.namespace, checked.account)
    # Constant time: the username is not secret, but there is no reason to leak how much of it matched.
    if not hmac.compare_digest(review.username.encode("utf-8"), expected.encode("utf-8")):
        raise Refused(grpcwire.PERMISSION_DENIED, "identity_mismatch",
                      f"the token belongs to {review.username or 'nobody'!s}, not {expected} "
                      f"(identity {checked.identity})")


class RateLimiter:
    """
    A token bucket per key: C{burst} requests at once, refilled at C{burst} per C{period} seconds.

    Memory is bounded: at most C{max_keys} buckets are kept; a full bucket is the same as no bucket and is
    the first to go, then the least recently used.
    """

    def __init__(self, burst, period, max_keys=10000):
        """
        @param burst: requests a key may make at once (at least 1).
        @param period: seconds in which C{burst} tokens come back.
        @param max_keys: buckets kept at most.
        """
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        if not period > 0:
            raise ValueError(f"period must be positive, not {period!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self.burst = float(burst)
        self.rate = float(burst) / float(period)
        self.max_keys = max_keys
        self._buckets = OrderedDict()

    def __len__(self):
        return len(self._buckets)

    def _level(self, key, now):
        level, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + max(0.0, now - then) * self.rate)

    def allow(self, key, now):
        """
        Take one token for C{key} if there is one.

        @param now: the current time in seconds.
        @return: C{True} if the request may go ahead.
        """
        level = self._level(key, now)
        if level < 1.0:
            self._buckets[key] = (level, now)
            self._buckets.move_to_end(key)
            return False
        self._buckets[key] = (level - 1.0, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._evict(now)
        return True

    def retry_after(self, key, now):
        """
        @return: seconds until C{key} has a token again (0 if it has one now).
        """
        return max(0.0, (1.0 - self._level(key, now)) / self.rate)

    def _evict(self, now):
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


def sign(checked, issuer_cert, issuer_key, now, lifetime):
    """
    Sign the leaf for a request that passed every check.

    @param checked: a L{CheckedRequest}.
    @param now: the current time, a unix timestamp.
    @param lifetime: seconds from C{now} to the leaf's notAfter. Its notBefore is L{ca.BACKDATE} earlier
        than C{now}, for peers whose clocks are slightly behind, without shortening the lifetime.
    @return: the leaf, an L{x509.Certificate}, whose only SAN is the identity.
    """
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc) - ca.BACKDATE
    return ca.make_leaf(issuer_cert, issuer_key, checked.identity, checked.csr.public_key(), start,
                        ca.BACKDATE + datetime.timedelta(seconds=float(lifetime)))
