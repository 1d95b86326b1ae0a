"""
Tests for L{linkproxy.net.http1}: the server/client glue driven over in-memory transports with a L{Clock}, and
loopback tests through a real listener with the real reactor (127.0.0.1 only).

The helpers at the top (connector onto StringTransports, scripted backend, raw client, in-process proxy) are
shared with C{tests.test_http1_interop}.
"""

import sys

from httptools import HttpParserUpgrade, HttpRequestParser, HttpResponseParser
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.core.http1 import MAX_HELD_BYTES
from linkproxy.net.connect import Connector
from linkproxy.net.context import HttpSettings, PeerInfo, PLAIN
from linkproxy.net.http1 import Http1ServerProtocol
from linkproxy.net.tracker import ConnectionTracker
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import NoEndpoints
from linkproxy.testing import FakeRouter, RecordingLease


class MemoryConnector:
    """
    A connector that connects each client protocol to a fresh L{StringTransport}.

    @ivar connects: C{[(endpoint, protocol, session_protocol, deferred)]} in order.
    @ivar auto: when true, connections complete at once; otherwise call L{complete} or L{refuse}.
    """

    def __init__(self, auto=True):
        self.auto = auto
        self.connects = []

    def connect(self, endpoint, protocol, session_protocol=None):
        d = Deferred()
        self.connects.append((endpoint, protocol, session_protocol, d))
        if self.auto:
            self.complete(-1)
        return d

    def complete(self, index=-1):
        """
        Connect attempt C{index}.
        """
        _, protocol, _, d = self.connects[index]
        protocol.makeConnection(StringTransport())
        d.callback(protocol)

    def refuse(self, index=-1, error=None):
        """
        Fail attempt C{index}.
        """
        from twisted.internet.error import ConnectionRefusedError
        self.connects[index][3].errback(error or ConnectionRefusedError())

    def upstream(self, index=-1):
        """
        The client protocol of attempt C{index}.
        """
        return self.connects[index][1]


def make_settings(router, connector, reactor, **kw):
    """
    L{HttpSettings} for tests, with a private metrics registry.
    """
    return HttpSettings(direction="outbound", router=router, connector=connector,
                        metrics=Metrics(process=False), reactor=reactor, **kw)


def sample(settings, name, **labels):
    """
    The value of metric sample C{name} with at least C{labels}, summed over the rest (0 when absent).
    """
    total = 0.0
    for family in settings.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class ParsedResponses:
    """
    httptools callbacks collecting responses: C{(status, headers dict, body)}.
    """

    def __init__(self):
        self.responses = []
        self.parser = HttpResponseParser(self)

    def feed(self, data):
        self.parser.feed_data(data)
        return self.responses

    def on_message_begin(self):
        self._headers = {}
        self._body = b""

    def on_header(self, name, value):
        self._headers[name.lower()] = value

    def on_body(self, body):
        self._body += body

    def on_message_complete(self):
        self.responses.append((self.parser.get_status_code(), self._headers, self._body))


# -- loopback ----------------------------------------------------------------------------------------------------


class Backend(Protocol):
    """
    A scripted HTTP/1 server connection: each complete request goes to C{factory.handler(self, request)} where
    C{request} is a dict with method, url, headers (lower-case names) and body.
    """

    def connectionMade(self):
        self.lost = Deferred()
        self.parser = HttpRequestParser(self)
        self.served = 0
        self.factory.connections.append(self)
        self.upgraded = False

    def on_message_begin(self):
        self.req = {"url": b"", "headers": {}, "body": b""}

    def on_url(self, url):
        self.req["url"] += url

    def on_header(self, name, value):
        self.req["headers"][name.lower()] = value

    def on_headers_complete(self):
        self.req["method"] = self.parser.get_method()
        if self.factory.on_head is not None:
            self.factory.on_head(self, self.req)

    def on_body(self, body):
        self.req["body"] += body
        if self.factory.on_body is not None:
            self.factory.on_body(self, body)

    def on_message_complete(self):
        self.factory.requests.append(self.req)
        self.factory.handler(self, self.req)
        self.served += 1

    def dataReceived(self, data):
        if self.upgraded:
            self.transport.write(data)  # echo after an upgrade
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            self.upgraded = True
            rest = data[e.args[0]:]
            if rest:
                self.transport.write(rest)

    def connectionLost(self, reason):
        self.lost.callback(None)


class BackendFactory(Factory):
    """
    Builds L{Backend}s; C{handler} answers requests.
    """

    protocol = Backend

    def __init__(self, handler):
        self.handler = handler
        self.on_head = None
        self.on_body = None
        self.connections = []
        self.requests = []


def ok(body=b"ok", extra=b""):
    """
    A handler answering 200 with C{body} and keep-alive.
    """
    def handler(conn, req):
        conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body))
    return handler


