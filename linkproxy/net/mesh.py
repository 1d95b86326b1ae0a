"""
The wire between proxies: mTLS plus Linkerd's transport header, on both ends.

Outbound, L{MeshConnector.connect} is the L{linkproxy.net.connect.Connector} hook for meshed endpoints: TCP to
the endpoint's inbound proxy, TLS with SNI set to the endpoint's identity and ALPN offering
C{transport.l5d.io/v1}, the transport header as the first plaintext bytes when the server selected that
protocol, and only then the caller's protocol. Its Deferred fires once the server has proved the identity the
client dialled; a wrong identity, an untrusted chain or a timeout fail it, and the caller's protocol is then
never connected (just as with a refused TCP connect).

Inbound, L{MeshServer} terminates mTLS for connections whose ClientHello names this proxy's identity, and
selects C{transport.l5d.io/v1} when the client offers it. It is plugged in where protocol detection hands a
connection over (L{linkproxy.net.sniff.SniffingProtocol}): L{MeshServer.protocol} returns the protocol that
takes the connection. After the handshake it reads the transport header (required when the ALPN was
negotiated; recognised by its preface otherwise, as from a linkproxy that predates the ALPN), and calls
C{on_ready(peer, header)} for the protocol that gets the plaintext stream, handing over the same way detection
does: C{makeConnection}, the bytes read so far, then every event.

As in linkerd2-proxy, the client writes the header exactly when C{transport.l5d.io/v1} was negotiated, and
the server then requires it. Unlike linkerd2-proxy's inbound (which refuses direct connections without the
ALPN), the server keeps serving clients that negotiated nothing as before: a header recognised by its preface
is read, and without one the stream is detected (see C{docs/wire-protocol.md}).

Both ends use L{MeshTLSTransport} (from L{linkproxy.net.twisted_private}), Twisted's TLS transport taught TLS 1.3
half-close, so that opaque TCP keeps its half-close semantics across the mesh (a client's EOF arrives as
C{readConnectionLost}, and the answer can still flow back).

L{authz_metrics} counts inbound policy decisions (L{linkproxy.core.policy.authorize}); L{AuthorizingRouter}
applies one to HTTP requests.
"""

import weakref

from OpenSSL.SSL import Error as SSLError
from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.core import transport_header
from linkproxy.core.detect import Protocol as Detected
from linkproxy.core.endpoint import format_address
from linkproxy.net.connect import client_endpoint
from linkproxy.net.context import PeerInfo
from linkproxy.net.tls import (
    IdentityNotReady,
    PeerIdentityMismatch,
    client_connection_creator,
    peer_identity,
    server_context_factory,
)
from linkproxy.net.twisted_private import MeshTLSTransport, install_direct_write

__all__ = [
    "MeshConnector", "MeshServer", "MeshTLSTransport", "TRANSPORT_HEADER_ALPN", "tls_error_label",
]

log = Logger(namespace="linkproxy.net.mesh")

#: The ALPN protocol that says a transport header follows the handshake (linkerd2-proxy's
#: C{transport_header::PROTOCOL}); the preface starts with it.
TRANSPORT_HEADER_ALPN = b"transport.l5d.io/v1"
_MESH_ALPN = (TRANSPORT_HEADER_ALPN,)

#: Plaintext a protocol may receive before it is handed over; only a misbehaving peer gets near it.
_MAX_EARLY = transport_header.MAX_HEADER_LENGTH + 64 * 1024

# X509 verification results (openssl/x509_vfy.h) that mean "not issued by anyone we trust".
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27, 28, 29})
_NOT_YET_VALID, _EXPIRED = 9, 10


