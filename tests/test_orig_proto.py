"""
Tests for L{linkproxy.net.orig_proto}: the header translation rules, and the whole bridge in memory:

    raw HTTP/1 client ─▶ Http1ServerProtocol (outbound, UpgradingPool) ═ h2 ═▶ H2ServerProtocol (inbound, meshed
    peer, downgrading_streams) ─▶ Http1Pool ─▶ scripted HTTP/1 app

all over L{twisted.test.iosim} transports with a L{Clock}.
"""

from httptools import HttpRequestParser
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.core.endpoint import Endpoint
from linkproxy.net.context import HttpSettings, PeerInfo
from linkproxy.net.h2 import H2Pool, H2ServerProtocol, Stream
from linkproxy.net.http1 import Http1Pool, Http1ServerProtocol
from linkproxy.net.orig_proto import (
    H2Exchange, Http1Stream, UpgradingPool, downgrading_streams, h1_request_head, h1_response_head,
    h2_request_headers,
)
from linkproxy.testing import FakeRouter, RecordingLease
from tests.test_http1 import ParsedResponses

CLIENT_ID = "client.default.serviceaccount.identity.linkproxy.local"
APP = ("127.0.0.1", 8080)
MESHED = Endpoint(address=APP, identity="web.default.serviceaccount.identity.linkproxy.local",
                  proxy=("127.0.0.1", 4143))
PLAIN_ENDPOINT = Endpoint(address=("10.0.0.9", 80))
PUMP_LIMIT = 2000


class HeaderRulesTests(SynchronousTestCase):
    """
    The pure translation functions.
    """

    def test_origin_form(self):
        """
        Pseudo-headers come first (C{:authority} from Host), hop-by-hop headers and Host are dropped,
        C{te: trailers} is kept, and C{l5d-orig-proto: HTTP/1.1} ends the block.
        """
        headers = h2_request_headers(b"GET", b"/a?b=1", [
            (b"host", b"web.default"), (b"connection", b"keep-alive"), (b"keep-alive", b"5"),
            (b"transfer-encoding", b"chunked"), (b"te", b"trailers"), (b"upgrade", b"x"), (b"accept", b"*/*"),
            (b"l5d-orig-proto", b"HTTP/9"),
        ])
        self.assertEqual(headers, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web.default"), (b":path", b"/a?b=1"),
            (b"te", b"trailers"), (b"accept", b"*/*"), (b"l5d-orig-proto", b"HTTP/1.1"),
        ])

    def test_absolute_form(self):
        """
        An absolute-form target gives C{:authority} (over Host) and an origin-form C{:path}.
        """
        headers = dict(h2_request_headers(b"GET", b"http://web.default:8080/x?y", [(b"host", b"other")]))
        self.assertEqual((headers[b":authority"], headers[b":path"]), (b"web.default:8080", b"/x?y"))
        headers = dict(h2_request_headers(b"GET", b"http://web.default?q", []))
        self.assertEqual((headers[b":authority"], headers[b":path"]), (b"web.default", b"/?q"))
        headers = dict(h2_request_headers(b"OPTIONS", b"*", [(b"host", b"h")]))
        self.assertEqual(headers[b":path"], b"*")

    def test_downgrade_head(self):
        """
        The HTTP/1.1 head of a downgraded request: Host from C{:authority}, framing by how the stream goes on.
        """
        base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web.default"), (b":path", b"/p"),
                (b"accept", b"*/*"), (b"te", b"trailers")]
        method, head, chunked, length = h1_request_head(base, True)
        self.assertEqual((method, chunked, length), (b"GET", False, None))
        self.assertEqual(head, b"GET /p HTTP/1.1\r\nhost: web.default\r\naccept: */*\r\n\r\n")
        post = [(b":method", b"POST")] + base[1:]
        self.assertIn(b"content-length: 0\r\n", h1_request_head(post, True)[1])
        _, head, chunked, _ = h1_request_head(post, False)
        self.assertTrue(chunked)
        self.assertIn(b"transfer-encoding: chunked\r\n", head)
        _, head, chunked, length = h1_request_head(post + [(b"content-length", b"12")], False)
        self.assertEqual((chunked, length), (False, 12))
        self.assertIn(b"content-length: 12\r\n", head)

    def test_response_head(self):
        """
        C{:status} is read, C{l5d-orig-proto} dropped, framing set aside.
        """
        status, resp = h1_response_head([(b":status", b"201"), (b"l5d-orig-proto", b"HTTP/1.1"),
                                         (b"content-length", b"3"), (b"x-a", b"b")])
        self.assertEqual((status, resp.content_length, resp.finish()), (201, b"3", [(b"x-a", b"b")]))
        self.assertIsNone(h1_response_head([(b":status", b"abc")])[0])

    def test_downgrading_streams(self):
        """
        Only streams marked C{l5d-orig-proto: HTTP/1.x} become L{Http1Stream}s; the header is removed.
        """
        harness = Harness(self)
        server = harness.inbound_server()
        plain = downgrading_streams(server, 1, [(b":method", b"GET"), (b"accept", b"*/*")], False)
        self.assertEqual(type(plain), Stream)
        marked = downgrading_streams(server, 3, [(b":method", b"GET"), (b"l5d-orig-proto", b"HTTP/1.1")], False)
        self.assertEqual(type(marked), Http1Stream)
        self.assertEqual(marked.headers, [(b":method", b"GET")])
        other = downgrading_streams(server, 5, [(b":method", b"GET"), (b"l5d-orig-proto", b"h3")], False)
        self.assertEqual(type(other), Stream)
        self.assertEqual(other.headers, [(b":method", b"GET")])