class RawClient(Protocol):
    """
    A loopback client that writes raw bytes and parses the responses.

    @ivar responses: C{(status, headers, body)} parsed so far.
    @ivar closed: fires when the connection is lost.
    """

    def __init__(self):
        self.parsed = ParsedResponses()
        self.responses = self.parsed.responses
        self.raw = b""
        self.closed = Deferred()
        self._waiters = []

    def dataReceived(self, data):
        self.raw += data
        self.parsed.feed(data)
        self._check()

    def _check(self):
        for n, d in list(self._waiters):
            if len(self.responses) >= n:
                self._waiters.remove((n, d))
                d.callback(self.responses)

    def wait(self, n):
        """
        @return: a Deferred firing with the responses once there are C{n} of them.
        """
        d = Deferred()
        self._waiters.append((n, d))
        self._check()
        return d

    def send(self, data, n=None):
        """
        Write C{data}; return L{wait} for C{n} responses (or one more than now).
        """
        self.transport.write(data)
        return self.wait(n if n is not None else len(self.responses) + 1)

    def connectionLost(self, reason):
        for _, d in self._waiters:
            d.errback(reason)
        self._waiters = []
        self.closed.callback(None)


class Loopback:
    """
    A backend, a proxy in front of it (Http1ServerProtocol on 127.0.0.1:0, FakeRouter to the backend) and a
    way to open clients; L{cleanup} closes everything it opened and waits for it.
    """

    def __init__(self, testcase, handler, router=None, **settings_kw):
        from twisted.internet import reactor

        self.reactor = reactor
        self.backend = BackendFactory(handler)
        self.backend_port = reactor.listenTCP(0, self.backend, interface="127.0.0.1")
        self.backend_addr = ("127.0.0.1", self.backend_port.getHost().port)
        self.router = router or FakeRouter(default=self.backend_addr)
        self.tracker = ConnectionTracker()
        settings = self.settings = make_settings(self.router, Connector(reactor, 2.0), reactor,
                                                 tracker=self.tracker, **settings_kw)

        class ProxyFactory(Factory):
            def buildProtocol(self, addr):
                return Http1ServerProtocol(settings, PLAIN)

        self.proxy_port = reactor.listenTCP(0, ProxyFactory(), interface="127.0.0.1")
        self.proxy_addr = ("127.0.0.1", self.proxy_port.getHost().port)
        self.clients = []
        testcase.addCleanup(self.cleanup)

    def client(self):
        """
        @return: a Deferred firing with a connected L{RawClient}.
        """
        d = Deferred()
        factory = ClientFactory()

        def build(addr):
            client = RawClient()
            self.clients.append(client)
            client.factory = factory
            original = client.connectionMade

            def made():
                original()
                d.callback(client)
            client.connectionMade = made
            return client
        factory.buildProtocol = build
        factory.clientConnectionFailed = lambda connector, reason: d.errback(reason)
        self.reactor.connectTCP(*self.proxy_addr, factory)
        return d

    def cleanup(self):
        waits = []
        for client in self.clients:
            if client.transport is not None and client.transport.connected:
                client.transport.loseConnection()
            waits.append(client.closed)
        d = DeferredList(waits)
        d.addCallback(lambda _: self.tracker.wait_empty())

        def rest(_):
            self.settings.h1_pool.close()
            lost = []
            for conn in self.backend.connections:
                conn.transport.loseConnection()
                lost.append(conn.lost)
            return DeferredList(lost)
        d.addCallback(rest)
        d.addCallback(lambda _: DeferredList([succeed(self.proxy_port.stopListening()),
                                              succeed(self.backend_port.stopListening())]))
        return d


# -- in-memory glue tests -------------------------------------------------------------------------------------------


BACKEND = ("10.0.0.1", 8080)
GET = b"GET /a HTTP/1.1\r\nHost: web:80\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class _Harness:
    """
    One proxied client connection over StringTransports: C{server} with C{transport}, and the connector that
    hands out upstream StringTransports.
    """

    def __init__(self, router=None, peer=PLAIN, auto=True, **kw):
        self.clock = Clock()
        self.router = router if router is not None else FakeRouter(default=BACKEND)
        self.connector = MemoryConnector(auto=auto)
        self.tracker = ConnectionTracker()
        self.settings = make_settings(self.router, self.connector, self.clock, tracker=self.tracker, **kw)
        self.server, self.transport = self.new_client(peer)

    def new_client(self, peer=PLAIN):
        server = Http1ServerProtocol(self.settings, peer)
        transport = StringTransport()
        server.makeConnection(transport)
        return server, transport

    def up(self, index=-1):
        """
        The upstream client protocol of connect attempt C{index}.
        """
        return self.connector.upstream(index)

    def sent_up(self, index=-1):
        """
        Bytes written to upstream C{index} so far (and clear them).
        """
        transport = self.up(index).transport
        data = transport.value()
        transport.clear()
        return data

    def responses(self):
        return ParsedResponses().feed(self.transport.value())


