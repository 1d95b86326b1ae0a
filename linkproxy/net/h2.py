"""
HTTP/2 proxying on the sans-I/O h2 library: the accepted side (L{H2ServerProtocol}) and pooled, multiplexed client
connections to endpoints (L{H2Pool}).

Each request stream accepted by an L{H2ServerProtocol} is routed on its own, and becomes one stream on a pooled
upstream connection to the chosen endpoint. A L{Stream} joins the two; each direction of it is a L{Half} that
forwards DATA as far as the receiving side's flow-control window allows and acknowledges the bytes to the
sending side only once they are handed on. What a peer may send us is therefore bounded by the window we granted,
and a reader that does not read stops its writer through HTTP/2 flow control instead of through our memory. On
top of that every connection is its own transport's producer: a full socket write buffer pauses reading from that
socket and stops forwarding into it until it drains.

Where this module departs from h2's defaults, and why:
  - h2 validates and normalises headers at a cost comparable to a whole HTTP/1 hop; the proxy checks what it relies
    on itself (L{_prepare_request}), so h2's header checks are off.
  - h2 closes its connection state machine on GOAWAY, which would kill the streams a graceful GOAWAY lets finish.
    L{linkproxy.net.h2_private.LeanConnection} reports the GOAWAY as an event and keeps the state open;
    L{H2ServerProtocol.drain} writes its own GOAWAY frame for the same reason.
  - hpack's encoder and decoder are general and slow (a log call per header, an object per field, a table search per
    header). L{linkproxy.net.h2_private.LeanEncoder} never inserts into the dynamic table, as nginx does, so a
    field's encoding depends on the field alone and is cached; L{linkproxy.net.h2_private.LeanDecoder} is a lean
    loop over the same table with the huffman decodings cached. Header blocks we send are larger than with indexing
    (literals every time), which on the sidecar's hops costs far less than the CPU it saves.
  - h2 walks all its streams to count the open ones each time a stream opens;
    L{linkproxy.net.h2_private.LeanConnection} walks only when the count could reach the concurrency limit (or to
    drop closed streams once they have piled up), and drops each stream as soon as the proxy is done with it
    (L{linkproxy.net.h2_private.LeanConnection.drop_closed}).
  - hyperframe's frame objects (a validated flag set, padding and priority fields, a flag walk to serialize) and
    h2's per-block header work (UTF-8 re-encoding, validation flags, copies) cost as much as the rest of the proxy.
    The proxy's connections use h2's state machines, flow control and error handling as they are, but make the
    per-request frames lean: L{linkproxy.net.h2_private.LeanFrameBuffer} reads HEADERS and DATA into light frames
    that hyperframe still parses, L{linkproxy.net.h2_private.LeanStream} serializes the HEADERS, CONTINUATION and
    DATA frames it sends itself (L{linkproxy.net.h2_private.OutFrame}), and
    L{linkproxy.net.h2_private.LeanConnection._receive_frame} skips a trace message built for every frame. Together
    they took the HTTP/2 bench from about 116 to about 74 us of CPU per request. They override private parts of h2,
    hpack and hyperframe, so they live in L{linkproxy.net.h2_private}, which lists what they rely on and the audited
    versions; C{setup.cfg} bounds the versions to those, and C{tests/test_h2.py} checks the overrides against the
    libraries' own code.
  - h2 turns an oversized header block into a connection error. The proxy advertises a hard limit twice the
    configured one and answers 431 to a block over the configured limit, so one bad request costs one stream.
"""

import re
from collections import deque

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, InformationalResponseReceived, RemoteSettingsChanged, RequestReceived,
    ResponseReceived, StreamEnded, StreamReset, TrailersReceived, WindowUpdated,
)
from h2.exceptions import NoAvailableStreamIDError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.core.classify import is_failure
from linkproxy.core.endpoint import format_address
from linkproxy.core.errors import BadRequest, HeadersTooLarge, ProxyError, ResponseTimeout, Unreachable, \
    blames_endpoint
from linkproxy.core.grpc import error_response, grpc_status, parse_grpc_timeout
from linkproxy.core.headers import CLIENT_ID, DST_OVERRIDE, HOP_BY_HOP, connection_tokens, normalize_authority
from linkproxy.core.http1 import IDEMPOTENT_METHODS, MAX_REPLAY_BYTES
from linkproxy.core.retry import CONNECT, RESET, RESPONSE
from linkproxy.net.context import PLAIN, endpoint_tls, route_metrics
from linkproxy.net.exchange import IStreamDownstream, IStreamEnd
from linkproxy.net.h2_private import new_connection
from linkproxy.net.splice import set_nodelay
from linkproxy.net.tcp import connect_error_label

log = Logger(namespace="linkproxy.net.h2")

#: Streams one accepted connection may have open at once (advertised in SETTINGS).
MAX_CONCURRENT_STREAMS = 100
#: Per-stream receive window granted to either peer: the most a stream can have queued in the proxy per direction.
STREAM_WINDOW = 65535
#: Connection receive window granted to either peer: the most one connection can have queued in the proxy.
CONNECTION_WINDOW = 1 << 20
#: Streams assumed available on an upstream connection until its SETTINGS arrive (RFC 9113 suggests >= 100).
UPSTREAM_INITIAL_STREAMS = 100
#: Upper bound on streams the proxy opens on one upstream connection, whatever the endpoint allows.
UPSTREAM_MAX_STREAMS = 1000
# Past this stream id an upstream connection is retired before h2 runs out of ids (2**31 - 1).
_LAST_STREAM_ID = 2 ** 31 - 1024

_H2_FLAGS = dict(
    validate_inbound_headers=False, validate_outbound_headers=False,
    normalize_inbound_headers=False, normalize_outbound_headers=False,
    header_encoding=None,
)
_SERVER_CONFIG = H2Configuration(client_side=False, **_H2_FLAGS)
_CLIENT_CONFIG = H2Configuration(client_side=True, **_H2_FLAGS)

