"""
A small development CA: a trust anchor, an intermediate issuer, and leaf certificates for identity names.

Identity names are DNS-like: C{<account>.<namespace>.serviceaccount.identity.<trust-domain>}.

Layout of an identity directory::

    ca.pem          trust anchor(s), PEM; what peers verify against
    ca-key.pem      the anchor's key (0600); only C{init} needs it
    issuer.pem      intermediate issuer, signed by the anchor, name-constrained to the trust domain
    issuer-key.pem  the issuer's key (0600); a proxy that has it can issue its own leaf
    cert.pem        a leaf followed by the issuer (the chain a peer needs)
    key.pem         the leaf's key (0600)

The functions that build certificates are pure: they take keys, names and times and return objects. Only
L{init_trust_domain} and L{issue_leaf} touch the filesystem.
"""

import datetime
import os
import re
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "linkproxy.local"
DEFAULT_LEAF_LIFETIME = datetime.timedelta(hours=24)
CA_LIFETIME = datetime.timedelta(days=365)
# Leaves start a minute in the past so that a peer whose clock is slightly behind still accepts them.
BACKDATE = datetime.timedelta(minutes=1)

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
ISSUER_FILE = "issuer.pem"
ISSUER_KEY_FILE = "issuer-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

_IDENTITY_INFIX = ".serviceaccount.identity."
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# X.520 caps commonName at 64 characters; longer identity names live only in the SAN.
_MAX_CN = 64


class IdentityError(Exception):
    """
    An expected problem with identity material: a missing or malformed file, a bad name, a refusal to
    overwrite. The message is one line, fit to show an operator.
    """


def _utc(value):
    """
    @param value: an aware or naive (taken as UTC) C{datetime}, a unix timestamp, or C{None} for now.
    @return: an aware UTC C{datetime}.
    """
    if value is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc)
    return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)


def _delta(value):
    """
    @param value: a C{timedelta} or a number of seconds.
    @return: a C{timedelta}.
    """
    if isinstance(value, datetime.timedelta):
        return value
    return datetime.timedelta(seconds=float(value))


def check_dns_name(name):
    """
    Check that C{name} is a lower-case DNS name.

    @raise IdentityError: if it is not.
    """
    if not isinstance(name, str) or not name or len(name) > 253:
        raise IdentityError(f"invalid identity name {name!r}: must be a DNS name of at most 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise IdentityError(
                f"invalid identity name {name!r}: label {label!r} is not a lower-case DNS label")


def check_trust_domain(trust_domain):
    """
    @raise IdentityError: if C{trust_domain} is not a DNS name.
    """
    try:
        check_dns_name(trust_domain)
    except IdentityError:
        raise IdentityError(f"invalid trust domain {trust_domain!r}: must be a lower-case DNS name") from None


def parse_identity_name(name):
    """
    Split an identity name into its parts.

    @param name: C{<account>.<namespace>.serviceaccount.identity.<trust-domain>}.
    @return: C{(account, namespace, trust_domain)}.
    @raise IdentityError: if C{name} does not have that shape.
    """
    check_dns_name(name)
    head, sep, trust_domain = name.partition(_IDENTITY_INFIX)
    if not sep or not trust_domain or "." not in head:
        raise IdentityError(
            f"invalid identity name {name!r}: expected "
            "<account>.<namespace>.serviceaccount.identity.<trust-domain>")
    # Service account names may contain dots; the namespace is the last label before the infix.
    account, _, namespace = head.rpartition(".")
    return account, namespace, trust_domain


