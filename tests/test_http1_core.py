"""
Tests for L{linkproxy.core.http1}: head serialisation, chunked framing, the proxy's error responses, authority
rules and header collection. No I/O.
"""

import httptools
from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core import http1 as h1
from linkproxy.core.headers import set_client_id, strip_hop_by_hop


class _Collect:
    """
    httptools callbacks that record one or more parsed messages.
    """

    def __init__(self):
        self.messages = []
        self.body = b""

    def on_message_begin(self):
        self.headers = []
        self.url = b""
        self.body = b""

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.messages.append((self.url, self.headers, self.body))


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_value = st.binary(min_size=0, max_size=20).map(lambda b: bytes(c for c in b if 0x21 <= c < 0x7F))


class HeadSerialisationTests(SynchronousTestCase):
    """
    Heads are serialised in one join and parse back to what was given.
    """

    def test_request_head(self):
        """
        A request head has the method, target, HTTP/1.1, each header once and a blank line.
        """
        head = h1.serialize_request_head(b"GET", b"/x?y=1", [(b"host", b"web:80"), (b"accept", b"*/*")])
        self.assertEqual(head, b"GET /x?y=1 HTTP/1.1\r\nhost: web:80\r\naccept: */*\r\n\r\n")

    def test_response_head_standard_reason(self):
        """
        Without a reason phrase the standard one is used.
        """
        self.assertEqual(h1.serialize_response_head(404, None, []), b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.assertEqual(h1.serialize_response_head(200, b"Fine", [(b"a", b"b")]),
                         b"HTTP/1.1 200 Fine\r\na: b\r\n\r\n")

    def test_unknown_status(self):
        """
        A status without a standard phrase still gets a valid status line.
        """
        self.assertEqual(h1.status_line(599), b"HTTP/1.1 599 Unknown\r\n")

    @given(st.lists(st.tuples(_token, _value), max_size=10), st.sampled_from([b"GET", b"POST", b"PUT"]))
    def test_request_round_trip(self, headers, method):
        """
        Whatever headers are serialised, httptools parses the same ones back.
        """
        collect = _Collect()
        parser = httptools.HttpRequestParser(collect)
        parser.feed_data(h1.serialize_request_head(method, b"/p", headers + [(b"content-length", b"0")]))
        self.assertEqual(len(collect.messages), 1)
        url, parsed, _ = collect.messages[0]
        self.assertEqual(url, b"/p")
        self.assertEqual(parsed[:-1], headers)
        self.assertEqual(parser.get_method(), method)


class ChunkedTests(SynchronousTestCase):
    """
    Chunked framing.
    """

    def test_encode_chunk(self):
        """
        A chunk is the hex size, CRLF, the data, CRLF; empty data yields nothing (it would end the body).
        """
        self.assertEqual(h1.encode_chunk(b"hello world!"), b"c\r\nhello world!\r\n")
        self.assertEqual(h1.encode_chunk(b""), b"")
        self.assertEqual(h1.chunk_prefix(255), b"ff\r\n")

    def test_last_chunk(self):
        """
        The last chunk is C{0} and a blank line, with trailers in between when given.
        """
        self.assertEqual(h1.last_chunk(), b"0\r\n\r\n")
        self.assertEqual(h1.last_chunk([(b"grpc-status", b"0")]), b"0\r\ngrpc-status: 0\r\n\r\n")

    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_round_trip(self, pieces):
        """
        A body framed chunk by chunk parses back to the concatenated data.
        """
        collect = _Collect()
        parser = httptools.HttpRequestParser(collect)
        wire = h1.serialize_request_head(b"POST", b"/", [(b"transfer-encoding", b"chunked")])
        wire += b"".join(h1.encode_chunk(p) for p in pieces) + h1.last_chunk()
        parser.feed_data(wire)
        self.assertEqual(collect.messages[0][2], b"".join(pieces))


class ErrorResponseTests(SynchronousTestCase):
    """
    Responses the proxy makes itself.
    """

    def test_shape(self):
        """
        An error response has the status line, C{l5d-proxy-error}, a content-length matching a short text body,
        and the connection header.
        """
        wire = h1.error_response(503, "no endpoints for web:80", close=False)
        head, _, body = wire.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertIn(b"l5d-proxy-error: no endpoints for web:80", lines)
        self.assertIn(b"content-length: %d" % len(body), lines)
        self.assertIn(b"connection: keep-alive", lines)
        self.assertEqual(body, b"no endpoints for web:80\n")
        self.assertIn(b"connection: close", h1.error_response(400, "bad", close=True))

    def test_reason_is_header_safe(self):
        """
        Control characters in the reason cannot break the header out of its line.
        """
        wire = h1.error_response(502, "evil\r\nset-cookie: x=1")
        self.assertNotIn(b"\r\nset-cookie", wire)
        self.assertIn(b"l5d-proxy-error: evil??set-cookie: x=1\r\n", wire)

    def test_parses(self):
        """
        httptools parses every error response the proxy produces.
        """
        for status in (400, 431, 502, 503, 504):
            collect = _Collect()
            parser = httptools.HttpResponseParser(collect)
            parser.feed_data(h1.error_response(status, "why"))
            self.assertEqual(parser.get_status_code(), status)
            self.assertEqual(collect.messages[0][2], b"why\n")


class AuthorityTests(SynchronousTestCase):
    """
    The logical target of a request.
    """

    def test_host_header(self):
        """
        Without an absolute-form target the Host header names the target; port 80 by default.
        """
        self.assertEqual(h1.request_authority(b"/", b"Web.Default"), "web.default:80")
        self.assertEqual(h1.request_authority(b"/", b"web:8080"), "web:8080")

    def test_absolute_form_wins(self):
        """
        An absolute-form URI's authority is the target, whatever the Host header says.
        """
        self.assertEqual(h1.request_authority(b"http://api:9000/v1?q", b"other"), "api:9000")
        self.assertEqual(h1.request_authority(b"https://api/v1", None), "api:443")
        self.assertEqual(h1.request_authority(b"http://user@api", None), "api:80")

    def test_missing_or_invalid(self):
        """
        No Host, or a Host that is not a host, has no authority.
        """
        self.assertIsNone(h1.request_authority(b"/", None))
        self.assertIsNone(h1.request_authority(b"/", b""))
        self.assertIsNone(h1.request_authority(b"/", b"a b"))
        self.assertIsNone(h1.request_authority(b"/", b"web:99999"))

    def test_ipv6(self):
        """
        IPv6 literals keep their brackets.
        """
        self.assertEqual(h1.request_authority(b"/", b"[::1]:81"), "[::1]:81")


class RulesTests(SynchronousTestCase):
    """
    Idempotency, body presence and content-length parsing.
    """

    def test_idempotent(self):
        """
        GET HEAD OPTIONS TRACE PUT DELETE are idempotent; POST and PATCH are not.
        """
        for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"):
            self.assertTrue(h1.is_idempotent(method))
        for method in (b"POST", b"PATCH", b"CONNECT"):
            self.assertFalse(h1.is_idempotent(method))

    def test_response_has_body(self):
        """
        No body for HEAD, 1xx, 204 and 304.
        """
        self.assertFalse(h1.response_has_body(b"HEAD", 200))
        self.assertFalse(h1.response_has_body(b"GET", 204))
        self.assertFalse(h1.response_has_body(b"GET", 304))
        self.assertFalse(h1.response_has_body(b"GET", 100))
        self.assertTrue(h1.response_has_body(b"GET", 200))

    def test_content_length(self):
        """
        Only plain decimal numbers are lengths.
        """
        self.assertEqual(h1.parse_content_length(b" 42 "), 42)
        self.assertIsNone(h1.parse_content_length(b"-1"))
        self.assertIsNone(h1.parse_content_length(b"1e3"))
        self.assertIsNone(h1.parse_content_length(b"9" * 40))


_header_names = st.sampled_from([
    b"Host", b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade", b"X-A", b"x-b",
    b"L5d-Client-Id", b"Proxy-Connection", b"Content-Length", b"Accept", b"grpc-status",
])
_header_values = st.sampled_from([b"close", b"x-a", b"X-B, keep-alive", b"1", b"upgrade", b"v", b"x-c"])


class HeadCollectorTests(SynchronousTestCase):
    """
    L{HeadCollector} applies the shared header rules in one pass.
    """

    @given(st.lists(st.tuples(_header_names, _header_values), max_size=12),
           st.one_of(st.none(), st.just("web.ns.serviceaccount.identity.local")))
    def test_matches_shared_rules(self, headers, client_id):
        """
        The collected headers equal C{set_client_id(strip_hop_by_hop(...))} without content-length, which the
        proxy sets itself.
        """
        collector = h1.HeadCollector()
        for name, value in headers:
            collector.add(name, value)
        expected = set_client_id(strip_hop_by_hop([(n.lower(), v) for n, v in headers]), client_id)
        expected = [(n, v) for n, v in expected if n != b"content-length"]
        self.assertEqual(collector.finish(client_id), expected)

    def test_framing_and_flags(self):
        """
        Framing, Connection tokens, Upgrade and grpc-status are noted as the head is collected.
        """
        collector = h1.HeadCollector()
        for name, value in [(b"Content-Length", b"5"), (b"Connection", b"Upgrade, Close"),
                            (b"Upgrade", b"websocket"), (b"Host", b"h"), (b"grpc-status", b"14")]:
            collector.add(name, value)
        self.assertEqual(collector.content_length, b"5")
        self.assertTrue(collector.wants_close)
        self.assertEqual(collector.upgrade, b"websocket")
        self.assertEqual(collector.host, b"h")
        self.assertEqual(collector.grpc_status, "14")
        self.assertGreater(collector.size, 40)
        collector.reset()
        self.assertEqual((collector.headers, collector.size, collector.upgrade), ([], 0, None))

    def test_connection_tokens_cached_and_bounded(self):
        """
        Connection values are parsed once and shared; several Connection fields add up without touching the cached
        sets; values past the bounds are parsed but not kept.
        """
        self.patch(h1, "_CONNECTION_TOKENS", {})
        first, second = h1.HeadCollector(), h1.HeadCollector()
        first.add(b"Connection", b"Keep-Alive, X-A")
        second.add(b"Connection", b"Keep-Alive, X-A")
        self.assertIs(first.connection, second.connection)
        self.assertEqual(first.connection, {b"keep-alive", b"x-a"})
        first.add(b"Connection", b" ,close")
        self.assertEqual(first.connection, {b"keep-alive", b"x-a", b"close"})
        self.assertEqual(second.connection, {b"keep-alive", b"x-a"})
        long_value = b"x-" + b"a" * 100
        first.add(b"Connection", long_value)
        self.assertIn(long_value, first.connection)
        self.assertNotIn(long_value, h1._CONNECTION_TOKENS)
        for i in range(200):
            h1.HeadCollector().add(b"Connection", b"x-%d" % i)
        self.assertEqual(len(h1._CONNECTION_TOKENS), h1._MAX_CACHED)


class StatusLineTests(SynchronousTestCase):
    """
    L{h1.status_line} with a reason phrase from the upstream.
    """

    def test_reason_cached_and_bounded(self):
        """
        Status lines with a given reason are kept for reuse, up to a bound in entries and in reason length.
        """
        self.patch(h1, "_REASON_LINES", {})
        line = h1.status_line(200, b"OK")
        self.assertEqual(line, b"HTTP/1.1 200 OK\r\n")
        self.assertIs(h1.status_line(200, b"OK"), line)
        self.assertEqual(h1.status_line(200, b"Fine"), b"HTTP/1.1 200 Fine\r\n")
        self.assertEqual(h1.status_line(200, b"R" * 100), b"HTTP/1.1 200 " + b"R" * 100 + b"\r\n")
        self.assertEqual(len(h1._REASON_LINES), 2)
        for i in range(200):
            self.assertEqual(h1.status_line(200, b"r%d" % i), b"HTTP/1.1 200 r%d\r\n" % i)
        self.assertEqual(len(h1._REASON_LINES), h1._MAX_CACHED)