_NO_ERROR = ErrorCodes.NO_ERROR
_CANCEL = ErrorCodes.CANCEL
_INTERNAL_ERROR = ErrorCodes.INTERNAL_ERROR
_REFUSED_STREAM = ErrorCodes.REFUSED_STREAM


def _new_connection(config, client, max_header_bytes):
    # The proxy's own limits, bound here so that the library-facing code takes them as parameters.
    return new_connection(config, client, max_header_bytes, STREAM_WINDOW, CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS)


def _prepare_request(headers, client_id):
    """
    One pass over a request's header block: what to send upstream, and what the proxy needs to know.

    Hop-by-hop headers are dropped except C{te: trailers}; C{l5d-client-id} is replaced by C{client_id}.

    @param headers: the decoded C{(name, value)} byte pairs, as received.
    @param client_id: the C{l5d-client-id} pair to add, or C{None}.
    @return: C{(out, authority, scheme, size, grpc, problem)}; C{problem} is C{None} or a reason for a 400.
    """
    out = []
    authority = host = method = path = None
    scheme = b"http"
    size = 0
    grpc = False
    problem = None
    tokens = False
    for pair in headers:
        name, value = pair
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if name == b":authority":
                authority = value
            elif name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            elif name == b":path":
                path = value
            out.append(pair)
            continue
        if name in HOP_BY_HOP:
            if name == b"te" and value.strip().lower() == b"trailers":
                out.append(pair)
            elif name == b"connection":
                tokens = True
            continue
        if name == CLIENT_ID:
            continue
        if name == b"host":
            host = value
        elif name == b"content-type":
            grpc = value.startswith(b"application/grpc")
        if not name.islower() and name != name.lower():
            problem = "upper-case header name"
        out.append(pair)
    if tokens:
        extra = connection_tokens(headers)
        out = [p for p in out if p[0] not in extra]
    if client_id is not None:
        out.append(client_id)
    if method is None or (method != b"CONNECT" and (path is None or not path)):
        problem = "missing :method or :path"
    elif method == b"CONNECT":
        problem = "CONNECT is not supported"
    return out, authority if authority is not None else host, scheme, size, grpc, problem


def _response_headers(headers):
    for name, _ in headers:
        if name in HOP_BY_HOP:
            return [p for p in headers if p[0] not in HOP_BY_HOP]
    return headers


def _status_of(headers):
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 502
    return 502


class _Flusher:
    """
    Writes what h2 has queued for each connection touched by one event, once per connection, at the end of it.

    Writes to upstream connections go through Twisted's queue rather than straight to the socket
    (L{linkproxy.net.twisted_private.direct_writer}): the streams of many clients share one upstream connection, and the
    queue gathers the writes of one reactor turn into one send. (Measured again after the lean-frame work: direct
    upstream sends changed neither the CPU per request nor the c=1 latency.) Accepted connections write directly,
    as detection installs the direct writer on every accepted transport.

    @ivar busy: set while an event is being handled; flushes asked for meanwhile wait for its end.
    @ivar pumps: the L{Half}s given DATA or their end during the event, forwarded at its end: DATA followed by
        END_STREAM in one read then leaves as one frame.
    """

    __slots__ = ("dirty", "closing", "busy", "pumps")

    def __init__(self):
        self.dirty = []
        self.closing = []
        self.pumps = []
        self.busy = False

    def flush(self):
        if self.busy:
            return
        while self.pumps or self.dirty:
            if self.pumps:
                pumps, self.pumps = self.pumps, []
                for half in pumps:
                    half.scheduled = False
                    half.pump()
            dirty, self.dirty = self.dirty, []
            for proto in dirty:
                proto._dirty = False
                data = proto.conn.data_to_send()
                if data and proto.alive:
                    proto.transport.write(data)
        if self.closing:
            # Closed only now, so the frames queued before the close (RST_STREAM, GOAWAY) go out first.
            closing, self.closing = self.closing, []
            for proto in closing:
                if proto.alive:
                    proto.transport.loseConnection()