def new_key():
    """
    @return: a fresh ECDSA P-256 private key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def _public(key):
    # A private key or, for a leaf signed from a CSR, the public key itself.
    return key.public_key() if hasattr(key, "public_key") else key


def _ski(key):
    return x509.SubjectKeyIdentifier.from_public_key(_public(key))


def _aki(issuer_cert):
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_key_usage():
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False)


def make_anchor(trust_domain, key, now=None, lifetime=CA_LIFETIME):
    """
    Build a self-signed trust anchor for a trust domain.

    @param trust_domain: e.g. C{"linkproxy.local"}; the subject is C{CN=root.<trust_domain>}.
    @param key: the anchor's private key.
    @param now: start of validity (C{datetime} or unix timestamp); defaults to the current time.
    @param lifetime: C{timedelta} or seconds.
    @return: an L{x509.Certificate}.
    """
    check_trust_domain(trust_domain)
    start = _utc(now)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"root.{trust_domain}")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _delta(lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key), critical=False)
        .sign(key, hashes.SHA256())
    )


def make_issuer(anchor_cert, anchor_key, trust_domain, key, now=None, lifetime=CA_LIFETIME):
    """
    Build an intermediate issuer signed by the anchor.

    It may only sign leaves (path length 0), and only for names inside the trust domain (a DNS name
    constraint), so a leaked development issuer key cannot mint certificates for arbitrary hosts.

    @param anchor_cert: the anchor's certificate.
    @param anchor_key: the anchor's private key.
    @param trust_domain: the trust domain; the subject is C{CN=identity.<trust_domain>}.
    @param key: the issuer's private key.
    @param now: start of validity; defaults to the current time.
    @param lifetime: C{timedelta} or seconds; capped at the anchor's own expiry.
    @return: an L{x509.Certificate}.
    """
    check_trust_domain(trust_domain)
    start = _utc(now)
    end = min(start + _delta(lifetime), anchor_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"identity.{trust_domain}")]))
        .issuer_name(anchor_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(trust_domain)], excluded_subtrees=None),
            critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(_aki(anchor_cert), critical=False)
        .sign(anchor_key, hashes.SHA256())
    )


def make_leaf(issuer_cert, issuer_key, name, key, not_before, lifetime=DEFAULT_LEAF_LIFETIME):
    """
    Build a leaf certificate for an identity name. Pure: nothing is written.

    The leaf is usable on both sides of a mesh connection (EKU serverAuth and clientAuth); its DNS SAN is
    the identity name, which is what peers verify. Its CN repeats the name when it fits in 64 characters.

    @param issuer_cert: the issuer's certificate.
    @param issuer_key: the issuer's private key.
    @param name: the identity name (a DNS name).
    @param key: the leaf's private key (only its public half is used), or its public key.
    @param not_before: start of validity, C{datetime} or unix timestamp. Callers usually pass "now minus
        a minute" (see L{BACKDATE}).
    @param lifetime: C{timedelta} or seconds; C{notAfter = not_before + lifetime}.
    @return: an L{x509.Certificate}.
    """
    check_dns_name(name)
    start = _utc(not_before)
    span = _delta(lifetime)
    if span <= datetime.timedelta(0):
        raise IdentityError(f"leaf lifetime must be positive, not {span}")
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= _MAX_CN else [])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(_public(key))
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + span)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        # RFC 5280: the SAN must be critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=not len(subject))
        .add_extension(_ski(key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def dns_names(cert):
    """
    @return: the DNS SAN entries of C{cert}, as a list of C{str} (empty if it has no SAN).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def trust_domain_of(issuer_cert):
    """
    The trust domain an issuer serves: its DNS name constraint, or failing that its C{identity.<td>} CN.

    @return: the trust domain, or C{None} if the issuer does not say.
    """
    try:
        nc = issuer_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        nc = None
    if nc is not None and nc.permitted_subtrees:
        names = [n.value for n in nc.permitted_subtrees if isinstance(n, x509.DNSName)]
        if len(names) == 1:
            return names[0].lstrip(".")
    for attr in issuer_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if attr.value.startswith("identity."):
            return attr.value[len("identity."):]
    return None


# --- reading -----------------------------------------------------------------------------------------


def load_certs(path):
    """
    Read every certificate in a PEM file.

    @raise IdentityError: if the file is missing, unreadable, or holds no valid certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise IdentityError(f"{path} does not hold valid PEM certificates") from None
    if not certs:
        raise IdentityError(f"{path} holds no certificate")
    return certs


def load_key(path):
    """
    Read an unencrypted PEM private key.

    @raise IdentityError: if the file is missing, unreadable, or not a usable key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{path} does not hold a valid unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        # Keys we issue are ECDSA; RSA is accepted for certificates made by other tools.
        raise IdentityError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def key_matches(cert, key):
    """
    @return: C{True} if C{key} is the private half of C{cert}'s public key.
    """
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


