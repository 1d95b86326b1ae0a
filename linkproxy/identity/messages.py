"""
The two messages of Linkerd's Identity API, encoded and decoded by hand (see C{identity.proto} beside this
module)::

    CertifyRequest  { string identity = 1; bytes token = 2; bytes certificate_signing_request = 3; }
    CertifyResponse { bytes leaf_certificate = 1; repeated bytes intermediate_certificates = 2;
                      google.protobuf.Timestamp valid_until = 3; }
    Timestamp       { int64 seconds = 1; int32 nanos = 2; }

Three fields each do not justify generated code and a protobuf runtime in every proxy; the tests check these
bytes against the real C{google.protobuf} runtime. Decoding follows protobuf's rules: fields may come in any
order and repeat (the last scalar wins, repeated fields accumulate, embedded messages merge), and unknown
fields, or known fields with another wire type, are skipped. Pure: no I/O.
"""

import datetime
from dataclasses import dataclass
from typing import Tuple

from linkproxy.core import protobuf

__all__ = ["CertifyRequest", "CertifyResponse", "MessageError", "MAX_MESSAGE_LENGTH"]

#: The largest message either side accepts. A request is a name, a token (a JWT of a kilobyte or two) and a
#: CSR of a few hundred bytes; a response is two or three certificates.
MAX_MESSAGE_LENGTH = 64 * 1024

_VARINT, _LEN = protobuf.VARINT, protobuf.LEN
_UINT64 = (1 << 64) - 1


class MessageError(ValueError):
    """
    The bytes are not a well-formed message of the expected type.
    """


def _varint(value: int) -> bytes:
    # Negative int64/int32 values go on the wire as their 64-bit two's complement: ten bytes.
    return protobuf.encode_varint(value & _UINT64)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _fields(buf: bytes):
    """
    The fields of one message (see L{linkproxy.core.protobuf.fields}), errors as L{MessageError}.
    """
    return protobuf.fields(bytes(buf), MessageError)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


@dataclass(frozen=True)
class CertifyRequest:
    """
    A proxy's request to have a CSR signed.

    @ivar identity: the identity name asked for.
    @ivar token: the proof of that identity (a service-account token).
    @ivar certificate_signing_request: a PKCS#10 CSR, DER or PEM.
    """

    identity: str = ""
    token: bytes = b""
    certificate_signing_request: bytes = b""

    def encode(self) -> bytes:
        """
        @return: the protobuf encoding; fields at their proto3 default (empty) are left out.
        """
        out = bytearray()
        if self.identity:
            out += _len_field(0x0A, self.identity.encode("utf-8"))
        if self.token:
            out += _len_field(0x12, bytes(self.token))
        if self.certificate_signing_request:
            out += _len_field(0x1A, bytes(self.certificate_signing_request))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> "CertifyRequest":
        """
        @raise MessageError: for malformed protobuf or an identity that is not UTF-8.
        """
        identity, token, csr = "", b"", b""
        for number, wire, value in _fields(data):
            if wire != _LEN:
                continue
            if number == 1:
                try:
                    identity = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise MessageError("identity is not valid UTF-8") from None
            elif number == 2:
                token = value
            elif number == 3:
                csr = value
        return cls(identity, token, csr)


@dataclass(frozen=True)
class CertifyResponse:
    """
    The service's answer: a signed leaf and its chain.

    @ivar leaf_certificate: the leaf, DER.
    @ivar intermediate_certificates: DER certificates from the leaf's issuer up to (not including) the anchor.
    @ivar valid_until: the leaf's notAfter as C{(seconds, nanos)} since the Unix epoch, or C{None} if absent.
    """

    leaf_certificate: bytes = b""
    intermediate_certificates: Tuple[bytes, ...] = ()
    valid_until: Tuple[int, int] = None

    @property
    def valid_until_seconds(self):
        """L{valid_until} as a float number of seconds, or C{None}."""
        if self.valid_until is None:
            return None
        seconds, nanos = self.valid_until
        return seconds + nanos / 1e9

    @staticmethod
    def timestamp(when: datetime.datetime) -> Tuple[int, int]:
        """
        @param when: an aware C{datetime}.
        @return: C{(seconds, nanos)} for L{valid_until}.
        """
        delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        seconds = delta.days * 86400 + delta.seconds
        return seconds, delta.microseconds * 1000

    def encode(self) -> bytes:
        """
        @return: the protobuf encoding. An empty C{valid_until} message is still written when it is set.
        """
        out = bytearray()
        if self.leaf_certificate:
            out += _len_field(0x0A, bytes(self.leaf_certificate))
        for cert in self.intermediate_certificates:
            # Repeated bytes are written even when empty: each element is a value of its own.
            out += _len_field(0x12, bytes(cert))
        if self.valid_until is not None:
            seconds, nanos = self.valid_until
            inner = bytearray()
            if seconds:
                inner += b"\x08" + _varint(seconds)
            if nanos:
                inner += b"\x10" + _varint(nanos)
            out += _len_field(0x1A, bytes(inner))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> "CertifyResponse":
        """
        @raise MessageError: for malformed protobuf.
        """
        leaf, intermediates, valid_until = b"", [], None
        for number, wire, value in _fields(data):
            if wire != _LEN:
                continue
            if number == 1:
                leaf = value
            elif number == 2:
                intermediates.append(value)
            elif number == 3:
                seconds, nanos = valid_until or (0, 0)
                for inner, inner_wire, inner_value in _fields(value):
                    if inner_wire != _VARINT:
                        continue
                    if inner == 1:
                        seconds = _signed(inner_value, 64)
                    elif inner == 2:
                        nanos = _signed(inner_value, 32)
                valid_until = (seconds, nanos)
        return cls(leaf, tuple(intermediates), valid_until)
