"""
HTTP/1 carried as HTTP/2 between proxies (C{--h2-upgrade on}, C{l5d-orig-proto}).

Outbound, L{UpgradingPool} stands in for the direction's L{linkproxy.net.http1.Http1Pool}. For a meshed endpoint
it hands L{Http1ServerProtocol} an L{H2Exchange} instead of an upstream HTTP/1 connection: an object with the
same face (C{attach}, C{out}, C{flush}, C{detach}, C{close}, C{abort}, C{pause_reading}, ...) that carries the
exchange as one stream of the direction's L{linkproxy.net.h2.H2Pool}. The pool connects to the peer proxy with
session protocol C{http2} in the transport header, so one mTLS connection carries every request in flight.

    client ─HTTP/1─▶ Http1ServerProtocol ─out─▶ H2Exchange ─stream─▶ H2Pool connection ══ mTLS h2 ══▶ peer proxy
    client ◀─HTTP/1─ Http1ServerProtocol ◀─_response_*── H2Exchange ◀─up_head/DATA/trailers──┘

The exchange re-parses the request head and body that the HTTP/1 server serialised for its upstream (httptools,
a few microseconds), so every rule of the HTTP/1 side (hop-by-hop headers, framing, held and pipelined requests,
the one retry on a stale connection, timeouts) applies unchanged; it then sends C{:method}, C{:scheme http},
C{:authority} (absolute-form authority, else C{Host}), C{:path}, the end-to-end headers and
C{l5d-orig-proto: HTTP/1.1}. The response comes back through the HTTP/1 server's own response path, which frames
it for the client (C{content-length} when known, else chunked with the trailers, or close-delimited for HTTP/1.0).

Inbound, an L{H2ServerProtocol} accepted from a meshed peer builds its streams with L{downgrading_streams}: a
stream carrying C{l5d-orig-proto} becomes an L{Http1Stream}, whose upstream is an L{_H1Upstream} (one HTTP/1
connection from the direction's HTTP/1 pool to the app, with the face of a pooled HTTP/2 connection towards the
stream and the face of the HTTP/1 server towards the L{Http1ClientProtocol}). The app gets an HTTP/1.1 request
without C{l5d-orig-proto}; its response is sent back on the stream, marked C{l5d-orig-proto: HTTP/1.1}.

Flow control and backpressure:
    - Request bodies outbound go through an h2 L{Half}: what is queued for the stream's window is bounded; past
      one stream window the HTTP/1 client's reading is paused.
    - Response DATA outbound is acknowledged to the peer as it is handed to the client, but not while the client's
      transport is full (the exchange is paused), so the peer's window closes instead of the proxy buffering.
    - Inbound, request DATA is acknowledged to the peer as it is written to the app, and not while the app's
      transport is full; the app's response is read as the peer's stream window allows (reading from the app
      pauses past one stream window queued).
"""

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.defer import CancelledError, succeed
from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.core import http1 as h1
from linkproxy.core.errors import BadRequest, Unreachable
from linkproxy.core.headers import HOP_BY_HOP, ORIG_PROTO
from linkproxy.net.exchange import IHttp1Downstream, IHttp1Upstream, IStreamDownstream, IStreamEnd
from linkproxy.net.h2 import STREAM_WINDOW, Half, Stream
from linkproxy.net.http1 import PAUSE_UPSTREAM_FULL

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

log = Logger(namespace="linkproxy.net.orig_proto")

#: The value of C{l5d-orig-proto} the proxy sends, on upgraded requests and on downgraded responses.
HTTP11 = b"HTTP/1.1"
_ORIG_PROTO_FIELD = (ORIG_PROTO, HTTP11)

_CANCEL = ErrorCodes.CANCEL
_REFUSED_STREAM = ErrorCodes.REFUSED_STREAM

_CRLF = b"\r\n"
_SCHEME = (b":scheme", b"http")
# Request methods that always carry a length in HTTP/1.1 even when the body is empty (RFC 9110 8.6).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_ZERO_LENGTH = (b"content-length", b"0")
_CHUNKED = (b"transfer-encoding", b"chunked")
# Flow-control window the HTTP/1 side offers the stream machinery: its backpressure is the transport's.
_UNBOUNDED = 1 << 30


