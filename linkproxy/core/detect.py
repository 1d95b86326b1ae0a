"""
Sans-I/O protocol detection on the first bytes of a connection.

L{detect} looks at what a client has sent so far and says which protocol it speaks: a TLS ClientHello, the
HTTP/2 prior-knowledge preface, an HTTP/1.x request line, or something else (opaque). It answers L{None} while
the bytes could still become more than one of those, and decides as early as the bytes allow.

The answer depends only on the bytes, never on how they were split: for any stream, feeding growing prefixes
gives L{None} until the first prefix that decides, and that decision is the one the whole stream gets. The
Twisted wrapper (L{linkproxy.net.sniff}) relies on this to call L{detect} on every read.
"""

import enum
import re
from dataclasses import dataclass
from typing import Optional

from linkproxy.core.client_hello import NEED_MORE, ClientHello, ClientHelloError, parse_client_hello

__all__ = ["Protocol", "Detection", "DETECT_BUFFER", "H2_PREFACE", "detect"]

#: How many bytes detection may hold before giving up as opaque. One TLS record carrying a whole ClientHello
#: is at most 5 + 16640 bytes (the record bound L{parse_client_hello} accepts), and this is that rounded up to
#: 17 KiB so the largest single-record ClientHello always fits. The same bound admits HTTP/1 request lines of
#: 17 KiB, twice the 8 KiB Linkerd allows for HTTP detection. A ClientHello fragmented over several records
#: that does not fit is treated as opaque ("overflow"), which is what the connection would get on timeout.
DETECT_BUFFER = 17 * 1024

#: The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 section 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 tchar, for the method.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
# The request-target is visible ASCII; bytes above 0x7F are let through (as httparse does) so that clients
# sending raw UTF-8 paths still reach the HTTP/1 server, which answers 400 if it objects.
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]*")
# RFC 9112 section 2.2 lets a recipient accept a bare LF as the line end; curl-less tools (nc, telnet
# scripts) send one, and httptools accepts it downstream.
_VERSIONS = (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", b"HTTP/1.1\n", b"HTTP/1.0\n")
# A request line that starts with one of these methods and a space is HTTP/1 even when the rest is malformed
# (a NUL or a control byte in the target, a bad version): the HTTP/1 server answers it 400, where treating it
# as opaque would pass a smuggling attempt on to the app byte for byte.
_HTTP_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
                           b"CONNECT"})


class Protocol(str, enum.Enum):
    """
    The protocols detection tells apart.
    """

    TLS = "tls"
    H2 = "h2"
    HTTP1 = "http1"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Detection:
    """
    The outcome of detection.

    @ivar protocol: what the client speaks.
    @ivar reason: why: C{"detected"} (the bytes said so), C{"overflow"} (the buffer filled without a
        decision), C{"eof"} (the stream ended first), C{"malformed"} (a TLS record header with an unparseable
        ClientHello), and from the wrapper C{"timeout"} and C{"opaque_port"}.
    @ivar client_hello: the parsed ClientHello when C{protocol} is L{Protocol.TLS} and it parsed.
    """

    protocol: Protocol
    reason: str
    client_hello: Optional[ClientHello] = None


_H2 = Detection(Protocol.H2, "detected")
_HTTP1 = Detection(Protocol.HTTP1, "detected")
_OPAQUE = Detection(Protocol.OPAQUE, "detected")
_OVERFLOW = Detection(Protocol.OPAQUE, "overflow")
_EOF = Detection(Protocol.OPAQUE, "eof")
_MALFORMED = Detection(Protocol.TLS, "malformed")


def _http1_request_line(data: bytes) -> Optional[bool]:
    """
    Match C{METHOD SP request-target SP HTTP/1.x CRLF} at the start of C{data}.

    @return: C{True} on a complete request line, C{False} as soon as C{data} cannot begin one, else L{None}.
    """
    end = len(data)
    method_end = _METHOD.match(data).end()
    if method_end == end:
        return None
    if method_end == 0 or data[method_end] != 0x20:
        return False
    target_start = method_end + 1
    target_end = _TARGET.match(data, target_start).end()
    if target_end == end:
        return None
    if target_end == target_start or data[target_end] != 0x20:
        return data[:method_end] in _HTTP_METHODS
    rest = data[target_end + 1:target_end + 1 + len(_VERSIONS[0])]
    for version in _VERSIONS:
        if rest.startswith(version):
            return True
    for version in _VERSIONS:
        if version.startswith(rest):
            return None
    return data[:method_end] in _HTTP_METHODS


def _decide(data: bytes) -> Optional[Detection]:
    """
    Decide on C{data} alone, or return L{None} if it is a prefix of more than one possible outcome.
    """
    if not data:
        return None
    if data.startswith(H2_PREFACE):
        return _H2
    if H2_PREFACE.startswith(data):
        return None

    if data[0] == 0x16:
        # A handshake record. 0x16 is no tchar, so only TLS or opaque remain.
        if len(data) >= 2 and data[1] != 3:
            return _OPAQUE
        if len(data) >= 3 and data[2] > 4:
            return _OPAQUE
        if len(data) < 3:
            return None
        try:
            hello = parse_client_hello(data)
        except ClientHelloError:
            return _MALFORMED
        if hello is NEED_MORE:
            return None
        return Detection(Protocol.TLS, "detected", hello)

    matched = _http1_request_line(data)
    if matched is None:
        return None
    return _HTTP1 if matched else _OPAQUE


def detect(data: bytes, *, final: bool = False, max_bytes: int = DETECT_BUFFER) -> Optional[Detection]:
    """
    Say which protocol a connection speaks from the bytes it has sent so far.

    Only the first C{max_bytes} bytes are looked at, so the answer for a stream is fixed once that many
    have arrived.

    @param data: every byte received on the connection so far, from the first.
    @param final: C{True} when the client will send nothing more (EOF), so undecided means opaque.
    @param max_bytes: the detection buffer bound; with this many bytes and no decision, the answer is
        opaque with reason C{"overflow"}.
    @return: a L{Detection}, or L{None} when more bytes are needed.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")
    window = bytes(data[:max_bytes])
    decision = _decide(window)
    if decision is not None:
        return decision
    if len(window) >= max_bytes:
        return _OVERFLOW
    if final:
        return _EOF
    return None