# --- writing -----------------------------------------------------------------------------------------


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_atomic(path, data, mode):
    """
    Write via a temporary file and a rename, so that a reader (the store's poller) sees either the old or
    the new content, never half of it.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def init_trust_domain(directory, trust_domain=DEFAULT_TRUST_DOMAIN, now=None):
    """
    Create a trust domain in C{directory}: C{ca.pem}/C{ca-key.pem} (the anchor, valid one year) and
    C{issuer.pem}/C{issuer-key.pem} (the intermediate that signs leaves). Key files are mode 0600.

    @param directory: created (0700) if absent.
    @param trust_domain: a DNS name.
    @param now: start of validity (C{datetime} or unix timestamp); defaults to the current time.
    @return: the anchor certificate.
    @raise IdentityError: if the directory already holds a CA or issuer, or cannot be written.
    """
    check_trust_domain(trust_domain)
    paths = [os.path.join(directory, n) for n in (CA_FILE, CA_KEY_FILE, ISSUER_FILE, ISSUER_KEY_FILE)]
    for path in paths:
        if os.path.lexists(path):
            raise IdentityError(f"{path} already exists; refusing to overwrite a trust domain")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        start = _utc(now)
        anchor_key = new_key()
        anchor = make_anchor(trust_domain, anchor_key, start)
        issuer_key = new_key()
        issuer = make_issuer(anchor, anchor_key, trust_domain, issuer_key, start)
        # Keys first: a reader that finds ca.pem may assume the rest of the domain exists.
        _write_atomic(paths[1], _key_pem(anchor_key), 0o600)
        _write_atomic(paths[3], _key_pem(issuer_key), 0o600)
        _write_atomic(paths[2], _pem(issuer), 0o644)
        _write_atomic(paths[0], _pem(anchor), 0o644)
    except OSError as e:
        raise IdentityError(f"cannot write trust domain in {directory}: {e.strerror or e}") from None
    return anchor


def load_issuer(directory):
    """
    @return: C{(issuer_cert, issuer_key)} from C{issuer.pem} and C{issuer-key.pem}.
    @raise IdentityError: if either is missing or invalid, or they do not match.
    """
    cert_path = os.path.join(directory, ISSUER_FILE)
    key_path = os.path.join(directory, ISSUER_KEY_FILE)
    issuer = load_certs(cert_path)[0]
    key = load_key(key_path)
    if not key_matches(issuer, key):
        raise IdentityError(f"{key_path} is not the key of {cert_path}")
    return issuer, key


def issue_leaf(directory, name, lifetime=DEFAULT_LEAF_LIFETIME, now=None):
    """
    Issue a leaf for C{name} with the directory's issuer and write C{cert.pem} (leaf + issuer) and
    C{key.pem} (0600), replacing any previous leaf atomically.

    @param name: an identity name inside the issuer's trust domain.
    @param lifetime: C{timedelta} or seconds.
    @param now: issue time (C{datetime} or unix timestamp); C{notBefore} is a minute earlier.
    @return: the leaf certificate.
    @raise IdentityError: for a malformed name, a name outside the trust domain, or a missing issuer.
    """
    _, _, domain = parse_identity_name(name)
    issuer, issuer_key = load_issuer(directory)
    expected = trust_domain_of(issuer)
    if expected is not None and domain != expected:
        raise IdentityError(
            f"identity name {name!r} is not in this issuer's trust domain {expected!r}")
    key = new_key()
    leaf = make_leaf(issuer, issuer_key, name, key, _utc(now) - BACKDATE, lifetime)
    try:
        # Key before certificate: a poller that sees the new cert.pem finds its key already in place.
        _write_atomic(os.path.join(directory, KEY_FILE), _key_pem(key), 0o600)
        _write_atomic(os.path.join(directory, CERT_FILE), _pem(leaf) + _pem(issuer), 0o644)
    except OSError as e:
        raise IdentityError(f"cannot write leaf in {directory}: {e.strerror or e}") from None
    return leaf


# --- verifying and describing ------------------------------------------------------------------------


def verify_chain(chain, anchors, at=None):
    """
    Verify a leaf and its intermediates against trust anchors, as OpenSSL will during a handshake.

    @param chain: certificates, leaf first.
    @param anchors: trusted root certificates.
    @param at: the verification time (C{datetime} or unix timestamp); defaults to now.
    @raise IdentityError: if the chain does not verify, with OpenSSL's reason.
    """
    from OpenSSL import crypto

    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_time(_utc(at).replace(tzinfo=None))
    ctx = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(chain[0]),
        [crypto.X509.from_cryptography(c) for c in chain[1:]])
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as e:
        raise IdentityError(f"certificate chain does not verify: {e}") from None


def _label(cert):
    names = dns_names(cert)
    if names:
        return ", ".join(names)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cns[0].value if cns else cert.subject.rfc4514_string() or "(empty subject)"


def _fingerprint(cert):
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


def describe(directory, now=None):
    """
    Summarise an identity directory for C{linkproxy-identity show}.

    @param now: the time used to mark expired certificates and to verify the leaf's chain.
    @return: several lines of text (no trailing newline).
    @raise IdentityError: if the directory holds no C{ca.pem}.
    """
    at = _utc(now)
    lines = []
    ca_path = os.path.join(directory, CA_FILE)
    anchors = load_certs(ca_path)

    def entry(role, cert):
        after = cert.not_valid_after_utc
        state = "EXPIRED" if after <= at else f"expires in {_human(after - at)}"
        lines.append(f"{role}: {_label(cert)}")
        lines.append(f"  issuer: {_label_name(cert.issuer)}")
        lines.append(f"  valid: {cert.not_valid_before_utc.isoformat()} .. {after.isoformat()} ({state})")
        lines.append(f"  serial: {cert.serial_number:x}  sha256: {_fingerprint(cert)}")

    for anchor in anchors:
        entry("trust anchor", anchor)
    issuer_path = os.path.join(directory, ISSUER_FILE)
    if os.path.exists(issuer_path):
        issuer = load_certs(issuer_path)[0]
        entry("issuer", issuer)
        domain = trust_domain_of(issuer)
        if domain:
            lines.append(f"  trust domain: {domain}")
    cert_path = os.path.join(directory, CERT_FILE)
    if os.path.exists(cert_path):
        chain = load_certs(cert_path)
        entry("leaf", chain[0])
        lines.append("  chain: " + " -> ".join(_label(c) for c in chain) + " -> (ca.pem)")
        try:
            verify_chain(chain, anchors, at)
        except IdentityError as e:
            lines.append(f"  verification: FAILED ({e})")
        else:
            lines.append("  verification: ok")
    else:
        lines.append("leaf: none (no cert.pem)")
    return "\n".join(lines)


def _label_name(name):
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cns[0].value if cns else name.rfc4514_string()


def _human(delta):
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m"