# -- header translation (pure) --------------------------------------------------------------------------------------

def h2_request_headers(method, target, fields):
    """
    The HTTP/2 header block for an HTTP/1 request, marked with C{l5d-orig-proto}.

    @param method: the method bytes.
    @param target: the request-target as sent (origin-form, absolute-form or C{*}).
    @param fields: the HTTP/1 C{(name, value)} pairs, names lower-case.
    @return: a list of C{(name, value)} pairs: the pseudo-headers first, then the end-to-end fields (hop-by-hop
        ones and C{host} dropped, C{te: trailers} kept), then C{l5d-orig-proto: HTTP/1.1}.
    """
    authority = None
    out = []
    for pair in fields:
        name = pair[0]
        if name in HOP_BY_HOP:
            if name == b"te" and pair[1].strip().lower() == b"trailers":
                out.append(pair)
            continue
        if name == b"host":
            if authority is None:
                authority = pair[1]
            continue
        if name == ORIG_PROTO:
            continue
        out.append(pair)
    path = target
    split = h1.split_absolute_form(target)
    if split is not None:
        authority = split[0]
        rest = target.partition(b"://")[2][len(authority):]
        path = rest if rest[:1] == b"/" else b"/" + rest
    head = [(b":method", method), _SCHEME, (b":authority", authority or b""), (b":path", path or b"/")]
    head += out
    head.append(_ORIG_PROTO_FIELD)
    return head


def h1_request_head(headers, ended):
    """
    The HTTP/1.1 request head for a downgraded HTTP/2 request.

    @param headers: the stream's C{(name, value)} pairs (pseudo-headers included, C{l5d-orig-proto} removed).
    @param ended: C{True} when the request has no body (END_STREAM came with the headers).
    @return: C{(method, head bytes, framing)} where C{framing} is C{None} (no body or C{content-length}:
        raw body bytes) or C{"chunked"}, and the declared length (or C{None}) as C{int}.
    @raise BadRequest: the C{content-length} is not a length the HTTP/1 head can carry, or the stream ended
        without the body it declares (h2 checks DATA against it, but not a stream ended by its HEADERS): the
        app would wait for bytes that never come and read the next request on the connection as them.
    """
    method = path = authority = host = None
    length = None
    fields = []
    for pair in headers:
        name = pair[0]
        if name[:1] == b":":
            if name == b":method":
                method = pair[1]
            elif name == b":path":
                path = pair[1]
            elif name == b":authority":
                authority = pair[1]
            continue
        if name == b"host":
            host = pair[1]
            continue
        if name == b"content-length":
            length = h1.parse_content_length(pair[1])
            if length is None:
                raise BadRequest("invalid content-length")
            continue
        if name in HOP_BY_HOP:
            continue
        fields.append((name, pair[1]) if type(pair) is not tuple else pair)
    authority = authority or host or b""
    out = [(b"host", authority)]
    out += fields
    chunked = False
    if ended:
        if length:
            raise BadRequest(f"content-length {length} but the stream ended without a body")
        if length is not None:
            out.append((b"content-length", b"%d" % length))
        elif method in _BODY_METHODS:
            out.append(_ZERO_LENGTH)
    elif length is not None:
        out.append((b"content-length", b"%d" % length))
    else:
        out.append(_CHUNKED)
        chunked = True
    return method, h1.serialize_request_head(method, path or b"/", out), chunked, length


def h1_response_head(headers):
    """
    Split an HTTP/2 response head for the HTTP/1 side.

    @return: C{(status, collector)}: the C{:status} as C{int} (C{None} when missing or invalid), and a
        L{linkproxy.core.http1.HeadCollector} holding the other fields (C{l5d-orig-proto} dropped).
    """
    status = None
    resp = h1.HeadCollector()
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status" and value.isdigit() and len(value) == 3:
                status = int(value)
            continue
        if name == ORIG_PROTO:
            continue
        resp.add(name, value)
    return status, resp