class Half:
    """
    One direction of a proxied stream: DATA read from C{src} and written to C{dst}, then END_STREAM or trailers.

    @ivar q: DATA not yet forwarded, bounded by the window granted to C{src}.
    @ivar tail: what ends this direction once C{q} is empty: C{True} (END_STREAM) or a trailer block.
    @ivar ended: C{src} has ended this direction.
    @ivar closed: nothing more is written to C{dst} (ended there, reset, or dropped).
    @ivar sent: DATA bytes written to C{dst}.
    @ivar scheduled: waiting in the flusher's C{pumps}.
    """

    __slots__ = (
        "owner", "src", "src_id", "dst", "dst_id", "q", "tail", "ended", "closed", "sent", "tail_sent", "scheduled",
        "kept", "skip_ack",
    )

    def __init__(self, owner, src, src_id, keep=False):
        """
        @param keep: keep what is forwarded (up to C{MAX_REPLAY_BYTES}) so L{rewind} can send it again: the
            request direction, which a retry replays.
        """
        self.owner = owner
        self.src = src
        self.src_id = src_id
        self.dst = None
        self.dst_id = 0
        self.q = deque()
        self.tail = None
        self.ended = False
        self.closed = False
        self.sent = 0
        self.tail_sent = None
        self.scheduled = False
        self.kept = [] if keep else None
        self.skip_ack = 0

    def rewind(self):
        """
        Make everything forwarded so far unsent again, for another attempt on another upstream stream. Bytes
        replayed from L{kept} were acknowledged to C{src} already, so they are not acknowledged twice.
        """
        kept = self.kept
        if kept:
            self.q.extendleft(reversed(kept))
            self.skip_ack += self.sent
        self.kept = []
        self.sent = 0
        if self.tail_sent is not None:
            self.tail = self.tail_sent
            self.tail_sent = None
            self.closed = False
        dst = self.dst
        if dst is not None:
            dst.waiting.discard(self)
        self.dst = None

    def ack(self, n):
        src = self.src
        if src is not None and src.alive:
            src.conn.acknowledge_received_data(n, self.src_id)
            src.mark()

    def feed(self, data, flow_length):
        if self.closed:
            self.ack(flow_length)
            return
        if flow_length > len(data):
            # Padding is never forwarded, so it is released at once.
            self.ack(flow_length - len(data))
        if data:
            self.q.append(data)
            self._pump_soon()

    def finish(self, tail):
        if self.ended:
            return
        self.ended = True
        if self.closed:
            return
        self.tail = tail
        self._pump_soon()

    def _pump_soon(self):
        """
        L{pump} at the end of the event being handled, or now outside of one.
        """
        if self.dst is None or self.scheduled:
            return
        flusher = self.owner.server.flusher
        if flusher.busy:
            self.scheduled = True
            flusher.pumps.append(self)
        else:
            self.pump()

    def pump(self):
        """
        Forward as much as C{dst} accepts now; acknowledge what was forwarded to C{src}.
        """
        dst = self.dst
        if dst is None or self.closed:
            return
        if dst.blocked:
            dst.waiting.add(self)
            return
        conn = dst.conn
        did = self.dst_id
        q = self.q
        kept = self.kept
        sent = 0
        try:
            while q:
                window = conn.local_flow_control_window(did)
                if window <= 0:
                    break
                limit = conn.max_outbound_frame_size
                if window < limit:
                    limit = window
                chunk = q[0]
                if len(chunk) > limit:
                    piece = chunk[:limit]
                    conn.send_data(did, piece)
                    q[0] = chunk[limit:]
                    sent += limit
                    if kept is not None:
                        kept.append(piece)
                else:
                    q.popleft()
                    sent += len(chunk)
                    if kept is not None:
                        kept.append(chunk)
                    if not q and self.tail is True:
                        conn.send_data(did, chunk, end_stream=True)
                        self.tail_sent = True
                        self.closed = True
                    else:
                        conn.send_data(did, chunk)
            if not q and not self.closed and self.tail is not None:
                if self.tail is True:
                    conn.end_stream(did)
                else:
                    conn.send_headers(did, self.tail, end_stream=True)
                self.tail_sent = self.tail
                self.closed = True
        except (StreamClosedError, ProtocolError):
            # The stream closed under us (a reset crossed our data); the owner learns of it from the event.
            self.drop()
            self.owner.half_closed()
            return
        finally:
            if sent:
                self.sent += sent
                if kept is not None and self.sent > MAX_REPLAY_BYTES:
                    self.kept = None
                skip = self.skip_ack
                if skip:
                    n = skip if skip < sent else sent
                    self.skip_ack = skip - n
                    sent -= n
                if sent:
                    self.ack(sent)
                dst.mark()
        if self.closed:
            dst.mark()
            self.owner.half_closed()
        elif q:
            dst.waiting.add(self)

    def drop(self):
        """
        Give up on this direction: release what is queued to C{src} and write nothing more.
        """
        queued = sum(len(c) for c in self.q)
        self.q.clear()
        self.tail = None
        self.closed = True
        if queued:
            self.ack(queued)
        if self.dst is not None:
            self.dst.waiting.discard(self)


