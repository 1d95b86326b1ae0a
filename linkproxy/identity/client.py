"""
The proxy's side of the identity service: ask it to sign a CSR for this proxy's key.

L{ServiceCertifier} is what L{linkproxy.identity.store.IdentityStore} calls in identity-service mode. Each
call reads the token afresh (projected service-account tokens rotate), makes a CSR for the key the store
generated in memory, and calls C{Certify} over TLS, verifying the service's certificate against the trust
anchors and its name against the configured service identity.
"""

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from linkproxy.identity import grpcwire
from linkproxy.identity.ca import IdentityError
from linkproxy.identity.h2grpc import unary_call
from linkproxy.identity.messages import MAX_MESSAGE_LENGTH, CertifyRequest, CertifyResponse, MessageError

__all__ = ["CERTIFY_PATH", "ServiceCertifier", "make_csr", "read_token"]

#: The method path of C{io.linkerd.proxy.identity.Identity/Certify}.
CERTIFY_PATH = "/io.linkerd.proxy.identity.Identity/Certify"

# A projected token is a JWT of a kilobyte or two.
_MAX_TOKEN = 64 * 1024


def make_csr(name, key):
    """
    @param name: the identity name, put in the CSR as its CN (when it fits) and its only DNS SAN.
    @param key: the private key that signs the CSR.
    @return: the CSR, DER (as Linkerd's proxies send it).
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64 else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def read_token(path):
    """
    @return: the token in C{path}, without surrounding whitespace.
    @raise IdentityError: if it cannot be read or is empty.
    """
    try:
        with open(path, "rb") as f:
            token = f.read(_MAX_TOKEN + 1).strip()
    except OSError as e:
        raise IdentityError(f"cannot read identity token {path}: {e.strerror or e}") from None
    if not token:
        raise IdentityError(f"identity token {path} is empty")
    if len(token) > _MAX_TOKEN:
        raise IdentityError(f"identity token {path} is larger than {_MAX_TOKEN} bytes")
    return token


class ServiceCertifier:
    """
    Calls the identity service for a store.

    @ivar address: C{(host, port)} of the service.
    @ivar service_name: the identity the service must prove.
    @ivar token_file: where the token is read from at every call.
    """

    def __init__(self, address, service_name, token_file, *, reactor=None, timeout=10.0):
        """
        @param address: C{(host, port)}.
        @param timeout: seconds for each call, connecting included.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.address = address
        self.service_name = service_name
        self.token_file = token_file
        self._reactor = reactor
        self._timeout = timeout

    def check(self):
        """
        What start-up checks: that the token can be read now.

        @raise IdentityError: if it cannot.
        """
        read_token(self.token_file)

    def _endpoint(self, anchors):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates

        roots = trustRootFromCertificates(
            [Certificate.loadPEM(a.public_bytes(serialization.Encoding.PEM)) for a in anchors])
        # optionsForClientTLS checks the service's certificate names service_name (service_identity), sends
        # it as SNI, and offers h2 by ALPN as gRPC requires.
        creator = optionsForClientTLS(self.service_name, trustRoot=roots, acceptableProtocols=[b"h2"])
        host, port = self.address
        return wrapClientTLS(creator, HostnameEndpoint(self._reactor, host, port, timeout=self._timeout))

    def __call__(self, name, key, anchors):
        """
        Certify C{key} for C{name}.

        @param name: the identity name.
        @param key: the private key (it never leaves this process; only a CSR is sent).
        @param anchors: the trust anchors the service's certificate must chain to.
        @return: a Deferred firing with the chain (L{x509.Certificate}s, leaf first), or failing with
            L{IdentityError} (no token) or L{grpcwire.GrpcError}.
        """
        from twisted.internet import defer
        try:
            token = read_token(self.token_file)
            request = CertifyRequest(name, token, make_csr(name, key)).encode()
            endpoint = self._endpoint(anchors)
        except Exception:
            return defer.fail()
        d = unary_call(self._reactor, endpoint, self.service_name, CERTIFY_PATH, request,
                       max_message=MAX_MESSAGE_LENGTH, timeout=self._timeout)
        return d.addCallback(_chain)


def _chain(message):
    try:
        response = CertifyResponse.decode(message)
        chain = [x509.load_der_x509_certificate(response.leaf_certificate)]
        chain += [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates]
    except (MessageError, ValueError) as e:
        raise grpcwire.GrpcError(grpcwire.INTERNAL, f"the identity service answered nonsense: {e}") from None
    return chain
