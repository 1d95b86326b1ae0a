"""
Tests for L{linkproxy.core.client_hello}.
"""

import os
import shutil
import socket
import subprocess
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from linkproxy.core.client_hello import (
    MAX_HANDSHAKE_LENGTH, NEED_MORE, ClientHello, ClientHelloError, parse_client_hello,
)

DATA = FilePath(__file__).sibling("data")

# Hypothesis writes no example database into the shared checkout; trial's temp dir is wiped anyway.
FUZZ = settings(max_examples=300, deadline=None, database=None)


# --- building ClientHellos -------------------------------------------------------------------------------------

def _vec(length_size, body):
    return len(body).to_bytes(length_size, "big") + body


def extension(ext_type, body):
    """
    @return: one encoded extension.
    """
    return struct.pack("!HH", ext_type, len(body)) + body


def sni_extension(host):
    """
    @param host: the host_name as C{bytes}.
    @return: an encoded server_name extension with one host_name.
    """
    return extension(0, _vec(2, b"\x00" + _vec(2, host)))


def alpn_extension(protocols):
    """
    @param protocols: protocol names as C{bytes}.
    @return: an encoded ALPN extension.
    """
    return extension(16, _vec(2, b"".join(_vec(1, p) for p in protocols)))


def versions_extension(versions):
    """
    @return: an encoded ClientHello supported_versions extension.
    """
    return extension(43, _vec(1, b"".join(struct.pack("!H", v) for v in versions)))


def client_hello_message(extensions=b"", *, legacy_version=0x0303, session_id=b"\x11" * 32,
                         suites=b"\x13\x01\x13\x02", compression=b"\x00", with_extensions_block=True):
    """
    @param extensions: the concatenated encoded extensions.
    @return: a handshake message (4-byte header included) holding a ClientHello.
    """
    body = (struct.pack("!H", legacy_version) + b"\x42" * 32 + _vec(1, session_id) + _vec(2, suites)
            + _vec(1, compression))
    if with_extensions_block:
        body += _vec(2, extensions)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message, fragment=16384, record_version=b"\x03\x01"):
    """
    Wrap a handshake message in handshake records of at most C{fragment} bytes each.
    """
    out = b""
    for i in range(0, len(message), fragment):
        chunk = message[i:i + fragment]
        out += b"\x16" + record_version + _vec(2, chunk)
    return out


def build_client_hello(sni=None, alpn=(), versions=None, fragment=16384, grease=True):
    """
    A complete TLS stream prefix holding one ClientHello, for tests across modules.

    @param sni: host name as C{bytes}, or L{None} for no server_name.
    @param alpn: ALPN protocol names as C{bytes}.
    @param versions: supported_versions values, or L{None} to leave the extension out.
    @param fragment: largest record body; smaller values fragment the handshake message.
    @param grease: add an unknown (GREASE) extension the parser must skip.
    """
    exts = b""
    if grease:
        exts += extension(0x0A0A, b"")
    if sni is not None:
        exts += sni_extension(sni)
    if alpn:
        exts += alpn_extension(alpn)
    if versions is not None:
        exts += versions_extension(versions)
    exts += extension(10, _vec(2, b"\x00\x1d"))  # supported_groups: x25519, an ordinary neighbour
    return records(client_hello_message(exts), fragment)


# --- capturing real ClientHellos ---------------------------------------------------------------------------------

