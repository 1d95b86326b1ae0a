"""
A sans-I/O parser for the TLS ClientHello, the first thing a TLS client sends.

Detection needs three facts from it without terminating TLS: the server name (SNI), the ALPN protocols and the
TLS versions the client offers. L{parse_client_hello} takes the bytes a connection has sent so far and either
answers with a L{ClientHello}, answers L{NEED_MORE}, or raises L{ClientHelloError}. It never touches a socket and
never raises anything else, whatever the input.

The parser is prefix-consistent: if it answers for some bytes, it answers the same for any longer stream that
starts with them, and if it raises for some bytes it raises for every longer stream too. Callers can therefore
feed it a growing buffer without caring how TCP split the stream.

Layouts are from RFC 8446 section 4.1.2 (ClientHello), RFC 6066 section 3 (server_name), RFC 7301 section 3.1
(ALPN) and RFC 8446 section 4.2.1 (supported_versions).
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

__all__ = [
    "ClientHello", "ClientHelloError", "NEED_MORE", "parse_client_hello",
    "MAX_RECORD_LENGTH", "MAX_HANDSHAKE_LENGTH",
]

#: TLS record content type for handshake messages.
CONTENT_TYPE_HANDSHAKE = 22
#: Handshake message type of a ClientHello.
HANDSHAKE_CLIENT_HELLO = 1

#: Largest record body accepted. TLSPlaintext may not exceed 2**14 bytes; the extra 256 tolerates peers that
#: size records by the (larger) ciphertext limit, as several stacks do.
MAX_RECORD_LENGTH = 16384 + 256
#: Largest handshake message we are willing to reassemble across records. Real ClientHellos are under 2 KiB
#: (a few KiB with post-quantum key shares); anything near this is an attempt to make us buffer.
MAX_HANDSHAKE_LENGTH = 64 * 1024

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43

_SNI_HOST_NAME = 0
_MAX_HOST_NAME = 255


class ClientHelloError(ValueError):
    """
    The bytes are not a well-formed TLS ClientHello, and no further bytes can make them one.
    """


class _NeedMore:
    """
    Type of the L{NEED_MORE} singleton.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __reduce__(self) -> str:
        # Keep the singleton a singleton across copy and pickle.
        return "NEED_MORE"


#: Returned by L{parse_client_hello} when the bytes so far are a valid beginning of a ClientHello.
NEED_MORE = _NeedMore()


@dataclass(frozen=True)
class ClientHello:
    """
    What a ClientHello says that routing and metrics care about.

    @ivar sni: the C{host_name} of the server_name extension, ASCII and lowercased, or L{None} when the
        client sent no server_name.
    @ivar alpn: the ALPN protocol names in the client's order, empty when the client sent no ALPN extension.
        Names are opaque bytes on the wire; they are decoded as Latin-1 so that every name (GREASE values
        included) survives the round trip, and the registered ones (C{"h2"}, C{"http/1.1"}) read as usual.
    @ivar versions: the versions from supported_versions in the client's order (GREASE values included) when
        the extension is present, else the one-element tuple of the legacy version; for example
        C{(0x0304, 0x0303)}.
    """

    sni: Optional[str]
    alpn: Tuple[str, ...]
    versions: Tuple[int, ...]


class _Reader:
    """
    A bounds-checked cursor over a complete, length-delimited structure.

    Running past the end raises L{ClientHelloError}: inside a handshake message whose length we already
    have in full, a short read means a lying inner length, not missing bytes.
    """

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes, start: int = 0, end: Optional[int] = None):
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self._end - self._pos:
            raise ClientHelloError(f"{what} runs past its enclosing structure")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> "_Reader":
        """Read a C{<length><body>} vector and return a reader confined to its body."""
        n = self.uint(length_size, what + " length")
        start = self._pos
        self.take(n, what)
        return _Reader(self._data, start, start + n)

    def take_all(self) -> bytes:
        return self.take(self._end - self._pos, "vector")


def _check_record_header(data: bytes, offset: int) -> Optional[int]:
    """
    Check the TLS record header at C{offset} as far as it is present.

    @return: the record body length, or L{None} when the header is not complete yet.
    @raise ClientHelloError: as soon as a present byte rules out a handshake record.
    """
    available = len(data) - offset
    if available >= 1 and data[offset] != CONTENT_TYPE_HANDSHAKE:
        raise ClientHelloError(f"record content type {data[offset]} is not handshake (22)")
    if available >= 2 and data[offset + 1] != 3:
        raise ClientHelloError("record version major is not 3")
    if available >= 3 and data[offset + 2] > 4:
        raise ClientHelloError("record version minor is above 4")
    if available < 5:
        return None
    length = int.from_bytes(data[offset + 3:offset + 5], "big")
    if length == 0:
        # RFC 8446 5.1: zero-length handshake fragments MUST NOT be sent; allowing them would also let a
        # peer keep us reading headers forever.
        raise ClientHelloError("empty handshake record")
    if length > MAX_RECORD_LENGTH:
        raise ClientHelloError(f"record length {length} exceeds {MAX_RECORD_LENGTH}")
    return length


