"""
Tests for L{linkproxy.core.detect}.
"""

import shutil

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from linkproxy.core.client_hello import ClientHello
from linkproxy.core.detect import DETECT_BUFFER, H2_PREFACE, Detection, Protocol, detect
from tests.test_client_hello import (
    DATA, build_client_hello, capture_client_hello, curl_argv, openssl_argv,
)

FUZZ = settings(max_examples=300, deadline=None, database=None)

H2 = Detection(Protocol.H2, "detected")
HTTP1 = Detection(Protocol.HTTP1, "detected")
OPAQUE = Detection(Protocol.OPAQUE, "detected")
OVERFLOW = Detection(Protocol.OPAQUE, "overflow")
EOF = Detection(Protocol.OPAQUE, "eof")
MALFORMED = Detection(Protocol.TLS, "malformed")


def feed(stream, cuts, max_bytes=DETECT_BUFFER):
    """
    Feed growing prefixes of C{stream}, split at C{cuts}, to L{detect} as a wrapper would.

    @return: C{(decision, index)}: the first decision and the prefix length it came at, or C{(None, None)}.
    """
    buffer = b""
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        if end <= start:
            continue
        buffer += stream[start:end]
        decision = detect(buffer, max_bytes=max_bytes)
        if decision is not None:
            return decision, len(buffer)
    return None, None


