"""
Tests for L{linkproxy.net.h2} and L{linkproxy.core.grpc}: an in-memory h2 client talks to L{H2ServerProtocol},
whose pooled upstream connections reach in-memory h2 backends, all pumped with L{twisted.test.iosim}.
"""

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from h2.events import (
    ConnectionTerminated, DataReceived, RequestReceived, ResponseReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.core import grpc
from linkproxy.core.errors import NoEndpoints, ResponseTimeout
from linkproxy.net.context import HttpSettings, PeerInfo
import hpack
from h2.exceptions import ProtocolError

from linkproxy.net import h2_private
from linkproxy.net.h2 import H2Pool, H2ServerProtocol
from linkproxy.net.h2_private import LeanConnection, LeanDecoder, LeanEncoder
from linkproxy.net.tracker import ConnectionTracker
from linkproxy.testing import FakeRouter

BACKEND = ("10.0.0.1", 8080)
AUTHORITY = "web.default:80"
PUMP_LIMIT = 500

_TEST_CONFIG = dict(validate_inbound_headers=False, validate_outbound_headers=False,
                    normalize_inbound_headers=False, normalize_outbound_headers=False, header_encoding=None)

#: The TLS labels of a hop to an endpoint without identity.
UNMESHED = dict(tls="no_identity", no_tls_reason="not_provided_by_service_discovery")


def _headers(pairs):
    return [(n if isinstance(n, bytes) else n.encode(), v if isinstance(v, bytes) else v.encode())
            for n, v in pairs]


def _as_dict(headers):
    return {bytes(n): bytes(v) for n, v in headers}


class PeerStream:
    """
    What one side of a test connection saw on one stream.
    """

    def __init__(self):
        self.headers = None
        self.data = b""
        self.trailers = None
        self.ended = False
        self.reset = None


class H2Peer(Protocol):
    """
    A scripted h2 endpoint (client or server) that records what it sees per stream.

    @ivar auto_ack: acknowledge received DATA at once (else the test calls L{ack}).
    """

    def __init__(self, client_side, auto_ack=True):
        # GOAWAY-tolerant, like the proxy's own, so tests can watch streams finish after a GOAWAY.
        self.conn = LeanConnection(H2Configuration(client_side=client_side, **_TEST_CONFIG))
        self.streams = {}
        self.goaways = []
        self.auto_ack = auto_ack
        self.unacked = {}
        self.lost = False

    def connectionMade(self):
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def stream(self, sid):
        return self.streams.setdefault(sid, PeerStream())

    def dataReceived(self, data):
        for event in self.conn.receive_data(data):
            self.handle(event)
        self.flush()

    def handle(self, event):
        if isinstance(event, (RequestReceived, ResponseReceived)):
            self.stream(event.stream_id).headers = _as_dict(event.headers)
            self.on_headers(event.stream_id)
        elif isinstance(event, DataReceived):
            s = self.stream(event.stream_id)
            s.data += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
            self.on_data(event.stream_id)
        elif isinstance(event, TrailersReceived):
            self.stream(event.stream_id).trailers = _as_dict(event.headers)
        elif isinstance(event, StreamEnded):
            self.stream(event.stream_id).ended = True
            self.on_end(event.stream_id)
        elif isinstance(event, StreamReset):
            self.stream(event.stream_id).reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaways.append(event)
        elif isinstance(event, WindowUpdated):
            self.on_window()

    def ack(self):
        """Acknowledge every DATA byte held back so far."""
        for sid, n in self.unacked.items():
            self.conn.acknowledge_received_data(n, sid)
        self.unacked = {}
        self.flush()

    def on_headers(self, sid):
        pass

    def on_data(self, sid):
        pass

    def on_end(self, sid):
        pass

    def on_window(self):
        pass

    def connectionLost(self, reason=None):
        self.lost = True


class Client(H2Peer):
    """
    The downstream test client.
    """

    def __init__(self, auto_ack=True):
        H2Peer.__init__(self, True, auto_ack)
        self.pending = {}

    def request(self, method=b"GET", path=b"/", authority=AUTHORITY, extra=(), body=None, end=True,
                trailers=None):
        """Open a stream; send C{body} (as far as the window allows, the rest on WINDOW_UPDATE)."""
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path)]
        if authority is not None:
            headers.append((b":authority", authority.encode() if isinstance(authority, str) else authority))
        headers += _headers(extra)
        self.conn.send_headers(sid, headers, end_stream=end and body is None and trailers is None)
        if body is not None or trailers is not None:
            self.pending[sid] = [body or b"", end, trailers]
            self.send_pending()
        self.flush()
        return sid

    def send_pending(self):
        for sid, entry in list(self.pending.items()):
            body, end, trailers = entry
            while body:
                n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(body))
                if n <= 0:
                    break
                self.conn.send_data(sid, body[:n])
                body = body[n:]
            entry[0] = body
            if not body:
                if trailers is not None:
                    self.conn.send_headers(sid, _headers(trailers), end_stream=True)
                elif end:
                    self.conn.end_stream(sid)
                del self.pending[sid]
        self.flush()

    def on_window(self):
        self.send_pending()


class Backend(H2Peer):
    """
    The upstream test server. C{mode} picks the behaviour:
      - C{"respond"}: 200 with C{b"hello"} at the request's end;
      - C{"echo"}: 200 at once, the request body echoed, trailers C{grpc-status: 0} at the end;
      - C{"hold"}: nothing until the test acts.
    """

    def __init__(self, mode="respond", auto_ack=True):
        H2Peer.__init__(self, False, auto_ack)
        self.mode = mode

    def on_headers(self, sid):
        if self.mode == "echo":
            self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])

    def on_data(self, sid):
        if self.mode == "echo":
            s = self.streams[sid]
            chunk, s.data = s.data, b""
            s.echoed = getattr(s, "echoed", 0) + len(chunk)
            self.conn.send_data(sid, chunk)

    def on_end(self, sid):
        if self.mode == "respond":
            self.conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"5")])
            self.conn.send_data(sid, b"hello", end_stream=True)
        elif self.mode == "echo":
            self.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)


