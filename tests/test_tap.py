"""
The tap without sockets: the layer, the events HTTP/1 and HTTP/2 report to it, the C{/tap} stream's filters,
bounded queue and backpressure, C{linkproxy-tap}'s lines, and the access log's formats.
"""

import io
import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.accesslog import AccessLog, format_apache, format_json
from linkproxy.admin.tap import TapFilterError, TapStream, matches, parse_filters
from linkproxy.core.endpoint import Endpoint
from linkproxy.layers.tap import EVENT_FIELDS, TapLayer
from linkproxy.tapcli import format_event


def event(**fields):
    base = {name: "" for name in EVENT_FIELDS}
    base.update(direction="outbound", authority="web:80", method="GET", path="/a/b", status=200, latency_ms=1.5,
                duration_ms=2.0, request_bytes=0, response_bytes=5, attempt=1, final=True, timestamp=0.0,
                client_addr="127.0.0.1", version="1.1", route="default")
    base.update(fields)
    return base


class TapLayerTests(SynchronousTestCase):
    """
    L{TapLayer}: watchers, their bound, and a failing watcher.
    """

    def test_watch_bound(self):
        """
        At most C{max_watchers} watch; C{watch} says no past it, and C{unwatch} frees a place.
        """
        tap = TapLayer(max_watchers=2)
        a, b, c = (lambda e: None), (lambda e: None), (lambda e: None)
        self.assertTrue(tap.watch(a))
        self.assertTrue(tap.watch(b))
        self.assertFalse(tap.watch(c))
        tap.unwatch(a)
        self.assertTrue(tap.watch(c))

    def test_failing_watcher_removed(self):
        """
        A watcher that raises is removed; the others still get the event, with its timestamp.
        """
        tap = TapLayer(clock=lambda: 42.0)
        got = []

        def bad(e):
            raise RuntimeError("boom")

        tap.watch(bad)
        tap.watch(got.append)
        tap.emit({})
        self.assertEqual(got, [{"timestamp": 42.0}])
        self.assertEqual(tap.watchers, [got.append])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class GlueEventTests(SynchronousTestCase):
    """
    The HTTP/1 and HTTP/2 glue report one event per finished request, and one per dropped attempt.
    """

    def test_http1(self):
        """
        An HTTP/1 round trip: one event with the request's fields; nothing is built while no one watches.
        """
        from tests.test_http1 import _Harness
        h = _Harness()
        h.server.dataReceived(b"GET /x?y=1 HTTP/1.1\r\nHost: web:80\r\n\r\n")
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        got = []
        h.settings.stack.tap.watch(got.append)
        h.server.dataReceived(b"POST http://web:80/p HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
        h.up().dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
        [e] = got
        self.assertEqual((e["direction"], e["authority"], e["method"], e["path"], e["status"]),
                         ("outbound", "web:80", "POST", "/p", 201))
        self.assertEqual((e["request_bytes"], e["response_bytes"], e["endpoint"], e["final"], e["attempt"]),
                         (3, 4, "10.0.0.1:8080", True, 1))
        self.assertEqual(set(e), set(EVENT_FIELDS))

    def test_http1_proxy_error(self):
        """
        The proxy's own answers are events too, with the cause in C{error}.
        """
        from linkproxy.testing import FakeRouter
        from tests.test_http1 import _Harness
        h = _Harness(router=FakeRouter())
        got = []
        h.settings.stack.tap.watch(got.append)
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: nowhere:80\r\n\r\n")
        [e] = got
        self.assertEqual((e["status"], e["error"]), (503, "no endpoints for nowhere:80"))

    def test_http1_retried_attempt_marked(self):
        """
        A connect failure retried: one event for the dropped attempt (C{final: false}), one for the answer.
        """
        from tests.test_http1 import _Harness
        h = _Harness(auto=False)
        got = []
        h.settings.stack.tap.watch(got.append)
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        h.connector.refuse()
        h.connector.complete()
        h.up().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([(e["final"], e["attempt"], e["status"]) for e in got], [(False, 1, 502), (True, 2, 200)])
        self.assertEqual(got[0]["error"], "retried: connect")

    def test_h2(self):
        """
        An HTTP/2 stream: one event when it completes.
        """
        from tests.test_h2 import Harness
        h = Harness()
        got = []
        h.settings.stack.tap.watch(got.append)
        h.pump()
        sid = h.client.request(path=b"/h2")
        h.pump()
        self.assertEqual(h.client.streams[sid].data, b"hello")
        [e] = got
        self.assertEqual((e["method"], e["path"], e["status"], e["version"], e["response_bytes"]),
                         ("GET", "/h2", 200, "2", 5))


class FilterTests(SynchronousTestCase):
    """
    The C{/tap} query filters.
    """

    def test_parse(self):
        """
        Known filters and C{limit} parse; unknown names and bad values are refused with a reason.
        """
        filters, limit = parse_filters({b"method": [b"get"], b"status": [b"5xx"], b"limit": [b"3"]})
        self.assertEqual((filters, limit), ({"method": "GET", "status": "5xx"}, 3))
        for bad in ({b"limit": [b"0"]}, {b"status": [b"9xx"]}, {b"colour": [b"red"]}):
            self.assertRaises(TapFilterError, parse_filters, bad)

    def test_matches(self):
        """
        Exact authority, method and direction; path by prefix; status by code or class.
        """
        e = event(status=503)
        self.assertTrue(matches({"path": "/a", "status": "5xx", "authority": "web:80"}, e))
        self.assertTrue(matches({"status": "503"}, e))
        self.assertFalse(matches({"status": "4xx"}, e))
        self.assertFalse(matches({"path": "/b"}, e))
        self.assertFalse(matches({"direction": "inbound"}, e))


class FakeRequest:
    def __init__(self):
        self.written = []
        self.headers = {}
        self.producer = None
        from twisted.internet.defer import Deferred
        self.finish_notified = Deferred()

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return self.finish_notified

    def events(self):
        text = b"".join(self.written).decode()
        found = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
        return [e for e in found if "lost" not in e]


class TapStreamTests(SynchronousTestCase):
    """
    One C{/tap} subscriber: filtered, batched, bounded, and paused by its client.
    """

    def stream(self, filters=None, limit=None, max_queued=1000):
        self.clock = Clock()
        self.tap = TapLayer(clock=self.clock.seconds)
        self.request = FakeRequest()
        stream = TapStream(self.request, self.tap, self.clock, filters or {}, limit, max_queued=max_queued)
        self.assertTrue(stream.start())
        return stream

    def test_stream_and_limit(self):
        """
        Events are written as SSE C{data:} lines at the next flush; at the limit the stream ends and stops
        watching.
        """
        stream = self.stream(filters={"status": "2xx"}, limit=2)
        for status in (200, 500, 204, 200):
            self.tap.emit(event(status=status))
        self.clock.advance(0.2)
        self.assertEqual([e["status"] for e in self.request.events()], [200, 204])
        self.assertEqual(self.tap.watchers, [])
        self.assertEqual(self.successResultOf(stream.finished), b"")
        self.assertEqual(self.request.headers[b"Content-Type"], b"text/event-stream")

    def test_slow_client_loses_events(self):
        """
        A client that does not read (the transport paused) gets nothing written; past the queue's bound
        events are dropped and counted, and the loss is reported when it reads again.
        """
        stream = self.stream(max_queued=10)
        stream.pauseProducing()
        for i in range(25):
            self.tap.emit(event(path=f"/{i}"))
        self.clock.advance(1)
        self.assertEqual(self.request.events(), [])
        self.assertEqual(stream.lost, 15)
        stream.resumeProducing()
        self.clock.advance(0)
        text = b"".join(self.request.written).decode()
        self.assertIn('event: lost\ndata: {"lost": 15}', text)
        self.assertEqual([e["path"] for e in self.request.events()], [f"/{i}" for i in range(10)])

    def test_client_gone(self):
        """
        When the client goes away the stream stops watching and its timers go.
        """
        self.stream()
        self.tap.emit(event())
        self.request.finish_notified.callback(None)
        self.assertEqual(self.tap.watchers, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_too_many(self):
        """
        A stream past the tap's watcher bound does not start (the route answers 429).
        """
        tap = TapLayer(max_watchers=1)
        clock = Clock()
        self.assertTrue(TapStream(FakeRequest(), tap, clock, {}, None).start())
        self.assertFalse(TapStream(FakeRequest(), tap, clock, {}, None).start())


class LineTests(SynchronousTestCase):
    """
    C{linkproxy-tap}'s line and the access log's formats.
    """

    def test_tap_line(self):
        """
        Method, authority, path, status, latency, endpoint, tls and client id, as linkerd viz tap prints.
        """
        line = format_event(event(endpoint="10.0.0.1:80", tls="true", client_id="a.b", status=503,
                                  error="boom", final=False, attempt=1))
        for part in ("proxy=out", ":method=GET", ":authority=web:80", ":path=/a/b", ":status=503",
                     "latency=1.5ms", "dst=10.0.0.1:80", "tls=true", "client_id=a.b", 'error="boom"', "(retried)"):
            self.assertIn(part, line)

    def test_access_log_formats(self):
        """
        Apache: the Common Log Format with the identity as the user, then authority and duration; JSON: one
        object. Retried attempts are not logged.
        """
        e = event(timestamp=0.0, client_id="a.b", response_bytes=335)
        self.assertEqual(format_apache(e),
                         '127.0.0.1 - a.b [01/Jan/1970:00:00:00 +0000] "GET /a/b HTTP/1.1" 200 335 web:80 2ms')
        record = json.loads(format_json(e))
        self.assertEqual((record["timestamp"], record["status"], record["client_id"]),
                         ("1970-01-01T00:00:00.000000Z", 200, "a.b"))
        out = io.StringIO()
        log = AccessLog("json", out)
        log(event(final=False))
        log(e)
        log.close()
        self.assertEqual(len(out.getvalue().splitlines()), 1)

    def test_access_log_bounded(self):
        """
        A writer that cannot keep up drops lines (counted) instead of growing without bound.
        """
        import threading
        gate = threading.Event()

        class Slow(io.StringIO):
            def write(self, text):
                gate.wait(5)
                return super().write(text)

        out = Slow()
        log = AccessLog("apache", out, max_queued=5)
        for i in range(50):
            log(event(path=f"/{i}"))
        self.assertGreaterEqual(log.dropped, 40)
        gate.set()
        log.close()
        self.assertLessEqual(len(out.getvalue().splitlines()), 10)


class EndpointLabelTests(SynchronousTestCase):
    """
    Events name the endpoint as host:port.
    """

    def test_addr(self):
        self.assertEqual(Endpoint(address=("::1", 80)).addr_str, "[::1]:80")