@implementer(IStreamDownstream)
class Stream:
    """
    One proxied request: a stream on the accepted connection joined to a stream on a pooled upstream connection.
    """

    __slots__ = (
        "server", "sid", "up", "uid", "req", "resp", "headers", "authority", "grpc", "lease", "route", "started",
        "timer", "head", "status", "grpc_status", "latency_ms", "retried", "done", "down_open", "down_code",
        "released", "call", "safe", "method", "path", "error",
    )

    def __init__(self, server, sid, headers, grpc):
        self.server = server
        self.sid = sid
        self.up = None
        self.uid = 0
        self.req = Half(self, server, sid, keep=True)
        self.resp = Half(self, None, 0)
        self.resp.dst = server
        self.resp.dst_id = sid
        self.headers = headers
        self.authority = ""
        self.grpc = grpc
        self.lease = None
        self.route = None
        self.started = server.reactor.seconds()
        self.timer = None
        self.head = False
        self.status = None
        self.grpc_status = ""
        self.latency_ms = 0.0
        self.retried = False
        self.done = False
        self.down_open = True
        self.down_code = _NO_ERROR
        self.released = False
        self.call = None
        self.safe = True
        self.method = self.path = b""
        self.error = ""

    # -- routing and dispatch ----------------------------------------------------------------------------------

    def route_to(self, authority):
        server = self.server
        self.authority = authority
        method = path = b""
        for name, value in self.headers:
            if name[:1] != b":":
                break
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
        self.method, self.path = method, path
        self.safe = self.req.ended or method in IDEMPOTENT_METHODS
        grpc_timeout = None
        if self.grpc:
            value = _header(self.headers, b"grpc-timeout")
            if value is not None:
                grpc_timeout = parse_grpc_timeout(value)
        call = self.call = server._stack.begin(authority, method, path, self.started, grpc_timeout)
        self.timer = server.reactor.callLater(call.timeout, self._timed_out)
        # At once or later, _routed flushes; within an event the flusher waits for the event's end.
        call.pick(self._routed, self._routed, self._route_failed)

    def _routed(self, lease):
        self.lease = lease
        self.released = False
        server = self.server
        self.route = server._route(self.authority, lease.endpoint)
        if self.call.attempts == 1:
            # One request in the golden metrics, however many attempts it takes.
            self.route.requests.inc()
        if self.done:
            # The stream ended while it was routed; nothing was sent to the endpoint.
            self.release(None)
            return
        self.dispatch(lease.endpoint)
        server.flusher.flush()

    def dispatch(self, endpoint):
        """
        Send the request to C{endpoint}: a stream on a pooled upstream connection. Hook: the HTTP/1 downgrade
        (L{linkproxy.net.orig_proto}) overrides it to use an HTTP/1 connection instead.
        """
        self.server._pool.dispatch(self, endpoint)

    def _route_failed(self, failure):
        self.route = self.server._route(self.authority, None)
        self.route.requests.inc()
        if self.done:
            return
        error = failure.value
        if not isinstance(error, ProxyError):
            log.failure("routing {authority} failed", failure, authority=self.authority)
            error = Unreachable("routing failed")
        self.fail(error)
        self.server.flusher.flush()

    def attached(self, up, uid, ended):
        """
        The request headers went out as stream C{uid} on C{up}; C{ended} when they carried END_STREAM.
        """
        self.up = up
        self.uid = uid
        req = self.req
        req.dst = up
        req.dst_id = uid
        self.resp.src = up
        self.resp.src_id = uid
        if ended:
            req.tail_sent = True
            req.closed = True
        else:
            req.pump()

    def release(self, success, at=None):
        if not self.released and self.lease is not None:
            self.released = True
            if at is None:
                self.lease.release(success)
            else:
                self.lease.release(success, at)

    def _again(self, kind):
        """
        The attempt failed (C{kind}, see L{linkproxy.core.retry}) before its response reached the client:
        route another, replaying what was sent, when the call allows it.

        @return: C{True} when another attempt is under way.
        """
        self.release(False)
        req = self.req
        if self.done or self.head or req.kept is None or not self.down_open:
            return False
        now = self.server.reactor.seconds()
        if now - self.started >= self.call.timeout:
            return False
        endpoint = self.lease.endpoint if self.lease is not None else None
        if not self.call.retry(kind, now, endpoint, self.safe, True):
            return False
        self._detach_upstream(_CANCEL)
        req.rewind()
        self.resp.src = None
        tap = self.server._stack.tap
        if tap.watchers:
            tap.emit(self._event(502, "", (now - self.started) * 1000.0, f"retried: {kind}", False))
        self.lease = None
        self.call.pick(self._routed, self._routed, self._route_failed)
        return True

    def _event(self, status, grpc, latency_ms, error, final):
        # One tap event (linkproxy.layers.tap): built only while someone watches.
        server = self.server
        settings = server.settings
        call = self.call
        lease = self.lease
        endpoint = lease.endpoint if lease is not None else None
        tls = endpoint_tls(settings.connector, endpoint)[0] if settings.direction == "outbound" else server.peer.tls
        peer = server.transport.getPeer() if server.transport is not None else None
        return {
            "direction": settings.direction, "authority": self.authority,
            "method": self.method.decode("latin-1"), "path": self.path.decode("latin-1"),
            "status": status, "grpc_status": grpc, "latency_ms": round(latency_ms, 3),
            "duration_ms": round((server.reactor.seconds() - self.started) * 1000.0, 3),
            "endpoint": endpoint.addr_str if endpoint is not None else "", "tls": tls,
            "client_id": server.peer.client_id or "", "request_bytes": self.req.sent,
            "response_bytes": self.resp.sent, "route": call.route.name if call is not None else "default",
            "error": error, "attempt": call.attempts if call is not None else 0, "final": final,
            "client_addr": getattr(peer, "host", ""), "version": "2",
        }

    def connect_failed(self, reason):
        """
        The pool could not open a connection for this stream: nothing was sent, so another attempt goes.
        """
        if not self.done and not self._again(CONNECT):
            self.fail(Unreachable(reason))

    def _timed_out(self):
        self.timer = None
        if not self.head and not self.done:
            self.fail(ResponseTimeout(self.call.timeout_reason))
            self.server.flusher.flush()

    def _detach_upstream(self, code):
        """
        Stop using the upstream stream, resetting it with C{code} unless C{code} is C{None} (already closed).
        """
        up = self.up
        if up is None:
            return
        self.up = None
        up.forget(self.uid)
        up.waiting.discard(self.req)
        if code is not None and up.alive:
            try:
                up.conn.reset_stream(self.uid, code)
            except (StreamClosedError, ProtocolError):
                pass
            up.mark()

    # -- answers the proxy makes itself ------------------------------------------------------------------------

    def fail(self, error):
        """
        Answer with C{error} (or reset the client stream when the response has already begun).
        """
        if self.done:
            return
        self.error = error.reason
        settings = self.server.settings
        settings.metrics.http_error(settings.direction, error)
        self._cancel_timer()
        # Only the endpoint's own failures count against it; the proxy's rejections of the client do not.
        self.release(False if blames_endpoint(error) else None)
        self._detach_upstream(_CANCEL)
        self.req.drop()
        resp = self.resp
        resp.drop()
        server = self.server
        if self.head or not self.down_open or not server.alive:
            self.down_code = _INTERNAL_ERROR
            self._reset_down()
            self._complete()
            return
        headers, body = error_response(error, self.grpc)
        self._head_at(server.reactor.seconds())
        if self.grpc:
            self.status = 200
            self.grpc_status = str(error.grpc_status)
        else:
            self.status = error.status
        server.mark()
        try:
            server.conn.send_headers(self.sid, headers, end_stream=not body)
        except (StreamClosedError, ProtocolError):
            self.down_open = False
            self._complete()
            return
        if not body:
            self._complete()
            return
        # The body goes through the queue: the client's window may be closed. Nothing upstream to acknowledge.
        resp.src = None
        resp.closed = False
        resp.q.append(body)
        resp.tail = True
        resp.ended = True
        resp.pump()

    def _head_at(self, now):
        self.head = True
        self.latency_ms = (now - self.started) * 1000.0

    def _cancel_timer(self):
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    # -- events from the accepted (downstream) connection ------------------------------------------------------

    def down_reset(self, code):
        """
        The client reset its stream: pass the reset upstream, and drop both directions.
        """
        self.down_open = False
        if self.done:
            return
        self._cancel_timer()
        if not self.head:
            # The client cancelled: no verdict on the endpoint.
            self.release(None)
        self.req.drop()
        self.resp.drop()
        self._detach_upstream(code)
        self._complete()

    def down_lost(self):
        self.down_reset(_CANCEL)

    # -- events from the upstream connection -------------------------------------------------------------------

    def up_head(self, headers, ended):
        if self.done or self.head:
            return
        server = self.server
        status = _status_of(headers)
        grpc = grpc_status(headers) if ended else ""
        failed = is_failure(status, grpc)
        if failed:
            call = self.call
            if call.route.retryable and self.req.ended and self._again(RESPONSE):
                # The dropped answer still counts among the route's actual responses.
                call.answered(status, grpc, (server.reactor.seconds() - self.started) * 1000.0)
                return
        self._cancel_timer()
        self._head_at(server.reactor.seconds())
        if failed or not self.grpc or ended:
            self.release(not failed)
        # A gRPC answer's outcome is in its trailers: released there (or when the stream ends).
        self.status = status
        self.grpc_status = grpc
        headers = _response_headers(headers)
        resp = self.resp
        try:
            if ended:
                resp.ended = True
                resp.closed = True
                server.conn.send_headers(self.sid, headers, end_stream=True)
            else:
                server.conn.send_headers(self.sid, headers)
        except (StreamClosedError, ProtocolError):
            # The client's stream is gone; its reset event follows or already came.
            self.down_reset(_CANCEL)
            return
        server.mark()
        if resp.closed:
            self.half_closed()

    def up_info(self, headers):
        if self.done or self.head:
            return
        try:
            self.server.conn.send_headers(self.sid, _response_headers(headers))
        except (StreamClosedError, ProtocolError):
            return
        self.server.mark()

    def up_trailers(self, headers):
        if self.done:
            return
        self.grpc_status = grpc = grpc_status(headers)
        # The RTT is the head's, measured when it arrived.
        self.release(not is_failure(self.status or 200, grpc), self.started + self.latency_ms / 1000.0)
        self.resp.finish(headers)

    def up_end(self):
        if self.done:
            return
        if not self.head:
            # END_STREAM without a response head cannot happen in h2; treat it as a broken upstream.
            self.up_gone(_INTERNAL_ERROR, "upstream ended the stream without a response")
            return
        self.resp.finish(True)

    def up_reset(self, code):
        if code == _REFUSED_STREAM and not self.head:
            self.up_refused()
            return
        self.up_gone(None, f"upstream reset the stream ({getattr(code, 'name', code)})", code)

    def up_gone(self, reset_with, reason, code=None):
        """
        The upstream stream ended abnormally: reset by the endpoint (C{reset_with} is C{None}) or its connection
        lost.
        """
        if self.done:
            return
        if not self.head:
            if not self._again(RESET):
                self._detach_upstream(reset_with)
                self.fail(Unreachable(reason))
            return
        self._detach_upstream(reset_with)
        self.req.drop()
        resp = self.resp
        if resp.ended:
            # The whole response arrived: let it drain, then stop the client's request the same way.
            self.down_code = code if code is not None else _NO_ERROR
            if resp.closed:
                self.half_closed()
            return
        resp.drop()
        self.down_code = code if code not in (None, _NO_ERROR) else _CANCEL
        self._reset_down()
        self._complete()

    def up_refused(self):
        """
        The endpoint did not process this stream (GOAWAY below its id, or REFUSED_STREAM): retry it once on a
        fresh connection if nothing of it is lost yet.
        """
        if self.done:
            return
        req = self.req
        retry = not self.retried and not self.head and req.sent == 0 and req.tail_sent in (None, True)
        self._detach_upstream(_CANCEL)
        if not retry:
            self.fail(Unreachable("upstream refused the stream"))
            return
        self.retried = True
        waiting_dst = req.dst
        if waiting_dst is not None:
            waiting_dst.waiting.discard(req)
        req.dst = None
        if req.tail_sent is True:
            req.tail = True
            req.tail_sent = None
            req.closed = False
        self.resp.src = None
        self.dispatch(self.lease.endpoint)

    # -- completion --------------------------------------------------------------------------------------------

    def _reset_down(self):
        if self.down_open:
            self.down_open = False
            server = self.server
            if server.alive:
                try:
                    server.conn.reset_stream(self.sid, self.down_code)
                except (StreamClosedError, ProtocolError):
                    pass
                server.mark()

    def half_closed(self):
        if self.req.closed and self.resp.closed:
            self._complete()

    def _complete(self):
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.up is not None:
            self.up.forget(self.uid)
            self.up.waiting.discard(self.req)
        if self.down_open and not self.req.ended:
            # The response is complete but the request is not: ask the client to stop sending (RFC 9113 8.1).
            self._reset_down()
        self.server.waiting.discard(self.resp)
        if self.status is not None and self.route is not None:
            self.route.response(self.status, self.grpc_status, self.latency_ms)
            call = self.call
            if call is not None and call.metrics is not None:
                call.answered(self.status, self.grpc_status, self.latency_ms)
                call.finished(self.status, self.grpc_status, self.latency_ms)
            tap = self.server._stack.tap
            if tap.watchers:
                tap.emit(self._event(self.status, self.grpc_status, self.latency_ms, self.error, True))
        # A gRPC stream that ended without its trailers (reset mid-body) was not answered properly.
        self.release(False if not self.head else not is_failure(self.status, self.grpc_status))
        self.server.forget(self.sid)