class MemoryConnector:
    """
    A connector whose connections are in-memory pairs with new L{Backend}s.

    @ivar backends: every backend connected, in order.
    @ivar refuse: when set, connects fail with C{ConnectionRefusedError}.
    """

    def __init__(self, clock, mode="respond", auto_ack=True):
        self.clock = clock
        self.mode = mode
        self.auto_ack = auto_ack
        self.backends = []
        self.pumps = []
        self.refuse = False
        self.calls = []

    def connect(self, endpoint, protocol, session_protocol=None):
        self.calls.append((endpoint.address, session_protocol))
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        backend = Backend(self.mode, self.auto_ack)
        self.backends.append(backend)
        pump = iosim.connect(backend, iosim.FakeTransport(backend, True), protocol,
                             iosim.FakeTransport(protocol, False), greet=False, clock=self.clock)
        self.pumps.append(pump)
        return succeed(protocol)


class Harness:
    """
    One proxy server connection with its test client, settings, router and connector.
    """

    def __init__(self, mode="respond", routes=None, default=BACKEND, peer=None, auto_ack=True,
                 client_auto_ack=True, tracker=None, profiles=None):
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.router = FakeRouter(routes, default=default)
        self.connector = MemoryConnector(self.clock, mode, auto_ack)
        self.settings = HttpSettings(direction="outbound", router=self.router, connector=self.connector,
                                     metrics=self.metrics, reactor=self.clock, response_timeout=10.0,
                                     pool_idle_timeout=3.0, tracker=tracker, profiles=profiles)
        self.settings.h2_pool = H2Pool(self.settings)
        self.proxy = H2ServerProtocol(self.settings, peer or PeerInfo())
        self.client = Client(client_auto_ack)
        self.pump_ = iosim.connect(self.proxy, iosim.FakeTransport(self.proxy, True), self.client,
                                   iosim.FakeTransport(self.client, False), greet=False, clock=self.clock)

    @property
    def pool(self):
        return self.settings.h2_pool

    def pump(self):
        """Move bytes on every connection until nothing moves (bounded)."""
        for _ in range(PUMP_LIMIT):
            moved = False
            for p in [self.pump_] + self.connector.pumps:
                if p.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("pumping did not settle")

    def backend_streams(self):
        return {sid: s for b in self.connector.backends for sid, s in b.streams.items()}

    def sample(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def assert_clean(self, case):
        """No stream state left anywhere in the proxy."""
        case.assertEqual(self.proxy._streams, {})
        case.assertEqual(self.proxy.waiting, set())
        for conn in self.pool._all:
            case.assertEqual(conn._streams, {})
            case.assertEqual(conn.waiting, set())
        case.assertEqual(self.pool._connecting, {})


class GrpcRulesTests(SynchronousTestCase):
    """
    The sans-I/O gRPC helpers.
    """

    def test_is_grpc(self):
        """
        C{application/grpc} and its C{+proto} variants are gRPC; other content types are not.
        """
        self.assertTrue(grpc.is_grpc([(b"content-type", b"application/grpc")]))
        self.assertTrue(grpc.is_grpc([(b"content-type", b"application/grpc+proto")]))
        self.assertFalse(grpc.is_grpc([(b"content-type", b"application/json")]))
        self.assertFalse(grpc.is_grpc([]))

    def test_grpc_status(self):
        """
        The status is read from a header block as text, C{""} when absent.
        """
        self.assertEqual(grpc.grpc_status([(b"grpc-status", b"14")]), "14")
        self.assertEqual(grpc.grpc_status([(b":status", b"200")]), "")

    def test_trailers_only(self):
        """
        A proxy error becomes a trailers-only block with grpc-status, a percent-encoded message and
        l5d-proxy-error.
        """
        headers = _as_dict(grpc.trailers_only(ResponseTimeout("took 100% too long")))
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"content-type"], b"application/grpc")
        self.assertEqual(headers[b"grpc-status"], b"4")
        self.assertEqual(headers[b"grpc-message"], b"took 100%25 too long")
        self.assertEqual(headers[b"l5d-proxy-error"], b"took 100% too long")

    def test_error_response_plain(self):
        """
        A plain error response has the status, a content length matching the body, and l5d-proxy-error.
        """
        headers, body = grpc.error_response(NoEndpoints("no endpoints\r\nx"), False)
        headers = _as_dict(headers)
        self.assertEqual(headers[b":status"], b"503")
        self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertEqual(headers[b"l5d-proxy-error"], b"no endpoints  x")


