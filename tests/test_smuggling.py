"""
Request smuggling (issue #9): requests whose framing two HTTP/1 parsers could read differently get 400 with
C{l5d-proxy-error}, the connection closes, and nothing of them reaches an upstream; upstream responses framed
that way are a 502 and their connection is closed, not pooled; HTTP/2 requests downgraded to HTTP/1 for the
app cannot leave the app's connection waiting for body bytes that never come.

The HTTP/1 side is driven over StringTransports (L{tests.test_http1._Harness}), the downgrade over
L{twisted.test.iosim} (L{tests.test_orig_proto.Harness} with an h2 client from L{tests.test_h2}).

C{VECTORS} is shared with C{tests.test_integration_smuggling}, which sends the same bytes to real processes.
"""

import sys

from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core import http1 as h1
from linkproxy.core.headers import PROXY_ERROR
from tests import test_http1
from tests.test_h2 import Client as H2Client
from tests.test_http1 import GET, OK, _Harness, sample
from tests.test_orig_proto import Harness as BridgeHarness

HOST = b"Host: web\r\n"


def request(*fields, body=b"", method=b"POST", version=b"1.1", host=HOST):
    """
    Raw request bytes: request line, Host, the given header lines, the blank line, C{body}.
    """
    return (method + b" / HTTP/" + version + b"\r\n" + host + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
            + body)


# A request hidden in a body: whoever reads the outer request's body differently from the proxy sees it.
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n"
CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED

