"""
HTTP/1 framing helpers around httptools: head serialisation, chunked framing, the proxy's own error responses,
authority rules and the limits the HTTP/1 glue enforces.

Sans-I/O: nothing here reads a clock or touches a socket. The glue in L{linkproxy.net.http1} feeds parser events
in and writes the bytes these functions return.
"""

from linkproxy.core.errors import REASON_PHRASES
from linkproxy.core.headers import CLIENT_ID, DST_OVERRIDE, HOP_BY_HOP, PROXY_ERROR, normalize_authority

#: Bytes of pipelined requests (or of a request body waiting for its upstream) held before the client is paused.
MAX_HELD_BYTES = 65536

#: Request body bytes kept, while no response byte has arrived, so a request can be replayed once on a fresh
#: connection when a reused one turns out to be stale. Past this the request is not retried.
MAX_REPLAY_BYTES = 65536

#: Methods a proxy may repeat without changing the outcome (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

LAST_CHUNK = b"0\r\n\r\n"

_CRLF = b"\r\n"
_SEP = b": "

# Framing the proxy sets itself; whatever the sender said is replaced.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

# Headers set aside by HeadCollector.add: hop-by-hop ones, framing, and the ones the proxy rewrites or reads.
_SPECIAL = HOP_BY_HOP | _FRAMING | {CLIENT_ID, DST_OVERRIDE, b"host", b"grpc-status"}

_STATUS_LINES = {}

# Status lines with the reason phrase an upstream sent, by (status, reason): upstreams repeat a handful of them,
# and formatting one costs more than the lookup. Bounded in entries and in value size, since peers choose them.
_REASON_LINES = {}
# Connection header values seen, parsed into their lower-cased tokens (frozensets). Bounded like the above.
_CONNECTION_TOKENS = {}
_MAX_CACHED = 64
_MAX_CACHED_VALUE = 64


def status_line(status, reason=None):
    """
    The C{HTTP/1.1} status line for C{status}, CRLF included.

    @param status: an C{int}.
    @param reason: the reason phrase as bytes; C{None} uses the standard one (cached).
    """
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is None:
            line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _reason_phrase(status))
        return line
    line = _REASON_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_REASON_LINES) < _MAX_CACHED and len(reason) <= _MAX_CACHED_VALUE:
            _REASON_LINES[(status, reason)] = line
    return line


