"""
Unary gRPC over HTTP/2 on Twisted, with the h2 library: just enough to serve and to call C{Certify}.

The server (L{GrpcServerProtocol}) answers each request stream by handing the one message to a handler
that returns a Deferred; the client (L{unary_call}) opens a connection, makes one call and closes it, which
is all a proxy that certifies once every several hours needs. Both speak through whatever transport they
are given, so TLS is the caller's business (C{TLSMemoryBIOFactory}, C{wrapClientTLS}).
"""

from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from linkproxy.identity import grpcwire
from linkproxy.identity.grpcwire import GrpcError

__all__ = ["GrpcServerProtocol", "GrpcServerFactory", "unary_call"]

_log = Logger(namespace="linkproxy.identity.grpc")

# A few calls at a time is what a client with one certificate to renew makes; more is a misbehaving peer.
_MAX_STREAMS = 16


class _Sender:
    """
    Writes a stream's response within HTTP/2 flow control: whatever the window does not take waits for a
    WINDOW_UPDATE.
    """

    def __init__(self, conn):
        self._conn = conn
        self._pending = {}

    def send(self, stream_id, data, trailers):
        self._pending[stream_id] = [bytearray(data), trailers]
        self.flush(stream_id)

    def flush(self, stream_id=None):
        for sid in ([stream_id] if stream_id is not None else list(self._pending)):
            entry = self._pending.get(sid)
            if entry is None:
                continue
            data, trailers = entry
            try:
                while data:
                    size = min(len(data), self._conn.local_flow_control_window(sid),
                               self._conn.max_outbound_frame_size)
                    if size <= 0:
                        break
                    self._conn.send_data(sid, bytes(data[:size]))
                    del data[:size]
                if not data:
                    del self._pending[sid]
                    self._conn.send_headers(sid, trailers, end_stream=True)
            except H2Error:
                # The stream was reset under us; nothing more to say on it.
                self._pending.pop(sid, None)

    def forget(self, stream_id):
        self._pending.pop(stream_id, None)


