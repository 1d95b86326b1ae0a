"""
Every override of h2, hpack and hyperframe internals that linkproxy's HTTP/2 proxying relies on, behind a
public surface (L{linkproxy.net.h2} imports only the names in C{__all__}).

Why each exists, and what it saves, is told in L{linkproxy.net.h2}'s docstring and on each class here. In short:
L{LeanEncoder} and L{LeanDecoder} replace hpack's coder on the hot path, L{LeanFrameBuffer} and L{OutFrame}
replace hyperframe's frame objects for HEADERS, CONTINUATION and DATA, L{LeanStream} skips h2's per-block header
work when validation is off, and L{LeanConnection} makes GOAWAY graceful, counts open streams lazily and holds
fewer closed streams. L{new_connection} assembles them.

None of what follows is public API of those libraries, so a release inside their semver range may still change
it. L{AUDITED} is the range these overrides were checked against; C{setup.cfg} bounds the install to it, and
C{tests/test_audited_versions.py} fails when an installed version is outside it. On an upgrade, re-read each
item below in the new release, run C{tests/test_h2.py} (which checks these overrides against the libraries'
own code) and the interop tests, then widen L{AUDITED} and C{setup.cfg} together.

What this module relies on, per library:

h2:
  - C{H2Connection._begin_new_stream}, C{_receive_frame} and C{_receive_goaway_frame}: replaced whole, as
    copies of h2's own with the changes described on L{LeanConnection}.
  - C{H2Connection._open_streams}: overridden, calling h2's own for the walk.
  - C{H2Connection._frame_dispatch_table}, C{_receive_headers_frame}, C{_receive_data_frame},
    C{_prepare_for_sending}, C{_stream_is_closed_by_reset}, C{_stream_is_closed_by_end} and C{_closed_streams}
    (replaced by a smaller C{SizeLimitDict}); its attributes C{streams}, C{highest_inbound_stream_id},
    C{highest_outbound_stream_id}, C{max_outbound_frame_size}, and C{encoder}, C{decoder}, C{incoming_buffer}
    and C{local_settings}, which are replaced after construction.
  - C{StreamClosedError._events}.
  - C{H2Stream.send_headers}, C{send_data} and C{end_stream} (internal to h2, replaced), and the private
    C{_build_hdr_validation_flags} and C{_process_received_headers} (replaced); C{state_machine} with its
    C{client}, C{trailers_sent}, C{state} and C{process_input}; C{StreamInputs}; C{request_method},
    C{outbound_flow_control_window}, C{max_outbound_frame_size}, C{closed_by}.
  - C{h2.frame_buffer.FrameBuffer.__next__} (replaced), its C{_data}, C{_validate_frame_length} and
    C{_update_header_buffer}; C{h2.utilities.SizeLimitDict}.
  - That h2 uses its encoder only through C{encode(headers)} and the C{header_table_size} setter, its decoder
    through C{decode(data, raw=True)} and C{max_header_list_size}, and a queued frame only through
    C{body_len} and C{serialize()}.

hpack:
  - C{Decoder.header_table}, C{max_header_list_size}, C{max_allowed_table_size}, the C{header_table_size}
    setter and the private C{_assert_valid_table_size}.
  - C{hpack.table.HeaderTable}: C{STATIC_TABLE}, C{DEFAULT_SIZE}, C{get_by_index}, C{add}, C{maxsize}.
  - The internal modules C{hpack.huffman} (C{HuffmanEncoder}), C{hpack.huffman_constants}
    (C{REQUEST_CODES}, C{REQUEST_CODES_LENGTH}) and C{hpack.huffman_table} (C{decode_huffman}).

hyperframe:
  - C{HeadersFrame.parse_body} and C{DataFrame.parse_body} called on objects that skip C{Frame.__init__}, so
    on the attributes they read and set (C{stream_id}, C{flags}, C{body_len}, C{pad_length}, C{data},
    C{depends_on}, C{stream_weight}, C{exclusive}); C{defined_flags} of both classes.
"""