@implementer(IPushProducer)
class _H2Side(Protocol):
    """
    What both ends of the proxy's HTTP/2 connections share: feeding received bytes to h2 and dispatching its
    events (with writes gathered into one flush), and pausing when the peer stops reading.

    Subclasses provide C{conn}, C{_handlers}, C{flusher}, C{_dirty}, C{_closing}, and the two hooks below.
    """

    alive = False
    blocked = False

    def mark(self):
        """
        Have the flusher write what h2 queued for this connection, at the end of the event.
        """
        if not self._dirty:
            self._dirty = True
            self.flusher.dirty.append(self)

    def _close_soon(self):
        """
        Close once the frames already queued (RST_STREAM, GOAWAY) are written.
        """
        if not self._closing:
            self._closing = True
            self.mark()
            self.flusher.closing.append(self)
            self.flusher.flush()

    def _protocol_error(self, error):
        """
        Log a protocol error from the peer; h2 has queued a GOAWAY.
        """

    def _after_events(self):
        """
        Called after each batch of received bytes is handled.
        """

    def dataReceived(self, data):
        if not self.alive:
            return
        flusher = self.flusher
        was_busy = flusher.busy
        flusher.busy = True
        try:
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as e:
                # h2 queued a GOAWAY; it goes out, then the connection closes and connectionLost cleans up.
                self._protocol_error(e)
                self._close_soon()
                return
            handlers = self._handlers
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(event)
            self.mark()
        finally:
            flusher.busy = was_busy
            flusher.flush()
        self._after_events()

    # -- IPushProducer: our transport's write buffer filled up or drained --------------------------------------

    def pauseProducing(self):
        """
        The peer is not reading: stop forwarding to it and stop reading from it.
        """
        self.blocked = True
        self.transport.pauseProducing()

    def resumeProducing(self):
        """
        The peer caught up: read again and forward what waited.
        """
        self.blocked = False
        if not self.alive:
            return
        self.transport.resumeProducing()
        _pump_waiting(self)
        self.flusher.flush()

    def stopProducing(self):
        """
        The transport is going away; L{connectionLost} cleans up.
        """