class GrpcServerProtocol(Protocol, TimeoutMixin):
    """
    The server side of one HTTP/2 connection carrying unary gRPC calls.
    """

    def __init__(self, handlers, max_message, idle_timeout=60.0, on_status=None, clock=None):
        """
        @param handlers: C{{path (bytes): handler}}; C{handler(message)} returns a Deferred that fires with
            the response message, or fails with L{GrpcError}.
        @param max_message: the largest request message accepted, in bytes.
        @param idle_timeout: seconds a connection may stay silent before it is closed.
        @param on_status: called with the gRPC status code of every finished call, if given.
        @param clock: the C{IReactorTime} of the idle timeout; the global reactor by default.
        """
        if clock is not None:
            self.callLater = clock.callLater
        self._handlers = handlers
        self._max_message = max_message
        self._idle_timeout = idle_timeout
        self._on_status = on_status
        self._streams = {}
        self._calls = {}
        self._conn = None
        self._sender = None

    def connectionMade(self):
        self._conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self._conn.initiate_connection()
        self._conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS})
        self._sender = _Sender(self._conn)
        self.setTimeout(self._idle_timeout)
        self._flush()

    def timeoutConnection(self):
        self._conn.close_connection()
        self._flush()
        self.transport.loseConnection()

    def _flush(self):
        data = self._conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data):
        self.resetTimeout()
        try:
            received = self._conn.receive_data(data)
        except H2Error as e:
            _log.debug("HTTP/2 protocol error from identity client: {error}", error=str(e))
            self._flush()
            self.transport.loseConnection()
            return
        for event in received:
            self._event(event)
        self._flush()

    def _event(self, event):
        if isinstance(event, h2events.RequestReceived):
            self._request(event.stream_id, event.headers)
        elif isinstance(event, h2events.DataReceived):
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            body = self._streams.get(event.stream_id)
            if body is not None:
                if len(body) + len(event.data) > self._max_message + 5:
                    del self._streams[event.stream_id]
                    self._finish(event.stream_id, grpcwire.RESOURCE_EXHAUSTED,
                                 f"request exceeds {self._max_message} bytes")
                else:
                    body += event.data
        elif isinstance(event, h2events.StreamEnded):
            self._ended(event.stream_id)
        elif isinstance(event, h2events.StreamReset):
            self._forget(event.stream_id)
        elif isinstance(event, h2events.WindowUpdated):
            self._sender.flush(event.stream_id or None)
        elif isinstance(event, h2events.ConnectionTerminated):
            self.transport.loseConnection()

    def _request(self, stream_id, headers):
        fields = dict(headers)
        path = fields.get(b":path", b"")
        if fields.get(b":method") != b"POST" or not fields.get(b"content-type", b"").startswith(
                grpcwire.CONTENT_TYPE):
            self._conn.send_headers(stream_id, [(b":status", b"415")], end_stream=True)
            return
        if path not in self._handlers:
            self._finish(stream_id, grpcwire.UNIMPLEMENTED, f"unknown method {path.decode('ascii', 'replace')}")
            return
        self._streams[stream_id] = bytearray()
        self._calls[stream_id] = path

    def _ended(self, stream_id):
        body = self._streams.pop(stream_id, None)
        path = self._calls.get(stream_id)
        if body is None or path is None:
            return
        try:
            message = grpcwire.unframe(body, self._max_message)
        except GrpcError as e:
            self._finish(stream_id, e.code, e.message)
            return
        d = defer.maybeDeferred(self._handlers[path], message)
        d.addCallbacks(lambda response: self._respond(stream_id, response),
                       lambda failure: self._failed(stream_id, failure))

    def _failed(self, stream_id, failure):
        if failure.check(GrpcError):
            self._finish(stream_id, failure.value.code, failure.value.message)
        else:
            _log.failure("identity call failed", failure)
            self._finish(stream_id, grpcwire.INTERNAL, "internal error")

    def _respond(self, stream_id, response):
        if self._calls.pop(stream_id, None) is None or self.transport is None:
            return
        try:
            self._conn.send_headers(stream_id, grpcwire.response_headers())
        except H2Error:
            return
        self._sender.send(stream_id, grpcwire.frame(response), grpcwire.trailers(grpcwire.OK))
        self._count(grpcwire.OK)
        self._flush()

    def _finish(self, stream_id, code, message):
        """A trailers-only response: the status in the only header block."""
        self._calls.pop(stream_id, None)
        self._streams.pop(stream_id, None)
        if self.transport is None:
            return
        try:
            self._conn.send_headers(stream_id, grpcwire.response_headers() + grpcwire.trailers(code, message),
                                    end_stream=True)
        except H2Error:
            return
        self._count(code)
        self._flush()

    def _count(self, code):
        if self._on_status is not None:
            self._on_status(code)

    def _forget(self, stream_id):
        self._streams.pop(stream_id, None)
        self._calls.pop(stream_id, None)
        self._sender.forget(stream_id)

    def connectionLost(self, reason):
        self.setTimeout(None)
        # Calls still running finish into nothing: their responses have nowhere to go.
        self._streams.clear()
        self._calls.clear()
        self.transport = None


class GrpcServerFactory(Factory):
    """
    Builds a L{GrpcServerProtocol} per connection.
    """

    noisy = False

    def __init__(self, handlers, max_message, idle_timeout=60.0, on_status=None, clock=None):
        self._args = (handlers, max_message, idle_timeout, on_status, clock)

    def buildProtocol(self, addr):
        return GrpcServerProtocol(*self._args)