import struct

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import FrameDataMissingError, ProtocolError, StreamClosedError, StreamIDTooLowError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamInputs, StreamState
from h2.utilities import SizeLimitDict
from hpack import Decoder, HPACKDecodingError, InvalidTableSizeError, NeverIndexedHeaderTuple, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

__all__ = [
    "AUDITED", "CLOSED_STREAMS_KEPT", "LeanConnection", "LeanDecoder", "LeanEncoder", "LeanFrameBuffer",
    "LeanStream", "OutFrame", "header_frames", "new_connection",
]

#: The releases these overrides were checked against, as C{(lower, upper)} version specifiers per distribution.
#: C{setup.cfg} must carry the same bounds (C{tests/test_audited_versions.py} checks both).
AUDITED = {
    "h2": (">=4.4", "<4.5"),
    "hpack": (">=4.1", "<5"),
    "hyperframe": (">=6.1", "<7"),
}

#: Closed streams a connection remembers, to answer a late frame on a stream it reset with RST_STREAM rather
#: than a connection error. h2 keeps 65,536 (about 8 MiB per long-lived connection); hyper's h2 keeps 10.
CLOSED_STREAMS_KEPT = 1024

_CLOSED = StreamState.CLOSED


def _error_code(value):
    try:
        return ErrorCodes(value)
    except ValueError:
        return value


# -- HPACK -------------------------------------------------------------------------------------------------------

#: Encoded fields kept by L{LeanEncoder}, and huffman strings kept by L{LeanDecoder}, before each cache starts over.
_CACHE_ENTRIES = 4096
#: Longer fields and strings are not cached: large and seldom repeated.
_CACHE_MAX_BYTES = 256
#: Decoded header blocks kept by L{LeanDecoder}, and the longest one cached.
_BLOCK_CACHE_ENTRIES = 1024
_BLOCK_CACHE_MAX_BYTES = 1024

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode
# name -> (index of its first static entry, {value: index of the exact static entry})
_STATIC = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC.setdefault(_name, (_index, {}))[1].setdefault(_value, _index)
del _index, _name, _value

# index -> static entry (index 0 is unused: HPACK indices start at 1)
_STATIC_ENTRIES = (None,) + HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(HeaderTable.STATIC_TABLE)

_encoded_fields = {}
_decoded_strings = {}
_decoded_blocks = {}


def _hpack_int(n, prefix_bits, flags):
    limit = (1 << prefix_bits) - 1
    if n < limit:
        return bytes((flags | n,))
    out = bytearray((flags | limit,))
    n -= limit
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _hpack_string(s):
    h = _huffman(s)
    if len(h) < len(s):
        return _hpack_int(len(h), 7, 0x80) + h
    return _hpack_int(len(s), 7, 0) + s


def _encode_field(name, value, sensitive):
    """
    One header field without the dynamic table: indexed when it is in the static table, otherwise a literal
    "without indexing" (or "never indexed" when C{sensitive}) naming a static name where there is one.
    """
    static = _STATIC.get(name)
    if static is not None:
        index = static[1].get(value)
        if index is not None:
            return bytes((0x80 | index,))
        return _hpack_int(static[0], 4, 0x10 if sensitive else 0) + _hpack_string(value)
    return (b"\x10" if sensitive else b"\x00") + _hpack_string(name) + _hpack_string(value)


class LeanEncoder:
    """
    The HPACK encoder of a connection (in place of hpack's): fields are never added to the dynamic table, so
    the encoding of a field is the same on every connection and every block, and is cached.

    A field given as an hpack C{HeaderTuple} that is not indexable (C{NeverIndexedHeaderTuple}, as the decoder
    reports one) is sent as "never indexed", so the peer keeps it out of its tables too.
    """

    def __init__(self):
        self._table_size = HeaderTable.DEFAULT_SIZE
        self._size_updates = []

    @property
    def header_table_size(self):
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value):
        # The peer changed SETTINGS_HEADER_TABLE_SIZE: say which size we use, as hpack's encoder would.
        if value != self._table_size:
            self._table_size = value
            self._size_updates.append(value)

    def encode(self, headers, huffman=True):
        out = []
        if self._size_updates:
            out.extend(_hpack_int(size, 5, 0x20) for size in self._size_updates)
            self._size_updates = []
        cache = _encoded_fields
        for field in headers:
            if type(field) is not tuple:
                # hpack's HeaderTuple, possibly never indexed; rare, not cached.
                out.append(_encode_field(field[0], field[1], not getattr(field, "indexable", True)))
                continue
            encoded = cache.get(field)
            if encoded is None:
                name, value = field
                encoded = _encode_field(name, value, False)
                if len(name) + len(value) <= _CACHE_MAX_BYTES:
                    if len(cache) >= _CACHE_ENTRIES:
                        cache.clear()
                    cache[field] = encoded
            out.append(encoded)
        return b"".join(out)


