"""
gRPC rules the HTTP/2 layer needs, without I/O: recognising gRPC requests, reading C{grpc-status}, and the
responses the proxy makes for its own errors (plain HTTP, or gRPC trailers-only).
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


_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value):
    # Placeholder until the profiles branch lands.
    value = value.strip()
    unit = _GRPC_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit
