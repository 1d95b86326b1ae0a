"""
The request layers without sockets: the retry rule, the per-request call (route, split, timeout, budget,
route metrics), HTTP/1 glue driven through them over StringTransports, and pools keyed by everything that
makes a connection what it is.
"""

from random import Random

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from linkproxy.admin.metrics import Metrics
from linkproxy.core import retry
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.profile import parse_profiles
from linkproxy.discovery.profiles import Profiles
from linkproxy.interfaces import ISyncRouter
from linkproxy.layers.stack import CONNECT, RESET, RESPONSE, RequestStack
from linkproxy.testing import FakeRouter, RecordingLease
from tests.test_http1 import MemoryConnector, ParsedResponses, _Harness, make_settings, sample

A = ("10.0.0.1", 8080)
B = ("10.0.0.2", 8080)

PROFILES = {
    "profiles": {
        "web:80": {
            "retry_budget": {"ratio": 0.2, "min_per_second": 1, "ttl": "1s"},
            "routes": [
                {"name": "api", "match": {"method": "GET", "path_regex": "^/api/"}, "timeout": "2s",
                 "retryable": True},
                {"name": "post", "match": {"method": "POST"}, "retryable": True},
            ],
        },
        "split:80": {"split": [{"target": "v1:80", "weight": 9}, {"target": "v2:80", "weight": 1}]},
    },
}


def profiles(clock=None):
    return Profiles(parse_profiles(PROFILES["profiles"]), clock=clock)


class RetryRuleTests(SynchronousTestCase):
    """
    L{retry.may_retry}: which failed attempts may go again.
    """

    def test_table(self):
        """
        Connect failures always (while attempts last); resets when safe or on retryable routes; failed answers
        only on retryable routes; nothing without the body to replay, or past the attempts.
        """
        cases = [
            ((CONNECT, 1, False, True, False), True),
            ((CONNECT, 3, True, True, True), False),
            ((RESET, 1, True, True, False), True),
            ((RESET, 1, False, True, False), False),
            ((RESET, 1, False, True, True), True),
            ((RESET, 1, True, False, True), False),
            ((RESPONSE, 1, True, True, False), False),
            ((RESPONSE, 1, False, True, True), True),
            ((RESPONSE, 2, False, False, True), False),
        ]
        for args, expected in cases:
            self.assertEqual(retry.may_retry(*args), expected, args)
        self.assertFalse(retry.budgeted(CONNECT))
        self.assertTrue(retry.budgeted(RESET) and retry.budgeted(RESPONSE))


