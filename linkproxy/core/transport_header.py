"""
Linkerd's transport header: the first bytes a proxy sends to a peer proxy inside mTLS.

Layout (linkerd2-proxy C{transport-header}, proto C{transport.l5d.io/v1})::

    "transport.l5d.io/v1\\r\\n\\r\\n"   23 bytes of preface
    length                             4 bytes, big-endian, the size of the message that follows
    Header                             protobuf:
        int32           port             = 1;   the target port on the server's side
        string          name             = 2;   an optional logical name (gateway hops)
        SessionProtocol session_protocol = 3;   oneof { Http1 http1 = 1; Http2 http2 = 2; } (both empty)

The protobuf is three fields, so it is encoded and decoded by hand here instead of through generated code;
the tests check the bytes against the real C{google.protobuf} runtime. Decoding follows protobuf's rules:
fields may come in any order and repeat (the last scalar wins, embedded messages merge), unknown fields and
known fields with an unexpected wire type are skipped.

L{decode} is sans-I/O and prefix-consistent like L{linkproxy.core.client_hello.parse_client_hello}: it answers
L{NEED_MORE} while the bytes are a valid beginning of a header, raises L{TransportHeaderError} as soon as no
continuation can make them one, and otherwise returns the header and the bytes after it.
"""

import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from linkproxy.core import protobuf
from linkproxy.core.client_hello import NEED_MORE

__all__ = [
    "PREFACE", "MAX_HEADER_LENGTH", "NEED_MORE", "SESSION_PROTOCOLS", "TransportHeader", "TransportHeaderError",
    "encode", "decode", "has_preface_prefix", "header_length",
]

#: What every transport header starts with.
PREFACE = b"transport.l5d.io/v1\r\n\r\n"

#: The largest protobuf body accepted. A real header is a few bytes (a port, a short name); the cap keeps a
#: hostile length prefix from making the inbound proxy buffer without bound.
MAX_HEADER_LENGTH = 64 * 1024

#: The session protocols a header can name.
SESSION_PROTOCOLS = ("http1", "http2")

_PREFIX_LENGTH = len(PREFACE) + 4
_LENGTH = struct.Struct(">I")

# Wire types (protobuf encoding guide).
_VARINT, _LEN = protobuf.VARINT, protobuf.LEN

# Tags for the fields we write: (field number << 3) | wire type.
_TAG_PORT = 0x08
_TAG_NAME = 0x12
_TAG_SESSION = 0x1A
_SESSION_BODY = {"http1": b"\x0a\x00", "http2": b"\x12\x00"}
_SESSION_KIND = {1: "http1", 2: "http2"}



class TransportHeaderError(ValueError):
    """
    The bytes are not a transport header, and no further bytes can make them one.
    """


@dataclass(frozen=True)
class TransportHeader:
    """
    A decoded transport header.

    @ivar port: the target port, C{0..65535}; C{0} means the client named none.
    @ivar name: the logical name, or C{""}.
    @ivar session_protocol: C{"http1"}, C{"http2"}, or L{None} for opaque TCP.
    """

    port: int
    name: str = ""
    session_protocol: Optional[str] = None


def has_preface_prefix(data: bytes) -> bool:
    """
    Whether C{data} could be the start of a transport header: it agrees with the preface for as long as both
    go (so C{b""} and C{b"transport."} are, C{b"GET "} is not).
    """
    n = min(len(data), len(PREFACE))
    return data[:n] == PREFACE[:n]


_varint = protobuf.encode_varint


