"""
HTTP/1 proxying on Twisted and httptools: the accepted side (L{Http1ServerProtocol}), the upstream side
(L{Http1ClientProtocol}) and the per-endpoint pool of idle keep-alive upstream connections (L{Http1Pool}).

Shape of one exchange::

    client ─▶ Http1ServerProtocol ── route(authority) ─▶ lease ── pool.checkout / connect ─▶ Http1ClientProtocol
    client ◀─ Http1ServerProtocol ◀───────── response head, body, end ────────────────────── Http1ClientProtocol

Decisions worth knowing:
    - One exchange at a time per client connection. Pipelined requests are parsed as they arrive, but their
      parser events are held (bounded by L{MAX_HELD_BYTES}; reading pauses past it) and replayed in order when
      the current response ends.
    - Output is gathered per read event and written once (one C{write} per received segment and direction).
    - Backpressure: each protocol registers itself as the streaming producer of its own transport. When a
      transport's write buffer fills, the protocol pauses reading on the other side of the exchange; reading
      is also paused while more than L{MAX_HELD_BYTES} wait for an upstream or behind a pipelined request.
    - C{Expect: 100-continue} is forwarded, and the upstream's C{100 Continue} is relayed like any other 1xx
      (not to HTTP/1.0 clients). The upstream decides, so a rejection (417, 401, ...) reaches the client
      before it sends its body.
    - A response that ends before its request was fully received closes the client connection afterwards
      (the rest of the request cannot be framed any more); the upstream connection is closed too.
    - A rejected upgrade (anything but 101 to a request with C{Upgrade}) is answered with
      C{connection: close}, because the bytes after an upgrade request cannot be parsed as HTTP again.
      Upgrade requests with a body and C{CONNECT} are refused with 400.
    - The response timeout runs from the request head to the response head, but never fires while the
      client is still sending the request body; it restarts when the body is complete.
"""

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser, \
    HttpResponseParser
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.core import http1 as h1
from linkproxy.core.classify import is_failure
from linkproxy.core.errors import BadRequest, HeadersTooLarge, ProxyError, ResponseTimeout, Unreachable, \
    blames_endpoint
from linkproxy.core.headers import normalize_authority
from linkproxy.layers.stack import CONNECT, RESET, RESPONSE
from linkproxy.net.context import PLAIN, endpoint_tls, route_metrics
from linkproxy.net.exchange import IHttp1Downstream, IHttp1Upstream
from linkproxy.net.splice import set_nodelay
from linkproxy.net.tcp import connect_error_label
from linkproxy.net.twisted_private import direct_writer

log = Logger(namespace="linkproxy.net.http1")

MAX_HELD_BYTES = h1.MAX_HELD_BYTES

# Reasons reading from the client is paused; reading resumes when none is left.
PAUSE_UPSTREAM_FULL = 1   # the upstream's write buffer is full
_R_HOLD = 2     # too many bytes held for a pipelined request or a request waiting for its upstream

# How the response body is framed towards the client.
_BODY_NONE = 0
_BODY_LENGTH = 1
_BODY_CHUNKED = 2
_BODY_EOF = 3   # HTTP/1.0 client and no length known: delimited by closing the connection

_CRLF = b"\r\n"
_CHUNKED = (b"transfer-encoding", b"chunked")
_UPGRADE = (b"connection", b"upgrade")
_CLOSE = (b"connection", b"close")
_KEEP_ALIVE = (b"connection", b"keep-alive")
_HTTP10 = "1.0"

_MAX_ROUTE_CACHE = 128


class _Abort(Exception):
    """
    Raised inside a parser callback to stop parsing; the reason is left on the protocol.
    """


