"""
The protobuf wire format, as far as linkproxy's small hand-encoded messages need it: varints, and reading the
fields of one message by protobuf's rules.

Both users (L{linkproxy.core.transport_header} and L{linkproxy.identity.messages}) decode a handful of
fields, so generated code is not worth its import; their tests check the bytes against the real
C{google.protobuf} runtime. Decoding follows protobuf's parsers: fields in any order, unknown fields and
known fields with an unexpected wire type skipped, groups skipped up to their end tag (nested at most
L{MAX_DEPTH} deep). Errors are raised as the caller's own exception class.
"""

from typing import Tuple

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

#: protobuf's own parser refuses nesting deeper than 100; groups are the only nesting an unknown field brings.
MAX_DEPTH = 100

_UINT64 = (1 << 64) - 1
_MAX_FIELD = 0x1FFFFFFF


def encode_varint(value: int) -> bytes:
    """
    The varint encoding of a non-negative C{value}.
    """
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes, pos: int, error=ValueError) -> Tuple[int, int]:
    """
    @return: C{(value, new position)}; the value is the raw unsigned 64-bit integer (bits past 64, from a
        tenth byte above 1, are dropped, as protobuf's parsers do).
    @raise error: on a truncated or over-long varint.
    """
    result = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise error("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _UINT64, pos
        shift += 7
    raise error("varint longer than 10 bytes")


def fields(buf: bytes, error=ValueError, depth: int = 0):
    """
    Iterate over C{(field number, wire type, value)} in one message; C{value} is an C{int} for varints and
    the payload bytes for length-delimited fields (fixed-width fields and groups are skipped over and
    yielded with value L{None}).

    @raise error: as soon as the bytes cannot be a message.
    """
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = read_varint(buf, pos, error)
        number, wire = tag >> 3, tag & 7
        if number == 0 or number > _MAX_FIELD:
            raise error(f"invalid field number {number}")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, error)
        elif wire == LEN:
            size, pos = read_varint(buf, pos, error)
            if size > end - pos:
                raise error("length-delimited field runs past the message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if width > end - pos:
                raise error("fixed-width field runs past the message")
            value, pos = None, pos + width
        elif wire == SGROUP:
            value, pos = None, _skip_group(buf, pos, number, depth + 1, error)
        else:
            # An end-group tag with no group open, or wire types 6 and 7, which do not exist.
            raise error(f"unexpected wire type {wire} for field {number}")
        yield number, wire, value


def _skip_group(buf, pos, number, depth, error):
    # A (deprecated, but still valid) group, up to its matching end tag; the position after it.
    if depth > MAX_DEPTH:
        raise error("groups nested too deeply")
    end = len(buf)
    while True:
        if pos >= end:
            raise error("unterminated group")
        tag, pos = read_varint(buf, pos, error)
        inner, wire = tag >> 3, tag & 7
        if inner == 0 or inner > _MAX_FIELD:
            raise error(f"invalid field number {inner}")
        if wire == EGROUP:
            if inner != number:
                raise error("mismatched end of group")
            return pos
        if wire == VARINT:
            _, pos = read_varint(buf, pos, error)
        elif wire == LEN:
            size, pos = read_varint(buf, pos, error)
            if size > end - pos:
                raise error("length-delimited field runs past the message")
            pos += size
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if width > end - pos:
                raise error("fixed-width field runs past the message")
            pos += width
        elif wire == SGROUP:
            pos = _skip_group(buf, pos, inner, depth + 1, error)
        else:
            raise error(f"unexpected wire type {wire} for field {inner}")