def _trailer_fields(headers):
    return [(name, value) for name, value in headers if name[:1] != b":" and name not in HOP_BY_HOP]


# -- outbound: HTTP/1 exchanges carried as HTTP/2 streams -----------------------------------------------------------

class UpgradingPool:
    """
    The outbound HTTP/1 pool with C{--h2-upgrade on}: exchanges with meshed endpoints become L{H2Exchange}s on the
    direction's L{H2Pool}; everything else is the plain L{Http1Pool}'s.

    @ivar plain: the L{linkproxy.net.http1.Http1Pool} (also used for upgrade requests, which stay HTTP/1).
    """

    def __init__(self, plain, settings):
        self.plain = plain
        self._settings = settings
        self.max_header_bytes = plain.max_header_bytes

    def __len__(self):
        return len(self.plain)

    def _upgrades(self, endpoint):
        return endpoint.meshed and getattr(self._settings.connector, "meshed", None) is not None

    def _h2_pool(self):
        return self._settings.h2_pool

    def checkout(self, endpoint, now):
        """
        An exchange for C{endpoint}: an L{H2Exchange} when it is meshed (the HTTP/2 connection is shared, so
        this counts as a reused connection: a refused stream is retried once), else an idle HTTP/1 connection.
        """
        if self._upgrades(endpoint):
            return H2Exchange(self._h2_pool(), endpoint)
        return self.plain.checkout(endpoint, now)

    def connect(self, endpoint):
        """
        A Deferred firing with an L{H2Exchange} for a meshed C{endpoint}, else a new HTTP/1 connection.
        """
        if self._upgrades(endpoint):
            return succeed(H2Exchange(self._h2_pool(), endpoint))
        return self.plain.connect(endpoint)

    def release(self, conn, now):
        """
        An exchange is over: HTTP/1 connections go back to the plain pool, streams are finished.
        """
        if type(conn) is H2Exchange:
            conn.close()
        else:
            self.plain.release(conn, now)

    def discard(self, conn):
        self.plain.discard(conn)

    def close(self):
        self.plain.close()


class _Lease:
    # What H2Pool reads from a stream's lease when it re-dispatches it.
    __slots__ = ("endpoint",)

    def __init__(self, endpoint):
        self.endpoint = endpoint


class _RequestSource:
    """
    The HTTP/1 side of an L{H2Exchange}'s request L{Half}: acknowledgements of forwarded bytes come here.
    """

    __slots__ = ("exchange",)
    alive = True

    def __init__(self, exchange):
        self.exchange = exchange

    @property
    def conn(self):
        return self

    def acknowledge_received_data(self, n, stream_id):
        self.exchange._acked(n)

    def mark(self):
        pass


class _ResponseSink:
    """
    What the upstream connection feeds response DATA to (C{stream.resp.feed}).
    """

    __slots__ = ("exchange",)

    def __init__(self, exchange):
        self.exchange = exchange

    def feed(self, data, flow_length):
        self.exchange._on_data(data, flow_length)


class _Writer:
    """
    Flushes an L{Http1ServerProtocol} once at the end of the HTTP/2 event being handled (or now, outside one).
    """

    __slots__ = ("server", "flusher", "scheduled")

    def __init__(self, server, flusher):
        self.server = server
        self.flusher = flusher
        self.scheduled = False

    def soon(self):
        if self.scheduled:
            return
        flusher = self.flusher
        if flusher.busy:
            self.scheduled = True
            flusher.pumps.append(self)
        else:
            self.server.flush()

    def pump(self):
        self.server.flush()