def tls_error_label(failure, verify_error=None):
    """
    A short, bounded label for why a TLS handshake failed, for C{tcp_protocol_error_total{error}}.

    @param failure: what the TLS layer reported to the protocol.
    @param verify_error: the X509 verification error code OpenSSL gave for the peer's chain, if any.
    @return: one of C{identity_mismatch}, C{no_client_cert}, C{cert_expired}, C{cert_not_yet_valid},
        C{untrusted}, C{cert_invalid}, C{peer_rejected}, C{version}, C{eof}, C{handshake}.
    """
    if failure.check(PeerIdentityMismatch):
        return "identity_mismatch"
    if not failure.check(SSLError):
        return "eof"
    text = str(failure.value).lower()
    if "did not return a certificate" in text:
        return "no_client_cert"
    if "certificate verify failed" in text:
        if verify_error == _EXPIRED:
            return "cert_expired"
        if verify_error == _NOT_YET_VALID:
            return "cert_not_yet_valid"
        if verify_error in _UNTRUSTED:
            return "untrusted"
        return "cert_invalid"
    if "alert" in text:
        if "protocol version" in text:
            return "version"
        # The peer refused us: our certificate, or the lack of one.
        return "peer_rejected"
    if "version" in text or "unsupported protocol" in text or "no protocols available" in text:
        return "version"
    return "handshake"


class _MeshTLSFactory(TLSMemoryBIOFactory):
    protocol = MeshTLSTransport
    noisy = False


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


# --- handing a TLS stream to the next protocol ------------------------------------------------------------