def _hpack_varint(data, i, number):
    """
    The rest of an HPACK integer whose prefix held C{number} (all ones); C{data[i]} is its first continuation
    byte. Returns C{(value, index after it)}.
    """
    shift = 0
    while True:
        byte = data[i]
        i += 1
        number += (byte & 127) << shift
        if byte < 128:
            return number, i
        shift += 7
        if shift > 28:
            raise HPACKDecodingError("HPACK integer representation is too long")


class LeanDecoder(Decoder):
    """
    hpack's decoder with a lean C{decode}: the same table, limits and errors, without a log call and a few
    objects per field, and with huffman strings cached.

    A block that neither reads nor changes the dynamic table decodes the same on any connection: such blocks
    are cached whole. Encoders that do not index send nothing else (the proxy itself, see L{LeanEncoder}; nginx,
    whose "incremental indexing" fields change nothing once it has sized the table to 0).

    Fields come back as C{(name, value)} byte tuples, or as C{NeverIndexedHeaderTuple} for "never indexed" ones.
    """

    def decode(self, data, raw=False):
        if type(data) is not bytes:
            data = bytes(data)
        limit = self.max_header_list_size
        cached = _decoded_blocks.get(data)
        if cached is not None and cached[2] and self.header_table.maxsize:
            cached = None  # it indexes fields, which only a table of size 0 ignores
        if cached is None:
            headers, size, stateless, indexes = self._decode_block(data, limit)
            if stateless and len(data) <= _BLOCK_CACHE_MAX_BYTES:
                if len(_decoded_blocks) >= _BLOCK_CACHE_ENTRIES:
                    _decoded_blocks.clear()
                _decoded_blocks[data] = (tuple(headers), size, indexes)
        else:
            fields, size, _ = cached
            if size > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
            headers = list(fields)
        self._assert_valid_table_size()
        if not raw:
            return [(n.decode("utf-8"), v.decode("utf-8")) for n, v in headers]
        return headers

    def _decode_block(self, data, limit):
        """
        @return: C{(fields, size, stateless, indexes)}: C{size} as counted against C{limit}; C{stateless} when
            the block neither read nor changed the dynamic table; C{indexes} when it has fields to add to it,
            which changed nothing only because the table's size is 0.
        """
        table = self.header_table
        entry = table.get_by_index
        static = _STATIC_ENTRIES
        headers = []
        size = 0
        stateless = True
        indexes = False
        i = 0
        end = len(data)
        while i < end:
            byte = data[i]
            i += 1
            if byte & 0x80:
                # Indexed field.
                index = byte & 0x7F
                if 0 < index <= _STATIC_COUNT:
                    field = static[index]
                else:
                    if index == 0x7F:
                        index, i = _hpack_varint(data, i, index)
                    field = entry(index)
                    stateless = False
            elif byte & 0x40 or not byte & 0x20:
                # Literal field: with incremental indexing (01xxxxxx), without (0000xxxx), never indexed (0001xxxx).
                if byte & 0x40:
                    index = byte & 0x3F
                    if index == 0x3F:
                        index, i = _hpack_varint(data, i, index)
                else:
                    index = byte & 0x0F
                    if index == 0x0F:
                        index, i = _hpack_varint(data, i, index)
                if not index:
                    name, i = self._string(data, i)
                elif index <= _STATIC_COUNT:
                    name = static[index][0]
                else:
                    name = entry(index)[0]
                    stateless = False
                value, i = self._string(data, i)
                if byte & 0x40:
                    table.add(name, value)
                    if table.maxsize:
                        stateless = False
                    indexes = True
                    field = (name, value)
                elif byte & 0x10:
                    field = NeverIndexedHeaderTuple(name, value)
                else:
                    field = (name, value)
            else:
                # Dynamic table size update (001xxxxx): only before the first field.
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                new_size = byte & 0x1F
                if new_size == 0x1F:
                    new_size, i = _hpack_varint(data, i, new_size)
                if new_size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = new_size
                stateless = False
                continue
            headers.append(field)
            size += 32 + len(field[0]) + len(field[1])
            if size > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        return headers, size, stateless, indexes

    @staticmethod
    def _string(data, i):
        byte = data[i]
        i += 1
        length = byte & 0x7F
        if length == 0x7F:
            length, i = _hpack_varint(data, i, length)
        end = i + length
        if end > len(data):
            raise HPACKDecodingError("Truncated header block")
        s = data[i:end]
        if byte & 0x80:
            cache = _decoded_strings
            decoded = cache.get(s)
            if decoded is None:
                decoded = decode_huffman(s)
                if length <= _CACHE_MAX_BYTES:
                    if len(cache) >= _CACHE_ENTRIES:
                        cache.clear()
                    cache[s] = decoded
            s = decoded
        return s, end