class App(Protocol):
    """
    A scripted HTTP/1 app connection: each request is recorded in C{harness.requests} and answered by
    C{harness.respond(app, request)} (bytes, or C{None} to answer later).
    """

    def __init__(self, harness):
        self.harness = harness
        self.parser = HttpRequestParser(self)

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def on_message_begin(self):
        self.req = {"url": b"", "headers": [], "body": b"", "trailers": []}
        self._in_body = False

    def on_url(self, url):
        self.req["url"] += url

    def on_header(self, name, value):
        (self.req["trailers"] if self._in_body else self.req["headers"]).append((name.lower(), value))

    def on_headers_complete(self):
        self._in_body = True
        self.req["method"] = self.parser.get_method()
        self.req["version"] = self.parser.get_http_version()

    def on_body(self, data):
        self.req["body"] += data

    def on_message_complete(self):
        self.harness.requests.append(self.req)
        answer = self.harness.respond(self, self.req)
        if answer:
            self.transport.write(answer)


class RawClient(Protocol):
    """
    The downstream HTTP/1 client: writes raw bytes, parses the responses.
    """

    def __init__(self):
        self.parsed = ParsedResponses()
        self.parse = True
        self.raw = b""
        self.lost = False

    def dataReceived(self, data):
        self.raw += data
        if self.parse:
            self.parsed.feed(data)

    def connectionLost(self, reason=None):
        self.lost = True

    @property
    def responses(self):
        return self.parsed.responses


class MeshConnector:
    """
    Outbound connector: a meshed connection is an in-memory pair with a new inbound H2ServerProtocol (as for a
    peer proxy with a verified client identity); anything else goes to a new L{App}.
    """

    meshed = True

    def __init__(self, harness):
        self.harness = harness
        self.calls = []
        self.refuse = False

    def connect(self, endpoint, protocol, session_protocol=None):
        self.calls.append((endpoint.address, session_protocol))
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        if endpoint.meshed:
            server = self.harness.inbound_server()
            self.harness.servers.append(server)
        else:
            server = App(self.harness)
        return self.harness.connect(server, protocol)


class AppConnector:
    """
    Inbound connector: every connection goes to a new L{App}.
    """

    def __init__(self, harness):
        self.harness = harness
        self.calls = []
        self.refuse = False

    def connect(self, endpoint, protocol, session_protocol=None):
        self.calls.append((endpoint.address, session_protocol))
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        app = App(self.harness)
        self.harness.apps.append(app)
        return self.harness.connect(app, protocol)