@implementer(IHttp1Upstream, IStreamDownstream)
class H2Exchange:
    """
    One HTTP/1 exchange carried as an HTTP/2 stream to a peer proxy.

    Towards L{linkproxy.net.http1.Http1ServerProtocol} it is the upstream connection of the exchange; towards
    L{linkproxy.net.h2.H2Pool} and its connections it is a proxied stream (C{headers}, C{req}, C{resp},
    C{attached}, C{up_head}, C{up_end}, ...).

    @ivar endpoint: the meshed endpoint.
    @ivar out: serialised HTTP/1 request bytes from the server, translated on L{flush}.
    """

    in_pool = False
    idle_since = 0.0

    def __init__(self, h2_pool, endpoint):
        self.endpoint = endpoint
        self.lease = _Lease(endpoint)
        # Half finds the flusher as owner.server.flusher.
        self.server = h2_pool
        self._h2_pool = h2_pool
        self.flusher = h2_pool.flusher
        self.out = []
        self.headers = None
        self.req = Half(self, _RequestSource(self), 0)
        self.resp = _ResponseSink(self)
        self.up = None
        self.uid = 0
        self.done = False
        self.head = False
        self._h1 = None
        self._writer = None
        self._method = None
        self._parser = None
        self._url = b""
        self._fields = []
        self._trailers = None
        self._in_body = False
        self._ready = False
        self._dispatched = False
        self._queued = 0
        self._full = False
        self._paused = False
        self._unacked = 0
        self._no_body = False
        self._resp_done = False

    # -- the face of an Http1ClientProtocol -------------------------------------------------------------------------

    def attach(self, server, method):
        """
        Serve one exchange of C{server} (an L{Http1ServerProtocol}) for a request with C{method}.
        """
        self._h1 = server
        self._method = method
        self._writer = _Writer(server, self.flusher)

    def detach(self):
        """
        The server is done with this exchange (or abandoned it): stop reporting to it.
        """
        server = self._h1
        if server is None:
            return
        self._h1 = None
        if self._full:
            self._full = False
            server.resume_request(PAUSE_UPSTREAM_FULL)
        self.resume_reading()

    def reusable(self):
        """
        An exchange serves one request; the HTTP/2 connection under it is what is reused.
        """
        return False

    def flush(self):
        """
        Translate what the server queued (request head, body, end) onto the stream.
        """
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.done:
            return
        parser = self._parser
        if parser is None:
            parser = self._parser = HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:
            # Only the proxy's own serialisation is parsed here, so this is a bug: answer 502 rather than hang.
            log.error("cannot carry an HTTP/1 request as HTTP/2: {error}", error=e)
            self._upstream_error(Unreachable("cannot carry the request as HTTP/2"))
            return
        if self._ready and not self._dispatched:
            self._dispatched = True
            self._h2_pool.dispatch(self, self.endpoint)
        self.flusher.flush()

    def close(self):
        """
        The exchange ended: finish the stream, or cancel it when the request was not all sent.
        """
        if self.done:
            return
        if self.req.closed and self._resp_done:
            self._finish()
        else:
            self._reset(_CANCEL)

    def abort(self):
        """
        The exchange was abandoned (client gone, timeout, error): cancel the stream.
        """
        self.out.clear()
        self._reset(_CANCEL)

    def pause_reading(self):
        """
        The client reads too slowly: stop acknowledging response DATA, so the peer's window closes.
        """
        self._paused = True

    def resume_reading(self):
        """
        Undo L{pause_reading}: acknowledge what was held.
        """
        if not self._paused:
            return
        self._paused = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._ack(n)
            self.flusher.flush()

    # -- httptools callbacks: the request as the server serialised it -----------------------------------------------

    def on_url(self, url):
        self._url += url

    def on_header(self, name, value):
        if self._in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name.lower(), value))
        else:
            self._fields.append((name.lower(), value))

    def on_headers_complete(self):
        self._in_body = True
        self.headers = h2_request_headers(self._parser.get_method(), self._url, self._fields)
        self._fields = None
        self._ready = True

    def on_body(self, data):
        n = len(data)
        self._queued += n
        self.req.feed(data, n)
        if self._queued > STREAM_WINDOW and not self._full and self._h1 is not None:
            self._full = True
            self._h1.pause_request(PAUSE_UPSTREAM_FULL)

    def on_message_complete(self):
        trailers = self._trailers
        self.req.finish(_trailer_fields(trailers) or True if trailers else True)

    def _acked(self, n):
        # Request bytes the stream took (or dropped).
        self._queued -= n
        if self._full and self._queued <= STREAM_WINDOW:
            self._full = False
            if self._h1 is not None:
                self._h1.resume_request(PAUSE_UPSTREAM_FULL)

    # -- the face of a proxied stream (H2Pool, _H2ClientProtocol) -----------------------------------------------------

    def attached(self, up, uid, ended):
        """
        The request headers went out as stream C{uid} on C{up}; C{ended} when they carried END_STREAM.
        """
        self.up = up
        self.uid = uid
        req = self.req
        req.dst = up
        req.dst_id = uid
        if ended:
            req.tail_sent = True
            req.closed = True
        else:
            req.pump()

    def half_closed(self):
        # The request direction is closed (all sent, or dropped).
        if self.req.closed and self._resp_done:
            self._finish()

    def connect_failed(self, reason):
        """
        The pool could not open a connection for the stream: as a lost HTTP/1 connection that never got a byte,
        which the server retries elsewhere.
        """
        self.up_refused()

    def fail(self, error):
        """
        The pool could not open the stream (connect failed, connection lost): answer the client with C{error}.
        """
        if self.done:
            return
        self._reset(None)
        self._upstream_error(error)

    def up_info(self, headers):
        server = self._h1
        if self.done or self.head or server is None:
            return
        status, resp = h1_response_head(headers)
        if status is not None:
            server.interim(status, None, resp.finish())
            self._writer.soon()

    def up_head(self, headers, ended):
        server = self._h1
        if self.done or self.head or server is None:
            return
        self.head = True
        writer = self._writer
        status, resp = h1_response_head(headers)
        if status is None or status < 200:
            self._upstream_error(Unreachable("invalid response from upstream: bad :status"))
            return
        self._no_body = not h1.response_has_body(self._method, status)
        if server.response_head(self, status, None, resp) and ended:
            self._response_done(None)
        writer.soon()

    def _on_data(self, data, flow_length):
        server = self._h1
        if server is None or self._resp_done:
            self._ack(flow_length)
            return
        if data and not self._no_body:
            server.response_body(data)
        if flow_length:
            if self._paused:
                self._unacked += flow_length
            else:
                self._ack(flow_length)
        self._writer.soon()

    def up_trailers(self, headers):
        if self.done:
            return
        self._response_done(_trailer_fields(headers))

    def up_end(self):
        if self.done:
            return
        if not self.head:
            self._upstream_error(Unreachable("upstream ended the stream without a response"))
            return
        self._response_done(None)

    def up_reset(self, code):
        if self.done:
            return
        if code == _REFUSED_STREAM and not self.head:
            self.up_refused()
            return
        self._upstream_error(Unreachable(f"upstream reset the stream ({getattr(code, 'name', code)})"))

    def up_gone(self, reset_with, reason, code=None):
        """
        The stream's connection was lost (or the stream broke): the server retries or answers as for a lost
        HTTP/1 connection.
        """
        if self.done:
            return
        self._reset(reset_with)
        server, writer = self._h1, self._writer
        if server is not None:
            server.upstream_lost(self, self.head)
            writer.soon()

    def up_refused(self):
        """
        The peer did not process the stream (GOAWAY below it, REFUSED_STREAM): as a stale HTTP/1 connection, which
        the server retries once on a fresh exchange when that is safe.
        """
        if self.done:
            return
        self._reset(_CANCEL)
        server, writer = self._h1, self._writer
        if server is not None:
            server.upstream_lost(self, False)
            writer.soon()

    # -- internals -------------------------------------------------------------------------------------------------

    def _response_done(self, trailers):
        self._resp_done = True
        server, writer = self._h1, self._writer
        if server is not None:
            server.response_end(trailers)
            # Detaches, then closes (or "releases") this exchange: see close().
            server.response_complete(self)
            writer.soon()
        if self.req.closed:
            self._finish()

    def _upstream_error(self, error):
        server, writer = self._h1, self._writer
        if server is not None:
            server.upstream_failed(self, error)
            writer.soon()
        else:
            self._reset(_CANCEL)

    def _ack(self, n):
        up = self.up
        if n and up is not None and up.alive:
            up.conn.acknowledge_received_data(n, self.uid)
            up.mark()

    def _finish(self):
        if self.done:
            return
        self.done = True
        up = self.up
        if up is not None:
            if self._unacked:
                n, self._unacked = self._unacked, 0
                self._ack(n)
            self.up = None
            up.forget(self.uid)
            up.waiting.discard(self.req)

    def _reset(self, code):
        if self.done:
            return
        self.done = True
        self.req.drop()
        up = self.up
        if up is None:
            return
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self._ack(n)
        self.up = None
        up.forget(self.uid)
        up.waiting.discard(self.req)
        if code is not None and up.alive:
            try:
                up.conn.reset_stream(self.uid, code)
            except (StreamClosedError, ProtocolError):
                pass
            up.mark()
        self.flusher.flush()