def _reason_phrase(status):
    phrase = REASON_PHRASES.get(status)
    if phrase is not None:
        return phrase
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def serialize_request_head(method, target, headers):
    """
    An C{HTTP/1.1} request head in one join.

    @param method: e.g. C{b"GET"}.
    @param target: the request-target as received.
    @param headers: C{(name, value)} byte pairs, including the framing headers to send.
    @return: the head bytes, ending with the blank line.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def serialize_response_head(status, reason, headers):
    """
    An C{HTTP/1.1} response head in one join.

    @param status: an C{int}.
    @param reason: the reason phrase bytes, or C{None} (or empty) for the standard one.
    @param headers: C{(name, value)} byte pairs, including framing and C{connection}.
    """
    parts = [status_line(status, reason or None)]
    for name, value in headers:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def chunk_prefix(size):
    """
    The size line that opens a chunk of C{size} bytes (C{size > 0}: an empty chunk would end the body).
    """
    return b"%x\r\n" % size


def encode_chunk(data):
    """
    One complete chunk carrying C{data}; C{b""} for empty data, which must not be framed.
    """
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers=()):
    """
    The terminating chunk, with trailer fields when there are any.
    """
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, _SEP, value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def error_response(status, reason, close=True):
    """
    A response the proxy makes itself: status line, C{l5d-proxy-error}, C{content-length}, C{connection} and a
    short text body.

    @param status: an C{int} such as 502.
    @param reason: the L{ProxyError.reason} text; control characters are replaced so it is a valid header value.
    @param close: C{True} to announce C{connection: close}, else C{connection: keep-alive}.
    @return: the whole response as bytes.
    """
    text = _header_safe(reason)
    body = text + b"\n"
    return b"".join((
        status_line(status),
        PROXY_ERROR, _SEP, text, _CRLF,
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n" if close else b"connection: keep-alive\r\n\r\n",
        body,
    ))


def _header_safe(text):
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    return bytes(b if 0x20 <= b < 0x7F else 0x3F for b in text[:200])


def split_absolute_form(target):
    """
    Split an absolute-form request-target into its scheme's default port and its authority.

    @param target: the request-target bytes.
    @return: C{(authority, default_port)}, or C{None} when C{target} is not absolute-form http(s).
    """
    if target[:1] == b"/" or b"://" not in target:
        return None
    scheme, _, rest = target.partition(b"://")
    scheme = scheme.lower()
    if scheme == b"http":
        port = 80
    elif scheme == b"https":
        port = 443
    else:
        return None
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        i = rest.find(delimiter)
        if 0 <= i < end:
            end = i
    return rest[:end], port


def origin_form(target, headers):
    """
    The origin-form of an absolute-form request, as a proxy sends it on to an origin server (RFC 9112
    3.2.1): the path and query alone, with C{Host} replaced by the target's authority (3.2.2).

    @param target: an absolute-form request-target, e.g. C{b"http://web:8080/a?b"}.
    @param headers: the request's C{(name, value)} pairs (not changed).
    @return: C{(target, headers)}; both unchanged when C{target} is not absolute-form http(s).
    """
    split = split_absolute_form(target)
    if split is None:
        return target, headers
    authority = split[0]
    rest = target[target.find(b"://") + 3 + len(authority):]
    fragment = rest.find(b"#")
    if fragment >= 0:
        rest = rest[:fragment]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    out = [(b"host", authority)]
    out += [pair for pair in headers if pair[0] != b"host"]
    return rest, out


def request_authority(target, host, method=b"GET"):
    """
    The logical target of a request: the authority of an absolute-form URI, else the C{Host} header.

    @param target: the request-target bytes.
    @param host: the C{Host} header value, or C{None}.
    @param method: for C{CONNECT} the target is itself the authority.
    @return: C{"host:port"} (see L{normalize_authority}), or C{None} when no valid authority is given.
    """
    if method == b"CONNECT":
        return normalize_authority(target, 443)
    split = split_absolute_form(target)
    if split is not None:
        return normalize_authority(split[0], split[1])
    if host is None:
        return None
    return normalize_authority(host, 80)


def is_idempotent(method):
    """
    C{True} when C{method} may be repeated safely (RFC 9110 9.2.2).
    """
    return method in IDEMPOTENT_METHODS


def response_has_body(request_method, status):
    """
    Whether a response carries a body on the wire: never to C{HEAD}, never for 1xx, 204 and 304 (RFC 9112 6.3).
    """
    if request_method == b"HEAD":
        return False
    return not (status < 200 or status == 204 or status == 304)


class HeadCollector:
    """
    Collects one message head as httptools reports its fields, setting hop-by-hop and framing fields aside.

    One per connection direction, reset per message, so the per-request cost is one list. The result of
    L{finish} equals C{set_client_id(strip_hop_by_hop(headers), ...)} minus the framing headers, which the
    proxy sets itself; the equivalence is tested.

    @ivar headers: the end-to-end C{(name, value)} pairs, names lower-cased, in order.
    @ivar size: bytes of the head seen so far (names, values and separators).
    @ivar host: the C{Host} value, or C{None}.
    @ivar content_length: the C{Content-Length} value bytes, or C{None}.
    @ivar chunked: C{True} when a C{Transfer-Encoding} was given.
    @ivar transfer_encoding: the C{Transfer-Encoding} value bytes (several fields joined with C{", "}, as
        RFC 9110 5.3 combines them), or C{None}; see L{request_framing_error}.
    @ivar connection: C{Connection} tokens seen, lower-cased, as a C{frozenset} (C{None} when there were none).
    @ivar upgrade: the C{Upgrade} value, or C{None}.
    @ivar grpc_status: the C{grpc-status} value as text, or C{""}.
    @ivar dst_override: the C{l5d-dst-override} value, or C{None}.
    """

    __slots__ = ("headers", "size", "host", "content_length", "chunked", "transfer_encoding", "connection",
                 "upgrade", "grpc_status", "dst_override", "_extra")

    def __init__(self):
        self.reset()

    def reset(self):
        """
        Start a new head.
        """
        self.headers = []
        self.size = 0
        self.host = None
        self.content_length = None
        self.chunked = False
        self.transfer_encoding = None
        self.connection = None
        self.upgrade = None
        self.grpc_status = ""
        self.dst_override = None
        self._extra = None

    def add(self, name, value):
        """
        One field as httptools reported it (name in any case).
        """
        name = name.lower()
        self.size += len(name) + len(value) + 4
        if name not in _SPECIAL:
            self.headers.append((name, value))
            return
        if name == b"host":
            if self.host is None:
                self.host = value
            self.headers.append((name, value))
        elif name == b"content-length":
            self.content_length = value
        elif name == b"transfer-encoding":
            self.chunked = True
            # Kept whole so the request side can refuse anything but a lone "chunked" (request_framing_error).
            te = self.transfer_encoding
            self.transfer_encoding = value if te is None else te + b", " + value
        elif name == b"connection":
            tokens = _connection_tokens(value)
            if self.connection is None:
                self.connection = tokens
            else:
                self.connection = self.connection | tokens
        elif name == b"upgrade":
            self.upgrade = value
        elif name == DST_OVERRIDE:
            # Kept end to end; the outbound proxy routes by it only when --dst-override is on.
            self.dst_override = value
            self.headers.append((name, value))
        elif name == b"grpc-status":
            self.grpc_status = value.decode("ascii", "replace").strip()
            self.headers.append((name, value))
        # Every other special name is hop-by-hop, or l5d-client-id, which finish() re-adds for meshed peers.

    def finish(self, client_id=None):
        """
        The end-to-end headers to forward, with C{Connection}-named fields removed and C{l5d-client-id} applied.

        @param client_id: the peer's verified identity for requests from meshed clients; C{None} otherwise.
        @return: the list of C{(name, value)} pairs (the collector's own list, extended in place).
        """
        headers = self.headers
        connection = self.connection
        # The subset test allocates nothing: the usual Connection values (keep-alive, close) name no field.
        if connection and not connection <= HOP_BY_HOP:
            extra = connection - HOP_BY_HOP
            headers[:] = [(n, v) for n, v in headers if n not in extra]
        if client_id:
            headers.append((CLIENT_ID, client_id.encode("ascii")))
        return headers

    @property
    def wants_close(self):
        """
        C{True} when the sender said C{Connection: close}.
        """
        return self.connection is not None and b"close" in self.connection


def _connection_tokens(value):
    """
    The lower-cased tokens of a C{Connection} value, as a C{frozenset} (cached for values seen often).
    """
    tokens = _CONNECTION_TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",")) - {b""}
        if len(_CONNECTION_TOKENS) < _MAX_CACHED and len(value) <= _MAX_CACHED_VALUE:
            _CONNECTION_TOKENS[value] = tokens
    return tokens


def parse_content_length(value):
    """
    @param value: the C{Content-Length} bytes.
    @return: the length as an C{int}, or C{None} when it is not a plain decimal number.
    """
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def is_chunked_only(value):
    """
    C{True} when a C{Transfer-Encoding} value is exactly the one coding C{chunked}: case-insensitive, with
    optional whitespace around it, and nothing else (no list, no empty list element, no parameter).

    The surrounding whitespace accepted is what llhttp itself reads as C{chunked} (leading spaces or tabs,
    trailing spaces), so the proxy and its parser never disagree about where a body ends.

    @param value: the field value bytes.
    """
    return value.lstrip(b" \t").rstrip(b" ").lower() == b"chunked"


def request_framing_error(req, version):
    """
    Why a request that has a C{Transfer-Encoding} cannot be framed safely, or C{None} when it can.

    httptools (llhttp) already refuses C{Content-Length} with C{Transfer-Encoding}, repeated or non-numeric
    C{Content-Length}, C{chunked} given twice, and a few obfuscations; it accepts other codings before
    C{chunked} (C{gzip, chunked}), empty list elements (C{, chunked}), several C{Transfer-Encoding} fields, and
    C{Transfer-Encoding} on HTTP/1.0 requests. Each of those is a way to make two parsers disagree about where
    a request ends (request smuggling), and the proxy decodes no coding but C{chunked}, so only a single field
    that is exactly C{chunked} (L{is_chunked_only}) on an HTTP/1.1 request is accepted.

    Called only for requests that have a C{Transfer-Encoding}, so ordinary requests pay nothing for it.

    @param req: the request's L{HeadCollector}.
    @param version: the request's HTTP version as httptools reports it (C{"1.1"}, C{"1.0"}).
    @return: the reason for a 400 as text, or C{None}.
    """
    if req.content_length is not None:
        return "transfer-encoding with content-length"
    if version != "1.1":
        return f"transfer-encoding in an HTTP/{version} request"
    if not is_chunked_only(req.transfer_encoding):
        # Several fields were joined with ", ", so a repeated field is caught here too.
        return "transfer-encoding other than a lone chunked"
    return None
