"""
mTLS between proxies: OpenSSL contexts that follow an L{IdentityStore}.

Contexts are built once per identity generation and cached; connections are cheap and are made per use.
When the store installs a new identity, the next connection gets a context with the new certificate, while
connections already open keep the context (and certificate) they were made with.

Both sides speak TLS 1.3 only and verify the peer's chain against the store's trust anchors. The client
also checks, during the handshake, that the server's certificate names the identity it meant to reach
(with service_identity), and fails the handshake otherwise.

What runs over the connection is the caller's business, and so is ALPN: each side takes the protocols to
offer (client) or select (server), and offers or selects none by default. The mesh passes
C{transport.l5d.io/v1} (see L{linkproxy.net.mesh}).
"""

import weakref

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.identity.ca import IdentityError, check_dns_name, dns_names

_log = Logger()


class IdentityNotReady(IdentityError):
    """The identity store has no identity yet, so no TLS connection can be made."""


class PeerIdentityMismatch(Exception):
    """
    The server's certificate chain is trusted, but it names another identity than the one we dialled.

    @ivar expected: the identity the client asked for.
    @ivar presented: the DNS names in the server's certificate, comma-separated (or C{"no DNS name"}).
    """

    def __init__(self, expected, presented):
        super().__init__(f"server certificate is for {presented}, not {expected}")
        self.expected = expected
        self.presented = presented


def _current(store):
    identity = store.current
    if identity is None:
        raise IdentityNotReady(f"identity {store.name} is not ready")
    return identity