_WAITING, _DELEGATING, _CLOSED = "waiting", "delegating", "closed"


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class _Relay(Protocol):
    """
    The protocol inside a L{MeshTLSTransport} that, once it is ready, hands the plaintext stream to the next
    protocol and passes every event on, half-closes included (the pattern of L{SniffingProtocol}).
    """

    _state = _WAITING
    _next = None
    _read_lost = False
    _write_lost = False

    def _hand_over(self, proto, buffered=b""):
        """
        Connect C{proto} to this TLS transport, give it C{buffered}, then delegate everything to it.
        """
        self._next = proto
        self._state = _DELEGATING
        proto.makeConnection(self.transport)
        # connectionMade may already have ended things.
        if self._state == _DELEGATING and buffered:
            proto.dataReceived(buffered)
        if self._state == _DELEGATING and self._read_lost:
            self._deliver_read_lost()
        if self._state == _DELEGATING and self._write_lost:
            half = IHalfCloseableProtocol(proto, None)
            if half is not None:
                half.writeConnectionLost()

    def dataReceived(self, data):
        if self._state == _DELEGATING:
            self._next.dataReceived(data)
        elif self._state == _WAITING:
            self._early(data)

    def _early(self, data):
        """
        Plaintext before the hand-over; subclasses decide.
        """

    def handshakeCompleted(self):
        """
        Subclasses act on the verified handshake.
        """

    def readConnectionLost(self):
        if self._state == _DELEGATING:
            self._deliver_read_lost()
        elif self._state == _WAITING:
            self._read_lost = True
            self._early_eof()

    def _early_eof(self):
        """
        The peer closed its side before the hand-over; subclasses decide.
        """
        self.transport.loseConnection()

    def _deliver_read_lost(self):
        half = IHalfCloseableProtocol(self._next, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self._state == _DELEGATING:
            half = IHalfCloseableProtocol(self._next, None)
            if half is not None:
                half.writeConnectionLost()
        else:
            self._write_lost = True

    def connectionLost(self, reason=None):
        if self._state == _DELEGATING:
            self._state = _CLOSED
            proto, self._next = self._next, None
            proto.connectionLost(reason)
        elif self._state == _WAITING:
            self._state = _CLOSED
            self._lost_early(reason)

    def _lost_early(self, reason):
        """
        The connection ended before the hand-over; subclasses decide.
        """


# --- outbound ---------------------------------------------------------------------------------------------


class _ClientSide(_Relay):
    """
    Inside the client TLS transport: after the handshake, writes the transport header first if the server
    selected C{transport.l5d.io/v1}, then hands over.
    """

    def __init__(self, attempt):
        self._attempt = attempt

    def handshakeCompleted(self):
        alpn = self.transport.negotiatedProtocol
        if alpn == TRANSPORT_HEADER_ALPN:
            # Written here, not queued at connectionMade: Twisted calls handshakeCompleted before it flushes
            # writes queued during the handshake, so the protocol handed over below would otherwise overtake
            # the header.
            self.transport.write(self._attempt.header)
        self._attempt.handshake_done(self, alpn)

    def _early(self, data):
        # Only reachable if the server sent data the instant the handshake completed and the hand-over did
        # not happen; it cannot be delivered anywhere sensible.
        self.transport.abortConnection()

    def _early_eof(self):
        self.transport.loseConnection()

    def _lost_early(self, reason):
        self._attempt.lost(reason)


class _Attempt:
    """
    One outbound meshed connection attempt: TCP, TLS, identity, header, hand-over; one timer for all of it.
    """

    def __init__(self, connector, endpoint, protocol, header, creator):
        self._connector = connector
        self._endpoint = endpoint
        self._protocol = protocol
        self.header = header
        self._creator = creator
        self._connecting = None
        self._tls = None
        self._timed_out = False
        self._cancelled = False
        self._timer = None
        self.result = Deferred(self._cancel)

    def start(self):
        c = self._connector
        self._timer = c._reactor.callLater(c._timeout, self._expire)
        side = _ClientSide(self)
        factory = _MeshTLSFactory(self._creator, True, _OneShot(side), clock=c._reactor)
        tcp = client_endpoint(c._reactor, self._endpoint.proxy, c._timeout)
        self._connecting = tcp.connect(factory)
        self._connecting.addCallbacks(self._tcp_connected, self._tcp_failed)
        return self.result

    def _tcp_connected(self, tls):
        self._connecting = None
        self._tls = tls
        # TLS records go straight to the socket when nothing is queued (see install_direct_write).
        install_direct_write(tls.transport)
        return None

    def _tcp_failed(self, failure):
        self._connecting = None
        if self._timed_out:
            failure = Failure(error.TimeoutError(f"connecting to {self._endpoint.identity} timed out"))
        self._finish(failure)

    def handshake_done(self, side, alpn):
        if self.result.called:
            side.transport.abortConnection()
            return
        self._stop_timer()
        # The handshake cannot finish without the verify callback accepting the name; this guards against a
        # connection creator that forgot to ask for a certificate at all.
        if peer_identity(side.transport) is None:
            side.transport.abortConnection()
            self._finish(Failure(PeerIdentityMismatch(self._endpoint.identity, "no verified certificate")))
            return
        log.debug("mTLS to {identity} at {proxy}: ALPN {alpn}, transport header {sent}",
                  identity=self._endpoint.identity, proxy=format_address(self._endpoint.proxy),
                  alpn=_alpn_name(alpn), sent="sent" if alpn == TRANSPORT_HEADER_ALPN else "not sent")
        protocol, self._protocol = self._protocol, None
        side._hand_over(protocol)
        self.result.callback(protocol)

    def lost(self, reason):
        if self._timed_out:
            reason = Failure(error.TimeoutError(f"TLS handshake with {self._endpoint.identity} timed out"))
        elif not self._cancelled:
            self._connector._count_error(reason, self._tls)
            log.info("mTLS to {identity} at {proxy} failed: {error}", identity=self._endpoint.identity,
                     proxy=format_address(self._endpoint.proxy), error=reason.getErrorMessage())
        self._finish(reason)

    def _expire(self):
        self._timer = None
        self._timed_out = True
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._tls is not None:
            self._tls.abortConnection()

    def _cancel(self, result):
        # The caller gave up (its own timeout, or the client went away): tear down whatever is in progress.
        self._cancelled = True
        self._stop_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._tls is not None:
            self._tls.abortConnection()

    def _stop_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _finish(self, failure):
        self._stop_timer()
        self._protocol = None
        if not self.result.called:
            self.result.errback(failure)


def _alpn_name(alpn):
    return alpn.decode("ascii", "replace") if alpn else "none"


class MeshConnector:
    """
    Opens meshed connections: mTLS to an endpoint's inbound proxy offering ALPN C{transport.l5d.io/v1}, and
    the transport header first when the server selects it.

    Install it as C{Connector(reactor, timeout, meshed=MeshConnector(store, reactor, timeout).connect)}.
    """

    _MAX_CREATORS = 1024

    def __init__(self, store, reactor, connect_timeout, *, metrics=None):
        """
        @param store: this proxy's L{linkproxy.identity.store.IdentityStore}; it supplies the client
            certificate and the trust anchors, and may rotate under live connections.
        @param reactor: an C{IReactorTCP} and C{IReactorTime}.
        @param connect_timeout: seconds for TCP connect and TLS handshake together.
        @param metrics: a L{linkproxy.admin.metrics.Metrics}; if given, failed handshakes are counted in
            C{tcp_protocol_error_total{direction="outbound",protocol="tls"}}.
        """
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, not {connect_timeout!r}")
        self._store = store
        self._reactor = reactor
        self._timeout = connect_timeout
        self._metrics = metrics
        self._creators = {}

    def _creator(self, identity):
        creator = self._creators.get(identity)
        if creator is None:
            creator = client_connection_creator(self._store, identity, alpn=_MESH_ALPN)
            if len(self._creators) >= self._MAX_CREATORS:
                # Identities churn only with deployments; starting over is simpler than an LRU.
                self._creators.clear()
            self._creators[identity] = creator
        return creator

    def _count_error(self, reason, tls):
        if self._metrics is not None:
            label = tls_error_label(reason, getattr(tls, "verify_error", None))
            self._metrics.tcp_protocol_error_total.labels("outbound", "tls", label).inc()

    def connect(self, endpoint, protocol, session_protocol=None):
        """
        Connect C{protocol} to a meshed C{endpoint} through its inbound proxy.

        @param endpoint: a meshed L{linkproxy.core.endpoint.Endpoint} (C{identity} and C{proxy} set).
        @param protocol: an unconnected C{IProtocol}; its first write follows the transport header, which is
            sent when the server selected ALPN C{transport.l5d.io/v1}, and only then, as linkerd2-proxy does.
        @param session_protocol: C{"http1"}, C{"http2"} or L{None} (opaque), for the header.
        @return: a Deferred firing with C{protocol}, connected, once the handshake completed and the server
            proved C{endpoint.identity}; it fails with L{PeerIdentityMismatch}, C{OpenSSL.SSL.Error},
            L{IdentityNotReady}, a connect error, or C{twisted.internet.error.TimeoutError}, and C{protocol}
            is then never connected. Cancelling it abandons the attempt.
        """
        if not endpoint.meshed:
            return fail(ValueError(f"endpoint {endpoint.addr_str} is not meshed"))
        if not self._store.ready:
            return fail(IdentityNotReady(f"identity {self._store.name} is not ready"))
        try:
            header = transport_header.encode(endpoint.address[1], session_protocol=session_protocol)
            creator = self._creator(endpoint.identity)
        except Exception:
            return fail()
        return _Attempt(self, endpoint, protocol, header, creator).start()


# --- inbound ----------------------------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class _RecordingServerCreator:
    """
    The inbound context, plus a verify callback that keeps OpenSSL's verdict on the client's chain, so a
    refusal can be counted as expired, untrusted and so on rather than a bare "certificate verify failed".
    """

    def __init__(self, contexts):
        self._contexts = contexts

    def serverConnectionForTLS(self, tls):
        connection = self._contexts.serverConnectionForTLS(tls)
        ref = weakref.ref(tls)

        def verify(conn, cert, errno, depth, ok):
            if not ok:
                holder = ref()
                if holder is not None and holder.verify_error is None:
                    holder.verify_error = errno
            return bool(ok)

        connection.set_verify(connection.get_verify_mode(), verify)
        return connection


_HANDSHAKE, _HEADER = "handshake", "header"
_PREFIX_LENGTH = len(transport_header.PREFACE) + 4


class _ServerSide(_Relay):
    """
    Inside the inbound TLS transport: waits for the handshake, reads the transport header (which must come
    when ALPN C{transport.l5d.io/v1} was negotiated, and may come otherwise), then hands the plaintext stream
    to the protocol C{on_ready} chooses.
    """

    _required = False

    def __init__(self, server, on_ready):
        self._server = server
        self._on_ready = on_ready
        self._phase = _HANDSHAKE
        self._timer = None
        # Plaintext before the hand-over, kept as chunks: a client dribbling a 64 KiB header one byte per
        # record must not cost a copy of the whole buffer per record.
        self._chunks = []
        self._size = 0
        self._need = _PREFIX_LENGTH
        self._peer = None

    def connectionMade(self):
        self._timer = self._server._reactor.callLater(self._server._handshake_timeout, self._handshake_timeout)

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _handshake_timeout(self):
        self._timer = None
        if self._state == _WAITING and self._phase == _HANDSHAKE:
            self._phase = "timed_out"
            self._server._count("tls", "handshake_timeout")
            self.transport.abortConnection()

    def handshakeCompleted(self):
        self._cancel_timer()
        if self._state != _WAITING:
            return
        self._peer = PeerInfo(tls="true", client_id=peer_identity(self.transport),
                              server_id=self._server.identity)
        alpn = self.transport.negotiatedProtocol
        self._required = alpn == TRANSPORT_HEADER_ALPN
        log.debug("mTLS from {client}: ALPN {alpn}", client=self._peer.client_id or "anonymous",
                  alpn=_alpn_name(alpn))
        self._phase = _HEADER
        self._timer = self._server._reactor.callLater(self._server._header_timeout, self._header_timeout)

    def _early(self, data):
        if self._phase != _HEADER:
            return
        self._chunks.append(data)
        self._size += len(data)
        # Until the preface and length are in, every read may decide (and the joins are tiny); after that,
        # only a read that completes the header can.
        if self._size < _PREFIX_LENGTH or self._size >= self._need:
            self._try_header(final=False)

    def _try_header(self, final):
        buffered = b"".join(self._chunks)
        self._chunks = [buffered] if buffered else []
        if not transport_header.has_preface_prefix(buffered):
            if self._required:
                self._refuse_header("missing", "ALPN transport.l5d.io/v1 negotiated, but no transport header")
            else:
                self._ready(None, buffered)
            return
        try:
            result = transport_header.decode(buffered)
        except transport_header.TransportHeaderError as e:
            self._refuse_header("malformed", str(e))
            return
        if result is not transport_header.NEED_MORE:
            header, remaining = result
            self._ready(header, remaining)
        elif not final:
            if len(buffered) >= self._need:
                # The length is known now: wait until the whole header is here before decoding again.
                self._need = transport_header.header_length(buffered)
        else:
            if len(buffered) >= len(transport_header.PREFACE) or (self._required and buffered):
                # The client speaks the header and stopped halfway: that is no stream to guess at.
                self._refuse_header("incomplete", "transport header incomplete")
            elif self._required:
                # It promised a header and sent nothing (linkerd2-proxy refuses this as a timeout too).
                self._refuse_header("missing", "ALPN transport.l5d.io/v1 negotiated, but no transport header")
            else:
                # A few bytes that happen to match the preface's start: continue without a header, as
                # detection continues as opaque when it cannot decide.
                self._ready(None, buffered)

    def _header_timeout(self):
        self._timer = None
        if self._state == _WAITING and self._phase == _HEADER:
            self._try_header(final=True)

    def _early_eof(self):
        if self._phase == _HEADER:
            self._try_header(final=True)
            # If that handed over, _Relay._hand_over delivered the EOF; otherwise the connection is closing.
            if self._state == _WAITING and not self.transport.disconnecting:
                self.transport.loseConnection()
        else:
            self.transport.loseConnection()

    def _refuse_header(self, label, why):
        self._cancel_timer()
        self._phase = "refused"
        self._server._count("transport_header", label)
        log.info("closing mTLS connection from {client}: {why}", client=self._peer.client_id or "anonymous",
                 why=why)
        self.transport.abortConnection()

    def _ready(self, header, buffered):
        self._cancel_timer()
        self._chunks = []
        self._phase = "ready"
        if header is not None:
            log.debug("transport header from {client}: {header}", client=self._peer.client_id or "anonymous",
                      header=header)
        try:
            proto = self._on_ready(self._peer, header)
        except Exception:
            log.failure("mesh on_ready callback failed; closing the connection")
            self._state = _CLOSED
            self.transport.abortConnection()
            return
        if proto is None:
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        self._hand_over(proto, buffered)

    def _lost_early(self, reason):
        self._cancel_timer()
        if self._phase == _HANDSHAKE:
            label = tls_error_label(reason, self.transport.verify_error)
            self._server._count("tls", label)
            log.info("inbound mTLS handshake failed ({label}): {error}", label=label,
                     error=reason.getErrorMessage())


class _NotReady(Protocol):
    """
    Closes a connection that asked for our identity before we have one.
    """

    def __init__(self, server):
        self._server = server

    def connectionMade(self):
        self._server._count("tls", "identity_not_ready")
        self.transport.abortConnection()


class MeshServer:
    """
    Terminates mTLS between proxies on the inbound side.

    One per inbound listener: it holds the server TLS context factory, which builds an C{SSL.Context} once
    per identity generation, so a rotation applies to new connections while open ones keep theirs.
    """

    def __init__(self, store, *, metrics, reactor=None, require_client_cert=True, handshake_timeout=10.0,
                 header_timeout=10.0, alpn=_MESH_ALPN):
        """
        @param store: this proxy's L{linkproxy.identity.store.IdentityStore}.
        @param metrics: a L{linkproxy.admin.metrics.Metrics}; refused connections are counted in
            C{tcp_protocol_error_total{direction="inbound",protocol="tls"|"transport_header",error}}.
        @param reactor: an C{IReactorTime}; defaults to the global reactor.
        @param require_client_cert: refuse TLS clients without a certificate in the handshake (see
            L{linkproxy.core.policy.requires_client_cert}); a certificate that is presented must verify either way.
        @param handshake_timeout: seconds from the hand-over to a completed handshake.
        @param header_timeout: seconds after the handshake to wait for the first bytes (or the rest of a
            transport header); when they do not come, the stream continues without a header, unless ALPN
            C{transport.l5d.io/v1} was negotiated, which promised one: then the connection is refused.
        @param alpn: the ALPN protocols to select when offered; C{()} selects none, as linkproxy did before it
            negotiated C{transport.l5d.io/v1} (the tests stand in for such a peer this way).
        """
        if handshake_timeout <= 0 or header_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if reactor is None:
            from twisted.internet import reactor
        self._store = store
        self._metrics = metrics
        self._reactor = reactor
        self._handshake_timeout = handshake_timeout
        self._header_timeout = header_timeout
        creator = _RecordingServerCreator(server_context_factory(store, require_client_cert=require_client_cert,
                                                                 alpn=alpn))
        self._tls_factory = _MeshTLSFactory(creator, False, Factory(), clock=reactor)

    @property
    def identity(self):
        """This proxy's identity name: the SNI it answers, and C{server_id} of every peer it reports."""
        return self._store.name

    def accepts(self, detection):
        """
        Whether a detected connection is mTLS for this proxy: a TLS ClientHello whose SNI is our identity.

        TLS for any other name is not ours to terminate (the assembly passes it through as opaque).

        @param detection: a L{linkproxy.core.detect.Detection}.
        """
        hello = detection.client_hello
        return detection.protocol == Detected.TLS and hello is not None and hello.sni == self._store.name

    def protocol(self, on_ready):
        """
        The protocol that takes over an accepted connection that L{accepts}; return it from the detection
        callback, which connects it and feeds it the buffered ClientHello.

        @param on_ready: C{on_ready(peer, header) -> IProtocol | None}, called once after the handshake and the
            transport header: C{peer} is a L{PeerInfo} with C{tls="true"}, C{client_id} the verified client
            identity (or L{None} without a client certificate) and C{server_id} our identity; C{header} is a
            L{linkproxy.core.transport_header.TransportHeader} or L{None} when the client sent none (only a
            client that did not negotiate ALPN C{transport.l5d.io/v1} may send none; one that did is refused
            and counted, and C{on_ready} is not called). The
            protocol it returns gets the plaintext stream (C{makeConnection} with the TLS transport, the
            bytes after the header, then every event); L{None} closes the connection.
        @return: an C{IProtocol}.
        """
        if not self._store.ready:
            return _NotReady(self)
        return MeshTLSTransport(self._tls_factory, _ServerSide(self, on_ready))

    def _count(self, protocol, label):
        self._metrics.tcp_protocol_error_total.labels("inbound", protocol, label).inc()


# --- authorization metrics --------------------------------------------------------------------------------