class ProxyTests(SynchronousTestCase):
    """
    Requests through L{H2ServerProtocol} to in-memory backends.
    """

    def test_get(self):
        """
        A GET is routed by its authority, answered by the backend, counted, and its lease released as a success.
        """
        h = Harness()
        h.pump()
        sid = h.client.request()
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.headers[b":status"], b"200")
        self.assertEqual(s.data, b"hello")
        self.assertTrue(s.ended)
        self.assertEqual(h.router.authorities, [AUTHORITY])
        self.assertEqual(h.router.leases[0].outcomes, [True])
        self.assertEqual(h.connector.calls, [(BACKEND, "http2")])
        labels = dict(direction="outbound", authority=AUTHORITY, target_addr="10.0.0.1:8080", **UNMESHED)
        self.assertEqual(h.sample("request_total", **labels), 1)
        self.assertEqual(h.sample("response_total", classification="success", status_code="200", grpc_status="",
                                  **labels), 1)
        h.assert_clean(self)

    def test_authority_normalized(self):
        """
        The authority is lower-cased and given the scheme's default port before routing.
        """
        h = Harness()
        h.pump()
        h.client.request(authority="Web.Default")
        h.pump()
        self.assertEqual(h.router.authorities, ["web.default:80"])

    def test_request_headers(self):
        """
        Hop-by-hop headers are stripped except C{te: trailers}, and C{l5d-client-id} becomes the verified one.
        """
        h = Harness(peer=PeerInfo(tls="true", client_id="a.ns.serviceaccount.identity.x"))
        h.pump()
        h.client.request(extra=[("te", "trailers"), ("keep-alive", "1"), ("connection", "x-hop"), ("x-hop", "1"),
                                ("l5d-client-id", "forged"), ("x-app", "yes")])
        h.pump()
        (seen,) = h.backend_streams().values()
        self.assertEqual(seen.headers[b"te"], b"trailers")
        self.assertEqual(seen.headers[b"l5d-client-id"], b"a.ns.serviceaccount.identity.x")
        self.assertEqual(seen.headers[b"x-app"], b"yes")
        for name in (b"keep-alive", b"connection", b"x-hop"):
            self.assertNotIn(name, seen.headers)

    def test_multiplexed_on_one_connection(self):
        """
        Many concurrent streams share one upstream connection.
        """
        h = Harness()
        h.pump()
        sids = [h.client.request(path=b"/%d" % i) for i in range(30)]
        h.pump()
        self.assertEqual(len(h.connector.backends), 1)
        self.assertEqual(len(h.connector.backends[0].streams), 30)
        for sid in sids:
            self.assertEqual(h.client.streams[sid].data, b"hello")
        # A later request reuses the same connection.
        h.client.request()
        h.pump()
        self.assertEqual(len(h.connector.backends), 1)
        h.assert_clean(self)

    def test_new_connection_at_stream_limit(self):
        """
        When the endpoint's concurrent-stream limit is reached, another connection is opened.
        """
        h = Harness(mode="hold")
        h.pump()
        h.client.request()
        h.pump()
        backend = h.connector.backends[0]
        backend.conn.update_settings({0x3: 2})
        backend.flush()
        h.pump()
        for _ in range(3):
            h.client.request()
        h.pump()
        self.assertEqual(len(h.connector.backends), 2)
        self.assertEqual([len(b.streams) for b in h.connector.backends], [2, 2])

    def test_trailers_both_ways(self):
        """
        Request and response trailers are forwarded, and the response's grpc-status is counted.
        """
        h = Harness(mode="echo")
        h.pump()
        sid = h.client.request(method=b"POST", extra=[("content-type", "application/grpc"), ("te", "trailers")],
                               body=b"\x00\x00\x00\x00\x02hi", trailers=[("x-req-trailer", "1")])
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.data, b"\x00\x00\x00\x00\x02hi")
        self.assertEqual(s.trailers, {b"grpc-status": b"0"})
        self.assertTrue(s.ended)
        (seen,) = h.backend_streams().values()
        self.assertEqual(seen.trailers, {b"x-req-trailer": b"1"})
        self.assertEqual(h.sample("response_total", direction="outbound", authority=AUTHORITY,
                                  target_addr="10.0.0.1:8080", **UNMESHED,
                                  classification="success", status_code="200", grpc_status="0"), 1)
        h.assert_clean(self)

    def test_client_reset_propagates(self):
        """
        A client RST_STREAM resets the upstream stream with the same code and leaves nothing behind.
        """
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request(method=b"POST", body=b"x", end=False)
        h.pump()
        h.client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        h.client.flush()
        h.pump()
        (seen,) = h.backend_streams().values()
        self.assertEqual(seen.reset, ErrorCodes.CANCEL)
        # Cancelled by the client: no verdict on the endpoint.
        self.assertEqual(h.router.leases[0].outcomes, [None])
        h.assert_clean(self)
        self.assertEqual(h.clock.getDelayedCalls()[0].func.__name__, "_idle_check")
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)

    def test_upstream_reset_after_head(self):
        """
        An upstream RST_STREAM after the response head resets the client stream with the same code.
        """
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request()
        h.pump()
        backend = h.connector.backends[0]
        (bsid,) = backend.streams
        backend.conn.send_headers(bsid, [(b":status", b"200")])
        backend.conn.send_data(bsid, b"part")
        backend.conn.reset_stream(bsid, ErrorCodes.INTERNAL_ERROR)
        backend.flush()
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.headers[b":status"], b"200")
        self.assertEqual(s.reset, ErrorCodes.INTERNAL_ERROR)
        h.assert_clean(self)

    def test_upstream_reset_before_head(self):
        """
        An upstream RST_STREAM before the response head of a request that is not safe to repeat (a POST with a
        body) is a 502 with l5d-proxy-error.
        """
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request(method=b"POST", body=b"x")
        h.pump()
        backend = h.connector.backends[0]
        (bsid,) = backend.streams
        backend.conn.reset_stream(bsid, ErrorCodes.INTERNAL_ERROR)
        backend.flush()
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.headers[b":status"], b"502")
        self.assertIn(b"l5d-proxy-error", s.headers)
        self.assertTrue(s.ended)
        self.assertEqual(h.router.leases[0].outcomes, [False])
        h.assert_clean(self)

    def test_refused_stream_retried(self):
        """
        REFUSED_STREAM before anything of the request was lost is retried once.
        """
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request()
        h.pump()
        backend = h.connector.backends[0]
        backend.conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
        backend.flush()
        backend.mode = "respond"
        h.pump()
        self.assertEqual(sorted(backend.streams), [1, 3])
        self.assertEqual(h.client.streams[sid].data, b"hello")
        self.assertEqual(h.router.leases[0].outcomes, [True])

    def test_upstream_goaway(self):
        """
        After an upstream GOAWAY, streams up to its last stream id finish on the old connection, later ones are
        retried on a new connection, and new requests go to the new connection.
        """
        h = Harness(mode="hold")
        h.pump()
        first = h.client.request()
        second = h.client.request()
        h.pump()
        old = h.connector.backends[0]
        self.assertEqual(sorted(old.streams), [1, 3])
        # h2 keeps no streams going after its own close_connection(), so the frame is written by hand.
        frame = GoAwayFrame(0)
        frame.last_stream_id = 1
        old.transport.write(old.conn.data_to_send() + frame.serialize())
        h.pump()
        self.assertEqual(len(h.connector.backends), 2)
        new = h.connector.backends[1]
        self.assertEqual(sorted(new.streams), [1])
        # The first stream still completes on the old connection.
        old.conn.send_headers(1, [(b":status", b"200")])
        old.conn.send_data(1, b"old", end_stream=True)
        old.flush()
        new.mode = "respond"
        new.on_end(1)
        new.flush()
        h.pump()
        self.assertEqual(h.client.streams[first].data, b"old")
        self.assertEqual(h.client.streams[second].data, b"hello")
        third = h.client.request()
        h.pump()
        self.assertEqual(h.client.streams[third].data, b"hello")
        self.assertEqual(len(h.connector.backends), 2)
        h.assert_clean(self)

    def test_drain(self):
        """
        drain() sends GOAWAY naming the highest stream, lets it finish, refuses newer ones and then closes.
        """
        tracker = ConnectionTracker()
        h = Harness(mode="hold", tracker=tracker)
        h.pump()
        self.assertEqual(len(tracker), 1)
        sid = h.client.request()
        h.pump()
        tracker.drain()
        h.pump()
        self.assertEqual(h.client.goaways[0].last_stream_id, sid)
        late = h.client.request()
        h.pump()
        self.assertEqual(h.client.streams[late].reset, ErrorCodes.REFUSED_STREAM)
        self.assertFalse(h.client.lost)
        backend = h.connector.backends[0]
        backend.mode = "respond"
        backend.on_end(1)
        backend.flush()
        h.pump()
        self.assertEqual(h.client.streams[sid].data, b"hello")
        self.assertTrue(h.client.lost)
        self.assertEqual(len(tracker), 0)

    def test_no_endpoints_503(self):
        """
        A router with no endpoints gives 503 with l5d-proxy-error and a short body.
        """
        h = Harness(default=None)
        h.pump()
        sid = h.client.request()
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.headers[b":status"], b"503")
        self.assertEqual(s.headers[b"l5d-proxy-error"], b"no endpoints for " + AUTHORITY.encode())
        self.assertEqual(s.data, b"no endpoints for " + AUTHORITY.encode() + b"\n")
        self.assertEqual(h.sample("response_total", direction="outbound", authority=AUTHORITY, target_addr="",
                                  **UNMESHED, classification="failure",
                                  status_code="503", grpc_status=""), 1)
        h.assert_clean(self)

    def test_no_endpoints_grpc(self):
        """
        For gRPC the 503 is a trailers-only response with grpc-status 14.
        """
        h = Harness(default=None)
        h.pump()
        sid = h.client.request(method=b"POST", extra=[("content-type", "application/grpc")], body=b"\0\0\0\0\0",
                               end=False)
        h.pump()
        s = h.client.streams[sid]
        self.assertEqual(s.headers[b":status"], b"200")
        self.assertEqual(s.headers[b"grpc-status"], b"14")
        self.assertIn(b"l5d-proxy-error", s.headers)
        self.assertTrue(s.ended)
        self.assertEqual(s.data, b"")
        # The rest of the request is not wanted: RST_STREAM(NO_ERROR) after the complete response.
        self.assertEqual(s.reset, ErrorCodes.NO_ERROR)
        h.assert_clean(self)

    def test_connect_failure_502(self):
        """
        A failed connect is retried (three attempts in all); then 502 (and grpc-status 14 for gRPC), each
        attempt's lease released as a failure.
        """
        h = Harness()
        h.connector.refuse = True
        h.pump()
        plain = h.client.request()
        rpc = h.client.request(method=b"POST", extra=[("content-type", "application/grpc")])
        h.pump()
        self.assertEqual(h.client.streams[plain].headers[b":status"], b"502")
        self.assertIn(b"l5d-proxy-error", h.client.streams[plain].headers)
        self.assertEqual(h.client.streams[rpc].headers[b"grpc-status"], b"14")
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False]] * 6)
        h.assert_clean(self)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_response_timeout_504(self):
        """
        No response head within the response timeout gives 504 (grpc-status 4 for gRPC) and resets upstream.
        """
        h = Harness(mode="hold")
        h.pump()
        plain = h.client.request()
        rpc = h.client.request(method=b"POST", extra=[("content-type", "application/grpc")])
        h.pump()
        h.clock.advance(10)
        h.pump()
        self.assertEqual(h.client.streams[plain].headers[b":status"], b"504")
        self.assertEqual(h.client.streams[rpc].headers[b"grpc-status"], b"4")
        self.assertEqual([s.reset for s in h.backend_streams().values()], [ErrorCodes.CANCEL] * 2)
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False], [False]])
        h.assert_clean(self)

    def test_headers_too_large(self):
        """
        A header block over max_header_bytes gets 431 on that stream; the connection keeps working.
        """
        h = Harness()
        h.pump()
        big = h.client.request(extra=[("x-big", "a" * 70000)])
        h.pump()
        self.assertEqual(h.client.streams[big].headers[b":status"], b"431")
        ok = h.client.request()
        h.pump()
        self.assertEqual(h.client.streams[ok].data, b"hello")

    def test_bad_authority(self):
        """
        A request without a usable authority gets 400 and is not routed.
        """
        h = Harness()
        h.pump()
        sid = h.client.request(authority=None)
        h.pump()
        self.assertEqual(h.client.streams[sid].headers[b":status"], b"400")
        self.assertEqual(h.router.authorities, [])

    def test_large_body_flow_control(self):
        """
        A body larger than the 65535-byte window arrives intact, and the client's window is acknowledged only as
        far as the backend has accepted bytes: a backend that stops reading stalls the client.
        """
        h = Harness(mode="respond", auto_ack=False)
        h.pump()
        body = bytes(range(256)) * 1000
        sid = h.client.request(method=b"POST", body=body)
        h.pump()
        (bsid,) = h.connector.backends[0].streams
        received = len(h.backend_streams()[bsid].data)
        self.assertEqual(received, 65535)
        # The proxy queued at most one more window, and did not acknowledge it to the client.
        sent = len(body) - len(h.client.pending[sid][0])
        self.assertLessEqual(sent - received, 65535)
        self.assertEqual(h.client.conn.local_flow_control_window(sid), 0)
        for _ in range(20):
            h.connector.backends[0].ack()
            h.pump()
        self.assertEqual(h.backend_streams()[bsid].data, body)
        self.assertEqual(h.client.streams[sid].data, b"hello")
        h.assert_clean(self)

    def test_slow_client_backpressure(self):
        """
        While the client's transport is full (pauseProducing), response data waits; it flows on resume.
        """
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request()
        h.pump()
        backend = h.connector.backends[0]
        backend.conn.send_headers(1, [(b":status", b"200")])
        backend.flush()
        h.pump()
        h.proxy.pauseProducing()
        backend.conn.send_data(1, b"x" * 1000, end_stream=True)
        backend.flush()
        h.pump()
        self.assertEqual(h.client.streams[sid].data, b"")
        self.assertEqual(len(h.proxy.waiting), 1)
        h.proxy.resumeProducing()
        h.pump()
        self.assertEqual(h.client.streams[sid].data, b"x" * 1000)
        self.assertTrue(h.client.streams[sid].ended)
        h.assert_clean(self)

    def test_client_gone_cleans_up(self):
        """
        When the client connection is lost, every upstream stream is reset (CANCEL), no timers or entries stay
        behind, and the idle upstream connection closes after the pool idle timeout.
        """
        h = Harness(mode="hold")
        h.pump()
        for _ in range(5):
            h.client.request(method=b"POST", body=b"data", end=False)
        h.pump()
        h.client.transport.loseConnection()
        h.pump()
        self.assertEqual([s.reset for s in h.backend_streams().values()], [ErrorCodes.CANCEL] * 5)
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[None]] * 5)
        h.assert_clean(self)
        self.assertEqual([c.func.__name__ for c in h.clock.getDelayedCalls()], ["_idle_check"])
        h.clock.advance(3)
        h.pump()
        self.assertTrue(h.connector.backends[0].lost)
        self.assertEqual(h.pool.connection_count(), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_upstream_lost(self):
        """
        Losing the upstream connection answers 502 to streams without a response head and resets the others.
        """
        h = Harness(mode="hold")
        h.pump()
        headed = h.client.request()
        waiting = h.client.request(method=b"POST", body=b"x")
        h.pump()
        backend = h.connector.backends[0]
        backend.conn.send_headers(1, [(b":status", b"200")])
        backend.flush()
        h.pump()
        backend.transport.loseConnection()
        h.pump()
        self.assertIsNotNone(h.client.streams[headed].reset)
        self.assertEqual(h.client.streams[waiting].headers[b":status"], b"502")
        h.assert_clean(self)
        self.assertEqual(h.pool.connection_count(), 0)

    def test_idle_connection_closed(self):
        """
        A pooled connection without streams for pool_idle_timeout is closed; the next request opens another.
        """
        h = Harness()
        h.pump()
        h.client.request()
        h.pump()
        h.clock.advance(2)
        h.client.request()
        h.pump()
        h.clock.advance(2)
        self.assertFalse(h.connector.backends[0].lost)
        h.clock.advance(1.5)
        h.pump()
        self.assertTrue(h.connector.backends[0].lost)
        h.client.request()
        h.pump()
        self.assertEqual(len(h.connector.backends), 2)


class DataEndCoalescedTests(SynchronousTestCase):
    """
    DATA and END_STREAM read from the endpoint together are forwarded as one DATA frame with END_STREAM.
    """

    def test_one_frame(self):
        h = Harness()
        h.pump()
        ends = []
        handle = h.client.handle

        def record(event):
            if isinstance(event, DataReceived):
                ends.append(event.stream_ended is not None)
            handle(event)

        h.client.handle = record
        sid = h.client.request()
        h.pump()
        self.assertEqual(h.client.streams[sid].data, b"hello")
        self.assertTrue(h.client.streams[sid].ended)
        self.assertEqual(ends, [True])
        h.assert_clean(self)


class HpackTests(SynchronousTestCase):
    """
    L{LeanEncoder} and L{LeanDecoder} against hpack's own encoder and decoder.
    """

    BLOCKS = [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"web.default:80")],
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-id", b"\x00\xff" * 200)],
        [(b":method", b"POST"), (b"x-custom", b"a" * 300), (b"te", b"trailers"), (b"x-empty", b"")],
        [(b":path", b"/pkg.Service/Method"), hpack.NeverIndexedHeaderTuple(b"authorization", b"secret"),
         hpack.NeverIndexedHeaderTuple(b"x-token", b"t0k3n")],
        [(b"grpc-status", b"0"), (b"grpc-message", b"")],
    ]

    def setUp(self):
        h2_private._decoded_blocks.clear()

    def test_round_trip(self):
        """
        What L{LeanEncoder} writes hpack reads back, and what hpack writes (with its dynamic table) L{LeanDecoder}
        reads back, over several blocks on one connection; "never indexed" fields stay so.
        """
        ours, theirs = LeanEncoder(), hpack.Encoder()
        our_decoder, their_decoder = LeanDecoder(), hpack.Decoder()
        for _ in range(3):
            for block in self.BLOCKS:
                expected = [tuple(f) for f in block]
                decoded = their_decoder.decode(ours.encode(block), raw=True)
                self.assertEqual([tuple(f) for f in decoded], expected)
                decoded = our_decoder.decode(theirs.encode(block), raw=True)
                self.assertEqual([tuple(f) for f in decoded], expected)
                self.assertEqual([type(f) is hpack.NeverIndexedHeaderTuple for f in decoded],
                                 [isinstance(f, hpack.NeverIndexedHeaderTuple) for f in block])
        # Ours never indexes; theirs does, and our decoder keeps the same table as hpack's would.
        self.assertEqual(list(their_decoder.header_table.dynamic_entries), [])
        self.assertEqual(list(our_decoder.header_table.dynamic_entries), list(theirs.header_table.dynamic_entries))

    def test_table_size_update(self):
        """
        When the peer changes SETTINGS_HEADER_TABLE_SIZE, the next block starts with a size update.
        """
        encoder, decoder = LeanEncoder(), hpack.Decoder()
        encoder.header_table_size = 0
        block = encoder.encode([(b":status", b"200")])
        self.assertEqual(block, b"\x20\x88")
        decoder.decode(block)
        self.assertEqual(decoder.header_table_size, 0)
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x88")

    def test_block_cache_respects_table(self):
        """
        A block of "incremental indexing" fields is replayed from the cache only on a table of size 0, where
        indexing changes nothing; a connection with a table still indexes its fields.
        """
        fields = [(b"server", b"nginx"), (b"date", b"Tue, 24 Nov 2026 16:41:39 GMT")]
        sized_to_zero = hpack.Encoder()
        sized_to_zero.header_table_size = 0
        first = sized_to_zero.encode(fields)
        again = sized_to_zero.encode(fields)
        self.assertNotEqual(first, again)  # the first one carries the size update
        zero = LeanDecoder()
        zero.max_allowed_table_size = 0
        self.assertEqual(zero.decode(first, raw=True), fields)
        self.assertEqual(zero.decode(again, raw=True), fields)
        self.assertIn(again, h2_private._decoded_blocks)
        self.assertEqual(zero.decode(again, raw=True), fields)
        sized = LeanDecoder()
        self.assertEqual(sized.decode(again, raw=True), fields)
        self.assertEqual(len(sized.header_table.dynamic_entries), 2)

    def test_cached_block_still_limited(self):
        """
        A cached block over a decoder's header list limit is refused like any other.
        """
        block = LeanEncoder().encode([(b"x-big", b"b" * 100)])
        self.assertEqual(LeanDecoder().decode(block, raw=True), [(b"x-big", b"b" * 100)])
        self.assertIn(block, h2_private._decoded_blocks)
        small = LeanDecoder(max_header_list_size=100)
        self.assertRaises(hpack.OversizedHeaderListError, small.decode, block, raw=True)

    def test_malformed(self):
        """
        Malformed blocks raise hpack's decoding errors, which h2 turns into a connection error.
        """
        for block in [b"\x80", b"\xff\xff\xff\xff\xff\xff\xff", b"\x00\x05ab", b"\x41\x85", b"\xbf",
                      b"\x88\x3f\xe1\x1f"]:
            self.assertRaises(hpack.HPACKDecodingError, LeanDecoder().decode, block, raw=True)