class EndpointRouter:
    """
    Routes everything to one L{Endpoint} (meshed or not).
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def route(self, authority):
        return succeed(RecordingLease(self.endpoint))


def _ok(body=b"hello", extra=b""):
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Harness:
    """
    Both proxies' HTTP layers in one process, joined by in-memory transports.
    """

    def __init__(self, case, endpoint=MESHED):
        self.case = case
        self.clock = Clock()
        self.pumps = []
        self.requests = []
        self.apps = []
        self.servers = []
        self.respond = lambda app, req: _ok()
        self.out_settings = HttpSettings(direction="outbound", router=EndpointRouter(endpoint),
                                         connector=MeshConnector(self), metrics=Metrics(process=False),
                                         reactor=self.clock)
        self.out_settings.h1_pool = UpgradingPool(Http1Pool(self.out_settings), self.out_settings)
        self.in_settings = HttpSettings(direction="inbound", router=FakeRouter(default=APP),
                                        connector=AppConnector(self), metrics=Metrics(process=False),
                                        reactor=self.clock)
        self.in_settings.h1_pool = Http1Pool(self.in_settings)
        self.in_settings.h2_pool = H2Pool(self.in_settings)

    def inbound_server(self):
        server = H2ServerProtocol(self.in_settings, PeerInfo(tls="true", client_id=CLIENT_ID))
        server.new_stream = downgrading_streams
        return server

    def connect(self, server, protocol):
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, True), protocol,
                                        iosim.FakeTransport(protocol, False), greet=False, clock=self.clock))
        return succeed(protocol)

    def client(self):
        """
        A new client connection to the outbound HTTP/1 server.
        """
        server = Http1ServerProtocol(self.out_settings)
        client = RawClient()
        self.connect(server, client)
        client.server = server
        return client

    def pump(self):
        for _ in range(PUMP_LIMIT):
            moved = False
            for p in list(self.pumps):
                if p.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("pumping did not settle")

    def send(self, client, data):
        client.transport.write(data)
        self.pump()

    def out_metric(self, name, **labels):
        return _sample(self.out_settings, name, **labels)

    def in_metric(self, name, **labels):
        return _sample(self.in_settings, name, **labels)

    def assert_clean(self):
        """
        No stream left on either side; the h2 connection stays pooled, the app connections are idle in the pool.
        """
        case = self.case
        for conn in self.out_settings.h2_pool._all:
            case.assertEqual(conn._streams, {})
            case.assertEqual(conn.waiting, set())
        for server in self.servers:
            case.assertEqual(server._streams, {})
            case.assertEqual(server.waiting, set())


def _sample(settings, name, **labels):
    total = 0.0
    for family in settings.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


GET = b"GET /hello?x=1 HTTP/1.1\r\nHost: web.default\r\nAccept: */*\r\nX-Mixed: Case\r\n\r\n"


class BridgeTests(SynchronousTestCase):
    """
    HTTP/1 through the outbound proxy, HTTP/2 between the proxies, HTTP/1 to the app.
    """

    def test_get(self):
        """
        The app gets an HTTP/1.1 request with Host, the client's headers, l5d-client-id and no l5d-orig-proto;
        the client gets the app's response as HTTP/1.1; the proxies spoke HTTP/2 (session protocol http2).
        """
        h = Harness(self)
        client = h.client()
        h.send(client, GET)
        self.assertEqual(h.out_settings.connector.calls, [(APP, "http2")])
        self.assertEqual(h.in_settings.connector.calls, [(APP, "http1")])
        [req] = h.requests
        self.assertEqual((req["method"], req["url"], req["version"]), (b"GET", b"/hello?x=1", "1.1"))
        self.assertEqual(req["headers"], [(b"host", b"web.default"), (b"accept", b"*/*"), (b"x-mixed", b"Case"),
                                          (b"l5d-client-id", CLIENT_ID.encode())])
        self.assertEqual(client.responses, [(200, {b"content-length": b"5"}, b"hello")])
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(h.in_metric("request_total", direction="inbound", tls="true", client_id=CLIENT_ID), 1)
        self.assertEqual(h.in_metric("response_total", direction="inbound", status_code="200"), 1)
        self.assertEqual(h.out_metric("request_total", direction="outbound", tls="true"), 1)
        self.assertEqual(h.out_metric("response_total", direction="outbound", status_code="200"), 1)
        h.assert_clean()
        self.assertEqual(len(h.in_settings.h1_pool), 1)

    def test_connections_shared(self):
        """
        Two client connections, several requests each: one HTTP/2 connection between the proxies, one app
        connection reused, every response in order.
        """
        h = Harness(self)
        clients = [h.client(), h.client()]
        for _ in range(3):
            for client in clients:
                client.transport.write(GET)
            h.pump()
        for client in clients:
            self.assertEqual([r[2] for r in client.responses], [b"hello"] * 3)
        self.assertEqual(len(h.out_settings.connector.calls), 1)
        self.assertEqual(len(h.servers), 1)
        self.assertEqual(len(h.requests), 6)
        # Two requests at a time need two HTTP/1 connections to the app, reused after.
        self.assertEqual(len(h.apps), 2)
        h.assert_clean()

    def test_pipelined(self):
        """
        Pipelined requests are answered in order.
        """
        h = Harness(self)
        h.respond = lambda app, req: _ok(req["url"])
        client = h.client()
        h.send(client, GET.replace(b"/hello?x=1", b"/1") + GET.replace(b"/hello?x=1", b"/2"))
        self.assertEqual([r[2] for r in client.responses], [b"/1", b"/2"])

    def test_post_content_length(self):
        """
        A body with content-length arrives whole, with its content-length.
        """
        h = Harness(self)
        body = b"x" * 200000
        client = h.client()
        h.send(client, b"POST /up HTTP/1.1\r\nHost: web.default\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        [req] = h.requests
        self.assertEqual(req["body"], body)
        self.assertIn((b"content-length", b"200000"), req["headers"])
        self.assertEqual(client.responses[0][0], 200)
        h.assert_clean()

    def test_post_chunked_with_trailers(self):
        """
        A chunked body goes to the app chunked, its trailers with it.
        """
        h = Harness(self)
        client = h.client()
        h.send(client, b"POST /up HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-check: 1\r\n\r\n")
        [req] = h.requests
        self.assertEqual(req["body"], b"hello world")
        self.assertIn((b"transfer-encoding", b"chunked"), req["headers"])
        self.assertEqual(req["trailers"], [(b"x-check", b"1")])
        self.assertEqual(client.responses[0][0], 200)

    def test_post_without_body(self):
        """
        A POST without a body reaches the app with content-length: 0.
        """
        h = Harness(self)
        client = h.client()
        h.send(client, b"POST /up HTTP/1.1\r\nHost: web.default\r\nContent-Length: 0\r\n\r\n")
        [req] = h.requests
        self.assertIn((b"content-length", b"0"), req["headers"])
        self.assertEqual(client.responses[0][0], 200)

    def test_chunked_response_with_trailers(self):
        """
        A chunked response without a length reaches the client chunked, with its trailers.
        """
        h = Harness(self)
        h.respond = lambda app, req: (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                      b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n")
        client = h.client()
        h.send(client, GET)
        self.assertEqual(client.responses, [(200, {b"transfer-encoding": b"chunked", b"x-sum": b"7"},
                                             b"abcdefg")])
        h.assert_clean()

    def test_response_end_alone(self):
        """
        The end of a chunked response (trailers) arriving on its own (a separate read on every hop) is written at
        once.
        """
        h = Harness(self)
        h.respond = lambda app, req: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
        client = h.client()
        h.send(client, GET)
        self.assertEqual(client.responses, [])
        h.apps[0].transport.write(b"0\r\nx-sum: 3\r\n\r\n")
        h.pump()
        self.assertEqual(client.responses, [(200, {b"transfer-encoding": b"chunked", b"x-sum": b"3"}, b"abc")])
        h.assert_clean()

    def test_head_and_no_content(self):
        """
        HEAD keeps its content-length without a body; 204 has neither; the connection stays usable.
        """
        h = Harness(self)
        h.respond = lambda app, req: (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n" if req["method"] == b"HEAD"
                                      else b"HTTP/1.1 204 No Content\r\n\r\n")
        client = h.client()
        client.parse = False    # a response parser cannot tell a HEAD response has no body
        h.send(client, b"HEAD / HTTP/1.1\r\nHost: web.default\r\n\r\n")
        h.send(client, GET)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n"), client.raw)
        self.assertIn(b"HTTP/1.1 204 No Content\r\n", client.raw)
        self.assertFalse(client.lost)
        h.assert_clean()

    def test_expect_continue(self):
        """
        C{Expect: 100-continue}: the app's 100 reaches the client before it sends the body.
        """
        h = Harness(self)

        def respond(app, req):
            return _ok()
        h.respond = respond
        client = h.client()
        h.send(client, b"POST / HTTP/1.1\r\nHost: web.default\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        # The app only sees the head so far; it answers 100 itself.
        h.apps[0].transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        h.pump()
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), client.raw)
        h.send(client, b"abcd")
        self.assertEqual(h.requests[0]["body"], b"abcd")
        self.assertEqual(client.responses[-1][0], 200)

    def test_app_unreachable(self):
        """
        The inbound proxy cannot connect to the app: its 502 with l5d-proxy-error reaches the client as HTTP/1.1.
        """
        h = Harness(self)
        h.in_settings.connector.refuse = True
        client = h.client()
        h.send(client, GET)
        [(status, headers, _)] = client.responses
        self.assertEqual(status, 502)
        self.assertIn(b"connect to 127.0.0.1:8080 failed", headers[b"l5d-proxy-error"])
        h.assert_clean()

    def test_peer_unreachable(self):
        """
        The peer proxy cannot be reached: 502 with l5d-proxy-error from the outbound proxy.
        """
        h = Harness(self)
        h.out_settings.connector.refuse = True
        client = h.client()
        h.send(client, GET)
        [(status, headers, _)] = client.responses
        self.assertEqual(status, 502)
        self.assertIn(b"l5d-proxy-error", headers)

    def test_app_closes_before_responding(self):
        """
        The app closes without a response: 502 (the inbound proxy's answer) reaches the client.
        """
        h = Harness(self)

        def respond(app, req):
            app.transport.loseConnection()
        h.respond = respond
        client = h.client()
        h.send(client, GET)
        self.assertEqual(client.responses[0][0], 502)
        h.assert_clean()

    def test_app_resets_mid_body(self):
        """
        The app goes away mid-body: the client's connection is closed (a status cannot be sent any more).
        """
        h = Harness(self)

        def respond(app, req):
            app.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            app.transport.loseConnection()
        h.respond = respond
        client = h.client()
        h.send(client, GET)
        self.assertTrue(client.lost)
        self.assertEqual(client.responses, [])
        h.assert_clean()

    def test_response_timeout(self):
        """
        No response head in time: 504 from the outbound proxy, the stream is cancelled.
        """
        h = Harness(self)
        h.respond = lambda app, req: None
        client = h.client()
        h.send(client, GET)
        h.clock.advance(11)
        h.pump()
        self.assertEqual(client.responses[0][0], 504)
        h.assert_clean()

    def test_client_goes_away(self):
        """
        A client that leaves mid-response cancels the stream; nothing is left on either side.
        """
        h = Harness(self)
        h.respond = lambda app, req: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nsome"
        client = h.client()
        h.send(client, GET)
        client.transport.loseConnection()
        h.pump()
        h.assert_clean()

    def test_large_response_backpressure(self):
        """
        A client that does not read: the proxies stop acknowledging, the app's connection is paused, and
        everything arrives once the client reads again.
        """
        h = Harness(self)
        body = bytes(range(256)) * 4096   # 1 MiB
        h.respond = lambda app, req: _ok(body)
        client = h.client()
        client.transport.write(GET)
        # The client's transport reports a full buffer: the outbound server pauses the exchange.
        client.server.pauseProducing()
        h.pump()
        self.assertLess(len(client.raw), len(body) // 2)
        client.server.resumeProducing()
        h.pump()
        self.assertEqual(client.responses[0][2], body)
        h.assert_clean()

    def test_plain_endpoint_stays_http1(self):
        """
        An endpoint that is not meshed is reached over plain HTTP/1 (the upgrading pool defers to its own pool).
        """
        h = Harness(self, endpoint=PLAIN_ENDPOINT)
        client = h.client()
        h.send(client, GET)
        self.assertEqual(h.out_settings.connector.calls, [(("10.0.0.9", 80), "http1")])
        self.assertEqual(client.responses[0][0], 200)
        self.assertNotIn(b"l5d-orig-proto", dict(h.requests[0]["headers"]))

    def test_upgrade_request_stays_http1(self):
        """
        A WebSocket upgrade request to a meshed endpoint is sent as HTTP/1 (session protocol http1).
        """
        h = Harness(self)
        client = h.client()
        h.send(client, b"GET /ws HTTP/1.1\r\nHost: web.default\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual(h.out_settings.connector.calls, [(APP, "http1")])

    def test_refused_stream_retried(self):
        """
        A stream the peer refuses (REFUSED_STREAM before any response) is retried once on a new stream.
        """
        h = Harness(self)
        client = h.client()
        h.send(client, GET)
        server = h.servers[0]
        original = server.new_stream
        refused = []

        def refuse_once(srv, sid, headers, grpc):
            if not refused:
                refused.append(sid)
                srv.conn.reset_stream(sid, 7)   # REFUSED_STREAM
                return _Dropped()
            return original(srv, sid, headers, grpc)
        server.new_stream = refuse_once
        h.send(client, GET)
        self.assertEqual([r[0] for r in client.responses], [200, 200])
        self.assertEqual(len(h.requests), 2)
        self.assertEqual(len(refused), 1)

    def test_exchange_interface(self):
        """
        L{UpgradingPool} hands out L{H2Exchange}s for meshed endpoints only, and they are never pooled.
        """
        h = Harness(self)
        pool = h.out_settings.h1_pool
        exchange = pool.checkout(MESHED, 0.0)
        self.assertIsInstance(exchange, H2Exchange)
        self.assertFalse(exchange.reusable())
        self.assertIsNone(pool.checkout(PLAIN_ENDPOINT, 0.0))


class _Dropped:
    """
    A stand-in for a stream the test server refused: ignores every event.
    """

    class _Req:
        ended = False
        tail = None

        def feed(self, data, flow_length):
            pass

        def finish(self, tail):
            pass

    def __init__(self):
        self.req = self._Req()
        self.route = None

    def route_to(self, target):
        pass

    def down_reset(self, code):
        pass

    def down_lost(self):
        pass