# -- Frames ------------------------------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4


class OutFrame:
    """
    A DATA, HEADERS or CONTINUATION frame we send, serialized at once: all that h2 does with a frame it queues
    is to read its C{body_len} and C{serialize()} it. hyperframe's frame objects cost a flag set, padding and
    priority fields, and a walk over the flags to serialize; these frames carry none of that.
    """

    __slots__ = ("body_len", "_wire")

    def __init__(self, kind, flags, stream_id, body):
        n = len(body)
        self.body_len = n
        self._wire = _FRAME_HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + body

    def serialize(self):
        return self._wire


def header_frames(stream_id, block, max_size, end_stream):
    """
    A header block as a HEADERS frame followed, when it is larger than C{max_size}, by CONTINUATION frames.
    """
    first = _END_STREAM if end_stream else 0
    if len(block) <= max_size:
        return [OutFrame(_HEADERS, first | _END_HEADERS, stream_id, block)]
    chunks = [block[i:i + max_size] for i in range(0, len(block), max_size)]
    last = len(chunks) - 1
    return [
        OutFrame(_CONTINUATION if i else _HEADERS, (0 if i else first) | (_END_HEADERS if i == last else 0),
                  stream_id, chunk)
        for i, chunk in enumerate(chunks)
    ]


class _Received:
    """
    A frame read by L{LeanFrameBuffer}, parsed by hyperframe's C{parse_body}, without hyperframe's per-frame set-up:
    its flags are a plain set of the flag names.
    """

    def __init__(self, stream_id):
        self.stream_id = stream_id
        self.flags = set()
        self.body_len = 0
        self.pad_length = 0
        self.data = b""


class _ReceivedHeaders(_Received, HeadersFrame):
    # Set by parse_body when the frame carries priority data.
    depends_on = 0
    stream_weight = 0
    exclusive = False


class _ReceivedData(_Received, DataFrame):
    pass


_RECEIVED = {
    _DATA: (_ReceivedData, tuple(DataFrame.defined_flags)),
    _HEADERS: (_ReceivedHeaders, tuple(HeadersFrame.defined_flags)),
}