class H2PrefaceTests(SynchronousTestCase):
    """
    The HTTP/2 prior-knowledge preface.
    """

    def test_preface(self):
        """
        The full preface, alone or followed by frames, is h2.
        """
        self.assertEqual(detect(H2_PREFACE), H2)
        self.assertEqual(detect(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"), H2)

    def test_strict_prefixes_wait(self):
        """
        Every strict non-empty prefix of the preface needs more, even those that look like HTTP/1 so far.
        """
        for i in range(1, len(H2_PREFACE)):
            self.assertIsNone(detect(H2_PREFACE[:i]), H2_PREFACE[:i])

    def test_prefix_then_eof(self):
        """
        A preface prefix followed by EOF is opaque/eof.
        """
        self.assertEqual(detect(H2_PREFACE[:10], final=True), EOF)

    def test_pri_as_http1(self):
        """
        PRI as an HTTP/1.1 method (diverging from the preface) is HTTP/1.
        """
        self.assertEqual(detect(b"PRI * HTTP/1.1\r\n"), HTTP1)

    def test_preface_diverges_late(self):
        """
        The preface line followed by something else is opaque (HTTP/2.0 is no HTTP/1 version).
        """
        self.assertEqual(detect(b"PRI * HTTP/2.0\r\n\r\nXX"), OPAQUE)


class Http1Tests(SynchronousTestCase):
    """
    HTTP/1.x request lines.
    """

    def test_versions(self):
        """
        HTTP/1.0 and HTTP/1.1 request lines are HTTP/1, with CRLF or a bare LF.
        """
        for line in (b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"GET / HTTP/1.1\n", b"GET / HTTP/1.0\n"):
            self.assertEqual(detect(line), HTTP1, line)

    def test_methods(self):
        """
        Any token is a method, as are extension methods.
        """
        for method in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT",
                       b"TRACE", b"PROPFIND", b"M-SEARCH", b"x"):
            self.assertEqual(detect(method + b" /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n"), HTTP1, method)

    def test_request_targets(self):
        """
        Origin, absolute, authority and asterisk forms are all accepted.
        """
        for target in (b"/", b"http://example.com:80/x", b"example.com:443", b"*"):
            self.assertEqual(detect(b"OPTIONS " + target + b" HTTP/1.1\r\n"), HTTP1, target)

    def test_prefixes_wait(self):
        """
        Every strict prefix of a request line needs more.
        """
        line = b"GET /index.html HTTP/1.1\r\n"
        for i in range(1, len(line)):
            self.assertIsNone(detect(line[:i]), line[:i])

    def test_early_opaque(self):
        """
        Opaque is decided at the first byte that rules out a request line.
        """
        cases = [
            b"\x00", b" ", b"\r", b"{", b"GET\t", b"FOO  ", b"FOO /\x00", b"FOO / HTTP/2", b"FOO / HTTP/1.2",
            b"FOO / h", b"FOO / HTTP/1.1\r\r", b"FOO / HTTP/1.1 ", b"\x16\x02", b"\x16\x03\x05",
        ]
        for data in cases:
            self.assertEqual(detect(data), OPAQUE, data)
            self.assertIsNone(detect(data[:-1]) if len(data) > 1 else None, data)

    def test_malformed_line_with_http_method(self):
        """
        A request line that starts with a standard HTTP method and a space but goes wrong later (a NUL or a
        control byte in the target, a bad version) is HTTP/1, decided at the byte that breaks it: the HTTP/1
        server answers 400 rather than the bytes passing to the app as opaque TCP.
        """
        for data in (b"GET  ", b"GET /\x00", b"GET / HTTP/2", b"GET / HTTP/1.2", b"POST / h",
                     b"GET / HTTP/1.1\r\r", b"PUT / HTTP/1.1 "):
            self.assertEqual(detect(data), HTTP1, data)
            self.assertIsNone(detect(data[:-1]), data)

    def test_bad_lines(self):
        """
        Lines that have the right shape but are not HTTP/1.x requests are opaque, unless they start with a
        standard HTTP method (then they are malformed HTTP/1, answered 400).
        """
        for line in (b"FOO /\r\n", b"FOO / HTTP/1.1 extra\r\n", b"SSH-2.0-OpenSSH_9.2\r\n",
                     b"HELLO\r\n", b"FOO / FTP/1.0\r\n"):
            self.assertEqual(detect(line), OPAQUE, line)
        for line in (b"GET /\r\n", b"GET / HTTP/1.1 extra\r\n", b"GET / FTP/1.0\r\n"):
            self.assertEqual(detect(line), HTTP1, line)

    def test_long_request_line(self):
        """
        A 16 KiB request-target still fits in the default buffer.
        """
        self.assertEqual(detect(b"GET /" + b"a" * 16 * 1024 + b" HTTP/1.1\r\n"), HTTP1)


class TlsTests(SynchronousTestCase):
    """
    TLS ClientHellos.
    """

    def test_client_hello(self):
        """
        A ClientHello is TLS, carrying the parsed hello.
        """
        decision = detect(build_client_hello(b"svc.example", (b"h2",), (0x0304,)))
        self.assertEqual(decision, Detection(Protocol.TLS, "detected",
                                             ClientHello("svc.example", ("h2",), (0x0304,))))

    def test_prefixes_wait(self):
        """
        Every strict prefix of a ClientHello needs more.
        """
        data = build_client_hello(b"svc.example")
        for i in range(1, len(data)):
            self.assertIsNone(detect(data[:i]))

    def test_malformed(self):
        """
        A handshake record header with a broken ClientHello is TLS/malformed.
        """
        self.assertEqual(detect(b"\x16\x03\x01\x00\x00"), MALFORMED)
        self.assertEqual(detect(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), MALFORMED)

    def test_truncated_then_eof(self):
        """
        A ClientHello cut off by EOF is opaque/eof.
        """
        self.assertEqual(detect(build_client_hello(b"a")[:20], final=True), EOF)

    def test_max_single_record_fits(self):
        """
        A ClientHello filling a 16 KiB record fits in the default detection buffer.
        """
        data = build_client_hello(b"a" * 200, tuple([b"x" * 255] * 63), fragment=16384)
        self.assertLess(len(data), DETECT_BUFFER)
        self.assertEqual(detect(data).protocol, Protocol.TLS)

    def test_oversized_hello_overflows(self):
        """
        A ClientHello that does not fit the buffer is opaque/overflow.
        """
        data = build_client_hello(b"a.example", tuple([b"x" * 255] * 100), fragment=16384)
        self.assertGreater(len(data), DETECT_BUFFER)
        self.assertEqual(detect(data), OVERFLOW)

    def test_fixtures(self):
        """
        The stored real ClientHellos detect as TLS with SNI foo.example.
        """
        for name in ("clienthello_openssl.bin", "clienthello_curl.bin"):
            decision = detect(DATA.child(name).getContent())
            self.assertEqual((decision.protocol, decision.reason), (Protocol.TLS, "detected"))
            self.assertEqual(decision.client_hello.sni, "foo.example")

    def test_live_openssl(self):
        """
        A live openssl s_client ClientHello detects as TLS with its SNI and ALPN.
        """
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        decision = detect(capture_client_hello(openssl_argv))
        self.assertEqual(decision.protocol, Protocol.TLS)
        self.assertEqual(decision.client_hello.sni, "foo.example")
        self.assertEqual(decision.client_hello.alpn, ("h2", "http/1.1"))

    def test_live_curl(self):
        """
        A live curl ClientHello detects as TLS with its SNI and http/1.1 offered.
        """
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        decision = detect(capture_client_hello(curl_argv))
        self.assertEqual(decision.protocol, Protocol.TLS)
        self.assertEqual(decision.client_hello.sni, "foo.example")
        self.assertIn("http/1.1", decision.client_hello.alpn)


class LimitTests(SynchronousTestCase):
    """
    EOF, buffer bound and arguments.
    """

    def test_empty(self):
        """
        No bytes yet needs more; no bytes at EOF is opaque/eof.
        """
        self.assertIsNone(detect(b""))
        self.assertEqual(detect(b"", final=True), EOF)

    def test_final_undecided(self):
        """
        An undecided prefix at EOF is opaque/eof; a decided one keeps its decision.
        """
        self.assertEqual(detect(b"GET / HT", final=True), EOF)
        self.assertEqual(detect(b"GET / HTTP/1.1\r\n", final=True), HTTP1)
        self.assertEqual(detect(b"\x00", final=True), OPAQUE)

    def test_overflow(self):
        """
        With max_bytes bytes and no decision, the answer is opaque/overflow, one byte less needs more.
        """
        line = b"GET /" + b"a" * 100
        self.assertIsNone(detect(line[:63], max_bytes=64))
        self.assertEqual(detect(line[:64], max_bytes=64), OVERFLOW)
        self.assertEqual(detect(line[:64], max_bytes=64, final=True), OVERFLOW)

    def test_overflow_ignores_bytes_past_bound(self):
        """
        Bytes past max_bytes cannot change the answer, so a late CRLF does not turn overflow into HTTP/1.
        """
        line = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n"
        self.assertEqual(detect(line, max_bytes=64), OVERFLOW)
        self.assertEqual(detect(line), HTTP1)

    def test_default_buffer(self):
        """
        The default bound holds a maximal TLS record and is above Linkerd's 8 KiB HTTP detection limit.
        """
        self.assertGreaterEqual(DETECT_BUFFER, 5 + 16384 + 256)
        self.assertGreater(DETECT_BUFFER, 8 * 1024)
        self.assertEqual(detect(b"GET /" + b"a" * DETECT_BUFFER), OVERFLOW)

    def test_bad_max_bytes(self):
        """
        A non-positive buffer bound is a programming error reported as ValueError.
        """
        self.assertRaises(ValueError, detect, b"x", max_bytes=0)

    def test_protocol_values(self):
        """
        Protocol values are the strings used as metric labels.
        """
        self.assertEqual([p.value for p in Protocol], ["tls", "h2", "http1", "opaque"])
        self.assertEqual(Protocol.H2, "h2")


def _streams():
    """
    Byte streams biased toward the interesting beginnings: preface, request lines, TLS records, garbage.
    """
    starts = st.sampled_from([
        b"", H2_PREFACE[:5], H2_PREFACE, b"GET ", b"GET / HTTP/1.", b"POST /x HTTP/1.1\r\n", b"PRI * HTTP/",
        b"\x16", b"\x16\x03\x01", build_client_hello(b"x.example", (b"h2",))[:40],
    ])
    return st.builds(lambda s, tail: s + tail, starts, st.binary(max_size=300)) | st.builds(
        lambda h, tail: h + tail,
        st.builds(lambda host, alpn, frag: build_client_hello(host.encode(), tuple(alpn), fragment=frag),
                  st.text("abc.-", min_size=1, max_size=20), st.lists(st.binary(min_size=1, max_size=8),
                                                                      max_size=3), st.integers(1, 64)),
        st.binary(max_size=20))


class PropertyTests(SynchronousTestCase):
    """
    Properties of detect over generated streams.
    """

    @FUZZ
    @given(st.binary(max_size=1024), st.booleans(), st.integers(1, 2048))
    def test_never_raises(self, data, final, max_bytes):
        """
        Arbitrary bytes give a Detection or None (None only when not final), never an exception.
        """
        result = detect(data, final=final, max_bytes=max_bytes)
        if final:
            self.assertIsInstance(result, Detection)
        else:
            self.assertTrue(result is None or isinstance(result, Detection))

    @FUZZ
    @given(_streams(), st.lists(st.integers(0, 2000), max_size=20), st.sampled_from([16, 64, DETECT_BUFFER]))
    def test_chunking_invariance(self, stream, cuts, max_bytes):
        """
        However a stream is split, feeding growing prefixes gives None until one decides, and that
        decision is the one the whole stream gets; the first decided prefix length does not depend on
        the split beyond the chunk containing it.
        """
        cuts = sorted({c for c in cuts if 0 < c < len(stream)})
        whole = detect(stream, max_bytes=max_bytes)
        decision, _ = feed(stream, cuts, max_bytes)
        self.assertEqual(decision, whole)
        # Byte by byte finds the earliest deciding prefix; chunked feeding decides at the chunk holding it.
        bytewise, at = feed(stream, list(range(1, len(stream))), max_bytes)
        self.assertEqual(bytewise, whole)
        if at is not None:
            for i in range(1, at):
                self.assertIsNone(detect(stream[:i], max_bytes=max_bytes))

    @FUZZ
    @given(st.binary(max_size=300))
    def test_final_decides(self, data):
        """
        With final=True there is always an answer, and it equals the non-final one whenever that decides.
        """
        eager = detect(data)
        final = detect(data, final=True)
        self.assertIsNotNone(final)
        if eager is not None:
            self.assertEqual(final, eager)

    @FUZZ
    @given(st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=60),
           st.lists(st.sampled_from([b"h2", b"http/1.1", b"grpc-exp"]), max_size=3, unique=True))
    def test_generated_hello(self, host, alpn):
        """
        A generated ClientHello is TLS with its SNI and ALPN, however it is fragmented into records.
        """
        for fragment in (1, 5, 16384):
            decision = detect(build_client_hello(host.encode(), tuple(alpn), fragment=fragment))
            self.assertEqual(decision.protocol, Protocol.TLS)
            self.assertEqual(decision.client_hello.sni, host)
            self.assertEqual(decision.client_hello.alpn, tuple(a.decode() for a in alpn))
