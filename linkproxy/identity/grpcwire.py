"""
The parts of gRPC over HTTP/2 that a unary call needs, without I/O: message framing, status codes, and the
header blocks of requests and responses.

A gRPC message on an HTTP/2 stream is a five-byte prefix (a compressed flag, then the length as four
big-endian bytes) followed by the message. The call's outcome travels in trailers: C{grpc-status} and a
percent-encoded C{grpc-message}.
"""

import struct
from urllib.parse import unquote_to_bytes

from linkproxy.core.grpc import encode_grpc_message

__all__ = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED",
    "STATUS_NAMES", "GrpcError", "frame", "unframe", "decode_grpc_message", "request_headers",
    "response_headers", "trailers",
]

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

STATUS_NAMES = {
    OK: "OK", CANCELLED: "CANCELLED", UNKNOWN: "UNKNOWN", INVALID_ARGUMENT: "INVALID_ARGUMENT",
    DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED", PERMISSION_DENIED: "PERMISSION_DENIED",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED", FAILED_PRECONDITION: "FAILED_PRECONDITION",
    UNIMPLEMENTED: "UNIMPLEMENTED", INTERNAL: "INTERNAL", UNAVAILABLE: "UNAVAILABLE",
    UNAUTHENTICATED: "UNAUTHENTICATED",
}

CONTENT_TYPE = b"application/grpc"

_PREFIX = struct.Struct(">BI")


class GrpcError(Exception):
    """
    A call that ended with a non-OK status, on either side.

    @ivar code: the gRPC status code.
    @ivar message: the status message, one line of text.
    """

    def __init__(self, code, message):
        super().__init__(f"{STATUS_NAMES.get(code, code)}: {message}")
        self.code = code
        self.message = message


def frame(message):
    """
    @param message: an encoded protobuf message.
    @return: the message with its uncompressed length prefix.
    """
    return _PREFIX.pack(0, len(message)) + message


def unframe(body, max_length):
    """
    The single message of a unary call's body.

    @param body: every DATA byte of the stream.
    @param max_length: the largest message accepted.
    @return: the message bytes.
    @raise GrpcError: C{INTERNAL} for a truncated or extra frame, C{RESOURCE_EXHAUSTED} for one too large,
        C{UNIMPLEMENTED} for a compressed one (no compression is ever negotiated).
    """
    if len(body) < _PREFIX.size:
        raise GrpcError(INTERNAL, "expected one length-prefixed gRPC message, got %d bytes" % len(body))
    flag, length = _PREFIX.unpack_from(body)
    if flag not in (0, 1):
        raise GrpcError(INTERNAL, f"invalid gRPC compressed flag {flag}")
    if flag == 1:
        raise GrpcError(UNIMPLEMENTED, "compressed messages are not supported")
    if length > max_length:
        raise GrpcError(RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit of {max_length}")
    if len(body) != _PREFIX.size + length:
        raise GrpcError(INTERNAL, "a unary call carries exactly one gRPC message")
    return bytes(body[_PREFIX.size:])


def decode_grpc_message(value):
    """
    @param value: a C{grpc-message} header value (percent-encoded UTF-8).
    @return: the text.
    """
    return unquote_to_bytes(value).decode("utf-8", "replace")


def request_headers(authority, path, timeout=None):
    """
    @param authority: the C{:authority}, as text.
    @param path: the method path, e.g. C{/io.linkerd.proxy.identity.Identity/Certify}.
    @param timeout: the deadline in seconds to announce in C{grpc-timeout}, or C{None}.
    @return: the header block of a unary request.
    """
    headers = [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", path.encode("ascii")),
        (b":authority", authority.encode("ascii")), (b"content-type", CONTENT_TYPE), (b"te", b"trailers"),
    ]
    if timeout is not None:
        headers.append((b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))))
    return headers


def response_headers():
    """The header block that starts a successful response."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE)]


def trailers(code, message=""):
    """
    @return: the trailers that end a call with C{code}; with L{response_headers} in front, a trailers-only
        response.
    """
    block = [(b"grpc-status", b"%d" % code)]
    if message:
        block.append((b"grpc-message", encode_grpc_message(message)))
    return block


def parse_status(headers):
    """
    @param headers: C{(name, value)} byte pairs (trailers, or the headers of a trailers-only response).
    @return: C{(code, message)}, or C{None} when the block carries no C{grpc-status}.
    """
    code, message = None, ""
    for name, value in headers:
        if name == b"grpc-status":
            try:
                code = int(value)
            except ValueError:
                code = UNKNOWN
        elif name == b"grpc-message":
            message = decode_grpc_message(value)
    return None if code is None else (code, message)
