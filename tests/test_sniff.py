"""
Tests for L{linkproxy.net.sniff}.
"""

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from linkproxy.admin.metrics import Metrics
from linkproxy.core.detect import H2_PREFACE, Detection, Protocol as Detected
from linkproxy.net.sniff import SniffingProtocol
from tests.test_client_hello import DATA

REQUEST = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"


class Recorder(Protocol):
    """
    A protocol that records every event it gets, without half-close support.
    """

    def __init__(self):
        self.events = []
        self.data = b""

    def connectionMade(self):
        """
        Record the connection.
        """
        self.events.append("connectionMade")

    def dataReceived(self, data):
        """
        Record and keep C{data}.
        """
        self.events.append(("data", data))
        self.data += data

    def connectionLost(self, reason=None):
        """
        Record the loss and its type.
        """
        self.events.append(("connectionLost", reason.type if reason is not None else None))


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """
    A L{Recorder} that also takes half-close events.
    """

    def readConnectionLost(self):
        """
        Record the read-side close.
        """
        self.events.append("readConnectionLost")

    def writeConnectionLost(self):
        """
        Record the write-side close.
        """
        self.events.append("writeConnectionLost")


class SniffTestCase(SynchronousTestCase):
    """
    Builds a L{SniffingProtocol} on a L{StringTransport} and a clock, recording on_detected calls.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.metrics = Metrics(process=False)
        self.transport = StringTransport()
        self.calls = []
        self.next = HalfCloseRecorder()

    def on_detected(self, detection, transport):
        """
        Record the call; hand over to C{self.next}.
        """
        self.calls.append((detection, transport))
        return self.next

    def sniffer(self, connect=True, **kwargs):
        """
        @return: a L{SniffingProtocol} on the test transport and clock.
        """
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("direction", "outbound")
        proto = SniffingProtocol(self.on_detected, reactor=self.clock, metrics=self.metrics, **kwargs)
        if connect:
            proto.makeConnection(self.transport)
        return proto

    def count(self, protocol, reason, direction="outbound"):
        """
        @return: the C{protocol_detect_total} sample for these labels.
        """
        value = self.metrics.registry.get_sample_value(
            "protocol_detect_total", {"direction": direction, "protocol": protocol, "reason": reason})
        return value or 0


class HandoffTests(SniffTestCase):
    """
    Decisions from the bytes, and the handoff that follows.
    """

    def test_provides_interfaces(self):
        """
        The sniffer is a half-closeable protocol, so transports tell it about half-closes.
        """
        self.assertTrue(verifyObject(IHalfCloseableProtocol, self.sniffer(connect=False)))

    def test_handoff_with_buffered_bytes(self):
        """
        A request line decides HTTP/1; the next protocol is connected to the same transport, then given
        every byte received so far, and gets later data directly.
        """
        proto = self.sniffer()
        proto.dataReceived(REQUEST)
        self.assertEqual(self.calls, [(Detection(Detected.HTTP1, "detected"), self.transport)])
        self.assertIs(self.next.transport, self.transport)
        self.assertEqual(self.next.events, ["connectionMade", ("data", REQUEST)])
        proto.dataReceived(b"more")
        self.assertEqual(self.next.events[-1], ("data", b"more"))
        self.assertEqual(proto.detection, Detection(Detected.HTTP1, "detected"))
        self.assertEqual(self.count("http1", "detected"), 1)

    def test_split_input(self):
        """
        Fed one byte at a time, the sniffer decides exactly once, at the byte that decides, and hands
        over the whole buffer.
        """
        proto = self.sniffer()
        stream = H2_PREFACE + b"\x00\x00\x00\x04"
        for i in range(len(stream)):
            proto.dataReceived(stream[i:i + 1])
            if i < len(H2_PREFACE) - 1:
                self.assertEqual(self.calls, [])
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.calls[0][0].protocol, Detected.H2)
        self.assertEqual(self.next.data, stream)
        self.assertEqual(self.count("h2", "detected"), 1)

    def test_tls_counted_with_sni(self):
        """
        A real ClientHello decides TLS, and its SNI is counted.
        """
        hello = DATA.child("clienthello_openssl.bin").getContent()
        proto = self.sniffer(direction="inbound")
        proto.dataReceived(hello[:100])
        proto.dataReceived(hello[100:])
        self.assertEqual(self.calls[0][0].client_hello.sni, "foo.example")
        self.assertEqual(self.next.data, hello)
        self.assertEqual(self.count("tls", "detected", "inbound"), 1)
        self.assertEqual(self.metrics.registry.get_sample_value(
            "tls_client_hello_total", {"direction": "inbound", "sni": "foo.example"}), 1)

    def test_opaque_early(self):
        """
        A first byte that cannot start any known protocol decides opaque at once.
        """
        self.sniffer().dataReceived(b"\x00\x01binary")
        self.assertEqual(self.calls[0][0], Detection(Detected.OPAQUE, "detected"))
        self.assertEqual(self.next.data, b"\x00\x01binary")

    def test_rejected(self):
        """
        When on_detected returns None the transport is closed and later bytes are dropped.
        """
        self.next = None
        proto = self.sniffer()
        proto.dataReceived(REQUEST)
        self.assertTrue(self.transport.disconnecting)
        proto.dataReceived(b"ignored")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.calls), 1)

    def test_callback_fails(self):
        """
        An exception from on_detected is logged and the connection aborted, not left hanging.
        """
        def broken(detection, transport):
            raise ZeroDivisionError()
        proto = SniffingProtocol(broken, reactor=self.clock, timeout=10, metrics=self.metrics,
                                 direction="outbound")
        proto.makeConnection(self.transport)
        proto.dataReceived(REQUEST)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_connection_lost_delegated(self):
        """
        After the handoff, connectionLost reaches the next protocol with its reason.
        """
        proto = self.sniffer()
        proto.dataReceived(REQUEST)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.next.events[-1], ("connectionLost", ConnectionDone))

    def test_buffer_bound(self):
        """
        With max_bytes buffered and no decision, the sniffer decides opaque/overflow and hands over
        everything, holding no more than the bound before that.
        """
        proto = self.sniffer(max_bytes=32)
        line = b"GET /" + b"a" * 100
        for i in range(0, 30, 10):
            proto.dataReceived(line[i:i + 10])
        self.assertEqual(self.calls, [])
        proto.dataReceived(line[30:40])
        self.assertEqual(self.calls[0][0], Detection(Detected.OPAQUE, "overflow"))
        self.assertEqual(self.next.data, line[:40])
        self.assertEqual(self.count("opaque", "overflow"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TimeoutTests(SniffTestCase):
    """
    The detection timeout and the opaque-port shortcut.
    """

    def test_timeout_fails_open(self):
        """
        Without a decision by the timeout, the connection continues as opaque with the bytes buffered so
        far, and the timeout is logged and counted.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proto = self.sniffer(timeout=10)
        proto.dataReceived(b"GET /slow")
        self.clock.advance(9.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls[0][0], Detection(Detected.OPAQUE, "timeout"))
        self.assertEqual(self.next.data, b"GET /slow")
        self.assertEqual(self.count("opaque", "timeout"), 1)
        logged = [e for e in events if e.get("log_namespace", "").startswith("linkproxy.net.sniff")
                  and "timeout" in e]
        self.assertEqual(len(logged), 1)
        self.assertEqual((logged[0]["timeout"], logged[0]["buffered"]), (10, 9))

    def test_timeout_without_bytes(self):
        """
        A client that sends nothing (server-first protocol) is handed over as opaque on timeout.
        """
        self.sniffer(timeout=3)
        self.clock.advance(3)
        self.assertEqual(self.calls[0][0], Detection(Detected.OPAQUE, "timeout"))
        self.assertEqual(self.next.events, ["connectionMade"])

    def test_timer_cancelled_on_decision(self):
        """
        Deciding cancels the timer, so advancing past the timeout changes nothing.
        """
        self.sniffer().dataReceived(REQUEST)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.calls), 1)

    def test_timer_cancelled_on_close(self):
        """
        Losing the connection while sniffing cancels the timer.
        """
        proto = self.sniffer()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timeout(self):
        """
        A timeout of None schedules nothing.
        """
        self.sniffer(timeout=None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_skip(self):
        """
        On an opaque port the decision is made at connection time, without a timer, and every byte goes
        straight to the next protocol.
        """
        proto = self.sniffer(skip=True)
        self.assertEqual(self.calls, [(Detection(Detected.OPAQUE, "opaque_port"), self.transport)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.dataReceived(REQUEST)
        self.assertEqual(self.next.events, ["connectionMade", ("data", REQUEST)])
        self.assertEqual(self.count("opaque", "opaque_port"), 1)


class CloseTests(SniffTestCase):
    """
    EOF and half-close during and after detection.
    """

    def test_eof_before_bytes(self):
        """
        A connection lost before any byte is counted as eof, and on_detected is not called.
        """
        proto = self.sniffer()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.calls, [])
        self.assertEqual(self.count("opaque", "eof"), 1)

    def test_read_eof_before_bytes(self):
        """
        A half-close before any byte is counted as eof, closes the connection cleanly, and does not call
        on_detected; the later connectionLost is not counted again.
        """
        proto = self.sniffer()
        proto.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.calls, [])
        self.assertEqual(self.count("opaque", "eof"), 1)

    def test_half_close_with_bytes(self):
        """
        A half-close with undecided bytes decides opaque/eof, hands them over, then delivers the
        half-close to the next protocol.
        """
        proto = self.sniffer()
        proto.dataReceived(b"GET / HT")
        proto.readConnectionLost()
        self.assertEqual(self.calls[0][0], Detection(Detected.OPAQUE, "eof"))
        self.assertEqual(self.next.events, ["connectionMade", ("data", b"GET / HT"), "readConnectionLost"])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.count("opaque", "eof"), 1)

    def test_half_close_after_handoff(self):
        """
        Half-close events after the handoff reach a half-closeable next protocol.
        """
        proto = self.sniffer()
        proto.dataReceived(REQUEST)
        proto.readConnectionLost()
        proto.writeConnectionLost()
        self.assertEqual(self.next.events[-2:], ["readConnectionLost", "writeConnectionLost"])

    def test_half_close_not_supported(self):
        """
        When the next protocol cannot take a half-close, the read EOF closes the transport.
        """
        self.next = Recorder()
        proto = self.sniffer()
        proto.dataReceived(b"\x00")
        proto.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_write_lost_before_handoff(self):
        """
        A write-side close seen while sniffing is delivered after the handoff.
        """
        proto = self.sniffer()
        proto.writeConnectionLost()
        proto.dataReceived(REQUEST)
        self.assertEqual(self.next.events, ["connectionMade", ("data", REQUEST), "writeConnectionLost"])

    def test_lost_with_undecided_bytes(self):
        """
        A connection lost with undecided bytes is counted as opaque/eof and not handed over.
        """
        proto = self.sniffer()
        proto.dataReceived(b"GET")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.calls, [])
        self.assertEqual(self.count("opaque", "eof"), 1)


