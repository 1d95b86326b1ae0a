"""
Tests for L{linkproxy.core.transport_header}, including wire compatibility with the real protobuf runtime.
"""

import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core import transport_header as th
from linkproxy.core.transport_header import (
    MAX_HEADER_LENGTH,
    NEED_MORE,
    PREFACE,
    TransportHeader,
    TransportHeaderError,
    decode,
    encode,
    has_preface_prefix,
)

_FD = descriptor_pb2.FieldDescriptorProto


def _build_messages():
    """
    Build Linkerd's C{Header} and C{SessionProtocol} messages at run time (no generated code), from the same
    description as linkerd2-proxy's C{header.proto}.

    @return: the C{Header} message class.
    """
    package = "transport.l5d.io.linkproxytest"
    proto = descriptor_pb2.FileDescriptorProto(
        name="linkproxy_transport_header_test.proto", package=package, syntax="proto3")
    header = proto.message_type.add(name="Header")
    header.field.add(name="port", number=1, type=_FD.TYPE_INT32, label=_FD.LABEL_OPTIONAL)
    header.field.add(name="name", number=2, type=_FD.TYPE_STRING, label=_FD.LABEL_OPTIONAL)
    header.field.add(name="session_protocol", number=3, type=_FD.TYPE_MESSAGE, label=_FD.LABEL_OPTIONAL,
                     type_name=f".{package}.SessionProtocol")
    session = proto.message_type.add(name="SessionProtocol")
    session.nested_type.add(name="Http1")
    session.nested_type.add(name="Http2")
    session.oneof_decl.add(name="kind")
    for number, kind in ((1, "http1"), (2, "http2")):
        session.field.add(name=kind, number=number, type=_FD.TYPE_MESSAGE, label=_FD.LABEL_OPTIONAL,
                          oneof_index=0, type_name=f".{package}.SessionProtocol.{kind.capitalize()}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Header"))


Header = _build_messages()


def pb_header(port=0, name="", session_protocol=None):
    """
    @return: a protobuf C{Header} with these fields.
    """
    message = Header(port=port, name=name)
    if session_protocol is not None:
        getattr(message.session_protocol, session_protocol).SetInParent()
    return message


def pb_fields(message):
    """
    @return: what a parsed protobuf C{Header} says, as a L{TransportHeader}.
    """
    kind = None
    if message.HasField("session_protocol"):
        kind = message.session_protocol.WhichOneof("kind")
    return TransportHeader(message.port, message.name, kind)


def frame(body):
    """
    @return: C{body} behind the preface and its length.
    """
    return PREFACE + struct.pack(">I", len(body)) + body


ports = st.integers(min_value=0, max_value=65535)
names = st.text(max_size=40)
sessions = st.sampled_from([None, "http1", "http2"])


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_fields(draw, depth=0):
    """
    Generate one protobuf field, well formed or not: known and unknown numbers, every wire type (groups
    included), wrong wire types for known fields, nested session messages, invalid UTF-8, huge varints.
    """
    number = draw(st.sampled_from([1, 2, 3, 4, 15, 16, 1000]))
    wire = draw(st.sampled_from([0, 1, 2, 3, 5] if depth < 3 else [0, 1, 2, 5]))
    tag = _varint((number << 3) | wire)
    if wire == 0:
        value = draw(st.one_of(ports, st.integers(min_value=0, max_value=2 ** 64 - 1)))
        return tag + _varint(value)
    if wire == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire == 3:
        inner = b"".join(draw(st.lists(wire_fields(depth + 1), max_size=3)))
        return tag + inner + _varint((number << 3) | 4)
    if number == 3:
        # A SessionProtocol: its own fields, with Http1/Http2 among them.
        payload = b"".join(draw(st.lists(wire_fields(depth + 1), max_size=3)))
    else:
        payload = draw(st.one_of(st.text(max_size=8).map(lambda s: s.encode("utf-8")),
                                 st.binary(max_size=8)))
    return tag + _varint(len(payload)) + payload


class EncodeTests(SynchronousTestCase):
    """
    L{encode}: the exact bytes, and what it refuses.
    """

    def test_example(self):
        """
        Port 8080 as HTTP/1 is the preface, length 7, then C{08 90 3f} (port) and C{1a 02 0a 00}
        (session_protocol { http1 {} }); the documented example in docs/wire-protocol.md.
        """
        self.assertEqual(
            encode(8080, session_protocol="http1").hex(),
            PREFACE.hex() + "00000007" + "08903f" + "1a020a00")
        self.assertEqual(encode(80, "web", "http2").hex(),
                         PREFACE.hex() + "0000000b" + "0850" + "1203776562" + "1a021200")
        self.assertEqual(encode(0), PREFACE + b"\x00\x00\x00\x00")

    @given(ports, names, sessions)
    def test_same_bytes_as_protobuf(self, port, name, session):
        """
        For any header, the body is byte for byte what protobuf serializes (proto3: defaults omitted,
        fields in number order).
        """
        body = encode(port, name, session)[len(PREFACE) + 4:]
        self.assertEqual(body, pb_header(port, name, session).SerializeToString(deterministic=True))

    def test_refuses(self):
        """
        Ports out of range, non-int ports, unknown session protocols and oversized names are refused.
        """
        for bad in (-1, 65536, 1.5, True, "80"):
            self.assertRaises(ValueError, encode, bad)
        self.assertRaises(ValueError, encode, 80, "x", "h2")
        self.assertRaises(ValueError, encode, 80, b"bytes")
        self.assertRaises(ValueError, encode, 80, "x" * MAX_HEADER_LENGTH)