# -- inbound: l5d-orig-proto streams served as HTTP/1 -----------------------------------------------------------------

def downgrading_streams(server, sid, headers, grpc):
    """
    L{H2ServerProtocol.new_stream} for connections from meshed peers: a request marked C{l5d-orig-proto} goes to
    the app as HTTP/1.1 (L{Http1Stream}, the header removed), any other as HTTP/2.
    """
    for name, value in headers:
        if name == ORIG_PROTO:
            break
    else:
        return Stream(server, sid, headers, grpc)
    headers = [pair for pair in headers if pair[0] != ORIG_PROTO]
    if not value.strip().upper().startswith(b"HTTP/1"):
        return Stream(server, sid, headers, grpc)
    return Http1Stream(server, sid, headers, grpc)


class Http1Stream(Stream):
    """
    A stream from a peer proxy that carries an HTTP/1 request: proxied to the app over an HTTP/1 connection.

    Everything else (routing, timeouts, errors, resets, metrics, flow control towards the peer) is L{Stream}'s.
    """

    __slots__ = ()

    def dispatch(self, endpoint):
        server = self.server
        pool = server.settings.h1_pool
        up = _H1Upstream(self, pool, endpoint)
        conn = pool.checkout(endpoint, server.reactor.seconds())
        if conn is not None:
            up.attach(conn, True)
        else:
            up.connect()