class RoundTripTests(SynchronousTestCase):
    """
    A request goes through the router to an upstream connection and its response comes back.
    """

    def test_round_trip(self):
        """
        The upstream receives an HTTP/1.1 head without hop-by-hop headers; the client gets the response; the
        lease is released as a success; metrics count one request and one response.
        """
        h = _Harness()
        h.server.dataReceived(b"GET /a HTTP/1.1\r\nHost: web:80\r\nConnection: keep-alive, x-hop\r\n"
                              b"X-Hop: 1\r\nTE: trailers\r\nL5d-Client-Id: forged\r\nAccept: */*\r\n\r\n")
        self.assertEqual(h.router.authorities, ["web:80"])
        self.assertEqual(h.connector.connects[0][2], "http1")
        sent = h.sent_up()
        self.assertEqual(sent, b"GET /a HTTP/1.1\r\nhost: web:80\r\naccept: */*\r\n\r\n")
        h.clock.advance(0.25)
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n"
                            b"Connection: keep-alive\r\n\r\nok")
        [(status, headers, body)] = h.responses()
        self.assertEqual((status, body), (200, b"ok"))
        self.assertNotIn(b"keep-alive", headers)
        self.assertEqual(h.router.leases[0].outcomes, [True])
        labels = dict(direction="outbound", authority="web:80", target_addr="10.0.0.1:8080")
        self.assertEqual(sample(h.settings, "request_total", **labels), 1)
        self.assertEqual(sample(h.settings, "response_total", status_code="200", classification="success",
                                **labels), 1)
        self.assertEqual(sample(h.settings, "response_latency_ms_sum", **labels), 250)
        self.assertEqual(len(h.settings.h1_pool), 1)

    def test_client_id_for_meshed_peer(self):
        """
        A meshed peer's verified identity replaces any l5d-client-id the client sent.
        """
        h = _Harness(peer=PeerInfo(tls="true", client_id="a.ns.serviceaccount.identity.local"))
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\nl5d-client-id: forged\r\n\r\n")
        sent = h.sent_up()
        self.assertIn(b"l5d-client-id: a.ns.serviceaccount.identity.local\r\n", sent)
        self.assertNotIn(b"forged", sent)

    def test_keep_alive_reuses_upstream(self):
        """
        Sequential requests on one client connection reuse one pooled upstream connection.
        """
        h = _Harness()
        for _ in range(3):
            h.server.dataReceived(GET)
            h.up().dataReceived(OK)
        self.assertEqual(len(h.connector.connects), 1)
        self.assertEqual(len(h.responses()), 3)
        self.assertEqual(h.up().transport.value().count(b"GET /a"), 3)

    def test_upstream_connection_close(self):
        """
        An upstream response with C{connection: close} is relayed, and that connection is not pooled.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(h.responses()[0][0], 200)
        self.assertTrue(h.up().transport.disconnecting)
        self.assertEqual(len(h.settings.h1_pool), 0)
        self.assertFalse(h.transport.disconnecting)

    def test_http10_upstream_eof_body(self):
        """
        An upstream HTTP/1.0 response delimited by closing the connection is re-framed as chunked for an
        HTTP/1.1 client, whose connection stays open.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        up = h.up()
        up.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nhello ")
        up.dataReceived(b"world")
        up.connectionLost(Failure(ConnectionDone()))
        [(status, headers, body)] = h.responses()
        self.assertEqual((status, headers.get(b"transfer-encoding"), body), (200, b"chunked", b"hello world"))
        self.assertFalse(h.transport.disconnecting)

    def test_http10_client(self):
        """
        An HTTP/1.0 client gets a chunked upstream body de-chunked and delimited by closing; no 1xx.
        """
        h = _Harness()
        h.server.dataReceived(b"POST / HTTP/1.0\r\nHost: web\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\nx")
        h.up().dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                            b"3\r\nabc\r\n0\r\n\r\n")
        value = h.transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"connection: close\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\nabc"))
        self.assertTrue(h.transport.disconnecting)


