"""
Opaque TCP forwarding: bytes spliced both ways with backpressure and half-close.

Each direction's transport is registered as the streaming producer of the other, so a slow reader pauses the
fast writer's socket instead of growing a buffer: memory per connection stays at about two socket write buffers.
The accepted side is paused until the upstream connects, so nothing is read that cannot be forwarded.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.net.twisted_private import direct_writer

log = Logger(namespace="linkproxy.net.splice")


def set_nodelay(transport):
    """
    Turn off Nagle on C{transport} when it is (or wraps) a TCP socket; small writes must not wait 40 ms.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


@implementer(IHalfCloseableProtocol)
class SpliceSide(Protocol):
    """
    One side of a splice: whatever it reads is written to its peer's transport.

    @ivar peer: the other L{SpliceSide}, set by L{join}.
    """

    peer = None
    _started = None
    _read_closed = False
    _write_closed = False
    _closed = False

    def __init__(self, metrics):
        """
        @param metrics: the L{linkproxy.admin.metrics.TcpMetrics} of this side's peer (C{src} or C{dst}).
        """
        self.metrics = metrics
        self._read_bytes = metrics.read_bytes
        self._write_bytes = metrics.write_bytes

    def connectionMade(self):
        set_nodelay(self.transport)
        self.write = direct_writer(self.transport)
        self._started = self.metrics.opened()

    def dataReceived(self, data):
        self._read_bytes.inc(len(data))
        peer = self.peer
        peer._write_bytes.inc(len(data))
        peer.write(data)

    def readConnectionLost(self):
        # The peer learns of our EOF as a FIN after its pending bytes; the other direction keeps flowing.
        self._read_closed = True
        peer = self.peer
        if peer is not None and not peer._closed:
            peer._write_closed = True
            peer.transport.loseWriteConnection()
            peer._maybe_close()
        self._maybe_close()

    def writeConnectionLost(self):
        self._write_closed = True
        self._maybe_close()

    def _maybe_close(self):
        if self._read_closed and self._write_closed and not self._closed:
            self.transport.loseConnection()

    def connectionLost(self, reason=ConnectionDone()):
        if self._closed:
            return
        self._closed = True
        self.metrics.closed(started=self._started, reason=reason)
        peer = self.peer
        if peer is not None and not peer._closed:
            # loseConnection flushes what is buffered for the peer first; a reset here must not drop those bytes.
            peer.transport.loseConnection()


class AcceptedSplice(SpliceSide):
    """
    The accepted side of an opaque connection: paused until the upstream connects, then spliced to it.

    Bytes that arrive before that (the ones protocol detection read, or a last read before the pause took
    effect) are held and sent first. A client EOF before the connect is delivered after those bytes.
    """

    _connecting = None

    def __init__(self, metrics, connect, on_connect_error=None, tracker=None):
        """
        @param metrics: L{TcpMetrics} for the client side (C{peer="src"}).
        @param connect: called once with no arguments; returns a Deferred firing with a connected L{SpliceSide}
            for the upstream, or failing (connect error, timeout, no endpoints).
        @param on_connect_error: called with the failure when C{connect} fails, after the client is closed.
        @param tracker: a L{linkproxy.net.tracker.ConnectionTracker} to register with while open, or C{None}.
        """
        SpliceSide.__init__(self, metrics)
        self._tracker = tracker
        self._connect = connect
        self._on_connect_error = on_connect_error
        self._held = []
        self._eof_held = False

    def connectionMade(self):
        SpliceSide.connectionMade(self)
        if self._tracker is not None:
            self._tracker.add(self)
        self.transport.pauseProducing()
        self._connecting = self._connect()
        self._connecting.addCallbacks(self._connected, self._failed)

    def dataReceived(self, data):
        if self.peer is None:
            self._held.append(data)
        else:
            SpliceSide.dataReceived(self, data)

    def readConnectionLost(self):
        if self.peer is None:
            self._eof_held = True
            self._read_closed = True
        else:
            SpliceSide.readConnectionLost(self)

    def _connected(self, upstream):
        self._connecting = None
        if self._closed:
            upstream.transport.loseConnection()
            return
        held, self._held = b"".join(self._held), None
        self.peer, upstream.peer = upstream, self
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)
        if held:
            self._read_bytes.inc(len(held))
            upstream._write_bytes.inc(len(held))
            upstream.write(held)
        if self._eof_held:
            SpliceSide.readConnectionLost(self)
        else:
            self.transport.resumeProducing()

    def _failed(self, failure):
        self._connecting = None
        self._held = None
        if self._closed and failure.check(CancelledError):
            return
        if not self._closed:
            self.transport.loseConnection()
        if self._on_connect_error is not None:
            self._on_connect_error(failure)
        else:
            log.failure("upstream connect failed", failure)

    def drain(self):
        """
        Opaque streams have no request boundary to stop at; they run until either side closes.
        """

    def abort(self):
        """
        The grace period is over: reset both sides.
        """
        self.transport.abortConnection()
        if self.peer is not None and not self.peer._closed:
            self.peer.transport.abortConnection()

    def connectionLost(self, reason=ConnectionDone()):
        SpliceSide.connectionLost(self, reason)
        if self._tracker is not None:
            self._tracker.discard(self)
        if self._connecting is not None:
            # The client left while we were still connecting: abandon the upstream attempt.
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