def _make_context(identity):
    """
    The parts every mesh context shares: TLS 1.3 only, our chain and key, and the trust anchors.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    # Resumed sessions skip certificate verification and would outlive a rotation or a revoked trust
    # anchor; between proxies, connections are pooled, so full handshakes are rare enough to afford.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.use_certificate(identity.chain[0])
    for intermediate in identity.chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(identity.key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    for anchor in identity.anchors:
        store.add_cert(_x509(anchor))
    return ctx


def _x509(cert):
    return crypto.X509.from_cryptography(cert)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerContextFactory:
    """
    Server-side TLS for the inbound proxy; see L{server_context_factory}.
    """

    def __init__(self, store, require_client_cert, alpn=()):
        self._store = store
        self._require = require_client_cert
        self._alpn = tuple(alpn)
        self._identity = None
        self._context = None

    def getContext(self):
        """
        @return: the C{SSL.Context} for the store's current identity (rebuilt when it changes).
        @raise IdentityNotReady: if the store has no identity yet.
        """
        identity = _current(self._store)
        if identity is not self._identity:
            ctx = _make_context(identity)
            mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
            if self._require:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode)
            # The session id context is part of OpenSSL's contract for verifying servers, even with the
            # cache off; without it a client offering a session gets a hard failure.
            ctx.set_session_id(b"linkproxy-inbound")
            for anchor in identity.anchors:
                # Tell clients (openssl s_client, curl) which CAs we accept, so they pick the right cert.
                ctx.add_client_ca(anchor)
            if self._alpn:
                ctx.set_alpn_select_callback(_alpn_selector(self._alpn))
            self._context, self._identity = ctx, identity
        return self._context

    def serverConnectionForTLS(self, tlsProtocol):
        """
        @return: a new C{SSL.Connection} on the current context.
        """
        return SSL.Connection(self.getContext(), None)


def server_context_factory(store, *, require_client_cert, alpn=()):
    """
    Build the inbound side of mesh TLS.

    @param store: an L{IdentityStore}; its current identity supplies the certificate, key and anchors.
    @param require_client_cert: if C{True}, a client without a certificate fails the handshake; if
        C{False}, a client certificate is optional, but one that is presented must verify.
    @param alpn: the ALPN protocols to select, in order of preference: the first of them the client offers is
        selected. A client that offers none of them (or no ALPN at all) is not refused; the handshake goes on
        with no protocol negotiated. Empty (the default): ALPN is ignored.
    @return: an object for C{TLSMemoryBIOFactory(factory, False, wrapped)} (it provides
        C{IOpenSSLServerConnectionCreator} and C{IOpenSSLContextFactory}).
    """
    return ServerContextFactory(store, bool(require_client_cert), alpn)


def _alpn_selector(protocols):
    """
    An ALPN select callback choosing the first of C{protocols} the client offered, or none.
    """

    def select(connection, offered):
        for protocol in protocols:
            if protocol in offered:
                return protocol
        # Not an alert: a client that offers other protocols only is served as one that offers none.
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


# Client contexts depend only on the identity (and the ALPN list), not on the server name, so one per store
# generation serves every upstream; the name check is attached to each connection instead.
# store -> {alpn: (identity, context)}
_CLIENT_CONTEXTS = weakref.WeakKeyDictionary()


def _client_context(store, alpn):
    identity = _current(store)
    contexts = _CLIENT_CONTEXTS.get(store)
    if contexts is None:
        contexts = _CLIENT_CONTEXTS[store] = {}
    cached = contexts.get(alpn)
    if cached is not None and cached[0] is identity:
        return cached[1]
    ctx = _make_context(identity)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    contexts[alpn] = (identity, ctx)
    return ctx


def _name_checker(tlsProtocol, server_identity):
    """
    A verify callback that, on top of OpenSSL's chain verdict, requires the leaf to name C{server_identity}.
    On a mismatch the handshake fails, and C{tlsProtocol} is told why, so the application sees a
    L{PeerIdentityMismatch} rather than a bare "certificate verify failed".
    """
    # Drop the protocol once used: the callback lives as long as the SSL.Connection, which the protocol
    # itself holds.
    ref = [tlsProtocol]

    def verify(connection, x509, errno, depth, ok):
        if not ok or depth != 0:
            return bool(ok)
        try:
            verify_certificate_hostname(x509.to_cryptography(), server_identity)
            return True
        except (VerificationError, CertificateError):
            presented = ", ".join(dns_names(x509.to_cryptography())) or "no DNS name"
            _log.warn("TLS peer is {presented}, expected {expected}", presented=presented,
                      expected=server_identity)
            protocol = ref[0]
            ref[0] = None
            fail = getattr(protocol, "failVerification", None)
            if fail is not None:
                fail(Failure(PeerIdentityMismatch(server_identity, presented)))
            return False
        except Exception:
            # An exception escaping an OpenSSL callback is swallowed; log it and fail closed.
            _log.failure("while verifying the identity of {expected}", expected=server_identity)
            return False

    return verify


@implementer(IOpenSSLClientConnectionCreator)
class ClientConnectionCreator:
    """
    Client-side TLS to one meshed server identity; see L{client_connection_creator}.

    @ivar server_identity: the identity the server must prove.
    @ivar alpn: the ALPN protocols offered, in order of preference (a tuple, maybe empty).
    """

    def __init__(self, store, server_identity, alpn=()):
        self._store = store
        self.server_identity = server_identity
        self.alpn = tuple(alpn)
        self._sni = server_identity.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol):
        """
        @return: a new C{SSL.Connection} with SNI and per-connection identity verification.
        """
        connection = SSL.Connection(_client_context(self._store, self.alpn), None)
        connection.set_tlsext_host_name(self._sni)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _name_checker(tlsProtocol, self.server_identity))
        return connection


def client_connection_creator(store, server_identity, *, alpn=()):
    """
    Build the outbound side of mesh TLS to one server identity.

    @param store: an L{IdentityStore}; supplies our client certificate and the trust anchors.
    @param server_identity: the identity name the server must present (also sent as SNI).
    @param alpn: the ALPN protocols to offer, in order of preference; empty (the default) offers none. What
        the server chose is the transport's C{negotiatedProtocol} after the handshake.
    @return: an C{IOpenSSLClientConnectionCreator} for C{TLSMemoryBIOFactory(creator, True, wrapped)} or
        C{wrapClientTLS(creator, endpoint)}.
    @raise IdentityError: if C{server_identity} is not a DNS name.
    """
    check_dns_name(server_identity)
    return ClientConnectionCreator(store, server_identity, alpn)


def peer_identity(transport):
    """
    The identity of the verified peer of a TLS connection.

    @param transport: a C{TLSMemoryBIOProtocol} (the transport an application protocol sees) or an
        C{OpenSSL.SSL.Connection}.
    @return: the DNS SAN of the peer's leaf certificate if the peer presented one and it was verified
        against the trust anchors, else C{None}. (For a client connection, the name was also checked
        during the handshake; see L{client_connection_creator}.)
    """
    connection = transport if isinstance(transport, SSL.Connection) else None
    if connection is None:
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, SSL.Connection):
            return None
        connection = handle
    # Only a connection that demanded verification can vouch for the peer: an unverified certificate is
    # just a claim.
    if not connection.get_verify_mode() & SSL.VERIFY_PEER:
        return None
    chain = connection.get_verified_chain(as_cryptography=True)
    if not chain:
        return None
    names = dns_names(chain[0])
    return names[0] if names else None