@implementer(IHalfCloseableProtocol)
class _Answer(Protocol):
    """
    Server side after detection: on the client's half-close, answer with what it sent, then close.
    """

    def __init__(self):
        self.data = b""
        self.lost = Deferred()

    def dataReceived(self, data):
        """
        Keep C{data}.
        """
        self.data += data

    def readConnectionLost(self):
        """
        Answer and close once the client has finished sending.
        """
        self.transport.write(b"got " + self.data)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        """
        Nothing to do: the answer is already written.
        """

    def connectionLost(self, reason=None):
        """
        Let the test know the server side is gone.
        """
        self.lost.callback(None)


class _HalfClosingClient(Protocol):
    """
    Sends some bytes, half-closes, and collects the answer.
    """

    def __init__(self, payload):
        self.payload = payload
        self.received = b""
        self.done = Deferred()

    def connectionMade(self):
        """
        Send the payload and close the write side.
        """
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        """
        Collect the answer.
        """
        self.received += data

    def connectionLost(self, reason=None):
        """
        Report everything received.
        """
        self.done.callback(self.received)


class LoopbackTests(TestCase):
    """
    The sniffer on a real TCP connection over 127.0.0.1.
    """

    timeout = 10

    @inlineCallbacks
    def test_real_half_close(self):
        """
        A real TCP half-close reaches the sniffer, which decides opaque/eof on the undecided bytes, hands
        them over, and passes the half-close on; the next protocol can still answer.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

        metrics = Metrics(process=False)
        answers = []

        def on_detected(detection, transport):
            answers.append((detection, _Answer()))
            return answers[-1][1]

        factory = Factory.forProtocol(lambda: SniffingProtocol(
            on_detected, reactor=reactor, timeout=5, metrics=metrics, direction="inbound"))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = _HalfClosingClient(b"GET / HT")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        received = yield client.done
        self.assertEqual(received, b"got GET / HT")
        yield gatherResults([answer.lost for _, answer in answers])
        self.assertEqual([d for d, _ in answers], [Detection(Detected.OPAQUE, "eof")])
        self.assertEqual(metrics.registry.get_sample_value(
            "protocol_detect_total", {"direction": "inbound", "protocol": "opaque", "reason": "eof"}), 1)