class DecodeTests(SynchronousTestCase):
    """
    L{decode}: round trips, compatibility with protobuf, chunking, and garbage.
    """

    @given(ports, names, sessions, st.binary(max_size=20))
    def test_round_trip(self, port, name, session, tail):
        """
        Whatever L{encode} writes, L{decode} reads back, and the bytes after the header are returned.
        """
        self.assertEqual(decode(encode(port, name, session) + tail), (TransportHeader(port, name, session), tail))

    @given(ports, names, sessions)
    def test_reads_protobuf(self, port, name, session):
        """
        Bodies serialized by protobuf decode to the same fields.
        """
        body = pb_header(port, name, session).SerializeToString()
        self.assertEqual(decode(frame(body)), (TransportHeader(port, name, session), b""))

    @settings(max_examples=500)
    @given(st.lists(wire_fields(), max_size=6))
    def test_agrees_with_protobuf(self, fields):
        """
        On arbitrary wire data (unknown fields, groups, fixed widths, repeated and wrongly typed fields,
        bad UTF-8), L{decode} accepts exactly what protobuf accepts and reads the same values, except that
        it also refuses ports outside 0..65535 and, like prost, field number 0.
        """
        body = b"".join(fields)
        message = Header()
        try:
            message.ParseFromString(body)
        except DecodeError:
            self.assertRaises(TransportHeaderError, decode, frame(body))
            return
        expected = pb_fields(message)
        if not 0 <= expected.port <= 65535:
            self.assertRaises(TransportHeaderError, decode, frame(body))
            return
        try:
            got = decode(frame(body))
        except TransportHeaderError as e:
            # The one deliberate difference: upb treats a zero tag as an end marker and accepts it inside a
            # nested message; prost (the decoder Linkerd runs) rejects field number 0, and so do we.
            if "invalid field number 0" in str(e):
                return
            raise
        self.assertEqual(got, (expected, b""))

    @settings(max_examples=300)
    @given(st.binary(max_size=40))
    def test_random_bodies(self, body):
        """
        Random bytes as a body: L{decode} raises exactly when protobuf does (or for a bad port), and never
        raises anything but L{TransportHeaderError}.
        """
        message = Header()
        try:
            message.ParseFromString(body)
        except DecodeError:
            self.assertRaises(TransportHeaderError, decode, frame(body))
            return
        expected = pb_fields(message)
        if 0 <= expected.port <= 65535:
            self.assertEqual(decode(frame(body)), (expected, b""))
        else:
            self.assertRaises(TransportHeaderError, decode, frame(body))

    def test_last_value_wins_and_messages_merge(self):
        """
        A repeated scalar keeps its last value; a second SessionProtocol without a kind keeps the first's;
        one with the other kind replaces it (oneof).
        """
        body = b"\x08\x50" + b"\x08\x51" + b"\x1a\x02\x0a\x00" + b"\x1a\x00"
        self.assertEqual(decode(frame(body))[0], TransportHeader(81, "", "http1"))
        body += b"\x1a\x02\x12\x00"
        self.assertEqual(decode(frame(body))[0], TransportHeader(81, "", "http2"))
        # An empty SessionProtocol is opaque.
        self.assertEqual(decode(frame(b"\x1a\x00"))[0], TransportHeader(0, "", None))

    def test_negative_port(self):
        """
        int32 ports are two's complement: -1 (ten varint bytes) is refused as out of range.
        """
        body = b"\x08" + b"\xff" * 9 + b"\x01"
        message = Header()
        message.ParseFromString(body)
        self.assertEqual(message.port, -1)
        self.assertRaises(TransportHeaderError, decode, frame(body))

    @given(ports, names, sessions, st.binary(max_size=10), st.data())
    def test_chunking_invariance(self, port, name, session, tail, data):
        """
        Fed growing prefixes of a stream, L{decode} says L{NEED_MORE} until the whole header is there, then
        gives the same answer however the stream was split.
        """
        wire = encode(port, name, session)
        stream = wire + tail
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        for cut in cuts:
            result = decode(stream[:cut])
            if cut < len(wire):
                self.assertIs(result, NEED_MORE)
            else:
                self.assertEqual(result, (TransportHeader(port, name, session), stream[len(wire):cut]))

    @given(st.binary(max_size=60), st.binary(max_size=20))
    def test_errors_are_prefix_consistent(self, data, more):
        """
        Once some bytes are refused, every longer stream starting with them is refused too; never anything
        but L{TransportHeaderError} or a result.
        """
        for stream in (data, PREFACE + data, PREFACE[:10] + data):
            try:
                result = decode(stream)
            except TransportHeaderError:
                self.assertRaises(TransportHeaderError, decode, stream + more)
            else:
                if result is not NEED_MORE:
                    header, remaining = result
                    self.assertEqual(decode(stream + more), (header, remaining + more))

    def test_no_preface(self):
        """
        Bytes that are not the preface are refused at once; a prefix of it needs more.
        """
        self.assertRaises(TransportHeaderError, decode, b"GET / HTTP/1.1\r\n")
        self.assertRaises(TransportHeaderError, decode, b"transport.l5d.io/v2\r\n\r\n")
        self.assertIs(decode(b""), NEED_MORE)
        self.assertIs(decode(PREFACE[:5]), NEED_MORE)
        self.assertIs(decode(PREFACE + b"\x00\x00"), NEED_MORE)

    def test_length_cap(self):
        """
        A length over 64 KiB is refused from the four length bytes alone, before any body is buffered; a
        body of exactly 64 KiB (an unknown field) is accepted.
        """
        self.assertRaises(TransportHeaderError, decode, PREFACE + struct.pack(">I", MAX_HEADER_LENGTH + 1))
        self.assertRaises(TransportHeaderError, decode, PREFACE + b"\xff\xff\xff\xff")
        body = b"\x22" + _varint(MAX_HEADER_LENGTH - 4) + b"x" * (MAX_HEADER_LENGTH - 4)
        self.assertEqual(len(body), MAX_HEADER_LENGTH)
        self.assertEqual(decode(frame(body) + b"tail"), (TransportHeader(0), b"tail"))

    def test_garbage(self):
        """
        Truncated fields, bad wire types, unterminated groups, field number 0, over-long varints and bad
        UTF-8 in the name are each refused.
        """
        for body in (
            b"\x08",                      # varint missing
            b"\x08\x80",                  # varint truncated
            b"\x12\x05ab",                # string longer than the message
            b"\x0f",                      # wire type 7
            b"\x0c",                      # end group with no group
            b"\x0b\x08\x01",              # group never closed
            b"\x0b\x14",                  # group closed with another field's end tag
            b"\x00\x01",                  # field number 0
            b"\x08" + b"\xff" * 10 + b"\x01",  # 11-byte varint
            b"\x12\x02\xc3\x28",          # name not UTF-8
            b"\x1a\x03\x0a\x01\x08",      # Http1 message with a truncated field inside
            b"\x0d\x00\x00",              # fixed32 truncated
        ):
            self.assertRaises(TransportHeaderError, decode, frame(body))

    def test_unknown_fields_skipped(self):
        """
        Unknown fields of every wire type, and known ones with the wrong wire type, are skipped.
        """
        body = (b"\x20\x07" + b"\x29" + b"\x00" * 8 + b"\x2d" + b"\x00" * 4 + b"\x33\x08\x01\x34"
                + b"\x0a\x01x"  # field 1 (port) as a string: unknown
                + b"\x10\x05"   # field 2 (name) as a varint: unknown
                + b"\x08\x50\x1a\x04\x0a\x02\x08\x01")
        self.assertEqual(decode(frame(body)), (TransportHeader(80, "", "http1"), b""))