def encode(port: int, name: str = "", session_protocol: Optional[str] = None) -> bytes:
    """
    Encode a transport header, preface and length included.

    Fields at their proto3 default (port 0, empty name) are left out, as protobuf does; the session protocol
    is a message, so it is written whenever it is given.

    @param port: the target port, C{0..65535}.
    @param name: an optional logical name.
    @param session_protocol: C{"http1"}, C{"http2"}, or L{None} for opaque.
    @raise ValueError: for a port out of range, an unknown session protocol, or a header over
        L{MAX_HEADER_LENGTH}.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, not {port!r}")
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, not {name!r}")
    if session_protocol is not None and session_protocol not in _SESSION_BODY:
        raise ValueError(f"session_protocol must be None, 'http1' or 'http2', not {session_protocol!r}")
    body = bytearray()
    if port:
        body += bytes((_TAG_PORT,)) + _varint(port)
    if name:
        raw = name.encode("utf-8")
        body += bytes((_TAG_NAME,)) + _varint(len(raw)) + raw
    if session_protocol is not None:
        inner = _SESSION_BODY[session_protocol]
        body += bytes((_TAG_SESSION,)) + _varint(len(inner)) + inner
    if len(body) > MAX_HEADER_LENGTH:
        raise ValueError(f"transport header of {len(body)} bytes exceeds {MAX_HEADER_LENGTH}")
    return PREFACE + _LENGTH.pack(len(body)) + bytes(body)


def decode(data: bytes) -> Union[Tuple[TransportHeader, bytes], type(NEED_MORE)]:
    """
    Decode the transport header at the start of C{data}.

    @param data: every byte received after the TLS handshake so far, from the first.
    @return: C{(header, remaining)} where C{remaining} is what followed the header, or L{NEED_MORE}.
    @raise TransportHeaderError: if C{data} does not start with the preface, the length exceeds
        L{MAX_HEADER_LENGTH}, the protobuf is malformed, the name is not UTF-8, or the port is outside
        C{0..65535}.
    """
    data = bytes(data)
    if not has_preface_prefix(data):
        raise TransportHeaderError("no transport header preface")
    if len(data) < _PREFIX_LENGTH:
        return NEED_MORE
    (length,) = _LENGTH.unpack_from(data, len(PREFACE))
    if length > MAX_HEADER_LENGTH:
        raise TransportHeaderError(f"transport header length {length} exceeds {MAX_HEADER_LENGTH}")
    end = _PREFIX_LENGTH + length
    if len(data) < end:
        return NEED_MORE
    return _parse_header(data[_PREFIX_LENGTH:end]), data[end:]


def header_length(data: bytes) -> int:
    """
    The total size of the header that C{data} starts with (preface, length and body), once its length field
    is in; lets a caller wait for that many bytes instead of retrying L{decode} on every read.

    @param data: at least the preface and the four length bytes.
    @raise TransportHeaderError: as L{decode} does for the preface and the length.
    @raise ValueError: if C{data} is shorter than the preface and length.
    """
    if len(data) < _PREFIX_LENGTH:
        raise ValueError(f"need {_PREFIX_LENGTH} bytes to know the header length, got {len(data)}")
    if not data.startswith(PREFACE):
        raise TransportHeaderError("no transport header preface")
    (length,) = _LENGTH.unpack_from(data, len(PREFACE))
    if length > MAX_HEADER_LENGTH:
        raise TransportHeaderError(f"transport header length {length} exceeds {MAX_HEADER_LENGTH}")
    return _PREFIX_LENGTH + length


# --- protobuf wire parsing -------------------------------------------------------------------------------


def _fields(buf: bytes):
    """
    The fields of one message (see L{linkproxy.core.protobuf.fields}), errors as L{TransportHeaderError}.
    """
    return protobuf.fields(buf, TransportHeaderError)


def _parse_session_kind(buf: bytes, kind: Optional[str]) -> Optional[str]:
    """
    Merge one C{SessionProtocol} message into the oneof seen so far; the last member present wins.
    """
    for number, wire, value in _fields(buf):
        if wire == _LEN and number in _SESSION_KIND:
            # Http1/Http2 are empty messages; whatever unknown fields they carry must still be well formed.
            for _ in _fields(value):
                pass
            kind = _SESSION_KIND[number]
    return kind


def _parse_header(buf: bytes) -> TransportHeader:
    port = 0
    name = ""
    session = None
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _VARINT:
            port = value
        elif number == 2 and wire == _LEN:
            # proto3 strings must be UTF-8 in every occurrence, not just the one that wins.
            try:
                name = value.decode("utf-8")
            except UnicodeDecodeError:
                raise TransportHeaderError("name is not valid UTF-8") from None
        elif number == 3 and wire == _LEN:
            session = _parse_session_kind(value, session)
        # Anything else is an unknown field (or a known one with another wire type): skipped.
    # int32 is the low 32 bits of the varint, two's complement.
    port &= 0xFFFFFFFF
    if port >= 0x80000000:
        port -= 0x100000000
    if not 0 <= port <= 65535:
        raise TransportHeaderError(f"port {port} is outside 0..65535")
    return TransportHeader(port, name, session)