#: (name, raw request bytes, the cause l5d-proxy-error names (a substring)). Each one must get 400 with
#: nothing forwarded. "llhttp" in a name marks vectors httptools already refused before issue #9.
VECTORS = [
    # Content-Length together with Transfer-Encoding, either order.
    ("cl-te (llhttp)", request(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
     b"Content-Length"),
    ("te-cl (llhttp)", request(b"Transfer-Encoding: chunked", b"Content-Length: 6", body=CHUNKED_SMUGGLE),
     b"Content-Length"),
    # Duplicate Content-Length, differing and identical, as two fields and as a list.
    ("cl-differing (llhttp)", request(b"Content-Length: 5", b"Content-Length: 40", body=b"hello" + SMUGGLED),
     b"Duplicate Content-Length"),
    ("cl-identical (llhttp)", request(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
     b"Duplicate Content-Length"),
    ("cl-list-identical (llhttp)", request(b"Content-Length: 5, 5", body=b"hello"), b"Content-Length"),
    ("cl-list-differing (llhttp)", request(b"Content-Length: 5, 40", body=b"hello" + SMUGGLED),
     b"Content-Length"),
    ("cl-plus (llhttp)", request(b"Content-Length: +5", body=b"hello"), b"Content-Length"),
    # Obfuscated or unknown Transfer-Encoding.
    ("te-gzip-chunked", request(b"Transfer-Encoding: gzip, chunked", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-identity-chunked", request(b"Transfer-Encoding: identity, chunked", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-empty-element", request(b"Transfer-Encoding: ,chunked", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-chunked-identity (llhttp)", request(b"Transfer-Encoding: chunked, identity", body=CHUNKED_SMUGGLE),
     b"Transfer-Encoding"),
    ("te-chunked-chunked (llhttp)", request(b"Transfer-Encoding: chunked, chunked", body=CHUNKED_SMUGGLE),
     b"Transfer-Encoding"),
    ("te-identity", request(b"Transfer-Encoding: identity", body=SMUGGLED),
     b"transfer-encoding other than a lone chunked"),
    ("te-gzip", request(b"Transfer-Encoding: gzip", body=SMUGGLED), b"transfer-encoding other than a lone chunked"),
    ("te-xchunked", request(b"Transfer-Encoding: xchunked", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-chunked-tab", request(b"Transfer-Encoding: chunked\t", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-chunked-param", request(b"Transfer-Encoding: chunked;x=1", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-chunked-vtab (llhttp)", request(b"Transfer-Encoding: chunked\x0b", body=CHUNKED_SMUGGLE),
     b"header value char"),
    ("te-obs-fold (llhttp)", request(b"Transfer-Encoding:", b" chunked", body=CHUNKED_SMUGGLE), b"malformed"),
    ("te-obs-fold-name (llhttp)", request(b"X-Pad: 1", b" Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
     b"malformed"),
    ("te-space-before-colon (llhttp)", request(b"Transfer-Encoding : chunked", body=CHUNKED_SMUGGLE),
     b"header field char"),
    ("te-two-fields", request(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
     b"transfer-encoding other than a lone chunked"),
    ("te-two-chunked-fields (llhttp)",
     request(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
     b"Transfer-Encoding"),
    ("te-http10", request(b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE, version=b"1.0"),
     b"transfer-encoding in an HTTP/1.0 request"),
    # A bare LF or a NUL in the head.
    ("lf-request-line (llhttp)", b"GET / HTTP/1.1\nHost: web\r\n\r\n", b"CRLF"),
    ("lf-header (llhttp)", b"GET / HTTP/1.1\r\nHost: web\nX: y\r\n\r\n", b"CR"),
    ("lf-in-value (llhttp)", b"GET / HTTP/1.1\r\nHost: web\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n", b"CR"),
    ("lf-end-of-head (llhttp)", b"GET / HTTP/1.1\r\nHost: web\r\n\n", b"malformed"),
    ("lf-only (llhttp)", b"GET / HTTP/1.1\nHost: web\n\n", b"CRLF"),
    ("cr-only (llhttp)", b"GET / HTTP/1.1\r\nHost: web\rX: y\r\n\r\n", b"LF"),
    ("nul-target (llhttp)", b"GET /\x00 HTTP/1.1\r\nHost: web\r\n\r\n", b"url"),
    ("nul-method (llhttp)", b"G\x00T / HTTP/1.1\r\nHost: web\r\n\r\n", b"malformed"),
    ("nul-name (llhttp)", b"GET / HTTP/1.1\r\nHost: web\r\nX\x00: a\r\n\r\n", b"header token"),
    ("nul-value (llhttp)", b"GET / HTTP/1.1\r\nHost: web\r\nX: a\x00b\r\n\r\n", b"header value char"),
    ("nul-version (llhttp)", b"GET / HTTP/1.1\x00\r\nHost: web\r\n\r\n", b"malformed"),
]

#: Transfer-Encoding values accepted as chunked: each is forwarded as one request framed "chunked".
ACCEPTED_TE = [b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b" chunked", b"\tchunked  "]


class CoreTests(SynchronousTestCase):
    """
    The pure rules in L{linkproxy.core.http1}.
    """

    def test_is_chunked_only(self):
        """
        Only one C{chunked} coding, in any case, with the whitespace llhttp itself reads as C{chunked}.
        """
        for value in ACCEPTED_TE:
            self.assertTrue(h1.is_chunked_only(value), value)
        for value in (b"", b"gzip, chunked", b"chunked, chunked", b",chunked", b"chunked,", b"chunked\t",
                      b"chunked\x0b", b"xchunked", b"chunkedx", b"chunked;q=1", b"identity", b"chun ked"):
            self.assertFalse(h1.is_chunked_only(value), value)

    def test_collector_joins_transfer_encoding(self):
        """
        Several C{Transfer-Encoding} fields are combined into one list, as RFC 9110 5.3 says recipients may.
        """
        c = h1.HeadCollector()
        c.add(b"Transfer-Encoding", b"gzip")
        c.add(b"transfer-encoding", b"chunked")
        self.assertTrue(c.chunked)
        self.assertEqual(c.transfer_encoding, b"gzip, chunked")
        c.reset()
        self.assertIsNone(c.transfer_encoding)
        self.assertFalse(c.chunked)

    def test_request_framing_error(self):
        """
        A lone C{chunked} on HTTP/1.1 is fine; a second coding, a second field, HTTP/1.0 or a Content-Length
        beside it each have their reason.
        """
        def check(version, *fields):
            c = h1.HeadCollector()
            for name, value in fields:
                c.add(name, value)
            return h1.request_framing_error(c, version)
        te = b"transfer-encoding"
        self.assertIsNone(check("1.1", (te, b"chunked")))
        self.assertEqual(check("1.1", (te, b"gzip, chunked")), "transfer-encoding other than a lone chunked")
        self.assertEqual(check("1.1", (te, b"chunked"), (te, b"chunked")),
                         "transfer-encoding other than a lone chunked")
        self.assertEqual(check("1.0", (te, b"chunked")), "transfer-encoding in an HTTP/1.0 request")
        self.assertEqual(check("1.1", (te, b"chunked"), (b"content-length", b"5")),
                         "transfer-encoding with content-length")


class RequestTests(SynchronousTestCase):
    """
    Each vector through L{Http1ServerProtocol}: 400 naming the cause, the connection closed, nothing sent
    upstream, counted once in the golden metrics.
    """

    def assertRefused(self, h, name, cause):
        [(status, headers, _)] = test_http1.ParsedResponses().feed(h.transport.value())
        self.assertEqual(status, 400, name)
        self.assertIn(cause.lower(), headers[PROXY_ERROR].lower(), name)
        self.assertEqual(headers[b"connection"], b"close", name)
        self.assertTrue(h.transport.disconnecting, name)
        # Counted as the proxy's other 400s are (Linkerd classifies 4xx as success: the proxy did its job).
        self.assertEqual(sample(h.settings, "response_total", status_code="400", authority="", target_addr=""),
                         1, name)
        self.assertEqual(sample(h.settings, "request_total"), 1, name)

    def assertNothingUpstream(self, h, name):
        sent = b"".join(c[1].transport.value() for c in h.connector.connects)
        self.assertEqual(sent, b"", name)
        # No endpoint was chosen: a client's bad framing says nothing about an endpoint.
        self.assertEqual(h.router.leases, [], name)

    def test_vectors(self):
        """
        Every vector, sent whole, gets 400 with C{l5d-proxy-error} naming the cause, the connection closes,
        and no byte reaches an upstream.
        """
        for name, raw, cause in VECTORS:
            h = _Harness()
            h.server.dataReceived(raw)
            self.assertRefused(h, name, cause)
            self.assertNothingUpstream(h, name)

    def test_vectors_byte_by_byte(self):
        """
        The same when the bytes arrive one at a time (the checks do not depend on how reads are split).
        """
        for name, raw, cause in VECTORS:
            h = _Harness()
            for i in range(len(raw)):
                h.server.dataReceived(raw[i:i + 1])
            self.assertRefused(h, name, cause)
            self.assertNothingUpstream(h, name)

    def test_vectors_pipelined(self):
        """
        Behind a good request in flight, a vector waits its turn: the good request is answered, then the 400,
        then the connection closes; the upstream saw only the good request.
        """
        for name, raw, cause in VECTORS:
            h = _Harness()
            h.server.dataReceived(GET + raw)
            self.assertEqual(h.transport.value(), b"", name)
            self.assertEqual(h.sent_up(), GET.replace(b"Host", b"host"), name)
            h.up().dataReceived(OK)
            statuses = [r[0] for r in test_http1.ParsedResponses().feed(h.transport.value())]
            self.assertEqual(statuses, [200, 400], name)
            self.assertTrue(h.transport.disconnecting, name)
            self.assertEqual(h.up().transport.value(), b"", name)

    def test_accepted_transfer_encoding(self):
        """
        A lone C{chunked} (any case, optional whitespace) is forwarded as one request framed
        C{transfer-encoding: chunked}, and the hidden request after its last chunk is a second request that
        the proxy frames and routes itself (it is not part of the first one's body).
        """
        for value in ACCEPTED_TE:
            h = _Harness()
            h.server.dataReceived(request(b"Transfer-Encoding: " + value, body=b"5\r\nhello\r\n" + CHUNKED_SMUGGLE))
            self.assertEqual(h.sent_up(), b"POST / HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n"
                                          b"5\r\nhello\r\n0\r\n\r\n", value)
            h.up().dataReceived(OK)
            # The next request is sent only once the first is answered, as its own request.
            self.assertEqual(h.sent_up(), b"GET /admin HTTP/1.1\r\nhost: web\r\n\r\n", value)

    def test_leading_empty_lines(self):
        """
        Empty lines before a request line (CRLF or a bare LF) are skipped, as RFC 9112 2.2 allows; they are
        not part of any head and never forwarded (the proxy writes its own heads).
        """
        h = _Harness()
        h.server.dataReceived(b"\r\n\n" + GET)
        self.assertEqual(h.sent_up(), b"GET /a HTTP/1.1\r\nhost: web:80\r\n\r\n")

    def test_bad_chunk_framing(self):
        """
        A bare LF in the chunked body (after a valid head): the head was already forwarded, but the proxy
        frames the body itself, so the upstream never sees the client's chunk lines; the client gets 400 and
        the upstream connection is aborted, not pooled: it never holds a second request.
        """
        h = _Harness()
        h.server.dataReceived(request(b"Transfer-Encoding: chunked", body=b"5\nhello\r\n0\r\n\r\n" + SMUGGLED))
        self.assertEqual(h.responses()[0][0], 400)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.sent_up(), b"POST / HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n")
        self.assertTrue(h.up().transport.disconnecting)
        self.assertEqual(len(h.settings.h1_pool), 0)

    def test_te_refusal_after_head_counted_once(self):
        """
        llhttp reports some Transfer-Encoding values (C{identity}, C{xchunked}) only after the head; the
        proxy refuses at the head, before routing, and the request is answered and counted once.
        """
        h = _Harness()
        h.server.dataReceived(request(b"Transfer-Encoding: identity"))
        self.assertEqual(h.router.authorities, [])
        self.assertEqual(h.transport.value().count(b"HTTP/1.1 400"), 1)
        self.assertEqual(sample(h.settings, "response_total", status_code="400"), 1)


class RequestSyncTests(test_http1._SyncRouting, RequestTests):
    """
    The same with a router that answers synchronously (C{route_now}), where a routed request would be
    attached to a pooled upstream within the parse.
    """

    def setUp(self):
        super().setUp()
        self.patch(sys.modules[__name__], "_Harness", _SyncHarness)


class _SyncHarness(_Harness):
    def __init__(self, **kw):
        kw.setdefault("router", test_http1.SyncRouter(default=test_http1.BACKEND))
        super().__init__(**kw)


class ResponseTests(SynchronousTestCase):
    """
    Upstream responses framed two ways are an upstream failure: 502, and the connection is closed, never
    pooled, so the bytes after it cannot be read as the next response.
    """

    BAD = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\nok", b"Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok", b"Duplicate Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"Duplicate Content-Length"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok", b"CR"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \x00\r\n\r\nok", b"header value char"),
    ]

    def test_bad_framing_is_502(self):
        """
        CL with TE, differing or repeated CL, a bare LF or a NUL: 502 with C{l5d-proxy-error}, the upstream
        connection aborted and not pooled, the lease a failure; the client connection keeps serving on a
        new upstream connection.
        """
        for raw, cause in self.BAD:
            h = _Harness()
            h.server.dataReceived(GET)
            up = h.up()
            up.dataReceived(raw)
            [(status, headers, _)] = h.responses()
            self.assertEqual(status, 502, raw)
            self.assertIn(b"invalid response from upstream", headers[PROXY_ERROR], raw)
            self.assertIn(cause, headers[PROXY_ERROR], raw)
            self.assertTrue(up.transport.disconnecting, raw)
            self.assertEqual(len(h.settings.h1_pool), 0, raw)
            self.assertEqual(h.router.leases[0].outcomes, [False], raw)
            h.server.dataReceived(GET)
            self.assertEqual(len(h.connector.connects), 2, raw)

    def test_http10_transfer_encoding_not_pooled(self):
        """
        An HTTP/1.0 response with Transfer-Encoding (RFC 9112 6.1: faulty framing) is relayed, but its
        connection is closed after it, even when it said keep-alive.
        """
        h = _Harness()
        h.server.dataReceived(GET)
        up = h.up()
        up.dataReceived(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\n\r\n")
        [(status, _, body)] = h.responses()
        self.assertEqual((status, body), (200, b"ok"))
        self.assertEqual(len(h.settings.h1_pool), 0)
        self.assertTrue(up.transport.disconnecting)

    def test_http10_keep_alive_still_pooled(self):
        """
        An HTTP/1.0 keep-alive response with a content-length stays poolable (the rule above is about
        Transfer-Encoding only).
        """
        h = _Harness()
        h.server.dataReceived(GET)
        h.up().dataReceived(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.responses()[0][2], b"ok")
        self.assertEqual(len(h.settings.h1_pool), 1)


class DowngradeTests(SynchronousTestCase):
    """
    An HTTP/2 stream marked C{l5d-orig-proto} reaches the app as HTTP/1.1: its body must be exactly what its
    C{content-length} says, or the app's connection could read the next request as the rest of this body.
    """

    def setUp(self):
        self.h = BridgeHarness(self)
        self.server = self.h.inbound_server()
        self.client = H2Client()
        self.h.connect(self.server, self.client)
        self.h.pump()

    def send(self, extra=(), body=None, trailers=None, method=b"POST"):
        sid = self.client.request(method=method, path=b"/up", authority="web.default",
                                  extra=[(b"l5d-orig-proto", b"HTTP/1.1")] + list(extra), body=body,
                                  trailers=trailers)
        self.h.pump()
        return self.client.streams.get(sid)

    def assert400(self, stream, cause):
        self.assertEqual(stream.headers[b":status"], b"400")
        self.assertIn(cause, stream.headers[PROXY_ERROR])
        self.assertEqual(self.h.in_metric("response_total", direction="inbound", status_code="400"), 1)

    def test_length_matches(self):
        """
        A body that matches its content-length is forwarded with it (the baseline for the tests below).
        """
        stream = self.send([(b"content-length", b"5")], body=b"hello")
        self.assertEqual(stream.headers[b":status"], b"200")
        [req] = self.h.requests
        self.assertEqual(req["body"], b"hello")
        self.assertIn((b"content-length", b"5"), req["headers"])

    def test_ended_at_headers_with_length(self):
        """
        HEADERS with END_STREAM and a non-zero content-length (h2 does not check this one): 400, and
        nothing is written to the app.
        """
        for method in (b"POST", b"GET"):
            self.setUp()
            stream = self.send([(b"content-length", b"5")], method=method)
            self.assert400(stream, b"content-length 5 but the stream ended without a body")
            self.assertEqual(self.h.requests, [])
            # No app connection received a byte (a connection made for the stream went back to the pool).
            for app in self.h.apps:
                self.assertFalse(hasattr(app, "req"), method)

    def test_short_body_ended_by_trailers(self):
        """
        DATA short of the content-length, then trailers ending the stream (h2 checks the length only at a
        DATA frame's END_STREAM): 400, and the app connection, which has the head, is closed, not pooled.
        """
        stream = self.send([(b"content-length", b"10")], body=b"abc", trailers=[(b"x-t", b"1")])
        self.assert400(stream, b"7 bytes short of its content-length")
        self.assertEqual(self.h.requests, [])
        [app] = self.h.apps
        self.assertTrue(app.transport.disconnecting)
        self.assertEqual(len(self.h.in_settings.h1_pool), 0)

    def test_h2_length_checks(self):
        """
        DATA beyond the content-length, or a DATA END_STREAM short of it: h2 treats either as a connection
        error (GOAWAY PROTOCOL_ERROR); every app connection of that HTTP/2 connection is closed, and no
        request reached the app whole.
        """
        for length, body in ((b"3", b"hello"), (b"10", b"hello")):
            self.setUp()
            self.send([(b"content-length", length)], body=body)
            self.assertTrue(self.client.goaways, length)
            self.assertEqual(self.h.requests, [], length)
            for app in self.h.apps:
                self.assertTrue(app.transport.disconnecting, length)
            self.assertEqual(len(self.h.in_settings.h1_pool), 0, length)

    def test_unframeable_length(self):
        """
        A content-length h2 accepts (all digits) but HTTP/1 framing here does not carry (over 18 digits): 400.
        """
        stream = self.send([(b"content-length", b"1" * 19)], body=None)
        self.assert400(stream, b"invalid content-length")
        self.assertEqual(self.h.requests, [])

    def test_transfer_encoding_and_connection_headers_stripped(self):
        """
        Connection-specific fields in the h2 request (C{transfer-encoding}, C{connection}, C{keep-alive}) are
        not forwarded: the HTTP/1 framing towards the app comes only from C{content-length} or END_STREAM, so
        a C{transfer-encoding: chunked} DATA payload reaches the app as opaque body bytes of one request.
        """
        payload = b"0\r\n\r\n" + SMUGGLED
        stream = self.send([(b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive"),
                            (b"keep-alive", b"5"), (b"content-length", b"%d" % len(payload))], body=payload)
        self.assertEqual(stream.headers[b":status"], b"200")
        [req] = self.h.requests
        self.assertEqual(req["body"], payload)
        names = [n for n, _ in req["headers"]]
        for name in (b"transfer-encoding", b"connection", b"keep-alive"):
            self.assertNotIn(name, names)
        # Without a content-length the proxy frames the body chunked itself: still one request.
        self.setUp()
        stream = self.send([(b"transfer-encoding", b"chunked")], body=payload)
        [req] = self.h.requests
        self.assertEqual(req["body"], payload)
        self.assertIn((b"transfer-encoding", b"chunked"), req["headers"])