class LeanFrameBuffer(FrameBuffer):
    """
    h2's frame buffer, with the two frames of every request (HEADERS and DATA) made as L{_ReceivedHeaders} and
    L{_ReceivedData}: the same checks and hyperframe's parsing of the body, at a third of the cost. Every other
    frame goes through h2's own code.

    A frame longer than the maximum frame size is refused as soon as its header arrives. h2 waits for the whole
    frame first, so a peer announcing a 16 MiB frame could make it buffer that much per connection; here what is
    buffered stays within one frame of the size we allow.
    """

    def __next__(self):
        data = self._data
        if len(data) < 9:
            raise StopIteration
        hi, lo, kind, flag_byte, stream_id = _FRAME_HEADER.unpack_from(data)
        length = (hi << 8) + lo
        self._validate_frame_length(length)
        lean = _RECEIVED.get(kind)
        if lean is None:
            return FrameBuffer.__next__(self)
        if len(data) < length + 9:
            raise StopIteration
        stream_id &= 0x7FFFFFFF
        if not stream_id:
            raise ProtocolError("Received frame with invalid header: a DATA or HEADERS frame on stream 0")
        cls, defined = lean
        frame = cls(stream_id)
        flags = frame.flags
        for name, bit in defined:
            if flag_byte & bit:
                flags.add(name)
        try:
            frame.parse_body(memoryview(data[9:9 + length]))
        except InvalidDataError as err:
            raise ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise FrameDataMissingError("Frame data missing or invalid") from err
        del data[:9 + length]
        frame = self._update_header_buffer(frame)
        return frame if frame is not None else self.__next__()


class LeanStream(H2Stream):
    """
    An L{H2Stream} for connections whose header validation and normalisation are off (all of the proxy's).

    h2 still builds validation flags for every header block, re-encodes every sent block as UTF-8 and copies
    every received one, although with validation off nothing reads the flags and the blocks are already the
    byte pairs it would produce. This stream skips that work; the state machine, flow control and the
    content-length checks are h2's own.

    Header blocks given to L{send_headers} must be C{(bytes, bytes)} pairs (or hpack C{HeaderTuple}s of bytes).
    """

    def send_headers(self, headers, encoder, end_stream=False):
        machine = self.state_machine
        client = machine.client
        method = None
        informational = False
        for name, value in headers:
            if name[:1] != b":":
                break
            if name == b":status":
                informational = value[:1] == b"1"
            elif name == b":method":
                method = value
        if informational and not client:
            if end_stream:
                raise ProtocolError("Cannot set END_STREAM on informational responses.")
            machine.process_input(StreamInputs.SEND_INFORMATIONAL_HEADERS)
        else:
            machine.process_input(StreamInputs.SEND_HEADERS)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        elif machine.trailers_sent:
            raise ProtocolError("Trailers must have END_STREAM set.")
        # h2 reads the request method to expect no body after a response to HEAD.
        self.request_method = method
        return header_frames(self.stream_id, encoder.encode(headers), self.max_outbound_frame_size, end_stream)

    def send_data(self, data, end_stream=False, pad_length=None):
        if pad_length is not None:
            return H2Stream.send_data(self, data, end_stream, pad_length)
        machine = self.state_machine
        machine.process_input(StreamInputs.SEND_DATA)
        if type(data) is not bytes:
            data = bytes(data)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        self.outbound_flow_control_window -= len(data)
        return [OutFrame(_DATA, _END_STREAM if end_stream else 0, self.stream_id, data)]

    def end_stream(self):
        self.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        return [OutFrame(_DATA, _END_STREAM, self.stream_id, b"")]

    def _build_hdr_validation_flags(self, events):
        return None

    def _process_received_headers(self, headers, header_validation_flags, header_encoding):
        return headers if type(headers) is list else list(headers)