class FramingTests(SynchronousTestCase):
    """
    Bodies, HEAD, 1xx and no-body statuses.
    """

    def test_chunked_both_ways(self):
        """
        A chunked request body is forwarded chunked (with trailers); a chunked response is relayed chunked.
        """
        h = _Harness()
        h.server.dataReceived(b"POST /u HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        h.server.dataReceived(b"6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n")
        sent = h.sent_up()
        head, _, body = sent.partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head)
        self.assertEqual(body, b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n")
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        h.up().dataReceived(b"2\r\nde\r\n0\r\n\r\n")
        [(status, headers, body)] = h.responses()
        self.assertEqual((headers[b"transfer-encoding"], body), (b"chunked", b"abcde"))
        self.assertEqual(len(h.settings.h1_pool), 1)

    def test_content_length_body(self):
        """
        A content-length body is forwarded as is, in pieces as it arrives.
        """
        h = _Harness()
        h.server.dataReceived(b"PUT /u HTTP/1.1\r\nHost: web\r\nContent-Length: 10\r\n\r\n01234")
        self.assertTrue(h.sent_up().endswith(b"content-length: 10\r\n\r\n01234"))
        h.server.dataReceived(b"56789")
        self.assertEqual(h.sent_up(), b"56789")

    def test_head(self):
        """
        A response to HEAD carries its content-length but no body, and the upstream connection stays usable.
        """
        h = _Harness()
        h.server.dataReceived(b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n")
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        self.assertEqual(h.transport.value(), b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        self.assertEqual(len(h.settings.h1_pool), 1)
        h.transport.clear()
        h.server.dataReceived(GET)
        h.up().dataReceived(OK)
        self.assertEqual(h.responses(), [(200, {b"content-length": b"2"}, b"ok")])
        self.assertEqual(len(h.connector.connects), 1)

    def test_interim_and_no_body(self):
        """
        A 100 Continue is relayed before the final response; a 204 has no body and keeps the connection.
        """
        h = _Harness()
        h.server.dataReceived(b"POST / HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        self.assertIn(b"expect: 100-continue", h.sent_up())
        h.up().dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(h.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        h.server.dataReceived(b"hi")
        self.assertEqual(h.sent_up(), b"hi")
        h.up().dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(h.transport.value().endswith(b"HTTP/1.1 204 No Content\r\n\r\n"))
        self.assertEqual(len(h.settings.h1_pool), 1)


class PipeliningTests(SynchronousTestCase):
    """
    Pipelined requests are served one at a time, in order, with a bounded hold.
    """

    def test_in_order(self):
        """
        Two requests in one segment: the second reaches the upstream only after the first response.
        """
        h = _Harness()
        h.server.dataReceived(GET + b"GET /b HTTP/1.1\r\nHost: other\r\n\r\n")
        self.assertEqual(h.sent_up().count(b"GET"), 1)
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1")
        self.assertEqual(h.router.authorities, ["web:80", "other:80"])
        self.assertIn(b"GET /b", h.sent_up())
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2")
        self.assertEqual([r[2] for r in h.responses()], [b"1", b"2"])

    def test_hold_is_bounded(self):
        """
        Past the hold limit the client transport is paused; it resumes once the held requests are served.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        body = b"x" * 40000
        post = b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        h.server.dataReceived(post)
        self.assertEqual(h.transport.producerState, "producing")
        h.server.dataReceived(post)
        self.assertGreater(2 * len(post), MAX_HELD_BYTES)
        self.assertEqual(h.transport.producerState, "paused")
        h.up().dataReceived(OK)
        h.up().dataReceived(OK)
        self.assertEqual(h.transport.producerState, "producing")
        h.up().dataReceived(OK)
        self.assertEqual(len(h.responses()), 3)
        self.assertEqual(h.up().transport.value().count(body), 2)


class BackpressureTests(SynchronousTestCase):
    """
    A slow reader on either side pauses the other side instead of growing a buffer.
    """

    def test_slow_client_pauses_upstream(self):
        """
        When the client's write buffer is full, the upstream transport is paused; it resumes when it drains.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        up = h.up()
        up.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        self.assertIs(h.transport.producer, h.server)
        h.transport.producer.pauseProducing()
        self.assertEqual(up.transport.producerState, "paused")
        h.transport.producer.resumeProducing()
        self.assertEqual(up.transport.producerState, "producing")

    def test_pause_carries_over_to_next_upstream(self):
        """
        A client that is still slow when a new upstream is attached pauses that upstream at once.
        """
        h = _Harness()
        h.transport.producer.pauseProducing()
        h.server.dataReceived(GET)
        self.assertEqual(h.up().transport.producerState, "paused")

    def test_slow_upstream_pauses_client(self):
        """
        When the upstream's write buffer is full, reading from the client is paused until it drains.
        """
        h = _Harness()
        h.server.dataReceived(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\nabc")
        up = h.up()
        self.assertIs(up.transport.producer, up)
        up.transport.producer.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        up.transport.producer.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")

    def test_body_waiting_for_connect_is_bounded(self):
        """
        While the upstream connects, the body is held up to the limit and the client is then paused.
        """
        h = _Harness(auto=False)
        h.server.dataReceived(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 200000\r\n\r\n")
        h.server.dataReceived(b"x" * (MAX_HELD_BYTES + 1))
        self.assertEqual(h.transport.producerState, "paused")
        h.connector.complete()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(len(h.sent_up()) > MAX_HELD_BYTES, True)


class ErrorTests(SynchronousTestCase):
    """
    Responses the proxy makes itself carry l5d-proxy-error and the right status.
    """

    def test_no_endpoints_503(self):
        """
        A router failing with NoEndpoints gives 503; the connection stays usable and the error is counted.
        """
        h = _Harness(router=FakeRouter())
        h.server.dataReceived(GET + GET)
        responses = h.responses()
        self.assertEqual([r[0] for r in responses], [503, 503])
        self.assertEqual(responses[0][1][b"l5d-proxy-error"], b"no endpoints for web:80")
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(sample(h.settings, "response_total", status_code="503", authority="web:80",
                                target_addr="", classification="failure"), 2)
        self.assertEqual(sample(h.settings, "request_total", authority="web:80"), 2)

    def test_431(self):
        """
        A request head over the limit gets 431 and the connection closes.
        """
        h = _Harness(max_header_bytes=1024)
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        [(status, headers, _)] = h.responses()
        self.assertEqual(status, 431)
        self.assertIn(b"l5d-proxy-error", headers)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.connector.connects, [])

    def test_431_incomplete_head(self):
        """
        A head that never ends is cut off at the limit, not buffered without bound.
        """
        h = _Harness(max_header_bytes=1024)
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: ")
        for _ in range(5):
            h.server.dataReceived(b"a" * 400)
        self.assertEqual(h.responses()[0][0], 431)
        self.assertTrue(h.transport.disconnecting)

    def test_400(self):
        """
        A malformed request gets 400 with l5d-proxy-error, and the connection closes.
        """
        h = _Harness()
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\nBad Header\r\n\r\n")
        [(status, headers, _)] = h.responses()
        self.assertEqual(status, 400)
        self.assertTrue(headers[b"l5d-proxy-error"].startswith(b"malformed request"))
        self.assertTrue(h.transport.disconnecting)

    def test_missing_host_400(self):
        """
        A request without a Host (or absolute-form target) has no authority to route: 400.
        """
        h = _Harness()
        h.server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(h.responses()[0][0], 400)

    def test_pipelined_error_waits_its_turn(self):
        """
        A malformed request behind one in flight is answered after that one's response.
        """
        h = _Harness()
        h.server.dataReceived(GET + b"BROKEN\r\n\r\n")
        self.assertEqual(h.transport.value(), b"")
        h.up().dataReceived(OK)
        self.assertEqual([r[0] for r in h.responses()], [200, 400])
        self.assertTrue(h.transport.disconnecting)

    def test_connect_failure_502(self):
        """
        A failed connect is retried (nothing was sent); when every attempt fails the answer is 502, and each
        attempt's lease is released as a failure.
        """
        h = _Harness(auto=False)
        h.server.dataReceived(GET)
        for attempt in range(3):
            self.assertEqual(h.responses(), [])
            h.connector.refuse()
        [(status, headers, _)] = h.responses()
        self.assertEqual(status, 502)
        self.assertIn(b"10.0.0.1:8080", headers[b"l5d-proxy-error"])
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False]] * 3)
        self.assertEqual(len(h.connector.connects), 3)

    def test_timeout_504(self):
        """
        No response head within the response timeout: 504, the lease fails, the upstream is closed.
        """
        h = _Harness(response_timeout=5.0)
        h.server.dataReceived(GET)
        h.clock.advance(4.9)
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(0.2)
        self.assertEqual(h.responses()[0][0], 504)
        self.assertTrue(h.up().transport.disconnecting)
        self.assertEqual(h.router.leases[0].outcomes, [False])
        self.assertEqual(len(h.settings.h1_pool), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_timer_is_per_connection(self):
        """
        Quick requests do not schedule one timer each: one per connection, re-armed lazily.
        """
        h = _Harness(response_timeout=5.0)
        for _ in range(10):
            h.server.dataReceived(GET)
            h.up().dataReceived(OK)
        self.assertEqual(len(h.clock.getDelayedCalls()), 2)  # the response timer and the pool sweep
        h.clock.advance(5)
        h.clock.advance(5)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_reset_before_response_502(self):
        """
        A fresh upstream connection closing before any response byte: a GET is sent again (another endpoint
        when there is one), at most three attempts in all, then 502.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        for attempt in range(3):
            self.assertEqual(h.responses(), [])
            h.up().connectionLost(Failure(ConnectionLost()))
        self.assertEqual(h.responses()[0][0], 502)
        self.assertEqual(len(h.connector.connects), 3)


class RetryTests(SynchronousTestCase):
    """
    A request that meets a stale pooled connection is sent once more on a fresh one.
    """

    def _pooled(self):
        h = _Harness()
        h.server.dataReceived(GET)
        h.up().dataReceived(OK)
        h.transport.clear()
        return h

    def test_retry_idempotent(self):
        """
        The reused connection closes with no response byte: the request is replayed on a new connection.
        """
        h = self._pooled()
        stale = h.up()
        stale.transport.clear()
        h.server.dataReceived(b"PUT /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
        self.assertTrue(stale.transport.value().endswith(b"abc"))
        stale.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.connects), 2)
        self.assertTrue(h.sent_up().endswith(b"content-length: 3\r\n\r\nabc"))
        h.up().dataReceived(OK)
        self.assertEqual(h.responses()[0][0], 200)
        self.assertEqual(h.router.leases[1].outcomes, [True])

    def test_post_without_body_sent_is_retried(self):
        """
        A POST waiting on 100-continue sent no body bytes: it is safe to retry.
        """
        h = self._pooled()
        h.server.dataReceived(b"POST / HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        h.up().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.connects), 2)
        h.server.dataReceived(b"abc")
        self.assertTrue(h.sent_up().endswith(b"\r\n\r\nabc"))

    def test_post_with_body_not_retried(self):
        """
        A POST whose body bytes were sent is not repeated: 502.
        """
        h = self._pooled()
        h.server.dataReceived(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
        h.up().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.connects), 1)
        self.assertEqual(h.responses()[0][0], 502)

    def test_retried_once(self):
        """
        The stale pooled connection is replaced once on the same endpoint; after that, failures are the
        endpoint's and count as attempts (three in all), then 502.
        """
        h = self._pooled()
        h.server.dataReceived(GET)
        h.up().connectionLost(Failure(ConnectionDone()))
        h.up().connectionLost(Failure(ConnectionDone()))
        h.up().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.responses(), [])
        h.up().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.connector.connects), 4)
        self.assertEqual(h.responses()[0][0], 502)


class CancellationTests(SynchronousTestCase):
    """
    One side going away mid-exchange.
    """

    def test_client_disconnect_cancels_upstream(self):
        """
        The client leaving mid-response aborts the upstream connection; it never returns to the pool.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        up = h.up()
        up.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        h.server.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(up.transport.disconnecting)
        up.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(h.settings.h1_pool), 0)
        self.assertEqual(len(h.tracker), 0)

    def test_client_disconnect_before_response(self):
        """
        The client leaving before the response head aborts the upstream and releases the lease once, as
        cancelled (C{None}): a client giving up is no verdict on the endpoint.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.server.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(h.up().transport.disconnecting)
        self.assertEqual(h.router.leases[0].outcomes, [None])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_client_disconnect_while_connecting(self):
        """
        The client leaving while the upstream connects cancels the attempt.
        """
        h = _Harness(auto=False)
        h.server.dataReceived(GET)
        d = h.connector.connects[0][3]
        h.server.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(d.called)
        self.assertEqual(h.router.leases[0].outcomes, [None])

    def test_upstream_reset_mid_body(self):
        """
        The upstream resetting mid-body closes the client connection; a new client is served normally.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        h.up().connectionLost(Failure(ConnectionLost()))
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(h.transport.value().endswith(b"12345"))
        server, transport = h.new_client()
        server.dataReceived(GET)
        h.up().dataReceived(OK)
        self.assertEqual(ParsedResponses().feed(transport.value())[0][0], 200)


class DrainTests(SynchronousTestCase):
    """
    Graceful drain through the tracker, and abort.
    """

    def test_idle_closes(self):
        """
        An idle connection closes at once when drained.
        """
        h = _Harness()
        self.assertEqual(len(h.tracker), 1)
        h.tracker.drain()
        self.assertTrue(h.transport.disconnecting)

    def test_busy_finishes_then_closes(self):
        """
        A connection with a request in flight answers it with connection: close, then closes.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.tracker.drain()
        self.assertFalse(h.transport.disconnecting)
        h.up().dataReceived(OK)
        self.assertEqual(h.responses()[0][1][b"connection"], b"close")
        self.assertTrue(h.transport.disconnecting)

    def test_abort(self):
        """
        abort() aborts the transport.
        """
        h = _Harness()
        h.tracker.abort_all()
        self.assertTrue(h.transport.disconnecting)


class UpgradeTests(SynchronousTestCase):
    """
    Upgrade requests become an opaque splice after a 101.
    """

    UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Key: k\r\n\r\n")

    def test_splice_after_101(self):
        """
        The Upgrade headers are forwarded; after the 101 bytes flow both ways untouched, and the upstream is
        not pooled.
        """
        h = _Harness()
        h.server.dataReceived(self.UPGRADE + b"early")
        sent = h.sent_up()
        self.assertIn(b"connection: upgrade\r\nupgrade: websocket\r\n", sent)
        self.assertNotIn(b"early", sent)
        h.up().dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                            b"\r\nfrom-server")
        value = h.transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertIn(b"connection: upgrade\r\nupgrade: websocket\r\n", value)
        self.assertTrue(value.endswith(b"\r\n\r\nfrom-server"))
        self.assertEqual(h.sent_up(), b"early")
        h.server.dataReceived(b"\x81\x00GET / HTTP/1.1\r\n")
        self.assertEqual(h.sent_up(), b"\x81\x00GET / HTTP/1.1\r\n")
        h.up().dataReceived(b"\x88\x00")
        self.assertTrue(h.transport.value().endswith(b"\x88\x00"))
        h.up().connectionLost(Failure(ConnectionDone()))
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(h.settings.h1_pool), 0)

    def test_rejected_upgrade_closes(self):
        """
        An upgrade answered with anything but 101 is relayed with connection: close.
        """
        h = _Harness()
        h.server.dataReceived(self.UPGRADE)
        h.up().dataReceived(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        [(status, headers, _)] = h.responses()
        self.assertEqual((status, headers[b"connection"]), (403, b"close"))
        self.assertTrue(h.transport.disconnecting)

    def test_unasked_101(self):
        """
        A 101 to a request that did not ask to upgrade is a 502.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.up().dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        self.assertEqual(h.responses()[0][0], 502)


# -- loopback tests with the real reactor ---------------------------------------------------------------------------


def _free_port():
    """
    A 127.0.0.1 port that nothing listens on (bound, then released).
    """
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _sleep(seconds):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    return deferLater(reactor, seconds, lambda: None)


class _Ignore:
    """
    Stands in for L{ParsedResponses} where a test reads the raw bytes itself.
    """

    def feed(self, data):
        return []


class LoopbackTests(TestCase):
    """
    The proxy on a real 127.0.0.1 listener, in front of a scripted backend.
    """

    timeout = 20

    async def test_get(self):
        """
        Sequential GETs on one client connection use one backend connection.
        """
        lb = Loopback(self, ok(b"hello"))
        client = await lb.client()
        await client.send(GET)
        responses = await client.send(GET)
        self.assertEqual([(r[0], r[2]) for r in responses], [(200, b"hello")] * 2)
        self.assertEqual(len(lb.backend.connections), 1)

    async def test_connect_refused_502(self):
        """
        An endpoint nothing listens on gives 502 with l5d-proxy-error.
        """
        lb = Loopback(self, ok(), router=FakeRouter(default=("127.0.0.1", _free_port())))
        client = await lb.client()
        [(status, headers, _)] = await client.send(GET)
        self.assertEqual(status, 502)
        self.assertIn(b"connect to 127.0.0.1:", headers[b"l5d-proxy-error"])

    async def test_no_endpoints_503(self):
        """
        FakeRouter without a default answers 503.
        """
        lb = Loopback(self, ok(), router=FakeRouter())
        client = await lb.client()
        [(status, headers, _)] = await client.send(GET)
        self.assertEqual((status, headers[b"l5d-proxy-error"]), (503, b"no endpoints for web:80"))

    async def test_never_answers_504(self):
        """
        A backend that never answers gets the client a 504 after the response timeout, and its connection is
        closed.
        """
        lb = Loopback(self, lambda conn, req: None, response_timeout=0.3)
        client = await lb.client()
        [(status, headers, _)] = await client.send(GET)
        self.assertEqual(status, 504)
        self.assertIn(b"l5d-proxy-error", headers)
        await lb.backend.connections[0].lost

    async def test_stale_pooled_connection_retried(self):
        """
        The backend closes a kept-alive connection as the next request arrives (the race behind Linkerd's
        intermittent 502s): the request is retried once on a fresh connection and succeeds.
        """
        def handler(conn, req):
            if conn.served == 0:
                ok()(conn, req)
            else:
                conn.transport.loseConnection()
        lb = Loopback(self, handler)
        client = await lb.client()
        await client.send(GET)
        responses = await client.send(GET)
        self.assertEqual([r[0] for r in responses], [200, 200])
        self.assertEqual(len(lb.backend.connections), 2)

    async def test_backend_closes_idle(self):
        """
        A backend that closes each connection after its response, without saying so: every request succeeds.
        """
        def handler(conn, req):
            ok()(conn, req)
            conn.transport.loseConnection()
        lb = Loopback(self, handler)
        client = await lb.client()
        for n in range(1, 4):
            await client.send(GET)
            await _sleep(0.01 if n % 2 else 0)
        self.assertEqual([r[0] for r in client.responses], [200, 200, 200])

    async def test_reset_mid_body(self):
        """
        A backend reset mid-body closes that client's connection; the proxy goes on serving others.
        """
        def handler(conn, req):
            if req["url"] == b"/reset":
                conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
                # Later, so the partial body is on the wire before the reset.
                lb.reactor.callLater(0.05, conn.transport.abortConnection)
            else:
                ok()(conn, req)
        lb = Loopback(self, handler)
        client = await lb.client()
        client.transport.write(b"GET /reset HTTP/1.1\r\nHost: web\r\n\r\n")
        await client.closed
        self.assertIn(b"partial", client.raw)
        other = await lb.client()
        [(status, _, body)] = await other.send(GET)
        self.assertEqual((status, body), (200, b"ok"))

    async def test_chunked_both_ways(self):
        """
        A 1 MiB chunked upload reaches the backend intact; its chunked echo comes back intact.
        """
        def echo(conn, req):
            body = req["body"]
            conn.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                conn.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.transport.write(b"0\r\n\r\n")
        lb = Loopback(self, echo)
        client = await lb.client()
        payload = bytes(range(256)) * 4096
        wire = b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        for i in range(0, len(payload), 10000):
            piece = payload[i:i + 10000]
            wire += b"%x\r\n%s\r\n" % (len(piece), piece)
        [(status, headers, body)] = await client.send(wire + b"0\r\n\r\n")
        self.assertEqual(lb.backend.requests[0]["body"], payload)
        self.assertEqual((status, headers[b"transfer-encoding"]), (200, b"chunked"))
        self.assertEqual(body, payload)

    async def test_head(self):
        """
        HEAD through a real backend: no body, and the next request on the same connections works.
        """
        def handler(conn, req):
            if req["method"] == b"HEAD":
                conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")
            else:
                ok()(conn, req)
        lb = Loopback(self, handler)
        client = await lb.client()
        parsed = client.parsed
        client.parsed = _Ignore()
        client.transport.write(b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n")
        await _sleep(0.2)
        self.assertEqual(client.raw, b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")
        client.raw = b""
        client.parsed = parsed
        [(status, _, body)] = await client.send(GET)
        self.assertEqual((status, body), (200, b"ok"))
        self.assertEqual(len(lb.backend.connections), 1)

    async def test_client_disconnect_cancels_upstream(self):
        """
        A client leaving mid-response closes the backend connection instead of pooling it.
        """
        def handler(conn, req):
            conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nstart")
        lb = Loopback(self, handler)
        client = await lb.client()
        client.transport.write(GET)
        while b"start" not in client.raw:
            await _sleep(0.01)
        client.transport.loseConnection()
        await lb.backend.connections[0].lost
        self.assertEqual(len(lb.settings.h1_pool), 0)

    async def test_slow_client_bounded(self):
        """
        A client that stops reading pauses the backend connection instead of letting the proxy buffer the body.
        """
        size = 16 * 1024 * 1024

        def handler(conn, req):
            conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            conn.transport.write(b"x" * size)
        lb = Loopback(self, handler)
        client = await lb.client()
        received = []
        client.dataReceived = lambda data: received.append(len(data))
        client.transport.pauseProducing()
        client.transport.write(GET)
        await _sleep(0.5)
        [server] = list(lb.tracker._open)
        upstream = server._up
        self.assertTrue(upstream._reading_paused)
        buffered = sum(len(b) for b in server.transport._tempDataBuffer) + len(server.transport.dataBuffer)
        self.assertLess(buffered, 4 * 1024 * 1024)
        client.transport.resumeProducing()
        while sum(received) < size:
            await _sleep(0.05)
        self.assertFalse(upstream._reading_paused)


# -- the routers' synchronous fast path (route_now) --------------------------------------------------------------


class SyncRouter(FakeRouter):
    """
    A L{FakeRouter} that also offers C{route_now}, the synchronous fast path of L{linkproxy.routing}'s routers.

    @ivar deferred_routes: authorities that went through C{route} (the Deferred path) instead.
    @ivar wait: when true, C{route_now} answers C{None} (as a router still waiting for discovery does).
    @ivar error: an exception C{route_now} raises instead of answering.
    """

    def __init__(self, routes=None, default=None, wait=False, error=None):
        super().__init__(routes, default)
        self.wait = wait
        self.error = error
        self.deferred_routes = []

    def route(self, authority, avoid=None):
        self.deferred_routes.append(authority)
        return super().route(authority, avoid)

    def route_now(self, authority, avoid=None):
        if self.error is not None:
            raise self.error
        if self.wait:
            return None
        self.authorities.append(authority)
        address = self.routes.get(authority, self.default)
        if address is None:
            raise NoEndpoints(f"no endpoints for {authority}")
        lease = RecordingLease(Endpoint(address=address))
        self.leases.append(lease)
        return lease


class _SyncRouting:
    """
    Runs a test class again with routers that have C{route_now}: every exchange is routed without a Deferred
    (including requests replayed after a pipelined one, and errors answered in order).
    """

    def setUp(self):
        super().setUp()
        self.patch(sys.modules[__name__], "FakeRouter", SyncRouter)


class RoundTripSyncTests(_SyncRouting, RoundTripTests):
    pass


class FramingSyncTests(_SyncRouting, FramingTests):
    pass


class PipeliningSyncTests(_SyncRouting, PipeliningTests):
    pass


class BackpressureSyncTests(_SyncRouting, BackpressureTests):
    pass


class ErrorSyncTests(_SyncRouting, ErrorTests):
    pass


class RetrySyncTests(_SyncRouting, RetryTests):
    pass


class CancellationSyncTests(_SyncRouting, CancellationTests):
    pass


class DrainSyncTests(_SyncRouting, DrainTests):
    pass


class UpgradeSyncTests(_SyncRouting, UpgradeTests):
    pass


class RouteNowTests(SynchronousTestCase):
    """
    How L{Http1ServerProtocol} uses a router's C{route_now}.
    """

    def test_used_when_offered(self):
        """
        A router with C{route_now} is not asked for a Deferred; the request head and a body that came in the same
        segment go up in one write.
        """
        router = SyncRouter(default=BACKEND)
        h = _Harness(router=router)
        h.server.dataReceived(GET)
        up = h.up()
        up.dataReceived(OK)
        self.assertEqual(h.responses()[0][0], 200)
        writes = []
        up._write = writes.append
        h.server.dataReceived(b"POST /a HTTP/1.1\r\nHost: web:80\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(writes, [b"POST /a HTTP/1.1\r\nhost: web:80\r\ncontent-length: 3\r\n\r\nabc"])
        up.dataReceived(OK)
        self.assertEqual([r[0] for r in h.responses()], [200, 200])
        self.assertEqual(router.authorities, ["web:80", "web:80"])
        self.assertEqual(router.deferred_routes, [])
        self.assertEqual([lease.outcomes for lease in router.leases], [[True], [True]])

    def test_waiting_falls_back_to_route(self):
        """
        C{route_now} answering C{None} (the target waits for discovery) sends the request through C{route}.
        """
        router = SyncRouter(default=BACKEND, wait=True)
        h = _Harness(router=router)
        h.server.dataReceived(GET)
        self.assertEqual(router.deferred_routes, ["web:80"])
        h.up().dataReceived(OK)
        self.assertEqual(h.responses()[0][0], 200)
        self.assertEqual(router.leases[0].outcomes, [True])

    def test_unexpected_error(self):
        """
        An unexpected exception from C{route_now} is logged and answered with 502, as a failed C{route} is.
        """
        h = _Harness(router=SyncRouter(default=BACKEND, error=RuntimeError("boom")))
        h.server.dataReceived(GET + GET)
        self.assertEqual([r[0] for r in h.responses()], [502, 502])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertFalse(h.transport.disconnecting)