class _UnaryClient(Protocol):
    """
    One unary call on a fresh connection; fires C{finished} with the response message or a L{GrpcError}.
    """

    def __init__(self, authority, path, message, max_message, finished, timeout):
        self._authority = authority
        self._path = path
        self._message = message
        self._max_message = max_message
        self._finished = finished
        self._timeout = timeout
        self._body = bytearray()
        self._status = None
        self._http_status = None
        self._conn = None
        self._rest = b""

    def connectionMade(self):
        self._conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self._conn.initiate_connection()
        self._conn.send_headers(1, grpcwire.request_headers(self._authority, self._path, self._timeout))
        # A request has no trailers of its own: the last DATA frame ends the stream.
        self._send_body()
        self._flush()

    def _send_body(self):
        self._rest = b""
        self._message_rest(grpcwire.frame(self._message))

    def _flush(self):
        data = self._conn.data_to_send()
        if data:
            self.transport.write(data)

    def dataReceived(self, data):
        try:
            received = self._conn.receive_data(data)
        except H2Error as e:
            self._done(GrpcError(grpcwire.UNAVAILABLE, f"HTTP/2 protocol error: {e}"))
            return
        for event in received:
            if isinstance(event, h2events.ResponseReceived):
                fields = dict(event.headers)
                self._http_status = fields.get(b":status")
                status = grpcwire.parse_status(event.headers)
                if status is not None:
                    self._status = status
            elif isinstance(event, h2events.DataReceived):
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if len(self._body) + len(event.data) > self._max_message + 5:
                    self._done(GrpcError(grpcwire.RESOURCE_EXHAUSTED, "response too large"))
                    return
                self._body += event.data
            elif isinstance(event, h2events.TrailersReceived):
                self._status = grpcwire.parse_status(event.headers)
            elif isinstance(event, h2events.StreamEnded):
                self._ended()
                return
            elif isinstance(event, h2events.StreamReset):
                self._done(GrpcError(grpcwire.UNAVAILABLE, f"stream reset by the server (code {event.error_code})"))
                return
            elif isinstance(event, h2events.WindowUpdated) and self._rest:
                rest, self._rest = self._rest, b""
                self._message_rest(rest)
            elif isinstance(event, h2events.ConnectionTerminated):
                self._done(GrpcError(grpcwire.UNAVAILABLE, "the server closed the connection"))
                return
        self._flush()

    def _message_rest(self, data):
        while data:
            size = min(len(data), self._conn.local_flow_control_window(1), self._conn.max_outbound_frame_size)
            if size <= 0:
                self._rest = data
                return
            self._conn.send_data(1, data[:size], end_stream=size == len(data))
            data = data[size:]

    def _ended(self):
        if self._http_status != b"200":
            status = (self._http_status or b"none").decode("ascii", "replace")
            self._done(GrpcError(grpcwire.UNKNOWN, f"HTTP status {status} instead of a gRPC response"))
        elif self._status is None:
            self._done(GrpcError(grpcwire.INTERNAL, "the response carried no grpc-status"))
        elif self._status[0] != grpcwire.OK:
            self._done(GrpcError(*self._status))
        else:
            try:
                self._done(grpcwire.unframe(self._body, self._max_message))
            except GrpcError as e:
                self._done(e)

    def _done(self, result):
        if self.transport is not None:
            self.transport.loseConnection()
        if not self._finished.called:
            if isinstance(result, Exception):
                self._finished.errback(result)
            else:
                self._finished.callback(result)

    def connectionLost(self, reason):
        if not self._finished.called:
            self._finished.errback(GrpcError(
                grpcwire.UNAVAILABLE, f"connection lost before the response: {reason.getErrorMessage()}"))


def unary_call(reactor, endpoint, authority, path, message, *, max_message, timeout):
    """
    Make one unary call on a new connection, and close it.

    @param reactor: an C{IReactorTime}.
    @param endpoint: an C{IStreamClientEndpoint}, TLS included (e.g. from C{wrapClientTLS}).
    @param authority: the C{:authority} to send.
    @param path: the method path, e.g. C{"/io.linkerd.proxy.identity.Identity/Certify"}.
    @param message: the encoded request message.
    @param max_message: the largest response message accepted.
    @param timeout: seconds for the whole call, connecting included.
    @return: a Deferred firing with the response message, or failing with L{GrpcError} (C{UNAVAILABLE} when
        the service could not be reached or the connection failed, C{DEADLINE_EXCEEDED} after C{timeout}).
    """
    finished = defer.Deferred()
    protocol = _UnaryClient(authority, path, message, max_message, finished, timeout)

    def connect_failed(failure):
        if not finished.called:
            finished.errback(GrpcError(grpcwire.UNAVAILABLE, f"cannot connect: {failure.getErrorMessage()}"))

    connecting = endpoint.connect(Factory.forProtocol(lambda: protocol))
    connecting.addErrback(connect_failed)

    def expired():
        if not finished.called:
            finished.errback(GrpcError(grpcwire.DEADLINE_EXCEEDED, f"no response within {timeout} s"))
        if not connecting.called:
            connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    timer = reactor.callLater(timeout, expired)

    def stop_timer(result):
        if timer.active():
            timer.cancel()
        return result

    return finished.addBoth(stop_timer)