class LeanConnection(H2Connection):
    """
    An L{H2Connection} on which GOAWAY is graceful: the frame is reported as L{ConnectionTerminated} but the
    connection stays open, so streams the GOAWAY lets finish can finish.

    It also counts open streams lazily (L{_open_streams}), makes its streams L{LeanStream}s, does not build a
    trace message for every frame received (L{_receive_frame}), and remembers only the last
    L{CLOSED_STREAMS_KEPT} closed streams.

    These override private methods of h2, whose version C{setup.cfg} bounds for that reason; the tests in
    C{tests/test_h2.py} and the interop tests exercise each of them.
    """

    # A walk over the streams is due once this many are held (see _open_streams).
    _walk_at = 0

    def __init__(self, config):
        H2Connection.__init__(self, config=config)
        self._outbound_parity = int(config.client_side)
        self.incoming_buffer = LeanFrameBuffer(server=not config.client_side)
        self._closed_streams = SizeLimitDict(size_limit=CLOSED_STREAMS_KEPT)
        self._frame_dispatch_table[_ReceivedHeaders] = self._receive_headers_frame
        self._frame_dispatch_table[_ReceivedData] = self._receive_data_frame

    def _begin_new_stream(self, stream_id, allowed_ids):
        """
        h2's own, making a L{LeanStream}.
        """
        outbound = (stream_id & 1) == self._outbound_parity
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        if stream_id <= highest:
            raise StreamIDTooLowError(stream_id, highest)
        if (stream_id & 1) != int(allowed_ids):
            raise ProtocolError("Invalid stream ID for peer.")
        stream = LeanStream(
            stream_id, config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size,
        )
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = stream
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return stream

    def _receive_frame(self, frame):
        """
        h2's own without its trace line, whose C{repr(frame)} is built for every frame even when nothing logs
        it (about 5% of the proxy's CPU on HTTP/2).
        """
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # A stream we reset: answer with RST_STREAM; otherwise a connection error.
            if not self._stream_is_closed_by_reset(e.stream_id):
                raise
            f = RstStreamFrame(e.stream_id)
            f.error_code = e.error_code
            self._prepare_for_sending([f])
            events = e._events
        except StreamIDTooLowError as e:
            # A stream reset by us is a stream error; one ended normally or closed implicitly, a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _open_streams(self, remainder):
        """
        h2 walks every stream it holds to count the open ones (dropping the closed ones) each time a stream
        opens, which is O(streams) per request on a busy multiplexed connection. Its only callers
        (C{open_outbound_streams}, C{open_inbound_streams}) compare the count with the concurrency limit, and
        the number of streams held is an upper bound of it: the walk happens only when that bound reaches the
        limit, or when the streams held have doubled since the last walk (to drop the closed ones).

        @return: the number of open streams of that parity, or an upper bound of it below the limit.
        """
        held = len(self.streams)
        if held < self._walk_at:
            if remainder == self._outbound_parity:
                limit = self.remote_settings.max_concurrent_streams
            else:
                limit = self.local_settings.max_concurrent_streams
            if held < limit:
                return held
        count = H2Connection._open_streams(self, remainder)
        self._walk_at = 2 * len(self.streams) + 32
        return count

    def drop_closed(self, stream_id):
        """
        Forget stream C{stream_id} now if it is closed, as h2's walk in C{_open_streams} would, so the streams
        held stay close to the open ones and that walk is seldom due.
        """
        stream = self.streams.get(stream_id)
        if stream is not None and stream.state_machine.state is _CLOSED:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by

    def _receive_goaway_frame(self, frame):
        event = ConnectionTerminated()
        event.error_code = _error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def new_connection(config, client, max_header_bytes, stream_window, connection_window, max_concurrent_streams):
    """
    An h2 connection with the lean parts installed: a L{LeanConnection} using L{LeanEncoder} and L{LeanDecoder},
    its local SETTINGS current from the start, its preface queued.

    @param config: the C{H2Configuration} (client or server side).
    @param client: C{True} for a connection we open to an endpoint.
    @param max_header_bytes: the soft limit on a header block; the hard limit h2 enforces is twice it.
    @param stream_window: the per-stream receive window to advertise (SETTINGS_INITIAL_WINDOW_SIZE).
    @param connection_window: the connection receive window to grant.
    @param max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS for an accepted connection.
    """
    conn = LeanConnection(config=config)
    conn.encoder = LeanEncoder()
    conn.decoder = LeanDecoder()
    # h2 enforces its decoder limit as a connection error; keep that as the hard cap at twice the soft limit,
    # over which a single request only gets 431.
    hard = 2 * max_header_bytes
    values = {
        SettingCodes.MAX_HEADER_LIST_SIZE: hard,
        SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
    }
    if client:
        values[SettingCodes.ENABLE_PUSH] = 0
    else:
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
    # Values given at construction are current at once (not pending an ACK), so h2 enforces them from the start.
    conn.local_settings = Settings(client=client, initial_values=values)
    conn.decoder.max_header_list_size = hard
    conn.initiate_connection()
    conn.increment_flow_control_window(connection_window - 65535)
    return conn
