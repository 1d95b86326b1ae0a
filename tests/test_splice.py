"""
Tests for L{linkproxy.net.splice}: the opaque TCP splice, in memory and over real loopback sockets.
"""

import socket

from twisted.internet import defer, protocol, reactor as global_reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.net.connect import connect_protocol
from linkproxy.net.splice import AcceptedSplice, SpliceSide
from linkproxy.net.twisted_private import direct_writer
from linkproxy.net.tracker import ConnectionTracker


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that records a write-side close.
    """

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def make_pair(metrics=None):
    """
    An accepted side whose connect is a Deferred the test controls, and an unconnected upstream side.
    """
    metrics = metrics or Metrics(process=False)
    connecting = defer.Deferred()
    failures = []
    accepted = AcceptedSplice(metrics.tcp("inbound", "src", "false", "t:1"), lambda: connecting,
                              on_connect_error=failures.append)
    upstream = SpliceSide(metrics.tcp("inbound", "dst", "false", "t:1"))
    return metrics, connecting, failures, accepted, upstream


class AcceptedSpliceTests(SynchronousTestCase):
    """
    The accepted side waits, paused, for its upstream, then splices.
    """

    def test_paused_until_connected_then_held_bytes_first(self):
        """
        The client transport is paused while connecting; bytes that arrived meanwhile are sent upstream first,
        then the client is resumed and bytes flow both ways.
        """
        metrics, connecting, _, accepted, upstream = make_pair()
        client = HalfCloseTransport()
        accepted.makeConnection(client)
        self.assertEqual(client.producerState, "paused")
        accepted.dataReceived(b"GET / HT")
        accepted.dataReceived(b"TP/1.1\r\n")
        server = HalfCloseTransport()
        upstream.makeConnection(server)
        connecting.callback(upstream)
        self.assertEqual(server.value(), b"GET / HTTP/1.1\r\n")
        self.assertEqual(client.producerState, "producing")
        self.assertIs(client.producer, server)
        self.assertIs(server.producer, client)
        upstream.dataReceived(b"response")
        self.assertEqual(client.value(), b"response")
        self.assertEqual(metrics.registry.get_sample_value(
            "tcp_read_bytes_total", {"direction": "inbound", "peer": "src", "tls": "no_identity",
                                     "target_addr": "t:1"}),
            16)

    def test_eof_before_connect_delivered_after_bytes(self):
        """
        A client that sends and half-closes before the upstream connects gets its bytes, then a FIN, upstream.
        """
        _, connecting, _, accepted, upstream = make_pair()
        client = HalfCloseTransport()
        accepted.makeConnection(client)
        accepted.dataReceived(b"last words")
        accepted.readConnectionLost()
        server = HalfCloseTransport()
        upstream.makeConnection(server)
        connecting.callback(upstream)
        self.assertEqual(server.value(), b"last words")
        self.assertTrue(server.write_closed)

    def test_half_close_both_ways_closes(self):
        """
        EOF in each direction is passed on as a FIN; once both directions are done the sockets close.
        """
        _, connecting, _, accepted, upstream = make_pair()
        client, server = HalfCloseTransport(), HalfCloseTransport()
        accepted.makeConnection(client)
        upstream.makeConnection(server)
        connecting.callback(upstream)
        accepted.readConnectionLost()
        self.assertTrue(server.write_closed)
        self.assertFalse(server.disconnecting)
        upstream.dataReceived(b"still flowing")
        self.assertEqual(client.value(), b"still flowing")
        upstream.readConnectionLost()
        self.assertTrue(client.write_closed)
        self.assertTrue(client.disconnecting)
        self.assertTrue(server.disconnecting)

    def test_connect_failure_closes_client_and_reports(self):
        """
        A failed connect closes the client and hands the failure to on_connect_error.
        """
        _, connecting, failures, accepted, _ = make_pair()
        client = HalfCloseTransport()
        accepted.makeConnection(client)
        connecting.errback(ConnectionRefusedError())
        self.assertTrue(client.disconnecting)
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(ConnectionRefusedError))

    def test_client_leaves_while_connecting(self):
        """
        A client that goes away during the connect cancels it quietly, and its metrics balance.
        """
        metrics = Metrics(process=False)
        cancelled, failures = [], []
        connecting = defer.Deferred(canceller=lambda d: cancelled.append(d))
        accepted = AcceptedSplice(metrics.tcp("inbound", "src", "false", "t:1"), lambda: connecting,
                                  on_connect_error=failures.append)
        accepted.makeConnection(HalfCloseTransport())
        accepted.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [connecting])
        self.assertEqual(failures, [])
        self.assertEqual(metrics.registry.get_sample_value(
            "tcp_open_connections", {"direction": "inbound", "peer": "src", "tls": "no_identity",
                                     "target_addr": "t:1"}),
            0)

    def test_reset_closes_peer_and_counts_failure(self):
        """
        A connection lost with an error closes the other side (after flushing) and counts a failed close.
        """
        metrics, connecting, _, accepted, upstream = make_pair()
        client, server = HalfCloseTransport(), HalfCloseTransport()
        accepted.makeConnection(client)
        upstream.makeConnection(server)
        connecting.callback(upstream)
        upstream.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(client.disconnecting)
        self.assertEqual(metrics.registry.get_sample_value(
            "tcp_close_total", {"direction": "inbound", "peer": "dst", "tls": "no_identity", "target_addr": "t:1",
                                "classification": "failure", "errno": "ECONNRESET"}), 1)

    def test_tracked_while_open(self):
        """
        The accepted side registers with the tracker while open; abort resets both sides.
        """
        tracker = ConnectionTracker()
        metrics = Metrics(process=False)
        connecting = defer.Deferred()
        accepted = AcceptedSplice(metrics.tcp("inbound", "src", "false", "t:1"), lambda: connecting,
                                  tracker=tracker)
        upstream = SpliceSide(metrics.tcp("inbound", "dst", "false", "t:1"))
        client, server = HalfCloseTransport(), HalfCloseTransport()
        accepted.makeConnection(client)
        self.assertEqual(len(tracker), 1)
        upstream.makeConnection(server)
        connecting.callback(upstream)
        accepted.drain()
        self.assertFalse(client.disconnecting)
        accepted.abort()
        accepted.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(tracker), 0)


class _Firehose(protocol.Protocol):
    """
    A backend that writes as fast as its transport lets it, as a push-producer-driven stream.
    """

    chunk = b"x" * 65536
    sent = 0
    paused = False

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        global_reactor.callLater(0, self._pump)

    def _pump(self):
        # Bounded: 64 MiB is far more than any honest set of buffers would hold.
        while not self.paused and self.sent < 64 * 1024 * 1024:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def stopProducing(self):
        self.paused = True


class _Sleeper(protocol.Protocol):
    """
    A client that reads nothing: its transport is paused from the start.
    """

    def connectionMade(self):
        self.transport.pauseProducing()


class BackpressureTests(TestCase):
    """
    Over real loopback sockets, a slow reader stops the proxy reading instead of growing its memory.
    """

    @defer.inlineCallbacks
    def test_slow_reader_bounds_memory(self):
        """
        A backend writes as fast as it can to a client that never reads. The proxy's buffers stay within a
        small bound, and it stops reading from the backend (whose writes then stall), instead of buffering
        the stream.
        """
        metrics = Metrics(process=False)
        backends = []

        class BackendFactory(protocol.Factory):
            def buildProtocol(self, addr):
                p = _Firehose()
                backends.append(p)
                return p

        backend_port = yield TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(BackendFactory())
        self.addCleanup(backend_port.stopListening)
        accepted_sides = []

        def connect():
            upstream = SpliceSide(metrics.tcp("outbound", "dst", "false", "b"))
            ep = TCP4ClientEndpoint(global_reactor, "127.0.0.1", backend_port.getHost().port)
            return connect_protocol(ep, upstream)

        class ProxyFactory(protocol.Factory):
            def buildProtocol(self, addr):
                side = AcceptedSplice(metrics.tcp("outbound", "src", "false", "b"), connect)
                accepted_sides.append(side)
                return side

        proxy_port = yield TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(ProxyFactory())
        self.addCleanup(proxy_port.stopListening)
        client = _Sleeper()
        yield connect_protocol(TCP4ClientEndpoint(global_reactor, "127.0.0.1", proxy_port.getHost().port), client)

        # Let the stream run into the wall: sample until the backend is stuck, bounded to ~3 s.
        for _ in range(60):
            yield _sleep(0.05)
            if backends and backends[0].paused and accepted_sides and accepted_sides[0].peer is not None:
                before = backends[0].sent
                yield _sleep(0.3)
                if backends[0].sent == before:
                    break
        backend = backends[0]
        side = accepted_sides[0]
        self.assertTrue(backend.paused, "the backend was never paused")
        proxy_to_client = _buffered(side.transport)
        proxy_from_backend = _buffered(side.peer.transport)
        # Kernel socket buffers absorb a few MiB; what matters is that the proxy's own buffers stay small.
        self.assertLess(proxy_to_client, 1024 * 1024, f"proxy buffered {proxy_to_client} bytes for the client")
        self.assertLess(proxy_from_backend, 1024 * 1024)
        self.assertLess(backend.sent, 32 * 1024 * 1024, "the backend was never slowed down")
        client.transport.abortConnection()
        yield _sleep(0.1)


def _buffered(transport):
    return len(transport.dataBuffer) + sum(len(b) for b in transport._tempDataBuffer)


def _sleep(seconds):
    d = defer.Deferred()
    global_reactor.callLater(seconds, d.callback, None)
    return d


class DirectWriterTests(SynchronousTestCase):
    """
    L{direct_writer} sends at once on plain TCP connections and never bypasses a wrapping transport.
    """

    def connection(self):
        from twisted.internet.tcp import Connection
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(2)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        conn = Connection(ours, protocol.Protocol(), reactor=global_reactor)
        conn.connected = 1
        return conn, theirs

    def test_sends_immediately_when_nothing_is_queued(self):
        """
        With an empty queue the bytes reach the peer socket without any reactor turn.
        """
        conn, theirs = self.connection()
        direct_writer(conn)(b"now")
        self.assertEqual(theirs.recv(10), b"now")
        self.assertEqual(conn._tempDataLen, 0)

    def test_queues_behind_pending_bytes(self):
        """
        When bytes are already queued, new bytes are queued behind them, so order is kept.
        """
        conn, theirs = self.connection()
        conn._tempDataBuffer.append(b"first")
        conn._tempDataLen = 5
        self.patch(conn, "startWriting", lambda: None)
        direct_writer(conn)(b"second")
        self.assertEqual(b"".join(conn._tempDataBuffer), b"firstsecond")

    def test_wrapper_is_never_bypassed(self):
        """
        A wrapping transport (as TLS is) that forwards attributes to a TCP connection gets its own write:
        writing to the socket beneath it would skip the wrapper.
        """
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
        conn, _ = self.connection()
        wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
        wrapper.makeConnection(conn)
        self.assertIs(wrapper.socket, conn.socket)
        self.assertEqual(direct_writer(wrapper), wrapper.write)

    def test_test_transports_use_their_write(self):
        """
        Transports that are not TCP connections keep their own write.
        """
        t = StringTransport()
        self.assertEqual(direct_writer(t), t.write)