@implementer(IPushProducer, IHttp1Downstream)
class Http1ServerProtocol(Protocol):
    """
    The accepted side of an HTTP/1 connection: parses requests, routes each one, relays the response.

    The protocol is registered as the streaming producer of its own transport: C{pauseProducing} means "the
    client reads too slowly", and pauses reading from the upstream of the exchange in flight.

    @ivar settings: the L{HttpSettings} of this direction.
    @ivar peer: the L{PeerInfo} of this connection.
    """

    _disconnected = False
    _close_when_flushed = False
    _draining = False
    _timer = None
    _splice = None

    def __init__(self, settings, peer=PLAIN):
        """
        @param settings: L{linkproxy.net.context.HttpSettings}; requests go out through C{settings.h1_pool}.
        @param peer: what is known about the client; C{peer.client_id} becomes C{l5d-client-id}.
        """
        self.settings = settings
        self.peer = peer
        self._pool = settings.h1_pool
        self._reactor = settings.reactor
        self._stack = stack = settings.stack
        self._tap = stack.tap
        self._outbound = settings.direction == "outbound"
        self._max_head = settings.max_header_bytes
        self._client_id = peer.client_id
        self._routes = {}
        # The last Host seen and its authority: clients repeat it, and normalising costs more than parsing.
        self._last_host = None
        self._last_authority = None
        self._out = []
        self._req = h1.HeadCollector()
        self._pause_mask = 0
        self._down_full = False
        # Parse-time state: where the parser is, whatever exchange is being served.
        self._p_in_body = False
        self._p_size = 0
        self._p_coarse = 0
        self._p_raw = False
        self._p_dead = False
        self._p_error = None
        self._raw_held = []
        # Pipelined events waiting for the exchange in flight: [(handler, args, size)], or None.
        self._held = None
        self._held_bytes = 0
        self._replaying = False
        self._reset_exchange()
        self._parser = HttpRequestParser(self)

    def _reset_exchange(self):
        self._busy = False
        self._url = b""
        self._method = None
        self._target = None
        self._authority = None
        self._version = None
        self._keep_alive = True
        self._is_upgrade = False
        self._req_has_body = False
        self._req_chunked = False
        self._req_complete = False
        self._req_in_body = False
        self._trailers = None
        self._body_sent = False
        self._req_bytes = 0
        self._resp_bytes = 0
        self._pending_up = None
        self._pending_bytes = 0
        self._req_headers = None
        self._absolute = False
        self._call = None
        self._replay = None
        self._replay_bytes = 0
        self._retried = False
        self._up_reused = False
        self._lease = None
        self._released = False
        self._route_metrics = None
        self._t0 = 0.0
        self._up = None
        self._routing = None
        self._connecting = None
        self._resp_started = False
        self._resp_mode = _BODY_NONE
        self._status = 0
        self._latency_ms = 0.0
        self._resp_grpc = ""
        self._deadline = None
        self._error_pending = None
        self._failed = False

    # -- connection lifecycle ---------------------------------------------------------------------------------

    def connectionMade(self):
        """
        Set TCP_NODELAY and register as the transport's streaming producer.
        """
        set_nodelay(self.transport)
        self._write = direct_writer(self.transport)
        self.transport.registerProducer(self, True)
        tracker = self.settings.tracker
        if tracker is not None:
            tracker.add(self)

    def connectionLost(self, reason=ConnectionDone()):
        """
        Clean up the exchange in flight, if any (see the module docstring).
        """
        if self._disconnected:
            return
        self._disconnected = True
        self._held = None
        tracker = self.settings.tracker
        if tracker is not None:
            tracker.discard(self)
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        splice = self._splice
        if splice is not None:
            splice.peer_closed()
            return
        self._cancel_upstream()
        if self._busy:
            # The client gave up before the response head: that says nothing about the endpoint (a load
            # generator stopping must not eject it), so the outcome is "cancelled".
            self._release(None)

    def drain(self):
        """
        Finish the exchange in flight (its response carries C{connection: close}), then close; close at once
        when idle. An upgraded connection runs to its end.
        """
        self._draining = True
        if self._disconnected or self._splice is not None:
            return
        if not self._busy:
            self._close()

    def _close(self):
        # A TLS transport (inbound mTLS) holds its close until its producer is unregistered, so unregister first.
        transport = self.transport
        transport.unregisterProducer()
        transport.loseConnection()

    def abort(self):
        """
        Close at once, with a reset.
        """
        if not self._disconnected:
            self.transport.abortConnection()

    # -- IPushProducer: the client's transport reports its write buffer ------------------------------------------

    def pauseProducing(self):
        """
        IPushProducer: this side's transport has a full write buffer; pause the other side's reading.
        """
        self._down_full = True
        up = self._up or self._splice
        if up is not None:
            up.pause_reading()

    def resumeProducing(self):
        """
        IPushProducer: the write buffer drained; resume the other side's reading.
        """
        self._down_full = False
        up = self._up or self._splice
        if up is not None:
            up.resume_reading()

    def stopProducing(self):
        """
        IPushProducer: the transport is going away; connectionLost does the cleanup.
        """
        pass

    def pause_request(self, reason):
        mask = self._pause_mask
        self._pause_mask = mask | reason
        if not mask and not self._disconnected:
            self.transport.pauseProducing()

    def resume_request(self, reason):
        mask = self._pause_mask
        if mask & reason:
            mask = self._pause_mask = mask & ~reason
            if not mask and not self._disconnected:
                self.transport.resumeProducing()

    # -- output ------------------------------------------------------------------------------------------------

    def flush(self):
        out = self._out
        if out and not self._disconnected:
            self._write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        up = self._up
        if up is not None and up.out:
            up.flush()
        if self._close_when_flushed and not self._disconnected:
            self._close()

    # -- input -------------------------------------------------------------------------------------------------

    def dataReceived(self, data):
        """
        Parse, route and forward; output is written once at the end.
        """
        splice = self._splice
        if splice is not None:
            splice._write(data)
            return
        if self._p_dead:
            return
        if self._p_raw:
            self._hold_raw(data)
            return
        if not self._p_in_body:
            self._p_coarse += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            self._p_raw = True
            rest = data[e.args[0]:]
            if rest:
                self._hold_raw(rest)
        except HttpParserCallbackError as e:
            self._parse_failed(self._p_error or self._internal_error(e))
        except HttpParserError as e:
            self._parse_failed(self._p_error or BadRequest(f"malformed request: {e}"))
        else:
            if not self._p_in_body and self._p_coarse > self._max_head:
                self._parse_failed(HeadersTooLarge("request head too large"))
        self.flush()

    def _internal_error(self, exc):
        cause = exc.__context__ if exc.__context__ is not None else exc
        log.failure("HTTP/1 request handling failed", Failure(cause))
        return Unreachable("internal proxy error")

    def _hold_raw(self, data):
        # Bytes after an upgrade request: spliced after a 101, dropped otherwise.
        self._raw_held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > MAX_HELD_BYTES:
            self.pause_request(_R_HOLD)

    def _parse_failed(self, err):
        self._p_dead = True
        if self._close_when_flushed:
            # The connection closes after an answer already given (a request refused at its head, which llhttp
            # may reject again after it, or Connection: close): what failed to parse gets no second answer.
            return
        if self._busy and not self._req_complete:
            # The request in flight is the broken one.
            self._fail(err, close=True)
        elif self._held is not None:
            self._held.append((self._emit_fatal, (err,), 0))
        else:
            self._emit_fatal(err)

    def _emit_fatal(self, err):
        self.settings.metrics.http_error(self.settings.direction, err)
        self._count_error(err.status, 0.0, err.reason)
        self._out.append(h1.error_response(err.status, err.reason, close=True))
        self._close_when_flushed = True

    # Parser callbacks (parse time). Events for a request behind the one in flight are held.

    def on_message_begin(self):
        """
        httptools callback: a message starts.
        """
        self._p_size = 0
        if self._held is None:
            self._req.reset()
            self._url = b""
        else:
            self._held.append((self._begin, (), 0))

    def _begin(self):
        self._req.reset()
        self._url = b""

    def on_url(self, url):
        """
        httptools callback: (part of) the request-target.
        """
        self._p_size += len(url)
        if self._held is None:
            self._url += url
        else:
            self._hold(self._add_url, (url,), len(url))

    def _add_url(self, url):
        self._url += url

    def on_header(self, name, value):
        """
        httptools callback: one header (or trailer) field.
        """
        size = len(name) + len(value) + 4
        self._p_size += size
        if self._p_size > self._max_head:
            self._p_error = HeadersTooLarge("request head too large")
            raise _Abort()
        if self._held is None:
            if self._req_in_body:
                self._add_trailer(name, value)
            else:
                self._req.add(name, value)
        else:
            self._hold(self._add_header, (name, value), size)

    def _add_header(self, name, value):
        if self._req_in_body:
            self._add_trailer(name, value)
        else:
            self._req.add(name, value)

    def _add_trailer(self, name, value):
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name.lower(), value))

    def on_headers_complete(self):
        """
        httptools callback: the head is complete.
        """
        self._p_in_body = True
        self._p_coarse = 0
        p = self._parser
        args = (p.get_method(), p.get_http_version(), p.should_keep_alive(), p.should_upgrade())
        if self._held is None:
            self._headers_complete(*args)
        else:
            self._hold(self._headers_complete, args, 0)

    def on_body(self, data):
        """
        httptools callback: body bytes, de-chunked.
        """
        if self._held is None:
            self._body(data)
        else:
            self._hold(self._body, (data,), len(data))

    def on_message_complete(self):
        """
        httptools callback: the message is complete.
        """
        self._p_in_body = False
        if self._held is None:
            self._message_complete()
        else:
            self._hold(self._message_complete, (), 0)

    def _hold(self, handler, args, size):
        self._held.append((handler, args, size))
        if size:
            self._held_bytes += size
            if self._held_bytes + self._pending_bytes > MAX_HELD_BYTES:
                self.pause_request(_R_HOLD)

    # -- one exchange: request side ------------------------------------------------------------------------------

    def _headers_complete(self, method, version, keep_alive, upgrade):
        if self._close_when_flushed or self._disconnected:
            return
        req = self._req
        self._busy = True
        self._req_in_body = True
        self._t0 = now = self._reactor.seconds()
        self._method = method
        self._version = version
        self._keep_alive = keep_alive and not self._draining
        target = self._target = self._url
        if req.chunked:
            # Checked before routing: a request whose end the proxy and the upstream could see differently
            # (request smuggling) must not reach an endpoint, not even its head.
            problem = h1.request_framing_error(req, version)
            if problem is not None:
                return self._fail(BadRequest(problem), close=True)
            self._req_chunked = self._req_has_body = True
            framing = _CHUNKED
        elif req.content_length is not None:
            length = h1.parse_content_length(req.content_length)
            if length is None:
                return self._fail(BadRequest("invalid content-length"), close=True)
            self._req_has_body = length > 0
            framing = (b"content-length", b"%d" % length)
        else:
            framing = None
        host = req.host
        if host is not None and host == self._last_host and target[:1] == b"/":
            authority = self._last_authority
        else:
            authority = h1.request_authority(target, host, method)
            if target[:1] == b"/" and authority is not None:
                self._last_host, self._last_authority = host, authority
        if req.dst_override is not None and self.settings.dst_override:
            authority = normalize_authority(req.dst_override, 80)
            if authority is None:
                return self._fail(BadRequest("invalid l5d-dst-override"), close=not self._req_has_body)
        self._authority = authority
        if upgrade:
            if method == b"CONNECT":
                return self._fail(BadRequest("CONNECT is not supported"), close=True)
            if self._req_has_body or req.upgrade is None:
                return self._fail(BadRequest("upgrade requests with a body are not supported"), close=True)
            self._is_upgrade = True
        if authority is None:
            return self._fail(BadRequest("missing or invalid host"), close=not self._req_has_body)
        headers = req.finish(self._client_id)
        if upgrade:
            headers.append(_UPGRADE)
            headers.append((b"upgrade", req.upgrade))
        if framing is not None:
            headers.append(framing)
        # The head is written per attempt, for its endpoint (_head_for): an absolute-form target goes to an
        # origin server in origin-form, and to a peer proxy as the app sent it.
        self._req_headers = headers
        self._absolute = target[:1] != b"/"
        self._pending_up = []
        self._replay = []
        call = self._call = self._stack.begin(authority, method, target, now)
        timeout = call.timeout
        self._deadline = now + timeout
        timer = self._timer
        if timer is None:
            self._timer = self._reactor.callLater(timeout, self._on_timer)
        elif timer.getTime() > self._deadline:
            # A route timeout shorter than the listener's.
            timer.reset(timeout)
        # A lease known at once is dispatched within the parse (or the replay of held events), whose caller
        # flushes when it is done; a later one flushes itself (_routed).
        self._routing = call.pick(self._dispatch, self._routed, self._route_failed)

    def _routed(self, lease):
        # route()'s Deferred fired; the exchange may have ended while it waited.
        self._routing = None
        if self._disconnected or not self._busy or self._lease is not None:
            # Nothing was sent: not the endpoint's failure.
            lease.release(None)
            return
        self._dispatch(lease)
        self.flush()

    def _dispatch(self, lease):
        # Send the request to the lease's endpoint, on a pooled connection or a new one; the caller flushes.
        self._lease = lease
        self._released = False
        endpoint = lease.endpoint
        key = (self._authority, endpoint.pool_key)
        rm = self._routes.get(key)
        if rm is None:
            rm = self._route_for(self._authority, endpoint, key)
        self._route_metrics = rm
        if self._call.attempts == 1:
            # One request in the golden metrics, however many attempts it takes.
            rm.requests.inc()
        conn = self._upstream_pool().checkout(endpoint, self._reactor.seconds())
        if conn is not None:
            self._attach(conn, True)
        else:
            self._connect(endpoint)

    def _route_for(self, authority, endpoint, key):
        if len(self._routes) >= _MAX_ROUTE_CACHE:
            self._routes.clear()
        rm = self._routes[key] = route_metrics(self.settings, self.peer, authority, endpoint)
        return rm

    def _route_failed(self, failure):
        self._routing = None
        if self._disconnected or not self._busy:
            return
        err = failure.value
        if not isinstance(err, ProxyError):
            if failure.check(CancelledError):
                return
            log.failure("routing {authority} failed", failure, authority=self._authority)
            err = Unreachable("routing failed")
        self._fail(err)
        self.flush()

    def _upstream_pool(self):
        # Hook for linkproxy.net.orig_proto.UpgradingPool, which may carry the exchange as HTTP/2: an upgrade
        # (WebSocket) request stays HTTP/1 end to end, so it takes the upgrading pool's plain HTTP/1 pool.
        pool = self._pool
        return getattr(pool, "plain", pool) if self._is_upgrade else pool

    def _connect(self, endpoint):
        d = self._connecting = self._upstream_pool().connect(endpoint)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn):
        self._connecting = None
        if self._disconnected or not self._busy or self._up is not None:
            conn.abort()
            return
        self._attach(conn, False)
        self.flush()

    def _connect_failed(self, failure):
        self._connecting = None
        if self._disconnected or not self._busy or failure.check(CancelledError):
            return
        endpoint = self._lease.endpoint
        settings = self.settings
        settings.metrics.tcp_connect_error_total.labels(settings.direction, endpoint.addr_str,
                                                        connect_error_label(failure)).inc()
        # Nothing was written: another endpoint gets the request as it is.
        if self._may_retry(CONNECT, endpoint, True):
            self._next_attempt(False)
        else:
            self._fail(Unreachable(f"connect to {endpoint.addr_str} failed: {_short(failure.value)}"))
        self.flush()

    def _release(self, success):
        if not self._released and self._lease is not None:
            self._released = True
            self._lease.release(success)

    def _may_retry(self, kind, endpoint, replayable, status=502):
        # The attempt on endpoint failed before its response reached the client; the call decides.
        self._release(False)
        now = self._reactor.seconds()
        if self._deadline is not None and now >= self._deadline:
            return False
        safe = not self._req_has_body or h1.is_idempotent(self._method)
        if not self._call.retry(kind, now, endpoint, safe, replayable):
            return False
        if self._tap.watchers:
            self._tap.emit(self._event(status, "", (now - self._t0) * 1000.0, f"retried: {kind}", False))
        return True

    def _next_attempt(self, replay):
        # Route the request again (the call avoids the endpoint that failed), resending what was sent.
        self._lease = None
        if replay:
            self._pending_up = list(self._replay)
            self._pending_bytes = self._replay_bytes
        self._routing = self._call.pick(self._dispatch, self._routed, self._route_failed)

    def _head_for(self, endpoint):
        target, headers = self._target, self._req_headers
        if self._absolute and not (self._outbound and endpoint.meshed and self.settings.connector.meshed):
            target, headers = h1.origin_form(target, headers)
        return h1.serialize_request_head(self._method, target, headers)

    def _attach(self, conn, reused):
        self._up = conn
        self._up_reused = reused
        conn.attach(self, self._method)
        if self._down_full:
            conn.pause_reading()
        pending, self._pending_up = self._pending_up, None
        if self._pending_bytes:
            self._pending_bytes = 0
            if self._held_bytes <= MAX_HELD_BYTES:
                self.resume_request(_R_HOLD)
        out = conn.out
        out.append(self._head_for(conn.endpoint))
        if pending:
            out += pending

    def _send_up(self, pieces, size):
        # Body bytes go to the upstream, or wait for it (bounded) while it is being chosen or connected. Up to
        # MAX_REPLAY_BYTES of them are also kept until the response head, so the request can be sent again.
        replay = self._replay
        if replay is not None:
            self._replay_bytes += size
            if self._replay_bytes > h1.MAX_REPLAY_BYTES:
                self._replay = None
            else:
                replay += pieces
        up = self._up
        if up is not None:
            up.out += pieces
        elif self._pending_up is not None:
            self._pending_up += pieces
            self._pending_bytes += size
            if self._pending_bytes + self._held_bytes > MAX_HELD_BYTES:
                self.pause_request(_R_HOLD)

    def _body(self, data):
        if not self._busy or self._failed:
            return
        self._body_sent = True
        size = len(data)
        self._req_bytes += size
        if self._req_chunked:
            self._send_up((h1.chunk_prefix(size), data, _CRLF), size)
        else:
            self._send_up((data,), size)

    def _message_complete(self):
        self._req_in_body = False
        if not self._busy:
            return
        self._req_complete = True
        err = self._error_pending
        if err is not None:
            self._error_pending = None
            self._write_error(err)
            return
        if self._failed:
            return
        if self._req_chunked:
            last = h1.last_chunk(self._trailers)
            self._send_up((last,), len(last))
        if self._deadline is not None and self._req_has_body:
            # The client finished sending: the response timeout starts now.
            self._deadline = self._reactor.seconds() + self._call.timeout
        if self._is_upgrade:
            # Nothing after an upgrade request is HTTP; its bytes go to _hold_raw.
            return
        self._held = []

    # -- one exchange: response side (called by Http1ClientProtocol) --------------------------------------------

    def interim(self, status, reason, headers):
        if self._version != _HTTP10:
            self._out.append(h1.serialize_response_head(status, reason, headers))

    def response_head(self, conn, status, reason, resp):
        now = self._reactor.seconds()
        if (status >= 500 or resp.grpc_status) and is_failure(status, resp.grpc_status):
            call = self._call
            if (call.route.retryable and self._req_complete and self._replay is not None and not self._is_upgrade
                    and self._may_retry(RESPONSE, conn.endpoint, True, status)):
                # This answer is dropped (it still counts among the route's actual responses); the connection
                # is mid-message, so it goes too.
                call.answered(status, resp.grpc_status, (now - self._t0) * 1000.0)
                self._up = None
                conn.detach()
                conn.abort()
                self._next_attempt(True)
                return False
            self._release(False)
        else:
            self._release(True)
        self._deadline = None
        self._replay = None
        headers = resp.finish()
        if status == 101 and not self._is_upgrade:
            self.upstream_failed(conn, Unreachable("upstream switched protocols unasked"))
            return False
        self._resp_started = True
        self._status = status
        self._latency_ms = (now - self._t0) * 1000.0
        self._resp_grpc = resp.grpc_status
        close = (not self._keep_alive or self._draining
                 or (self._is_upgrade and status != 101))
        if status == 101:
            headers.append(_UPGRADE)
            if resp.upgrade is not None:
                headers.append((b"upgrade", resp.upgrade))
            mode = _BODY_NONE
            close = False
        elif not h1.response_has_body(self._method, status):
            mode = _BODY_NONE
            if resp.content_length is not None and (status == 304 or self._method == b"HEAD"):
                headers.append((b"content-length", resp.content_length))
        elif resp.content_length is not None and not resp.chunked:
            mode = _BODY_LENGTH
            headers.append((b"content-length", resp.content_length))
        elif self._version != _HTTP10:
            mode = _BODY_CHUNKED
            headers.append(_CHUNKED)
        else:
            mode = _BODY_EOF
            close = True
        self._resp_mode = mode
        if close:
            headers.append(_CLOSE)
            self._keep_alive = False
        elif self._version == _HTTP10:
            headers.append(_KEEP_ALIVE)
        self._out.append(h1.serialize_response_head(status, reason, headers))
        return True

    def response_body(self, data):
        self._resp_bytes += len(data)
        if self._resp_mode == _BODY_CHUNKED:
            self._out += (h1.chunk_prefix(len(data)), data, _CRLF)
        else:
            self._out.append(data)

    def response_end(self, trailers):
        if self._resp_mode == _BODY_CHUNKED:
            self._out.append(h1.last_chunk(trailers))
        grpc = self._resp_grpc
        if trailers and not grpc:
            for name, value in trailers:
                if name == b"grpc-status":
                    grpc = value.decode("ascii", "replace").strip()
        self._finished(self._route_metrics, self._status, grpc, self._latency_ms)

    def _finished(self, rm, status, grpc, latency_ms, error=""):
        # The request's one answer, counted once: golden metrics, the route's, and the tap when watched.
        rm.response(status, grpc, latency_ms)
        call = self._call
        if call is not None and call.metrics is not None:
            call.answered(status, grpc, latency_ms)
            call.finished(status, grpc, latency_ms)
        if self._tap.watchers:
            self._tap.emit(self._event(status, grpc, latency_ms, error, True))

    def _event(self, status, grpc, latency_ms, error, final):
        # One tap event (linkproxy.layers.tap): built only while someone watches.
        call = self._call
        lease = self._lease
        endpoint = lease.endpoint if lease is not None else None
        tls = endpoint_tls(self.settings.connector, endpoint)[0] if self._outbound else self.peer.tls
        peer = self.transport.getPeer() if self.transport is not None else None
        path = self._target or b""
        if path[:1] != b"/" and b"://" in path:
            # Absolute-form: the path, as the app gets it (origin-form).
            slash = path.find(b"/", path.find(b"://") + 3)
            path = path[slash:] if slash >= 0 else b"/"
        return {
            "direction": self.settings.direction, "authority": self._authority or "",
            "method": (self._method or b"").decode("latin-1"), "path": path.decode("latin-1"),
            "status": status, "grpc_status": grpc, "latency_ms": round(latency_ms, 3),
            "duration_ms": round((self._reactor.seconds() - self._t0) * 1000.0, 3) if self._busy else 0.0,
            "endpoint": endpoint.addr_str if endpoint is not None else "", "tls": tls,
            "client_id": self.peer.client_id or "", "request_bytes": self._req_bytes,
            "response_bytes": self._resp_bytes, "route": call.route.name if call is not None else "default",
            "error": error, "attempt": call.attempts if call is not None else 0, "final": final,
            "client_addr": getattr(peer, "host", ""), "version": self._version or "1.1",
        }

    def response_complete(self, conn):
        # The response has ended; return the upstream connection and move to the next request.
        if conn is self._up:
            self._up = None
            conn.detach()
            if self._req_complete:
                # The pool closes it instead when it cannot be reused.
                self._pool.release(conn, self._reactor.seconds())
            else:
                conn.close()
        if not self._req_complete or not self._keep_alive:
            self._p_dead = True
            self._close_when_flushed = True
            return
        self._end_exchange()

    def switch_protocols(self, conn, rest):
        # A 101: from here on both connections are one opaque byte stream.
        self._up = None
        self._splice = conn
        conn.splice_to(self)
        self._finished(self._route_metrics, self._status, "", self._latency_ms)
        self._deadline = None
        if rest:
            self._out.append(rest)
        raw, self._raw_held = self._raw_held, []
        self._held_bytes = 0
        self.resume_request(_R_HOLD)
        if raw:
            conn._write(b"".join(raw))

    def peer_closed(self):
        """
        The upstream of an upgraded (spliced) connection closed: close this side once its bytes are written.
        """
        if not self._disconnected:
            self.flush()
            self._close()

    def upstream_lost(self, conn, got_bytes):
        # The upstream closed (or reset) while serving this exchange.
        if conn is not self._up:
            return
        self._up = None
        conn.detach()
        if self._resp_started:
            # Mid-body: the client cannot get a clean error any more; close its connection.
            self._finished(self._route_metrics, self._status, self._resp_grpc, self._latency_ms,
                           "upstream closed the connection mid-response")
            self._p_dead = True
            self._close_when_flushed = True
            return
        replayable = self._replay is not None
        if (not got_bytes and replayable and self._up_reused and not self._retried
                and (not self._body_sent or h1.is_idempotent(self._method))):
            # A reused connection the server had already closed: send the request again on a fresh one, to
            # the same endpoint (the race is the keep-alive's, not the endpoint's failure).
            self._retried = True
            self._pending_up = list(self._replay)
            self._pending_bytes = self._replay_bytes
            self._connect(self._lease.endpoint)
            return
        if self._may_retry(RESET, conn.endpoint, replayable):
            self._next_attempt(True)
            return
        self._fail(Unreachable("upstream closed the connection before responding"))

    def upstream_failed(self, conn, err):
        # The upstream sent something that is not HTTP/1: drop it.
        if conn is self._up:
            self._up = None
            conn.detach()
        conn.abort()
        if self._resp_started:
            self._finished(self._route_metrics, self._status, self._resp_grpc, self._latency_ms, err.reason)
            self._p_dead = True
            self._close_when_flushed = True
        else:
            self._fail(err)

    # -- errors the proxy answers itself ---------------------------------------------------------------------------

    def _fail(self, err, close=False):
        """
        Answer the exchange in flight with C{err}, or close when part of a response was already sent.
        """
        self._deadline = None
        # Only the endpoint's own failures count against it; the proxy's rejections of the client do not.
        self._release(False if blames_endpoint(err) else None)
        self._cancel_upstream()
        self._failed = True
        self.settings.metrics.http_error(self.settings.direction, err)
        self._count_error(err.status, (self._reactor.seconds() - self._t0) * 1000.0, err.reason)
        if self._resp_started:
            self._p_dead = True
            self._close_when_flushed = True
        elif self._req_complete:
            self._write_error(err)
        elif close or self._req_has_body or self._is_upgrade:
            # The rest of the request body will not be read: answer, then close.
            self._p_dead = True
            self._keep_alive = False
            self._write_error(err)
        else:
            # A request without a body: its end is parsed right after its head; answer then, in order.
            self._error_pending = err

    def _write_error(self, err):
        close = not self._keep_alive or self._draining or self._is_upgrade
        self._resp_started = True
        self._out.append(h1.error_response(err.status, err.reason, close))
        if close:
            self._p_dead = True
            self._close_when_flushed = True
        else:
            self._end_exchange()

    def _count_error(self, status, latency_ms, reason):
        rm = self._route_metrics
        if rm is None:
            authority = self._authority or ""
            key = (authority, None)
            rm = self._routes.get(key)
            if rm is None:
                rm = self._route_for(authority, None, key)
            rm.requests.inc()
        self._finished(rm, status, "", latency_ms, reason)

    def _cancel_upstream(self):
        conn = self._up
        if conn is not None:
            self._up = None
            conn.detach()
            conn.abort()
        if self._routing is not None:
            d, self._routing = self._routing, None
            d.cancel()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._pending_up = None
        self._pending_bytes = 0

    def _on_timer(self):
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._disconnected:
            return
        now = self._reactor.seconds()
        call = self._call
        if not self._req_complete and self._req_has_body:
            # The client is still sending; the clock restarts when it is done (see _message_complete).
            deadline = self._deadline = max(deadline, now + call.timeout)
        if now < deadline:
            self._timer = self._reactor.callLater(deadline - now, self._on_timer)
            return
        self._fail(ResponseTimeout(call.timeout_reason))
        self.flush()

    # -- moving on ------------------------------------------------------------------------------------------------

    def _end_exchange(self):
        self._reset_exchange()
        if self._close_when_flushed:
            return
        if self._draining:
            self._close_when_flushed = True
            return
        self._replay_held()

    def _replay_held(self):
        held = self._held
        if held is not None and not self._replaying:
            self._held = None
            self._held_bytes = 0
            if held:
                self._replay_events(held)
        if self._pause_mask & _R_HOLD and self._held_bytes + self._pending_bytes <= MAX_HELD_BYTES:
            self.resume_request(_R_HOLD)

    def _replay_events(self, held):
        # Feed the held events of pipelined requests back in, until one of them is in flight again.
        self._replaying = True
        try:
            for i, (handler, args, _) in enumerate(held):
                handler(*args)
                if self._held is not None:
                    # The replayed request is in flight with its request complete: hold the rest again.
                    rest = held[i + 1:]
                    self._held.extend(rest)
                    self._held_bytes = sum(size for _, _, size in rest)
                    break
                if self._close_when_flushed:
                    break
        finally:
            self._replaying = False