class CallTests(SynchronousTestCase):
    """
    L{RequestStack.begin}: a request's route, concrete target, deadline and budget.
    """

    def stack(self, response_timeout=10.0):
        self.metrics = Metrics(process=False)
        self.router = FakeRouter(default=A)
        return RequestStack("outbound", self.router, self.metrics, response_timeout, profiles=profiles(),
                            rng=Random(7))

    def test_no_profile(self):
        """
        A target without a profile: the default route, itself as concrete target, the listener's timeout, no
        budget and no route metrics.
        """
        call = self.stack().begin("other:80", b"GET", b"/api/x", 0.0)
        self.assertEqual((call.route.name, call.concrete, call.timeout), ("default", "other:80", 10.0))
        self.assertIsNone(call.metrics)
        self.assertIsNone(call.budget)

    def test_route_and_timeout(self):
        """
        The first matching route wins, and its timeout (shorter than the listener's) is the deadline; the
        query string does not take part in the match.
        """
        stack = self.stack()
        call = stack.begin("web:80", b"GET", b"/api/x?y=1", 0.0)
        self.assertEqual((call.route.name, call.timeout), ("api", 2.0))
        self.assertIn("route api", call.timeout_reason)
        self.assertEqual(stack.begin("web:80", b"GET", b"/other", 0.0).route.name, "default")
        self.assertEqual(stack.begin("web:80", b"POST", b"/api/x", 0.0).route.name, "post")

    def test_grpc_timeout_shortest_wins(self):
        """
        A C{grpc-timeout} shorter than the route's is the deadline, named in the reason.
        """
        call = self.stack().begin("web:80", b"GET", b"/api/x", 0.0, grpc_timeout=0.5)
        self.assertEqual(call.timeout, 0.5)
        self.assertIn("grpc-timeout", call.timeout_reason)

    def test_split(self):
        """
        A split profile sends requests to its legs by weight (seeded), and the balance layer routes the leg.
        """
        stack = self.stack()
        legs = [stack.begin("split:80", b"GET", b"/", 0.0).concrete for _ in range(2000)]
        share = legs.count("v1:80") / len(legs)
        self.assertTrue(0.87 <= share <= 0.93, share)
        call = stack.begin("split:80", b"GET", b"/", 0.0)
        call.pick(lambda lease: None, lambda lease: None, self.fail)
        self.assertEqual(self.router.authorities[-1], call.concrete)

    def test_budget_limits_retries(self):
        """
        A retryable route retries failed answers until the budget (1/s reserve over 1 s, plus 0.2 per
        request) runs out; exhaustion and retries are counted in the route metrics; connect failures do
        not draw on the budget.
        """
        stack = self.stack()
        allowed = 0
        for i in range(20):
            call = stack.begin("web:80", b"GET", b"/api/x", 0.0)
            call.attempts = 1
            if call.retry(RESPONSE, 0.0, Endpoint(address=A), True, True):
                allowed += 1
        # 1 of reserve plus 0.2 x 20 deposits.
        self.assertEqual(allowed, 5)
        self.assertEqual(sample_route(self.metrics, "route_retry_requests_total"), 5)
        self.assertEqual(sample_route(self.metrics, "route_retry_budget_exhausted_total"), 15)
        call = stack.begin("web:80", b"GET", b"/api/x", 0.0)
        call.attempts = 1
        self.assertTrue(call.retry(CONNECT, 0.0, Endpoint(address=A), True, True))
        self.assertEqual(call.avoid, Endpoint(address=A))


def sample_route(metrics, name):
    total = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


@implementer(ISyncRouter)
class TwoEndpoints:
    """
    A router over two endpoints that honours C{avoid}, recording every lease.
    """

    def __init__(self, endpoints):
        self.endpoints = endpoints
        self.leases = []
        self.avoided = []

    def route_now(self, authority, avoid=None):
        return None

    def route(self, authority, avoid=None):
        self.avoided.append(avoid)
        choices = [e for e in self.endpoints if e != avoid] or self.endpoints
        lease = RecordingLease(choices[0])
        self.leases.append(lease)
        return succeed(lease)