def _connected_pair(server_settings=None):
    """
    A client and a server L{LeanConnection}, their prefaces and SETTINGS exchanged in memory.
    """
    client = LeanConnection(H2Configuration(client_side=True, **_TEST_CONFIG))
    server = LeanConnection(H2Configuration(client_side=False, **_TEST_CONFIG))
    if server_settings:
        server.local_settings = Settings(client=False, initial_values=server_settings)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


class OpenStreamsTests(SynchronousTestCase):
    """
    L{LeanConnection} counts open streams lazily, and still enforces the concurrency limits exactly.
    """

    def _pair(self, limit):
        return _connected_pair({SettingCodes.MAX_CONCURRENT_STREAMS: limit})

    def _request(self, client, server, end):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")], end_stream=True)
        server.receive_data(client.data_to_send())
        if end:
            server.send_headers(sid, [(b":status", b"204")], end_stream=True)
            client.receive_data(server.data_to_send())
        return sid

    def test_limit_after_many_closed(self):
        """
        After many finished streams, the limit allows exactly C{limit} open streams, inbound and outbound.
        """
        client, server = self._pair(3)
        for _ in range(200):
            self._request(client, server, end=True)
        self.assertLess(len(server.streams), 200)
        self.assertLess(len(client.streams), 200)
        for _ in range(3):
            self._request(client, server, end=False)
        self.assertEqual(server.open_inbound_streams, 3)
        self.assertEqual(client.open_outbound_streams, 3)
        # The client refuses to open a fourth; forced through, the server refuses it too.
        sid = client.get_next_available_stream_id()
        self.assertRaises(ProtocolError, client.send_headers, sid, [(b":method", b"GET")])
        forced = LeanConnection(H2Configuration(client_side=True, **_TEST_CONFIG))
        forced.initiate_connection()
        forced.data_to_send()
        forced.highest_outbound_stream_id = sid - 2
        forced.send_headers(sid, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
        self.assertRaises(ProtocolError, server.receive_data, forced.data_to_send())


# -- The lean frame and stream paths -------------------------------------------------------------------------

from hypothesis import given, strategies as st
from hyperframe.frame import (
    ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame, WindowUpdateFrame,
)
from h2.frame_buffer import FrameBuffer
from h2.exceptions import FrameTooLargeError

from linkproxy.net.h2_private import LeanFrameBuffer, OutFrame, header_frames


def _frame_fields(frame):
    """
    What h2 reads of a received frame, comparable between hyperframe's frames and linkproxy's.
    """
    fields = {"kind": frame.type, "stream_id": frame.stream_id, "flags": set(frame.flags)}
    for name in ("data", "pad_length", "depends_on", "stream_weight", "exclusive", "body_len", "error_code",
                 "window_increment", "opaque_data"):
        if hasattr(frame, name):
            fields[name] = getattr(frame, name)
    if isinstance(frame, DataFrame):
        fields["flow_controlled_length"] = frame.flow_controlled_length
    return fields


def _drain(buffer, data, max_frame_size=16384):
    """
    Feed C{data} to C{buffer} one chunk at a time; the frames read, and the error that ended the reading.
    """
    buffer.max_frame_size = max_frame_size
    out = []
    try:
        for i in range(0, len(data), 7):
            buffer.add_data(data[i:i + 7])
            out.extend(_frame_fields(f) for f in buffer)
    except Exception as e:
        return out, type(e)
    return out, None


_stream_ids = st.integers(min_value=1, max_value=2 ** 31 - 1)


@st.composite
def _frames(draw):
    kind = draw(st.sampled_from(["data", "headers", "headers+cont", "ping", "rst", "window"]))
    sid = draw(_stream_ids)
    if kind == "data":
        f = DataFrame(sid, data=draw(st.binary(max_size=64)))
        if draw(st.booleans()):
            f.flags.add("END_STREAM")
        if draw(st.booleans()):
            f.flags.add("PADDED")
            f.pad_length = draw(st.integers(min_value=0, max_value=20))
        return [f]
    if kind in ("headers", "headers+cont"):
        f = HeadersFrame(sid, data=draw(st.binary(max_size=64)))
        for flag in ("END_STREAM", "PADDED", "PRIORITY"):
            if draw(st.booleans()):
                f.flags.add(flag)
        if "PADDED" in f.flags:
            f.pad_length = draw(st.integers(min_value=0, max_value=20))
        if "PRIORITY" in f.flags:
            f.depends_on = draw(st.integers(min_value=0, max_value=2 ** 31 - 1))
            f.stream_weight = draw(st.integers(min_value=0, max_value=255))
            f.exclusive = draw(st.booleans())
        if kind == "headers":
            f.flags.add("END_HEADERS")
            return [f]
        c = ContinuationFrame(sid, data=draw(st.binary(max_size=32)))
        c.flags.add("END_HEADERS")
        return [f, c]
    if kind == "ping":
        return [PingFrame(0, opaque_data=draw(st.binary(min_size=8, max_size=8)))]
    if kind == "rst":
        f = RstStreamFrame(sid)
        f.error_code = draw(st.integers(min_value=0, max_value=13))
        return [f]
    f = WindowUpdateFrame(draw(st.integers(min_value=0, max_value=2 ** 31 - 1)))
    f.window_increment = draw(st.integers(min_value=1, max_value=2 ** 31 - 1))
    return [f]


class FrameBufferTests(SynchronousTestCase):
    """
    L{LeanFrameBuffer} reads the same frames as h2's C{FrameBuffer}, and fails the same way.
    """

    def assertSameReading(self, wire, max_frame_size=16384):
        """
        The same frames, then the same error class or none; except that L{LeanFrameBuffer} refuses an oversized
        frame as soon as its header is in, where h2 waits for the whole frame (which may never come) or first
        finds another fault in its header. Either way it is a connection error.
        """
        ours, theirs = _drain(LeanFrameBuffer(), wire, max_frame_size), _drain(FrameBuffer(), wire, max_frame_size)
        if ours[1] is FrameTooLargeError:
            self.assertEqual(ours[0], theirs[0])
            self.assertTrue(theirs[1] is None or issubclass(theirs[1], ProtocolError), theirs)
        else:
            self.assertEqual(ours, theirs)

    @given(st.lists(_frames(), max_size=12).map(lambda groups: [f for g in groups for f in g]))
    def test_same_frames(self, frames):
        self.assertSameReading(b"".join(f.serialize() for f in frames))

    @given(st.binary(max_size=80), st.sampled_from([16, 16384]))
    def test_same_on_garbage(self, wire, max_frame_size):
        self.assertSameReading(wire, max_frame_size)

    def test_oversized_refused_at_its_header(self):
        """
        A frame header announcing more than the maximum frame size is an error at once, for every frame type,
        before any of its body is buffered.
        """
        for kind in (0x0, 0x1, 0x6, 0x9, 0xEE):
            buffer = LeanFrameBuffer()
            buffer.max_frame_size = 16384
            buffer.add_data(b"\xff\xff\xff" + bytes((kind,)) + b"\x00\x00\x00\x00\x01")
            self.assertRaises(FrameTooLargeError, list, buffer)
        # Oversized and on stream 0: h2 calls it a protocol error, linkproxy a size error; both end the connection.
        self.assertSameReading(b"\x00\x00\x20\x01\x04\x00\x00\x00\x00" + b"x" * 32, max_frame_size=16)

    def test_errors(self):
        stream_zero = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
        oversized = b"\x00\x00\x11\x01\x04\x00\x00\x00\x01" + b"x" * 17
        bad_padding = b"\x00\x00\x02\x00\x08\x00\x00\x00\x01\x05x"
        for wire, error in [(stream_zero, ProtocolError), (oversized, FrameTooLargeError),
                            (bad_padding, Exception)]:
            ours = _drain(LeanFrameBuffer(), wire, max_frame_size=16)
            self.assertEqual(ours, _drain(FrameBuffer(), wire, max_frame_size=16))
            self.assertTrue(issubclass(ours[1], error), ours)


class OutFrameTests(SynchronousTestCase):
    """
    The frames linkproxy serializes itself are byte for byte hyperframe's.
    """

    @given(_stream_ids, st.binary(max_size=100), st.booleans())
    def test_data(self, sid, body, end):
        f = DataFrame(sid, data=body)
        if end:
            f.flags.add("END_STREAM")
        ours = OutFrame(0, 1 if end else 0, sid, body)
        self.assertEqual(ours.serialize(), f.serialize())
        self.assertEqual(ours.body_len, len(body))

    @given(_stream_ids, st.binary(min_size=1, max_size=100), st.integers(min_value=1, max_value=40), st.booleans())
    def test_header_block_split(self, sid, block, max_size, end):
        frames = header_frames(sid, block, max_size, end)
        self.assertTrue(all(f.body_len <= max_size for f in frames))
        buffer = FrameBuffer()
        buffer.max_frame_size = max_size
        buffer.add_data(b"".join(f.serialize() for f in frames))
        [read] = list(buffer)
        self.assertIsInstance(read, HeadersFrame)
        self.assertEqual(read.data, block)
        self.assertEqual(read.stream_id, sid)
        self.assertEqual("END_STREAM" in read.flags, end)
        self.assertIn("END_HEADERS", read.flags)


class LeanStreamTests(SynchronousTestCase):
    """
    L{linkproxy.net.h2_private.LeanStream} keeps h2's stream rules: informational responses, trailers, HEAD, and the
    streams held by L{LeanConnection} stay few.
    """

    def _pair(self):
        return _connected_pair()

    def test_informational_then_final(self):
        client, server = self._pair()
        client.send_headers(1, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"),
                                (b"expect", b"100-continue")])
        server.receive_data(client.data_to_send())
        self.assertRaises(ProtocolError, server.send_headers, 1, [(b":status", b"100")], end_stream=True)
        server.send_headers(1, [(b":status", b"100")])
        events = client.receive_data(server.data_to_send())
        self.assertEqual(type(events[0]).__name__, "InformationalResponseReceived")
        client.send_data(1, b"body", end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(1, [(b":status", b"200")])
        server.send_data(1, b"ok")
        server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        events = client.receive_data(server.data_to_send())
        self.assertEqual([type(e).__name__ for e in events],
                         ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"])
        self.assertEqual(events[1].data, b"ok")
        # Trailers must end the stream, as h2 requires.
        client.send_headers(3, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")], end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(3, [(b":status", b"200")])
        self.assertRaises(ProtocolError, server.send_headers, 3, [(b"grpc-status", b"0")])

    def test_head_response_with_length(self):
        """
        A response to HEAD may name a Content-Length and carry no body: h2 learns the method from our stream.
        """
        client, server = self._pair()
        client.send_headers(1, [(b":method", b"HEAD"), (b":path", b"/"), (b":scheme", b"http")], end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")], end_stream=True)
        events = client.receive_data(server.data_to_send())
        self.assertEqual([type(e).__name__ for e in events], ["ResponseReceived", "StreamEnded"])

    def test_body_longer_than_content_length(self):
        client, server = self._pair()
        client.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")], end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"1")])
        server.send_data(1, b"too long", end_stream=True)
        self.assertRaises(ProtocolError, client.receive_data, server.data_to_send())

    def test_large_header_block_continuation(self):
        client, server = self._pair()
        big = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b"x-big", b"v" * 40000)]
        client.send_headers(1, big, end_stream=True)
        events = server.receive_data(client.data_to_send())
        self.assertEqual(events[0].headers[-1], (b"x-big", b"v" * 40000))
        self.assertIsNotNone(events[0].stream_ended)

    def test_closed_streams_dropped(self):
        """
        L{LeanConnection.drop_closed} forgets a finished stream at once, and h2 still knows how it was closed:
        DATA that arrives for it afterwards gets RST_STREAM, not a connection error.
        """
        client, server = self._pair()
        client.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
        server.receive_data(client.data_to_send())
        server.reset_stream(1, ErrorCodes.CANCEL)
        server.drop_closed(1)
        server.drop_closed(1)
        self.assertNotIn(1, server.streams)
        client.receive_data(server.data_to_send())
        late = DataFrame(1, data=b"late")
        server.receive_data(late.serialize())
        rst = server.data_to_send()
        self.assertEqual(rst[3], 0x3)  # RST_STREAM, for that stream only
        # An open stream is kept.
        client.send_headers(3, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
        server.receive_data(client.data_to_send())
        server.drop_closed(3)
        self.assertIn(3, server.streams)


class ClosedStreamsTests(SynchronousTestCase):
    """
    A connection remembers a bounded number of closed streams: recent resets are still answered per stream.
    """

    def test_bounded(self):
        client, server = _connected_pair()
        request = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")]
        for i in range(h2_private.CLOSED_STREAMS_KEPT + 50):
            sid = 2 * i + 1
            client.send_headers(sid, request, end_stream=True)
            server.receive_data(client.data_to_send())
            server.send_headers(sid, [(b":status", b"204")], end_stream=True)
            client.receive_data(server.data_to_send())
            server.drop_closed(sid)
            client.drop_closed(sid)
        self.assertEqual(len(server._closed_streams), h2_private.CLOSED_STREAMS_KEPT)
        self.assertEqual(len(client._closed_streams), h2_private.CLOSED_STREAMS_KEPT)
        self.assertEqual(len(server.streams), 0)
        # A stream reset just now still gets RST_STREAM for a late DATA frame.
        sid += 2
        client.send_headers(sid, request)
        server.receive_data(client.data_to_send())
        server.reset_stream(sid, ErrorCodes.CANCEL)
        server.drop_closed(sid)
        server.data_to_send()
        server.receive_data(DataFrame(sid, data=b"late").serialize())
        self.assertEqual(server.data_to_send()[3], 0x3)