@implementer(IPushProducer, IHttp1Upstream)
class Http1ClientProtocol(Protocol):
    """
    One upstream HTTP/1.1 connection, serving one exchange of an L{Http1ServerProtocol} at a time.

    It is registered as the streaming producer of its own transport: C{pauseProducing} means "the upstream
    reads too slowly", and pauses reading from the client of the exchange in flight.

    @ivar endpoint: the L{Endpoint} it is connected to.
    @ivar out: bytes to write on the next flush.
    @ivar idle_since: when it was last returned to the pool.
    """

    idle_since = 0.0
    in_pool = False
    _closed = False
    _splice = None

    def __init__(self, pool, endpoint):
        self._pool = pool
        self.endpoint = endpoint
        self.out = []
        self._server = None
        self._method = None
        self._resp = h1.HeadCollector()
        self._max_head = pool.max_header_bytes
        self._reason = b""
        self._trailers = None
        self._in_body = False
        self._interim_msg = False
        self._switching = False
        self._skip = False
        self._done = False
        self._dirty = False
        self._got = False
        self._keep_alive = True
        self._full = False
        self._reading_paused = False

    def connectionMade(self):
        """
        Set TCP_NODELAY and register as the transport's streaming producer.
        """
        set_nodelay(self.transport)
        self._write = direct_writer(self.transport)
        self.transport.registerProducer(self, True)
        self._parser = HttpResponseParser(self)

    # -- the exchange ---------------------------------------------------------------------------------------------

    def attach(self, server, method):
        """
        Serve one exchange of C{server} for a request with C{method}.
        """
        self._server = server
        self._method = method
        self._got = False
        self._done = False
        if self._full:
            server.pause_request(PAUSE_UPSTREAM_FULL)

    def detach(self):
        """
        The exchange is over (or abandoned): flush what is queued and stop reporting to the server.
        """
        server = self._server
        if server is None:
            return
        self._server = None
        if self.out and not self._closed:
            self.flush()
        if self._full:
            server.resume_request(PAUSE_UPSTREAM_FULL)
        if self._reading_paused:
            self.resume_reading()

    def reusable(self):
        """
        C{True} when the connection can serve another request.
        """
        return (self._keep_alive and not self._dirty and not self._closed and self._splice is None
                and not self.transport.disconnecting)

    def flush(self):
        """
        Write what is queued in L{out} in one call.
        """
        out = self.out
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def close(self):
        """
        Close after writing what is queued.
        """
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()

    def abort(self):
        """
        Close at once: the exchange was abandoned and nothing queued matters.
        """
        if not self._closed:
            self._closed = True
            self.out.clear()
            self.transport.abortConnection()

    def pause_reading(self):
        """
        Stop reading from the upstream (the client reads too slowly).
        """
        if not self._reading_paused and not self._closed:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self):
        """
        Undo L{pause_reading}.
        """
        if self._reading_paused:
            self._reading_paused = False
            if not self._closed:
                self.transport.resumeProducing()

    def peer_closed(self):
        """
        The client of an upgraded (spliced) connection closed: close this side once its bytes are written.
        """
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()

    def splice_to(self, server):
        """
        Become the upstream half of an opaque byte splice with C{server} (after a 101).
        """
        self._splice = server
        self._server = None

    # IPushProducer: this connection's transport reports its write buffer.

    def pauseProducing(self):
        """
        IPushProducer: this side's transport has a full write buffer; pause the other side's reading.
        """
        self._full = True
        server = self._server or self._splice
        if server is not None:
            server.pause_request(PAUSE_UPSTREAM_FULL)

    def resumeProducing(self):
        """
        IPushProducer: the write buffer drained; resume the other side's reading.
        """
        self._full = False
        server = self._server or self._splice
        if server is not None:
            server.resume_request(PAUSE_UPSTREAM_FULL)

    def stopProducing(self):
        """
        IPushProducer: the transport is going away; connectionLost does the cleanup.
        """
        pass

    # -- input ------------------------------------------------------------------------------------------------------

    def dataReceived(self, data):
        """
        Parse, route and forward; output is written once at the end.
        """
        splice = self._splice
        if splice is not None:
            splice._write(data)
            return
        server = self._server
        if server is None:
            # Bytes on an idle connection (a 408, garbage): it cannot be trusted with another request.
            self._dirty = True
            self.close()
            return
        self._got = True
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            if self._switching and self._server is server:
                server.switch_protocols(self, data[e.args[0]:])
        except HttpParserError as e:
            self._dirty = True
            if isinstance(e, HttpParserCallbackError) and not isinstance(e.__context__, _Abort):
                log.failure("HTTP/1 response handling failed", Failure(e.__context__ or e))
            if self._server is server:
                server.upstream_failed(self, Unreachable(f"invalid response from upstream: {_short(e)}"))
            else:
                self.abort()
        else:
            if self._switching and self._splice is None and self._server is server:
                server.switch_protocols(self, b"")
        if self._skip:
            # A response to HEAD ended at its head, but the parser expects the body its headers describe.
            self._skip = False
            self._parser = HttpResponseParser(self)
        if self._done:
            self._done = False
            if self._server is server:
                server.response_complete(self)
        server.flush()

    def on_message_begin(self):
        """
        httptools callback: a message starts.
        """
        self._resp.reset()
        self._reason = b""
        self._in_body = False
        self._trailers = None

    def on_status(self, reason):
        """
        httptools callback: (part of) the reason phrase.
        """
        self._reason += reason

    def on_header(self, name, value):
        """
        httptools callback: one header (or trailer) field.
        """
        if self._in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name.lower(), value))
            return
        resp = self._resp
        resp.add(name, value)
        if resp.size > self._max_head:
            self._server.upstream_failed(self, Unreachable("response head too large"))
            raise _Abort()

    def on_headers_complete(self):
        """
        httptools callback: the head is complete.
        """
        server = self._server
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            self._interim_msg = True
            server.interim(status, self._reason, self._resp.finish())
            return
        self._in_body = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._resp.chunked and self._parser.get_http_version() == _HTTP10:
            # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing; the connection is closed
            # after it rather than trusted with another request.
            self._keep_alive = False
        if status == 101:
            self._switching = True
        if not server.response_head(self, status, self._reason, self._resp):
            raise _Abort()
        if self._method == b"HEAD":
            self._skip = True
            self._done = True
            server.response_end(())

    def on_body(self, data):
        """
        httptools callback: body bytes, de-chunked.
        """
        if self._skip:
            self._dirty = True
            return
        self._server.response_body(data)

    def on_message_complete(self):
        """
        httptools callback: the message is complete.
        """
        if self._interim_msg:
            self._interim_msg = False
            return
        if self._skip or self._switching:
            return
        self._done = True
        self._server.response_end(self._trailers)

    def connectionLost(self, reason=ConnectionDone()):
        """
        Clean up the exchange in flight, if any (see the module docstring).
        """
        self._closed = True
        splice = self._splice
        if splice is not None:
            splice.peer_closed()
            return
        server = self._server
        if server is None:
            if self.in_pool:
                self._pool.discard(self)
            return
        if (self._in_body and not self._done and not self._skip and self._resp.content_length is None
                and not self._resp.chunked and reason.check(ConnectionDone) is not None):
            # A body delimited by the end of the connection (HTTP/1.0 style) ended cleanly.
            server.response_end(self._trailers)
            server.response_complete(self)
        else:
            server.upstream_lost(self, self._got)
        server.flush()


