"""
The Twisted side of protocol detection: a protocol that buffers a connection's first bytes, asks
L{linkproxy.core.detect.detect} what they are, and hands the connection to the protocol chosen for that.

Detection favours availability, as Linkerd's does: when the client says nothing decisive within the timeout,
the connection continues as opaque TCP with whatever it has sent so far.
"""

from typing import Callable, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.core.detect import DETECT_BUFFER, Detection, Protocol as Detected, detect
from linkproxy.net.twisted_private import install_direct_write

__all__ = ["SniffingProtocol", "OnDetected"]

#: The callback a L{SniffingProtocol} reports its decision to: it gets the L{Detection} and the transport, and
#: answers with the protocol that takes the connection over, or L{None} to have the connection closed.
OnDetected = Callable[[Detection, ITransport], Optional[IProtocol]]

_SNIFFING = "sniffing"
_DELEGATING = "delegating"
_CLOSED = "closed"


@implementer(IHalfCloseableProtocol)
class SniffingProtocol(Protocol):
    """
    Buffers the first bytes of a connection until L{detect} decides, then hands the connection over.

    C{on_detected} is called at most once: exactly once, unless the connection ends before the decision
    (then the outcome is only counted, since there is no connection left to hand over). The protocol it
    returns is connected to the same transport, given the buffered bytes, and from then on receives every
    event this protocol gets.

    @ivar detection: the L{Detection} once made, else L{None}.
    """

    _log = Logger(namespace="linkproxy.net.sniff")

    def __init__(self, on_detected: OnDetected, *, reactor: IReactorTime, timeout: Optional[float], metrics,
                 direction: str, max_bytes: int = DETECT_BUFFER, skip: bool = False, tcp=None):
        """
        @param on_detected: see L{OnDetected}.
        @param reactor: schedules the detection timeout.
        @param timeout: seconds to wait for a decision before continuing as opaque; L{None} waits for ever
            (the buffer bound and EOF still end detection).
        @param metrics: a L{linkproxy.admin.metrics.Metrics}; every outcome is counted on it.
        @param direction: the C{direction} metric label, C{"inbound"} or C{"outbound"}.
        @param max_bytes: the detection buffer bound (see L{detect}).
        @param skip: the port is configured opaque: decide opaque at once, without reading.
        @param tcp: the connection's L{linkproxy.admin.metrics.TcpConnection}, or L{None}: this protocol
            counts every byte read and (through the direct writer) written on it, and its close. Whoever takes
            the connection over binds its labels, or hands the counting over with C{skip()}.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must not be negative, not {timeout!r}")
        self._on_detected = on_detected
        self._reactor = reactor
        self._timeout = timeout
        self._metrics = metrics
        self._direction = direction
        self._max_bytes = max_bytes
        self._skip = skip
        self._state = _SNIFFING
        self._buffer = b""
        self._timer = None
        self._write_lost = False
        self._next: Optional[IProtocol] = None
        self._tcp = tcp
        self._accepted = None
        self.detection: Optional[Detection] = None

    # -- IProtocol ------------------------------------------------------------------------------------------------

    def connectionMade(self):
        """
        Start the timeout, or decide opaque at once on an opaque port.
        """
        # Whatever protocol takes the connection over (TLS included) writes straight to the socket.
        install_direct_write(self.transport, self._tcp)
        self._accepted = self._reactor.seconds()
        if self._skip:
            self._decide(Detection(Detected.OPAQUE, "opaque_port"))
        elif self._timeout is not None:
            self._timer = self._reactor.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes):
        """
        Buffer C{data} and try to decide; once decided, pass it on.
        """
        tcp = self._tcp
        if tcp is not None:
            tcp.rx += len(data)
        if self._state == _DELEGATING:
            self._next.dataReceived(data)
            return
        if self._state == _CLOSED:
            return
        # At most max_bytes - 1 bytes wait here: with max_bytes, detect() always decides.
        self._buffer += data
        decision = detect(self._buffer, max_bytes=self._max_bytes)
        if decision is not None:
            self._decide(decision)

    def connectionLost(self, reason: Failure = None):
        """
        Pass the loss on, or count an undecided connection as opaque/eof.
        """
        self._cancel_timer()
        if self._state == _DELEGATING:
            self._state = _CLOSED
            self._next.connectionLost(reason)
            self._next = None
        elif self._state == _SNIFFING:
            self._state = _CLOSED
            # Nothing to hand over: the connection is gone in both directions.
            self._count(detect(self._buffer, final=True, max_bytes=self._max_bytes))
            self._buffer = b""
        tcp = self._tcp
        if tcp is not None:
            self._tcp = None
            tcp.closed(reason)

    # -- IHalfCloseableProtocol -----------------------------------------------------------------------------------

    def readConnectionLost(self):
        """
        The client finished sending: decide on what it sent, or close if it sent nothing.
        """
        if self._state == _SNIFFING:
            if not self._buffer:
                self._cancel_timer()
                self._state = _CLOSED
                self._count(detect(b"", final=True))
                self.transport.loseConnection()
                return
            self._decide(detect(self._buffer, final=True, max_bytes=self._max_bytes))
        if self._state == _DELEGATING:
            half = IHalfCloseableProtocol(self._next, None)
            if half is not None:
                half.readConnectionLost()
            else:
                self.transport.loseConnection()

    def writeConnectionLost(self):
        """
        The peer stopped reading; tell the protocol in charge, now or when there is one.
        """
        if self._state == _DELEGATING:
            self._deliver_write_lost()
        else:
            self._write_lost = True

    # -- internals ------------------------------------------------------------------------------------------------

    def _deliver_write_lost(self):
        half = IHalfCloseableProtocol(self._next, None)
        if half is not None:
            half.writeConnectionLost()

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self):
        self._timer = None
        if self._state != _SNIFFING:
            return
        self._log.info(
            "protocol detection timed out after {timeout}s with {buffered} bytes; continuing as opaque",
            timeout=self._timeout, buffered=len(self._buffer), direction=self._direction,
            peer=self._peer())
        self._decide(Detection(Detected.OPAQUE, "timeout"))

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "unknown"

    def _count(self, detection: Detection):
        self.detection = detection
        sni = detection.client_hello.sni if detection.client_hello is not None else None
        elapsed = self._reactor.seconds() - self._accepted if self._accepted is not None else None
        self._metrics.detected(self._direction, detection.protocol.value, detection.reason, sni, elapsed)

    def _decide(self, detection: Detection):
        self._cancel_timer()
        self._count(detection)
        self._log.debug("detected {protocol} ({reason})", protocol=detection.protocol.value,
                        reason=detection.reason, direction=self._direction, sni=(
                            detection.client_hello.sni if detection.client_hello is not None else None))
        buffered, self._buffer = self._buffer, b""
        # Until the next protocol exists, anything re-entrant (a callback closing the transport) is dropped.
        self._state = _CLOSED
        transport = self.transport
        try:
            proto = self._on_detected(detection, transport)
        except Exception:
            self._log.failure("protocol detection callback failed; closing the connection",
                              direction=self._direction)
            # Not every ITransport can abort; a clean close still frees the connection.
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        if proto is None:
            transport.loseConnection()
            return
        self._next = proto
        self._state = _DELEGATING
        proto.makeConnection(transport)
        # connectionMade may already have ended things (connectionLost delivered synchronously).
        if self._state == _DELEGATING and buffered:
            proto.dataReceived(buffered)
        if self._state == _DELEGATING and self._write_lost:
            self._deliver_write_lost()