def capture_client_hello(argv_for_port, timeout=5.0):
    """
    Run a TLS client against a loopback listener that records what it sends, and stop the client.

    @param argv_for_port: a callable from the listening port to the client's argv.
    @return: the bytes read up to the end of the ClientHello (or to the client giving up).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        proc = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                data = b""
                # Bounded: a ClientHello never needs more reads than bytes we allow.
                for _ in range(1024):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    try:
                        if parse_client_hello(data) is not NEED_MORE:
                            break
                    except ClientHelloError:
                        break
                    if len(data) > MAX_HANDSHAKE_LENGTH + 1024:
                        break
                return data
        finally:
            proc.kill()
            proc.wait(timeout)
    finally:
        listener.close()


def openssl_argv(port):
    """
    @return: the C{openssl s_client} command line the captured fixture came from.
    """
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "foo.example",
            "-alpn", "h2,http/1.1"]


def curl_argv(port):
    """
    @return: the C{curl} command line the captured fixture came from.
    """
    return ["curl", "-k", "-s", "-o", os.devnull, "--noproxy", "*", f"https://foo.example:{port}/",
            "--resolve", f"foo.example:{port}:127.0.0.1", "--max-time", "2"]


# --- tests -------------------------------------------------------------------------------------------------------

class BuiltClientHelloTests(SynchronousTestCase):
    """
    Hand-built ClientHellos, valid and not.
    """

    def test_sni_alpn_versions(self):
        """
        SNI, ALPN and supported_versions come out of a typical TLS 1.3 ClientHello, SNI lowercased.
        """
        data = build_client_hello(b"Foo.Example", (b"h2", b"http/1.1"), (0x0304, 0x0303))
        self.assertEqual(parse_client_hello(data),
                         ClientHello(sni="foo.example", alpn=("h2", "http/1.1"), versions=(0x0304, 0x0303)))

    def test_no_extensions_of_interest(self):
        """
        Without server_name, ALPN or supported_versions, SNI is None, ALPN empty, and versions the legacy one.
        """
        self.assertEqual(parse_client_hello(build_client_hello()),
                         ClientHello(sni=None, alpn=(), versions=(0x0303,)))

    def test_no_extensions_block(self):
        """
        An old-style ClientHello that ends after the compression methods is well-formed.
        """
        data = records(client_hello_message(legacy_version=0x0301, with_extensions_block=False))
        self.assertEqual(parse_client_hello(data), ClientHello(None, (), (0x0301,)))

    def test_every_prefix_needs_more(self):
        """
        Every strict prefix of a valid ClientHello is NEED_MORE, and the whole parses.
        """
        data = build_client_hello(b"a.example", (b"h2",), (0x0304,))
        for i in range(len(data)):
            self.assertIs(parse_client_hello(data[:i]), NEED_MORE, i)
        self.assertEqual(parse_client_hello(data).sni, "a.example")

    def test_trailing_bytes_ignored(self):
        """
        Bytes after the ClientHello (in its record or later) do not change the answer.
        """
        data = build_client_hello(b"a.example")
        self.assertEqual(parse_client_hello(data + b"\x14\x03\x03\x00\x01\x01"), parse_client_hello(data))

    def test_fragmented_over_records(self):
        """
        A ClientHello fragmented over many handshake records, even 1-byte ones, reassembles.
        """
        for fragment in (1, 2, 3, 7, 100):
            data = build_client_hello(b"frag.example", (b"h2",), (0x0304,), fragment=fragment)
            self.assertEqual(parse_client_hello(data),
                             ClientHello("frag.example", ("h2",), (0x0304,)), fragment)

    def test_fragment_not_handshake(self):
        """
        A non-handshake record in the middle of a fragmented ClientHello is an error.
        """
        data = build_client_hello(b"a.example", fragment=10)
        broken = data[:15] + b"\x17" + data[16:]
        self.assertRaises(ClientHelloError, parse_client_hello, broken)

    def test_handshake_too_long(self):
        """
        A handshake length over 64 KiB is refused as soon as the header shows it.
        """
        data = b"\x16\x03\x01\x00\x04\x01" + (MAX_HANDSHAKE_LENGTH + 1).to_bytes(3, "big")
        self.assertRaises(ClientHelloError, parse_client_hello, data)

    def test_handshake_at_limit_needs_more(self):
        """
        A handshake length of exactly 64 KiB is accepted and waits for its bytes.
        """
        data = b"\x16\x03\x01\x00\x04\x01" + MAX_HANDSHAKE_LENGTH.to_bytes(3, "big")
        self.assertIs(parse_client_hello(data), NEED_MORE)

    def test_record_header_errors(self):
        """
        Wrong content type, wrong version, empty or oversized records are errors, byte by byte.
        """
        for bad in (b"\x17", b"\x16\x02", b"\x16\x03\x05", b"\x16\x03\x01\x00\x00",
                    b"\x16\x03\x01\x41\x01", b"\x16\x03\x01\x00\x01\x02"):
            self.assertRaises(ClientHelloError, parse_client_hello, bad)

    def test_record_length_limit(self):
        """
        A record of 16384 + 256 bytes is accepted (waiting for its body); one byte more is not.
        """
        self.assertIs(parse_client_hello(b"\x16\x03\x01\x41\x00\x01"), NEED_MORE)
        self.assertRaises(ClientHelloError, parse_client_hello, b"\x16\x03\x01\x41\x01\x01")

    def test_malformed_bodies(self):
        """
        Inner lengths that lie, empty lists and bad host names are errors.
        """
        cases = {
            "session id too long": client_hello_message(session_id=b"\x00" * 33),
            "odd cipher suites": client_hello_message(suites=b"\x13\x01\x13"),
            "no cipher suites": client_hello_message(suites=b""),
            "no compression": client_hello_message(compression=b""),
            "duplicate extension": client_hello_message(sni_extension(b"a") + sni_extension(b"b")),
            "empty host": client_hello_message(sni_extension(b"")),
            "long host": client_hello_message(sni_extension(b"a" * 256)),
            "non-ascii host": client_hello_message(sni_extension("é.example".encode("utf-8"))),
            "space in host": client_hello_message(sni_extension(b"a b")),
            "empty alpn list": client_hello_message(extension(16, _vec(2, b""))),
            "empty alpn name": client_hello_message(extension(16, _vec(2, b"\x00"))),
            "alpn list overruns": client_hello_message(extension(16, b"\x00\x05\x02h2")),
            "odd versions": client_hello_message(extension(43, b"\x03\x03\x04\x03")),
            "empty versions": client_hello_message(extension(43, b"\x00")),
            "no host_name entry": client_hello_message(extension(0, _vec(2, b"\x01" + _vec(2, b"x")))),
            "empty sni ext": client_hello_message(extension(0, b"")),
            "extension overruns": client_hello_message(b"\x00\x00\x00\x09abc"),
        }
        for name, message in cases.items():
            self.assertRaises(ClientHelloError, parse_client_hello, records(message))

    def test_bytes_after_extensions(self):
        """
        A ClientHello body with bytes after its extensions block is an error.
        """
        message = client_hello_message(sni_extension(b"a.example"))
        body = message[4:] + b"\x00"
        data = records(b"\x01" + len(body).to_bytes(3, "big") + body)
        self.assertRaises(ClientHelloError, parse_client_hello, data)

    def test_host_name_limits(self):
        """
        A host name of 255 bytes is accepted; the limit is on bytes, not labels.
        """
        host = b"a" * 255
        self.assertEqual(parse_client_hello(records(client_hello_message(sni_extension(host)))).sni,
                         "a" * 255)

    def test_grease_alpn_round_trips(self):
        """
        Non-ASCII ALPN names (GREASE uses 0xFAFA) decode losslessly as Latin-1.
        """
        data = build_client_hello(alpn=(b"\xfa\xfa", b"h2"))
        self.assertEqual(parse_client_hello(data).alpn, ("\xfa\xfa", "h2"))
        self.assertEqual(parse_client_hello(data).alpn[0].encode("latin-1"), b"\xfa\xfa")

    def test_need_more_repr(self):
        """
        NEED_MORE reads as itself in test failures and logs.
        """
        self.assertEqual(repr(NEED_MORE), "NEED_MORE")

    def test_error_is_value_error(self):
        """
        ClientHelloError is a ValueError, so generic callers can catch it as bad input.
        """
        self.assertTrue(issubclass(ClientHelloError, ValueError))


_hostnames = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.",
                     min_size=1, max_size=255)
_alpn = st.lists(st.binary(min_size=1, max_size=20), max_size=5)
_versions = st.one_of(st.none(), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8))


class PropertyTests(SynchronousTestCase):
    """
    Properties over generated input.
    """

    @FUZZ
    @given(st.binary(max_size=2048))
    def test_arbitrary_bytes(self, data):
        """
        Arbitrary bytes give a ClientHello, NEED_MORE or ClientHelloError, nothing else.
        """
        try:
            result = parse_client_hello(data)
        except ClientHelloError:
            return
        self.assertTrue(result is NEED_MORE or isinstance(result, ClientHello))

    @FUZZ
    @given(st.binary(max_size=600), st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03"]))
    def test_arbitrary_bytes_behind_record_header(self, data, head):
        """
        Arbitrary bytes behind a handshake record header (so the inner parser is reached) never crash it.
        """
        payload = b"\x01" + len(data).to_bytes(3, "big") + data
        try:
            result = parse_client_hello(head + _vec(2, payload))
        except ClientHelloError:
            return
        self.assertTrue(result is NEED_MORE or isinstance(result, ClientHello))

    @FUZZ
    @given(_hostnames, _alpn, _versions, st.integers(1, 600))
    def test_round_trip(self, host, alpn, versions, fragment):
        """
        A generated ClientHello with random SNI, ALPN and versions, in records of any size, parses back.
        """
        data = build_client_hello(host.encode("ascii"), tuple(alpn), versions, fragment=fragment)
        self.assertEqual(
            parse_client_hello(data),
            ClientHello(sni=host.lower(), alpn=tuple(a.decode("latin-1") for a in alpn),
                        versions=tuple(versions) if versions is not None else (0x0303,)))

    @FUZZ
    @given(_hostnames, _alpn, st.data())
    def test_mutations(self, host, alpn, draw):
        """
        Corrupting a byte of a valid ClientHello yields a result or ClientHelloError, never a crash, and a
        result never depends on bytes beyond the message.
        """
        data = bytearray(build_client_hello(host.encode("ascii"), tuple(alpn), (0x0304,)))
        index = draw.draw(st.integers(0, len(data) - 1))
        data[index] = draw.draw(st.integers(0, 255))
        try:
            result = parse_client_hello(bytes(data))
        except ClientHelloError:
            return
        if result is not NEED_MORE:
            self.assertEqual(parse_client_hello(bytes(data) + b"\xff" * 10), result)

    @FUZZ
    @given(st.binary(max_size=400), st.data())
    def test_prefix_consistency(self, data, draw):
        """
        Whatever a prefix decides (a result or an error), the longer stream decides the same.
        """
        cut = draw.draw(st.integers(0, len(data)))

        def outcome(b):
            try:
                return parse_client_hello(b)
            except ClientHelloError:
                return "error"

        # Seed the stream with a plausible header half the time so the deep paths are exercised.
        if draw.draw(st.booleans()):
            data = b"\x16\x03\x01" + data
            cut += 3
        early = outcome(data[:cut])
        if early is not NEED_MORE:
            self.assertEqual(outcome(data), early)


class CapturedFixtureTests(SynchronousTestCase):
    """
    ClientHellos captured from real clients and stored in C{tests/data}; these run without the tools.
    """

    def test_openssl_fixture(self):
        """
        The stored C{openssl s_client -servername foo.example -alpn h2,http/1.1} hello parses.
        """
        hello = parse_client_hello(DATA.child("clienthello_openssl.bin").getContent())
        self.assertEqual(hello.sni, "foo.example")
        self.assertEqual(hello.alpn, ("h2", "http/1.1"))
        self.assertIn(0x0304, hello.versions)

    def test_curl_fixture(self):
        """
        The stored curl hello for https://foo.example/ parses, with curl's ALPN offer.
        """
        hello = parse_client_hello(DATA.child("clienthello_curl.bin").getContent())
        self.assertEqual(hello.sni, "foo.example")
        self.assertIn("http/1.1", hello.alpn)
        self.assertIn(0x0304, hello.versions)

    def test_fixture_prefixes(self):
        """
        Every strict prefix of the real captures is NEED_MORE.
        """
        for name in ("clienthello_openssl.bin", "clienthello_curl.bin"):
            data = DATA.child(name).getContent()
            for i in range(len(data)):
                self.assertIs(parse_client_hello(data[:i]), NEED_MORE)


class LiveCaptureTests(SynchronousTestCase):
    """
    Capture ClientHellos from the real tools on 127.0.0.1 and parse them.
    """

    def test_openssl(self):
        """
        openssl s_client's ClientHello carries the SNI and ALPN given on its command line.
        """
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        hello = parse_client_hello(capture_client_hello(openssl_argv))
        self.assertEqual(hello.sni, "foo.example")
        self.assertEqual(hello.alpn, ("h2", "http/1.1"))

    def test_curl(self):
        """
        curl's ClientHello carries the host of the URL as SNI and offers http/1.1 by ALPN.
        """
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        hello = parse_client_hello(capture_client_hello(curl_argv))
        self.assertEqual(hello.sni, "foo.example")
        self.assertIn("http/1.1", hello.alpn)
