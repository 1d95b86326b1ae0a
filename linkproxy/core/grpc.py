"""
gRPC rules the HTTP/2 layer needs, without I/O: recognising gRPC requests, reading C{grpc-status} and
C{grpc-timeout}, and the responses the proxy makes for its own errors (plain HTTP, or gRPC trailers-only).
"""

from linkproxy.core.headers import PROXY_ERROR

GRPC_CONTENT_TYPE = b"application/grpc"

# Bytes that may appear unescaped in grpc-message (the gRPC HTTP/2 spec: printable ASCII except '%').
_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_grpc(headers):
    """
    Whether a request or response is gRPC: its C{content-type} is C{application/grpc} or a C{+proto}-style
    variant.

    @param headers: C{(name, value)} byte pairs with lower-case names.
    """
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(GRPC_CONTENT_TYPE)
    return False


def grpc_status(headers):
    """
    The C{grpc-status} of a header block (trailers, or the headers of a trailers-only response).

    @param headers: C{(name, value)} byte pairs with lower-case names.
    @return: the status as text (C{"0"}, C{"14"}...), or C{""} when the block has none.
    """
    for name, value in headers:
        if name == b"grpc-status":
            return value.decode("ascii", "replace").strip()
    return ""


# grpc-timeout units (gRPC over HTTP/2: "H" hours ... "n" nanoseconds), in seconds.
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_grpc_timeout(value):
    """
    Read a C{grpc-timeout} header value: 1 to 8 ASCII digits, then one unit of C{H M S m u n}.

    An invalid value gives C{None}, and the proxy then applies no deadline of its own and forwards the header
    as it came: the server is the one to judge it (grpc-go's server answers it with INTERNAL). Only the
    spec's form is accepted; grpc-go's C{strconv.ParseInt} would also take a sign, which the spec does not
    allow. C{0} is valid, and means the deadline has already passed.

    @param value: the header value (L{bytes}); surrounding spaces and tabs are ignored.
    @return: the timeout in seconds, or C{None} when the value is not a valid timeout.
    """
    value = value.strip(b" \t")
    if not 2 <= len(value) <= 9:
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def encode_grpc_message(text):
    """
    Percent-encode C{text} for the C{grpc-message} header, as the gRPC HTTP/2 spec requires.

    @param text: a L{str}.
    @return: L{bytes}.
    """
    raw = text.encode("utf-8")
    if all(b in _MESSAGE_SAFE for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _MESSAGE_SAFE else b"%%%02X" % b for b in raw)


def _header_value(text):
    # Header values must not carry CR/LF/NUL; a reason is short text, so fold anything odd to '?'.
    return text.encode("ascii", "replace").translate(_CONTROL_TO_SPACE)


_CONTROL_TO_SPACE = bytes(b if 0x20 <= b < 0x7F else 0x20 for b in range(256))


def trailers_only(error):
    """
    The header block of a gRPC trailers-only response for a proxy error: sent with END_STREAM and no body.

    @param error: a L{linkproxy.core.errors.ProxyError}.
    @return: a list of C{(name, value)} byte pairs, C{:status} first.
    """
    return [
        (b":status", b"200"),
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", b"%d" % error.grpc_status),
        (b"grpc-message", encode_grpc_message(error.reason)),
        (PROXY_ERROR, _header_value(error.reason)),
    ]


def error_response(error, grpc):
    """
    The response the proxy makes for C{error}.

    @param error: a L{linkproxy.core.errors.ProxyError}.
    @param grpc: C{True} when the request was gRPC, which gets a trailers-only response instead of a status.
    @return: C{(headers, body)}; C{body} is C{b""} for gRPC (the headers then end the stream).
    """
    if grpc:
        return trailers_only(error), b""
    reason = _header_value(error.reason)
    body = reason + b"\n"
    return [
        (b":status", b"%d" % error.status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (PROXY_ERROR, reason),
    ], body