@implementer(IStreamEnd)
class H2ServerProtocol(_H2Side):
    """
    The accepted side of an HTTP/2 connection: every request stream is routed and proxied on its own.

    Hand it the connection after protocol detection: C{makeConnection(transport)}, then C{dataReceived} with the
    bytes detection buffered (starting with the client preface).

    @ivar settings: the direction's L{HttpSettings}.
    @ivar peer: what is known about the client (L{PeerInfo}).
    """

    conn = None
    #: Hook: builds the per-stream object as C{new_stream(server, sid, headers, grpc)}; set per connection to
    #: serve C{l5d-orig-proto} streams as HTTP/1 (L{linkproxy.net.orig_proto.downgrading_streams}).
    new_stream = Stream

    def __init__(self, settings, peer=PLAIN):
        """
        @param settings: a L{linkproxy.net.context.HttpSettings}; streams go out through its C{h2_pool}.
        @param peer: the L{linkproxy.net.context.PeerInfo} of the accepted connection.
        """
        self.settings = settings
        self.peer = peer
        pool = self._pool = settings.h2_pool
        self.flusher = pool.flusher
        self.reactor = settings.reactor
        self._stack = settings.stack
        self._streams = {}
        self._routes = {}
        self.waiting = set()
        self.blocked = False
        self._dirty = False
        self._draining = False
        self._last_stream_id = None
        self._peer_goaway = False
        self._closing = False
        self._client_id = (CLIENT_ID, peer.client_id.encode("ascii")) if peer.client_id else None
        self._handlers = {
            RequestReceived: self._on_request,
            DataReceived: self._on_data,
            StreamEnded: self._on_end,
            TrailersReceived: self._on_trailers,
            StreamReset: self._on_reset,
            WindowUpdated: self._on_window,
            RemoteSettingsChanged: self._on_settings,
            ConnectionTerminated: self._on_goaway,
        }

    # -- IProtocol ---------------------------------------------------------------------------------------------

    def connectionMade(self):
        set_nodelay(self.transport)
        self.conn = _new_connection(_SERVER_CONFIG, False, self.settings.max_header_bytes)
        self.alive = True
        self.transport.registerProducer(self, True)
        self.mark()
        self.flusher.flush()
        tracker = self.settings.tracker
        if tracker is not None:
            tracker.add(self)

    def _protocol_error(self, error):
        log.debug("HTTP/2 protocol error from client: {error}", error=error)
        _count_protocol_error(self.settings, error)

    def _after_events(self):
        self._maybe_close()

    def connectionLost(self, reason=None):
        if not self.alive:
            return
        self.alive = False
        tracker = self.settings.tracker
        if tracker is not None:
            tracker.discard(self)
        for stream in list(self._streams.values()):
            stream.down_lost()
        self._streams.clear()
        self.waiting.clear()
        self.flusher.flush()

    # -- tracker contract --------------------------------------------------------------------------------------

    def drain(self):
        """
        Send GOAWAY naming the highest stream seen, finish those streams, then close.
        """
        if self._draining or not self.alive:
            return
        self._draining = True
        self._last_stream_id = last = self.conn.highest_inbound_stream_id
        self.mark()
        self.flusher.flush()
        # Written by hand: h2's close_connection() would stop the streams this GOAWAY lets finish.
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = 0
        self.transport.write(frame.serialize())
        self._maybe_close()

    def abort(self):
        """
        Drop the connection now.
        """
        if self.transport is not None:
            self.transport.abortConnection()

    # -- h2 events ---------------------------------------------------------------------------------------------

    def _on_request(self, event):
        sid = event.stream_id
        if self._draining and sid > self._last_stream_id:
            self.conn.reset_stream(sid, _REFUSED_STREAM)
            return
        headers, authority, scheme, size, grpc, problem = _prepare_request(event.headers, self._client_id)
        stream = self.new_stream(self, sid, headers, grpc)
        self._streams[sid] = stream
        if event.stream_ended is not None:
            stream.req.ended = True
            stream.req.tail = True
        if size > self.settings.max_header_bytes:
            stream.route = self._route("", None)
            stream.route.requests.inc()
            stream.fail(HeadersTooLarge(f"request headers exceed {self.settings.max_header_bytes} bytes"))
            return
        target = None
        if problem is None:
            if authority is None:
                problem = "missing :authority"
            else:
                target = normalize_authority(authority, 443 if scheme == b"https" else 80)
                if target is None:
                    problem = "invalid :authority"
                elif self.settings.dst_override:
                    override = _header(headers, DST_OVERRIDE)
                    if override is not None:
                        target = normalize_authority(override, 80)
                        if target is None:
                            problem = "invalid l5d-dst-override"
        if problem is not None:
            stream.route = self._route("", None)
            stream.route.requests.inc()
            stream.fail(BadRequest(problem))
            return
        stream.route_to(target)

    def _on_data(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is None:
            # A stream we already answered: its bytes are discarded, and released so the connection keeps going.
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.req.feed(event.data, event.flow_controlled_length)

    def _on_trailers(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.req.finish(_response_headers(event.headers))

    def _on_end(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.req.finish(True)

    def _on_reset(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.down_reset(event.error_code)

    def _on_window(self, event):
        if event.stream_id == 0:
            _pump_waiting(self)
            return
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.resp.pump()

    def _on_settings(self, event):
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            _pump_waiting(self)

    def _on_goaway(self, event):
        # The client opens no more streams; those in flight still finish.
        self._peer_goaway = True

    # -- helpers -----------------------------------------------------------------------------------------------

    def forget(self, sid):
        self._streams.pop(sid, None)
        self.conn.drop_closed(sid)
        if not self._streams:
            self._maybe_close()

    def _maybe_close(self):
        if self.alive and not self._streams and (self._draining or self._peer_goaway):
            self._close_soon()

    def _route(self, authority, endpoint):
        key = (authority, endpoint.pool_key if endpoint is not None else None)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = route_metrics(self.settings, self.peer, authority, endpoint)
        return route


def _error_label(error):
    """
    A bounded label for an h2 protocol error: its class name in snake case (C{FrameTooLargeError} becomes
    C{frame_too_large}); h2's exception classes are a fixed set.
    """
    label = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(error).__name__).lower()
    if label.endswith("_error") and label != "protocol_error":
        label = label[:-len("_error")]
    return label


def _count_protocol_error(settings, error):
    # The connection closes for it: count it as garbage on the HTTP layer, like TLS and transport-header errors.
    settings.metrics.tcp_protocol_error_total.labels(settings.direction, "h2", _error_label(error)).inc()


def _pump_waiting(proto):
    waiting = proto.waiting
    if waiting:
        proto.waiting = set()
        for half in waiting:
            half.pump()


@implementer(IPushProducer, IStreamEnd)
class _H2ClientProtocol(_H2Side):
    """
    One pooled upstream HTTP/2 connection, multiplexing the streams of any number of accepted connections.
    """

    conn = None

    def __init__(self, pool, key):
        self._pool = pool
        self.key = key
        self.flusher = pool.flusher
        self._streams = {}
        self.waiting = set()
        self.blocked = False
        self.retired = False
        self._closing = False
        self._dirty = False
        self._capacity = UPSTREAM_INITIAL_STREAMS
        self._idle_since = None
        self._idle_timer = None
        self._handlers = {
            ResponseReceived: self._on_response,
            DataReceived: self._on_data,
            TrailersReceived: self._on_trailers,
            StreamEnded: self._on_end,
            StreamReset: self._on_reset,
            WindowUpdated: self._on_window,
            RemoteSettingsChanged: self._on_settings,
            ConnectionTerminated: self._on_goaway,
            InformationalResponseReceived: self._on_informational,
        }

    def has_capacity(self):
        """
        @return: whether another stream may be opened here now.
        """
        return self.alive and not self.retired and len(self._streams) < self._capacity

    def open_stream(self, stream):
        """
        Send C{stream}'s request headers as a new stream here.
        """
        conn = self.conn
        try:
            uid = conn.get_next_available_stream_id()
        except NoAvailableStreamIDError:
            uid = _LAST_STREAM_ID + 1
        if uid > _LAST_STREAM_ID:
            self._pool._retire(self)
            self._pool.dispatch(stream, None)
            return
        req = stream.req
        ended = req.ended and req.tail is True and not req.q
        conn.send_headers(uid, stream.headers, end_stream=ended)
        self._streams[uid] = stream
        self._idle_since = None
        self.mark()
        stream.attached(self, uid, ended)

    # -- IProtocol ---------------------------------------------------------------------------------------------

    def connectionMade(self):
        set_nodelay(self.transport)
        self.conn = _new_connection(_CLIENT_CONFIG, True, self._pool._settings.max_header_bytes)
        self.alive = True
        self.transport.registerProducer(self, True)
        self.mark()
        self.flusher.flush()

    def _protocol_error(self, error):
        log.info("HTTP/2 protocol error from {key}: {error}", key=self.key, error=error)
        _count_protocol_error(self._pool._settings, error)

    def _after_events(self):
        self._check_idle()

    def connectionLost(self, reason=None):
        if not self.alive:
            return
        self.alive = False
        self._pool._lost(self)
        self._cancel_idle()
        streams = list(self._streams.values())
        self._streams.clear()
        self.waiting.clear()
        for stream in streams:
            stream.up = None
            stream.up_gone(None, "upstream connection lost")
        self.flusher.flush()

    # -- h2 events ---------------------------------------------------------------------------------------------

    def _on_response(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.up_head(event.headers, event.stream_ended is not None)

    def _on_informational(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.up_info(event.headers)

    def _on_data(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is None:
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.resp.feed(event.data, event.flow_controlled_length)

    def _on_trailers(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.up_trailers(event.headers)

    def _on_end(self, event):
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.up_end()

    def _on_reset(self, event):
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            stream.up = None
            self.waiting.discard(stream.req)
            stream.up_reset(event.error_code)

    def _on_window(self, event):
        if event.stream_id == 0:
            _pump_waiting(self)
            return
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.req.pump()

    def _on_settings(self, event):
        changed = event.changed_settings
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            self._capacity = min(changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value, UPSTREAM_MAX_STREAMS)
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            _pump_waiting(self)

    def _on_goaway(self, event):
        self._pool._retire(self)
        last = event.last_stream_id
        for uid, stream in list(self._streams.items()):
            if uid > last:
                stream.up_refused()

    # -- pool bookkeeping --------------------------------------------------------------------------------------

    def forget(self, uid):
        self._streams.pop(uid, None)
        self.conn.drop_closed(uid)
        if not self._streams:
            self._check_idle()

    def _check_idle(self):
        if self._streams or not self.alive or self._closing:
            return
        if self.retired:
            self.close()
            return
        if self._idle_since is None:
            self._idle_since = self._pool.reactor.seconds()
            if self._idle_timer is None:
                self._idle_timer = self._pool.reactor.callLater(self._pool._idle_timeout, self._idle_check)
            self._pool._became_idle(self)

    def _idle_check(self):
        self._idle_timer = None
        if self._streams or not self.alive:
            return
        if self._idle_since is None:
            self._check_idle()
            return
        left = self._idle_since + self._pool._idle_timeout - self._pool.reactor.seconds()
        if left > 0:
            self._idle_timer = self._pool.reactor.callLater(left, self._idle_check)
        else:
            self.close()

    def _cancel_idle(self):
        timer = self._idle_timer
        if timer is not None:
            self._idle_timer = None
            timer.cancel()

    def close(self):
        """
        Close this connection gracefully (GOAWAY, then FIN) and take it out of the pool.
        """
        self._pool._retire(self)
        self._cancel_idle()
        if self.alive and not self._closing:
            try:
                self.conn.close_connection()
            except ProtocolError:
                pass
            self._close_soon()


class H2Pool:
    """
    Multiplexed HTTP/2 client connections to endpoints, shared by every accepted connection of one direction.

    There is one connection per endpoint (keyed by L{Endpoint.pool_key}: address, identity and proxy), used by
    every stream, and another only when that one has received GOAWAY or has reached the endpoint's
    concurrent-stream limit. Connections idle for
    C{settings.pool_idle_timeout} seconds are closed.
    """

    def __init__(self, settings):
        """
        @param settings: the direction's L{linkproxy.net.context.HttpSettings} (C{connector}, C{reactor},
            C{pool_idle_timeout}, C{pool_max_idle}, C{max_header_bytes} are used).
        """
        self._settings = settings
        self.reactor = settings.reactor
        self._idle_timeout = settings.pool_idle_timeout
        self._conns = {}
        self._connecting = {}
        self._all = set()
        self.flusher = _Flusher()

    def connection_count(self, address=None):
        """
        @param address: an endpoint C{(host, port)}, or C{None} for all.
        @return: how many upstream connections are open or being opened (to C{address}).
        """
        if address is None:
            return len(self._all) + len(self._connecting)
        n = sum(1 for c in self._all if c.key[0] == address)
        return n + sum(1 for key in self._connecting if key[0] == address)

    def close(self):
        """
        Close every pooled connection (shutdown); streams still on them are reset.
        """
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._conns.clear()

    # -- used by the protocols ---------------------------------------------------------------------------------

    def dispatch(self, stream, endpoint):
        if endpoint is None:
            endpoint = stream.lease.endpoint
        key = endpoint.pool_key
        for conn in self._conns.get(key, ()):
            if conn.has_capacity():
                conn.open_stream(stream)
                return
        waiting = self._connecting.get(key)
        if waiting is not None:
            waiting.append(stream)
            return
        self._connecting[key] = [stream]
        proto = _H2ClientProtocol(self, key)
        d = self._settings.connector.connect(endpoint, proto, "http2")
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(key, endpoint),
                       errbackArgs=(key,))

    def _connected(self, proto, key, endpoint):
        waiting = self._connecting.pop(key, [])
        if not proto.alive:
            self._fail_waiting(waiting, "upstream connection lost")
            return
        self._all.add(proto)
        self._conns.setdefault(key, []).append(proto)
        for stream in waiting:
            if not stream.done:
                self.dispatch(stream, endpoint)
        proto._check_idle()
        self.flusher.flush()

    def _connect_failed(self, failure, key):
        settings = self._settings
        settings.metrics.tcp_connect_error_total.labels(settings.direction, format_address(key[0]),
                                                        connect_error_label(failure)).inc()
        waiting = self._connecting.pop(key, [])
        self._fail_waiting(waiting, f"connect failed: {failure.getErrorMessage()}")
        self.flusher.flush()

    def _fail_waiting(self, waiting, reason):
        for stream in waiting:
            if not stream.done:
                stream.connect_failed(reason)

    def _retire(self, proto):
        proto.retired = True
        conns = self._conns.get(proto.key)
        if conns is not None and proto in conns:
            conns.remove(proto)
            if not conns:
                del self._conns[proto.key]

    def _lost(self, proto):
        self._retire(proto)
        self._all.discard(proto)

    def _became_idle(self, proto):
        limit = self._settings.pool_max_idle
        idle = [c for c in self._conns.get(proto.key, ()) if not c._streams]
        if len(idle) > limit:
            proto.close()


def _header(headers, name):
    """
    The first value of C{name} in a list of C{(name, value)} byte pairs, or C{None}.
    """
    for key, value in headers:
        if key == name:
            return value
    return None