class Http1RetryTests(SynchronousTestCase):
    """
    HTTP/1 requests through the layers: failed attempts go to the other endpoint.
    """

    def harness(self, **kw):
        router = TwoEndpoints([Endpoint(address=A), Endpoint(address=B)])
        return _Harness(router=router, **kw)

    def test_connect_failure_goes_elsewhere(self):
        """
        A refused connect is retried on the other endpoint, and the client gets that one's answer.
        """
        h = self.harness(auto=False)
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        h.connector.refuse()
        self.assertEqual([c[0].address for c in h.connector.connects], [A, B])
        self.assertEqual(h.router.avoided, [None, Endpoint(address=A)])
        h.connector.complete()
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.responses()[0][0], 200)
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False], [True]])
        self.assertEqual(sample(h.settings, "request_total"), 1)

    def test_retryable_503_replays_body(self):
        """
        On a retryable route a 503 is dropped and the request, body included, goes to the other endpoint.
        """
        clock = Clock()
        h = self.harness(profiles=profiles(clock))
        h.server.dataReceived(b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
        first = h.sent_up()
        h.up().dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.responses(), [])
        self.assertEqual(h.sent_up(), first)
        self.assertEqual(h.connector.connects[-1][0].address, B)
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.responses()[0][:3:2], (200, b"ok"))
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False], [True]])
        # One request, two attempts, two answers (the dropped 503 among them), one response to the client.
        route = {"rt_route": "post"}
        self.assertEqual(sample(h.settings, "route_request_total", **route), 1)
        self.assertEqual(sample(h.settings, "route_actual_request_total", **route), 2)
        self.assertEqual(sample(h.settings, "route_actual_response_total", status_code="503", **route), 1)
        self.assertEqual(sample(h.settings, "route_actual_response_total", status_code="200", **route), 1)
        self.assertEqual(sample(h.settings, "route_response_total", **route), 1)
        self.assertEqual(sample(h.settings, "route_response_total", status_code="200", **route), 1)
        self.assertEqual(sample(h.settings, "route_retry_requests_total", **route), 1)

    def test_proxy_rejection_never_blames(self):
        """
        A request the proxy rejects while its body arrives (malformed chunk) releases the lease as "not the
        endpoint's doing".
        """
        h = self.harness()
        h.server.dataReceived(b"POST /x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n")
        self.assertEqual(h.responses()[0][0], 400)
        self.assertEqual(h.router.leases[0].outcomes, [None])

    def test_absolute_form_to_origin(self):
        """
        An absolute-form request goes to a plain endpoint in origin-form with Host rebuilt from the target.
        """
        h = self.harness()
        h.server.dataReceived(b"GET http://web.test:8080/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        sent = h.sent_up()
        self.assertTrue(sent.startswith(b"GET /p?q=1 HTTP/1.1\r\nhost: web.test:8080\r\n"), sent)
        self.assertNotIn(b"other", sent)


class PoolKeyTests(SynchronousTestCase):
    """
    A pooled connection is never shared between a meshed and a plain endpoint of one address (the silent
    mTLS downgrade: requests for the meshed target riding a plaintext connection to the app, and back).
    """

    def test_meshed_and_plain_never_share(self):
        """
        One address listed under two targets, once with an identity (through its proxy) and once without:
        each request to either target uses a connection of its own kind, however the pool is warmed.
        """
        meshed = Endpoint(address=A, identity="web.ns.serviceaccount.identity.test", proxy=("10.0.0.1", 4143))
        plain = Endpoint(address=A)
        router = FakeRouter()
        leases = {"meshed:80": meshed, "plain:80": plain}

        def route(authority, avoid=None):
            lease = RecordingLease(leases[authority])
            router.leases.append(lease)
            return succeed(lease)

        router.route = route
        connector = MemoryConnector()
        clock = Clock()
        settings = make_settings(router, connector, clock)
        from linkproxy.net.http1 import Http1ServerProtocol
        from twisted.internet.testing import StringTransport
        order = ["meshed:80", "plain:80", "meshed:80", "plain:80", "plain:80", "meshed:80"]
        for authority in order:
            server = Http1ServerProtocol(settings)
            server.makeConnection(StringTransport())
            server.dataReceived(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % authority.encode())
            up = server._up
            self.assertIs(up.endpoint, leases[authority])
            up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(ParsedResponses().feed(server.transport.value())[0][0], 200)
        # Each kind got one connection of its own, reused for its own kind only.
        self.assertEqual(len(connector.connects), 2)
        for endpoint, protocol, _, _ in connector.connects:
            kind = "meshed" if endpoint.meshed else "plain"
            written = protocol.transport.value()
            self.assertEqual(written.count(b"host: %s:80" % kind.encode()), 3, written)
            self.assertEqual(written.count(b"GET / HTTP/1.1"), 3)
        self.assertEqual({c[0].pool_key for c in connector.connects},
                         {(A, meshed.identity, meshed.proxy), (A, None, None)})


class H2RetryTests(SynchronousTestCase):
    """
    HTTP/2 streams through the layers: a failed attempt is sent again on a new upstream stream, body and all,
    without acknowledging the replayed bytes to the client twice.
    """

    def profiles(self):
        from tests.test_h2 import AUTHORITY
        return Profiles(parse_profiles({AUTHORITY: {"routes": [{"name": "all", "retryable": True}]}}))

    def test_reset_get_retried(self):
        """
        An upstream RST_STREAM before the head of a GET: the GET goes again (avoiding the endpoint that
        failed), and the client gets the second attempt's answer.
        """
        from h2.errors import ErrorCodes
        from tests.test_h2 import BACKEND, Harness
        h = Harness(mode="hold")
        h.pump()
        sid = h.client.request()
        h.pump()
        backend = h.connector.backends[0]
        backend.conn.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        backend.flush()
        backend.mode = "respond"
        h.pump()
        self.assertEqual(sorted(backend.streams), [1, 3])
        self.assertEqual(h.client.streams[sid].data, b"hello")
        self.assertEqual([lease.outcomes for lease in h.router.leases], [[False], [True]])
        self.assertEqual(h.router.avoided, [None, Endpoint(address=BACKEND)])
        h.assert_clean(self)

    def test_retryable_503_replays_body(self):
        """
        On a retryable route, a 503 to a POST is dropped and the POST, its 20 kB body included, is sent again;
        each byte of it is acknowledged to the client once, not once per attempt.
        """
        from tests.test_h2 import Harness
        h = Harness(mode="hold", profiles=self.profiles())
        h.pump()
        acked = []
        acknowledge = h.proxy.conn.acknowledge_received_data

        def record(n, stream_id):
            acked.append(n)
            return acknowledge(n, stream_id)

        h.proxy.conn.acknowledge_received_data = record
        body = bytes(range(256)) * 80
        sid = h.client.request(method=b"POST", body=body)
        h.pump()
        backend = h.connector.backends[0]
        self.assertEqual(backend.streams[1].data, body)
        backend.mode = "echo"
        backend.conn.send_headers(1, [(b":status", b"503")], end_stream=True)
        backend.flush()
        h.pump()
        self.assertEqual(sorted(backend.streams), [1, 3])
        self.assertEqual(backend.streams[3].echoed, len(body))
        self.assertEqual(h.client.streams[sid].headers[b":status"], b"200")
        self.assertEqual(h.client.streams[sid].data, body)
        self.assertEqual(h.router.leases[0].outcomes, [False])
        self.assertEqual(sum(acked), len(body))
        h.assert_clean(self)

    def test_grpc_unavailable_trailers_only_retried(self):
        """
        A trailers-only gRPC UNAVAILABLE on a retryable route is retried; an OK answer reaches the client.
        """
        from tests.test_h2 import Harness
        h = Harness(mode="hold", profiles=self.profiles())
        h.pump()
        sid = h.client.request(method=b"POST", extra=[("content-type", "application/grpc")], body=b"\0\0\0\0\0")
        h.pump()
        backend = h.connector.backends[0]
        backend.mode = "echo"
        backend.conn.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                      (b"grpc-status", b"14")], end_stream=True)
        backend.flush()
        h.pump()
        self.assertEqual(sorted(backend.streams), [1, 3])
        self.assertEqual(h.client.streams[sid].trailers.get(b"grpc-status"), b"0")
        h.assert_clean(self)


class TlsCloseTests(SynchronousTestCase):
    """
    Closing an HTTP/1 connection after a response works over TLS too, whose transport holds a close while a
    producer is registered (Twisted's TLSMemoryBIOProtocol does).
    """

    def test_connection_close_over_tls(self):
        """
        A request with C{Connection: close} on a TLS-like transport: after the response the connection
        closes (the producer is unregistered first).
        """
        from twisted.internet.testing import StringTransport
        from linkproxy.net.http1 import Http1ServerProtocol

        class TlsLikeTransport(StringTransport):
            def loseConnection(self):
                if self.producer is None:
                    StringTransport.loseConnection(self)

        h = _harness()
        server = Http1ServerProtocol(h.settings)
        transport = TlsLikeTransport()
        server.makeConnection(transport)
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(transport.disconnecting)


def _harness():
    return _Harness()