class Http1Pool:
    """
    Idle keep-alive upstream connections, per L{Endpoint.pool_key} (address, identity, proxy), most recently
    used first.

    Idle connections older than C{settings.pool_idle_timeout} are closed by one timer per pool; at most
    C{settings.pool_max_idle} are kept per address.
    """

    def __init__(self, settings):
        """
        @param settings: the L{HttpSettings} of the direction this pool serves.
        """
        self._settings = settings
        self._reactor = settings.reactor
        self._connector = settings.connector
        self.max_header_bytes = settings.max_header_bytes
        self._idle = {}
        self._timer = None

    def __len__(self):
        return sum(len(stack) for stack in self._idle.values())

    def checkout(self, endpoint, now):
        """
        Take an idle connection to C{endpoint}, if a fresh one is available.

        @param now: the reactor's current time.
        @return: a connected L{Http1ClientProtocol}, or C{None}.
        """
        stack = self._idle.get(endpoint.pool_key)
        if not stack:
            return None
        oldest = now - self._settings.pool_idle_timeout
        while stack:
            conn = stack.pop()
            conn.in_pool = False
            if conn.idle_since > oldest and conn.reusable():
                return conn
            conn.close()
        return None

    def connect(self, endpoint):
        """
        Open a new connection to C{endpoint}.

        @return: a Deferred firing with the connected L{Http1ClientProtocol}.
        """
        conn = Http1ClientProtocol(self, endpoint)
        return self._connector.connect(endpoint, conn, "http1")

    def release(self, conn, now):
        """
        Keep C{conn} for reuse, or close it when it cannot be reused or the pool for its address is full.
        """
        limit = self._settings.pool_max_idle
        if limit <= 0 or not conn.reusable():
            conn.close()
            return
        key = conn.endpoint.pool_key
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        elif len(stack) >= limit:
            oldest = stack.pop(0)
            oldest.in_pool = False
            oldest.close()
        conn.idle_since = now
        conn.in_pool = True
        stack.append(conn)
        if self._timer is None:
            self._timer = self._reactor.callLater(self._settings.pool_idle_timeout, self._sweep)

    def discard(self, conn):
        """
        Forget C{conn}, an idle connection that closed.
        """
        conn.in_pool = False
        key = conn.endpoint.pool_key
        stack = self._idle.get(key)
        if stack is not None:
            try:
                stack.remove(conn)
            except ValueError:
                pass
            if not stack:
                del self._idle[key]

    def _sweep(self):
        self._timer = None
        now = self._reactor.seconds()
        timeout = self._settings.pool_idle_timeout
        oldest = now - timeout
        next_expiry = None
        for key in list(self._idle):
            stack = self._idle[key]
            # Stacks are ordered by idle_since: the expired ones are a prefix.
            n = 0
            while n < len(stack) and stack[n].idle_since <= oldest:
                n += 1
            expired, stack[:n] = stack[:n], []
            for conn in expired:
                conn.in_pool = False
                conn.close()
            if not stack:
                del self._idle[key]
            elif next_expiry is None or stack[0].idle_since < next_expiry:
                next_expiry = stack[0].idle_since
        if next_expiry is not None:
            self._timer = self._reactor.callLater(max(next_expiry + timeout - now, 0.001), self._sweep)

    def close(self):
        """
        Close every idle connection and stop the timer (shutdown).
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        idle, self._idle = self._idle, {}
        for stack in idle.values():
            for conn in stack:
                conn.in_pool = False
                conn.close()


def _short(error):
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:120] if text else type(error).__name__