class HeaderLengthTests(SynchronousTestCase):
    """
    L{th.header_length}.
    """

    @given(ports, names, sessions, st.binary(max_size=10))
    def test_length(self, port, name, session, tail):
        """
        Once the preface and length are in, it gives the size L{decode} will consume.
        """
        wire = encode(port, name, session)
        self.assertEqual(th.header_length(wire[:len(PREFACE) + 4]), len(wire))
        self.assertEqual(th.header_length(wire + tail), len(wire))

    def test_errors(self):
        """
        Too few bytes is a caller error; a bad preface or length is a header error.
        """
        self.assertRaises(ValueError, th.header_length, PREFACE)
        self.assertRaises(TransportHeaderError, th.header_length, b"x" * 30)
        self.assertRaises(TransportHeaderError, th.header_length, PREFACE + b"\xff\xff\xff\xff")


class PrefaceTests(SynchronousTestCase):
    """
    L{has_preface_prefix}.
    """

    def test_prefixes(self):
        """
        Every prefix of the preface (the empty one too), and anything starting with it, qualifies; bytes
        that diverge do not.
        """
        for n in range(len(PREFACE) + 1):
            self.assertTrue(has_preface_prefix(PREFACE[:n]))
        self.assertTrue(has_preface_prefix(PREFACE + b"\x00\x00\x00\x00"))
        self.assertFalse(has_preface_prefix(b"GET /"))
        self.assertFalse(has_preface_prefix(b"transport.l5d.io/v2"))
        self.assertFalse(has_preface_prefix(b"\x16\x03\x01"))

    def test_public_names(self):
        """
        The module exports what the mesh layer uses.
        """
        for name in th.__all__:
            self.assertTrue(hasattr(th, name), name)