@implementer(IHttp1Downstream, IStreamEnd)
class _H1Upstream:
    """
    One HTTP/1 connection to the app, serving one L{Http1Stream}.

    Towards the stream and its L{Half}s it has the face of a pooled HTTP/2 connection (C{alive}, C{blocked},
    C{waiting}, C{conn}, C{mark}, C{forget}), where "sending DATA" writes HTTP/1 body bytes; towards the
    L{Http1ClientProtocol} it has the face of the HTTP/1 server of the exchange.
    """

    __slots__ = ("stream", "conn", "alive", "blocked", "waiting", "_dirty", "_pool", "_endpoint", "flusher", "_h1",
                 "_method", "_chunked", "_remaining", "_reused", "_held", "_paused", "_req_done", "_h1_done", "_resp_ended",
                 "_ended_at_head", "_dead")

    #: Sent as one "DATA frame" as far as the stream machinery is concerned.
    max_outbound_frame_size = _UNBOUNDED

    def __init__(self, stream, pool, endpoint):
        self.stream = stream
        self.conn = self
        self.alive = True
        self.blocked = False
        self.waiting = set()
        self._dirty = False
        self._pool = pool
        self._endpoint = endpoint
        self.flusher = stream.server.flusher
        self._h1 = None
        self._method = None
        self._chunked = False
        self._remaining = None
        self._reused = False
        self._held = 0
        self._paused = False
        self._req_done = False
        self._h1_done = False
        self._resp_ended = False
        self._ended_at_head = False
        self._dead = False

    # -- connecting ------------------------------------------------------------------------------------------------

    def connect(self):
        d = self._pool.connect(self._endpoint)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn):
        if self._dead or self.stream.done:
            self._dead = True
            conn.abort()
            return
        self.attach(conn, False)
        self.flusher.flush()

    def _connect_failed(self, failure):
        if self._dead or self.stream.done or failure.check(CancelledError):
            return
        self._dead = True
        reason = failure.getErrorMessage().splitlines()[0][:120] if failure.getErrorMessage() else "error"
        self.stream.fail(Unreachable(f"connect to {self._endpoint.addr_str} failed: {reason}"))
        self.flusher.flush()

    def attach(self, conn, reused):
        """
        Send the stream's request head on C{conn}, then its body as it comes.
        """
        stream = self.stream
        req = stream.req
        ended = req.ended and req.tail is True and not req.q
        try:
            method, head, self._chunked, self._remaining = h1_request_head(stream.headers, ended)
        except BadRequest as e:
            # Nothing was written on the connection: it goes back to the pool untouched.
            self._dead = True
            self._pool.release(conn, stream.server.reactor.seconds())
            self._malformed(e.reason)
            return
        self._h1 = conn
        self._method = method
        self._reused = reused
        conn.attach(self, method)
        conn.out.append(head)
        self._req_done = ended
        self.mark()
        stream.attached(self, 1, ended)

    # -- the face of an upstream HTTP/2 connection (for Stream and Half) ------------------------------------------

    def local_flow_control_window(self, stream_id):
        return _UNBOUNDED

    def send_data(self, stream_id, data, end_stream=False):
        conn = self._h1
        if conn is None:
            raise StreamClosedError(stream_id)
        if data:
            if self._chunked:
                conn.out += (h1.chunk_prefix(len(data)), data, _CRLF)
            elif self._remaining is not None:
                # Never more than the declared length: the app's connection must stay parseable. (h2 refuses
                # such DATA itself; this holds whatever it lets through.)
                if len(data) > self._remaining:
                    self._malformed("DATA exceeds the content-length")
                    raise StreamClosedError(stream_id)
                self._remaining -= len(data)
                conn.out.append(data)
            else:
                conn.out.append(data)
        if end_stream:
            self.end_stream(stream_id)

    def end_stream(self, stream_id):
        conn = self._h1
        if conn is None:
            raise StreamClosedError(stream_id)
        self._check_length(stream_id)
        if self._chunked:
            conn.out.append(h1.LAST_CHUNK)
        self._request_sent()

    def send_headers(self, stream_id, headers, end_stream=True):
        # Only request trailers come here: sent in the last chunk, dropped with a content-length body.
        conn = self._h1
        if conn is None:
            raise StreamClosedError(stream_id)
        self._check_length(stream_id)
        if self._chunked:
            conn.out.append(h1.last_chunk(_trailer_fields(headers)))
        self._request_sent()

    def _check_length(self, stream_id):
        # The request ends: with less DATA than its content-length the app would wait for the rest and read the
        # next request on the connection as it. h2 compares DATA with content-length at a DATA frame's
        # END_STREAM, but not when trailers end the stream.
        if self._remaining:
            self._malformed(f"request ended {self._remaining} bytes short of its content-length")
            raise StreamClosedError(stream_id)

    def _malformed(self, reason):
        # The client's request cannot be framed as declared: 400 (a reset once the response has begun). Not the
        # app's failure, so the lease is released as "no verdict"; the app connection, with a head already
        # sent on it, is closed by forget rather than reused (_req_done is not set).
        stream = self.stream
        stream.release(None)
        stream.fail(BadRequest(reason))

    def reset_stream(self, stream_id, code):
        self._dead = True
        conn = self._h1
        if conn is not None:
            self._h1 = None
            conn.detach()
            conn.abort()

    def acknowledge_received_data(self, n, stream_id):
        # The response Half handed n bytes to the peer: read more from the app once below one window.
        self._held -= n
        if self._paused and self._held <= STREAM_WINDOW:
            self._paused = False
            conn = self._h1
            if conn is not None:
                conn.resume_reading()

    def data_to_send(self):
        conn = self._h1
        if conn is not None and conn.out:
            conn.flush()
        return b""

    def mark(self):
        if not self._dirty:
            self._dirty = True
            self.flusher.dirty.append(self)

    def forget(self, uid):
        # The stream is done with this connection: back to the pool when the exchange completed, else closed.
        self.alive = False
        self._dead = True
        conn = self._h1
        if conn is None:
            return
        if self._resp_ended and self._req_done and not self._h1_done:
            # The response's end completed the stream from inside the HTTP/1 parser's callbacks; the parser
            # finishes the message next, and response_complete returns the connection to the pool.
            return
        self._h1 = None
        conn.detach()
        if self._req_done and self._h1_done:
            self._pool.release(conn, self.stream.server.reactor.seconds())
        else:
            conn.abort()

    def _request_sent(self):
        self._req_done = True
        if self._h1_done:
            self._release()

    def _release(self):
        conn = self._h1
        if conn is not None:
            self._h1 = None
            conn.detach()
            self._pool.release(conn, self.stream.server.reactor.seconds())

    # -- the face of an Http1ServerProtocol (for Http1ClientProtocol) ----------------------------------------------

    def pause_request(self, reason):
        self.blocked = True

    def resume_request(self, reason):
        self.blocked = False
        waiting = self.waiting
        if waiting:
            self.waiting = set()
            for half in waiting:
                half.pump()
        self.flusher.flush()

    def flush(self):
        self.flusher.flush()

    def interim(self, status, reason, headers):
        self.stream.up_info([(b":status", b"%d" % status)] + headers)

    def response_head(self, conn, status, reason, resp):
        if status == 101:
            self.upstream_failed(conn, Unreachable("upstream switched protocols unasked"))
            return False
        headers = [(b":status", b"%d" % status)]
        headers += resp.finish()
        if resp.content_length is not None and status != 204:
            headers.append((b"content-length", resp.content_length))
        headers.append(_ORIG_PROTO_FIELD)
        ended = not h1.response_has_body(self._method, status)
        self._ended_at_head = self._resp_ended = ended
        self.stream.up_head(headers, ended)
        return True

    def response_body(self, data):
        if self._ended_at_head or not data:
            return
        self._held += len(data)
        self.stream.resp.feed(data, len(data))
        if self._held > STREAM_WINDOW and not self._paused:
            self._paused = True
            conn = self._h1
            if conn is not None:
                conn.pause_reading()

    def response_end(self, trailers):
        self._resp_ended = True
        if self._ended_at_head:
            return
        if trailers:
            self.stream.up_trailers(trailers)
        else:
            self.stream.up_end()

    def response_complete(self, conn):
        # The HTTP/1 response is complete.
        if conn is not self._h1:
            return
        self._h1_done = True
        if self._req_done:
            self._release()
            return
        if self._dead:
            self._h1 = None
            conn.detach()
            conn.abort()
            return
        # The app answered before the whole request was sent: the rest is not sent (the connection is closed
        # when the stream completes) and the peer is asked to stop sending, as an HTTP/2 upstream would.
        stream = self.stream
        stream.req.drop()
        stream.half_closed()

    def upstream_lost(self, conn, got_bytes):
        if conn is not self._h1:
            return
        self._h1 = None
        conn.detach()
        stream = self.stream
        if (not got_bytes and self._reused and not stream.retried and not stream.head
                and stream.req.sent == 0):
            # A pooled connection the app had already closed: the stream is sent again on a fresh one.
            stream.up_refused()
        else:
            stream.up_gone(None, "upstream closed the connection before responding" if not stream.head
                           else "upstream closed the connection mid-response")
        self.flusher.flush()

    def upstream_failed(self, conn, error):
        if conn is self._h1:
            self._h1 = None
            conn.detach()
        conn.abort()
        self.stream.up_gone(None, error.reason)
        self.flusher.flush()

    def switch_protocols(self, conn, rest):
        self.upstream_failed(conn, Unreachable("upstream switched protocols unasked"))