def _reassemble(data: bytes) -> Union[bytes, _NeedMore]:
    """
    Collect the first handshake message from one or more handshake records.

    @return: the whole handshake message, header included, or L{NEED_MORE}.
    """
    fragments = []
    have = 0
    needed = None  # total handshake message length (header included), once known
    offset = 0
    while True:
        length = _check_record_header(data, offset)
        if length is None:
            return NEED_MORE
        body = data[offset + 5:offset + 5 + length]
        fragments.append(body)
        have += len(body)
        if needed is None:
            head = b"".join(fragments)[:4]
            if len(head) >= 1 and head[0] != HANDSHAKE_CLIENT_HELLO:
                raise ClientHelloError(f"handshake type {head[0]} is not ClientHello (1)")
            if len(head) == 4:
                body_length = int.from_bytes(head[1:4], "big")
                if body_length > MAX_HANDSHAKE_LENGTH:
                    raise ClientHelloError(
                        f"handshake length {body_length} exceeds {MAX_HANDSHAKE_LENGTH}")
                needed = 4 + body_length
        if needed is not None and have >= needed:
            # Anything after the ClientHello in its last record is not ours to judge.
            return b"".join(fragments)[:needed]
        if len(body) < length:
            return NEED_MORE
        offset += 5 + length


def _parse_server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name list")
    if ext.remaining():
        raise ClientHelloError("bytes after the server_name list")
    if not names.remaining():
        raise ClientHelloError("empty server_name list")
    host = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        # RFC 6066 defines only host_name; later types are assumed to keep its 2-byte-length layout, which
        # is what the RFC asks of any extension of the list.
        name = names.vector(2, "server name").take_all()
        if name_type != _SNI_HOST_NAME:
            continue
        if host is not None:
            raise ClientHelloError("more than one host_name in server_name")
        host = name
    if host is None:
        raise ClientHelloError("server_name carries no host_name")
    if not host:
        raise ClientHelloError("empty host_name")
    if len(host) > _MAX_HOST_NAME:
        raise ClientHelloError(f"host_name longer than {_MAX_HOST_NAME} bytes")
    # The name becomes a routing key, a log field and a metric label, so only printable ASCII gets through.
    if any(b < 0x21 or b > 0x7E for b in host):
        raise ClientHelloError("host_name is not printable ASCII")
    return host.decode("ascii").lower()


def _parse_alpn(ext: _Reader) -> Tuple[str, ...]:
    names = ext.vector(2, "ALPN list")
    if ext.remaining():
        raise ClientHelloError("bytes after the ALPN list")
    if not names.remaining():
        raise ClientHelloError("empty ALPN list")
    protocols = []
    while names.remaining():
        name = names.vector(1, "ALPN protocol").take_all()
        if not name:
            raise ClientHelloError("empty ALPN protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)


def _parse_supported_versions(ext: _Reader) -> Tuple[int, ...]:
    versions = ext.vector(1, "supported_versions list")
    if ext.remaining():
        raise ClientHelloError("bytes after the supported_versions list")
    count, odd = divmod(versions.remaining(), 2)
    if odd or not count:
        raise ClientHelloError("supported_versions list is empty or of odd length")
    return tuple(versions.uint(2, "version") for _ in range(count))


def _parse_body(message: bytes) -> ClientHello:
    hello = _Reader(message, 4)
    legacy_version = hello.uint(2, "legacy_version")
    hello.take(32, "random")
    session_id = hello.vector(1, "legacy_session_id")
    if session_id.remaining() > 32:
        raise ClientHelloError("legacy_session_id longer than 32 bytes")
    suites = hello.vector(2, "cipher_suites")
    if suites.remaining() < 2 or suites.remaining() % 2:
        raise ClientHelloError("cipher_suites is empty or of odd length")
    if not hello.vector(1, "legacy_compression_methods").remaining():
        raise ClientHelloError("no compression methods")

    sni = None
    alpn: Tuple[str, ...] = ()
    versions = (legacy_version,)
    # Pre-TLS-1.2 clients may stop here: no extensions block at all.
    if hello.remaining():
        extensions = hello.vector(2, "extensions")
        if hello.remaining():
            raise ClientHelloError("bytes after the extensions")
        seen = set()
        while extensions.remaining():
            ext_type = extensions.uint(2, "extension type")
            ext = extensions.vector(2, "extension")
            if ext_type in seen:
                raise ClientHelloError(f"extension {ext_type} appears twice")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                sni = _parse_server_name(ext)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(ext)
    return ClientHello(sni=sni, alpn=alpn, versions=versions)


def parse_client_hello(data: bytes) -> Union[ClientHello, _NeedMore]:
    """
    Parse the ClientHello at the start of a TLS stream.

    The message may be fragmented over several handshake records; at most L{MAX_HANDSHAKE_LENGTH} bytes of it
    are reassembled. Bytes after the ClientHello are ignored.

    @param data: everything the client has sent so far, from the first byte of the connection.
    @return: the parsed L{ClientHello}, or L{NEED_MORE} when C{data} is a valid but incomplete beginning.
    @raise ClientHelloError: when C{data} cannot begin a well-formed ClientHello. Nothing else is raised.
    """
    try:
        message = _reassemble(bytes(data))
        if message is NEED_MORE:
            return NEED_MORE
        return _parse_body(message)
    except ClientHelloError:
        raise
    except Exception as e:  # pragma: no cover - a parser bug must still honour the contract
        raise ClientHelloError(f"unparseable ClientHello: {e!r}") from e
