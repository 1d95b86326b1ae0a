"""
Request smuggling through a real C{twist linkproxy} (issue #9): every vector of L{tests.test_smuggling} is sent
raw over a socket to the outbound listener and to the inbound listener, in front of a backend that parses
strictly (httptools) and records every request it parses and every byte it receives.

Acceptance: the client gets 400 with C{l5d-proxy-error} and the connection closed; the backend receives exactly
one well-formed request per client request, or none (here: none, and not a byte). Responses framed two ways
are a 502 and never leave a desynchronised connection in the pool. HTTP/2 requests downgraded to HTTP/1 for the
app (mTLS from a meshed peer, C{l5d-orig-proto}) whose DATA disagrees with their content-length never leave the
app a request it would wait on, or read the next request into.

127.0.0.1 only; every process and thread is stopped by the test that started it.
"""

import os
import socket
import ssl
import threading

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.trial.unittest import TestCase

from linkproxy.core.detect import Protocol, detect
from tests.proc import Proxy, TcpServer, wait_for
from tests.test_smuggling import ACCEPTED_TE, SMUGGLED, VECTORS, request

# A NUL in the request line makes protocol detection see no HTTP/1 request line: such a connection is opaque
# TCP (docs/http.md, "Request smuggling"). The rest reach the HTTP/1 server.
HTTP_VECTORS = [v for v in VECTORS if detect(v[1], final=True).protocol is Protocol.HTTP1]
OPAQUE_VECTORS = [v for v in VECTORS if v not in HTTP_VECTORS]

READ_TIMEOUT = 5.0


class RecordingBackend:
    """
    A keep-alive HTTP/1.1 backend that parses with httptools, records each complete request
    (C{(method, url, headers, body)}) and every byte received, and answers each request 200 with
    C{content-length}.

    @ivar requests: the complete requests parsed, in order.
    @ivar received: bytes received, over all connections.
    @ivar connections: connections accepted.
    @ivar respond: C{respond(index)} gives the raw response to request C{index}; a 200 by default.
    """

    def __init__(self, testcase):
        self.requests = []
        self.received = 0
        self.errors = []
        self.respond = lambda index: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        self._lock = threading.Lock()
        self._server = TcpServer(testcase, self._handle)
        self.port = self._server.port

    @property
    def connections(self):
        return self._server.accepted

    def _handle(self, conn):
        backend = self

        class Callbacks:
            def on_message_begin(self):
                self.req = [None, b"", [], b""]

            def on_url(self, url):
                self.req[1] += url

            def on_header(self, name, value):
                self.req[2].append((name.lower(), value))

            def on_body(self, body):
                self.req[3] += body

            def on_message_complete(self):
                self.req[0] = parser.get_method()
                with backend._lock:
                    index = len(backend.requests)
                    backend.requests.append(tuple(self.req))
                conn.sendall(backend.respond(index))

        parser = HttpRequestParser(Callbacks())
        while True:
            data = conn.recv(65536)
            if not data:
                return
            with self._lock:
                self.received += len(data)
            try:
                parser.feed_data(data)
            except (HttpParserError, HttpParserUpgrade) as e:
                self.errors.append(e)
                return


def read_until_closed(sock, timeout=READ_TIMEOUT):
    """
    Everything the peer sends until it closes; fails if it does not close within C{timeout}.
    """
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"connection not closed after {timeout}s; got {b''.join(chunks)[:200]!r}")
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port, raw):
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as s:
        s.sendall(raw)
        return read_until_closed(s)


class SmugglingTests(TestCase):
    """
    The request vectors through both listeners of one proxy, then the response side.
    """

    def setUp(self):
        self.backend = RecordingBackend(self)
        self.authority = f"127.0.0.1:{self.backend.port}".encode()
        self.proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={self.backend.port}"})

    def aimed(self, raw):
        # Outbound routes by Host (an IP literal); inbound sends everything to --app whatever the Host.
        assert b"Host: web" in raw, raw
        return raw.replace(b"Host: web", b"Host: " + self.authority, 1)

    def test_vectors_both_listeners(self):
        """
        Each vector, on its own connection to each listener: 400 with C{l5d-proxy-error} naming the cause,
        C{connection: close} and the connection closed; the backend parsed no request and received no byte;
        each refusal is counted in the golden metrics of its direction.
        """
        for listener in ("outbound", "inbound"):
            for name, raw, cause in HTTP_VECTORS:
                answer = exchange(self.proxy.ports[listener], self.aimed(raw))
                head = answer.partition(b"\r\n\r\n")[0].lower()
                what = f"{listener} {name}: {answer[:300]!r}"
                self.assertTrue(head.startswith(b"http/1.1 400 "), what)
                self.assertIn(b"\r\nl5d-proxy-error: ", head, what)
                self.assertIn(cause.lower(), head, what)
                self.assertIn(b"\r\nconnection: close", head, what)
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1, what)
                self.assertEqual(self.backend.requests, [], what)
                self.assertEqual(self.backend.received, 0, what)
        self.assertEqual(self.backend.connections, 0)
        for direction in ("outbound", "inbound"):
            self.assertEqual(self.proxy.metric("response_total", direction=direction, status_code="400"),
                             len(HTTP_VECTORS), direction)
            self.assertEqual(self.proxy.metric("request_total", direction=direction), len(HTTP_VECTORS),
                             direction)

    def test_nul_in_method_is_opaque(self):
        """
        A NUL in the method: detection finds no HTTP/1 request line (nothing that starts like one), so the
        connection is opaque TCP, never parsed or framed by the proxy. (A NUL later in a line that starts with
        an HTTP method is HTTP/1 and gets its 400 above.) Outbound there is no target for it and it is closed with
        nothing sent; inbound the bytes reach the app as they were sent (as without a proxy), and the
        app's strict parser finds no request in them.
        """
        self.assertEqual([name for name, _, _ in OPAQUE_VECTORS], ["nul-method (llhttp)"])
        for name, raw, _ in OPAQUE_VECTORS:
            answer = exchange(self.proxy.ports["outbound"], self.aimed(raw))
            self.assertEqual(answer, b"", name)
        self.assertEqual(self.backend.received, 0)
        sent = 0
        for name, raw, _ in OPAQUE_VECTORS:
            raw = self.aimed(raw)
            sent += len(raw)
            with socket.create_connection(("127.0.0.1", self.proxy.ports["inbound"]), timeout=READ_TIMEOUT) as s:
                s.sendall(raw)
                wait_for(lambda: self.backend.received >= sent, timeout=READ_TIMEOUT, what=f"{name} at the app")
                s.shutdown(socket.SHUT_WR)
                self.assertEqual(read_until_closed(s), b"", name)
        self.assertEqual(self.backend.received, sent)
        self.assertEqual(self.backend.requests, [])
        self.assertEqual(len(self.backend.errors), 1)
        self.assertIsNone(self.proxy.metric("request_total", direction="inbound"))

    def test_accepted_chunked_is_one_request_each(self):
        """
        A lone C{chunked} (any case or whitespace) with a request hidden after its last chunk: the backend
        parses exactly the two requests the proxy parsed, each well-formed and framed by the proxy, one per
        client request, and both are answered.
        """
        for listener in ("outbound", "inbound"):
            for value in ACCEPTED_TE:
                del self.backend.requests[:]
                raw = self.aimed(request(b"Transfer-Encoding: " + value, b"Connection: keep-alive",
                                         body=b"5\r\nhello\r\n0\r\n\r\n"))
                raw += self.aimed(SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                answer = exchange(self.proxy.ports[listener], raw)
                what = f"{listener} {value!r}: {answer[:300]!r}"
                self.assertEqual(answer.count(b"HTTP/1.1 200 OK\r\n"), 2, what)
                requests = self.backend.requests
                self.assertEqual([(r[0], r[1]) for r in requests], [(b"POST", b"/"), (b"GET", b"/admin")], what)
                self.assertEqual(requests[0][3], b"hello", what)
                self.assertIn((b"transfer-encoding", b"chunked"), requests[0][2], what)
        self.assertEqual(self.backend.errors, [])

    def test_response_framed_two_ways_is_502(self):
        """
        A backend answering with Content-Length and Transfer-Encoding, and a smuggled response after it: the
        client gets 502 with C{l5d-proxy-error}; that backend connection is closed, and the next request
        gets the next honest response on a new connection, never the smuggled one.
        """
        bad = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled")
        self.backend.respond = lambda index: bad if index == 0 else (
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhonest")
        for listener in ("outbound", "inbound"):
            before = self.backend.connections
            self.backend.requests.clear()
            with socket.create_connection(("127.0.0.1", self.proxy.ports[listener]), timeout=READ_TIMEOUT) as s:
                s.sendall(self.aimed(b"GET /one HTTP/1.1\r\nHost: web\r\n\r\n"))
                first = _read_response(s)
                s.sendall(self.aimed(b"GET /two HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"))
                second = read_until_closed(s)
            self.assertTrue(first.startswith(b"HTTP/1.1 502 "), first)
            self.assertIn(b"l5d-proxy-error: invalid response from upstream", first)
            self.assertTrue(second.startswith(b"HTTP/1.1 200 OK"), second)
            self.assertTrue(second.endswith(b"honest"), second)
            self.assertNotIn(b"smuggled", second)
            self.assertEqual(self.backend.connections - before, 2, listener)


def _read_response(sock):
    """
    One response whose body has a content-length (the proxy's own answers do).
    """
    sock.settimeout(READ_TIMEOUT)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class DowngradeTests(TestCase):
    """
    HTTP/2 from a meshed peer (mTLS with a client certificate, transport header C{http2}) carrying HTTP/1 as
    C{l5d-orig-proto: HTTP/1.1}, downgraded by the inbound listener for the app, with a body that disagrees with
    its C{content-length}. Sent by a raw h2 client, as a peer proxy never would.
    """

    def setUp(self):
        from tests.test_integration_mesh import CLIENT, WEB, identity_cli, trust_domain

        self.backend = RecordingBackend(self)
        domain = trust_domain(self)
        identity_cli("issue", domain, CLIENT)
        # The client's leaf moves out, so the proxy issues its own (WEB) from the domain's dev issuer.
        self.client_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.client_dir)
        for name in ("cert.pem", "key.pem"):
            os.replace(os.path.join(domain, name), os.path.join(self.client_dir, name))
        self.ca = os.path.join(domain, "ca.pem")
        self.server_name = WEB
        self.proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={self.backend.port}", "identity_dir": domain,
                                  "identity_name": WEB})

    def stream(self, headers, data=None, trailers=None, end_with_data=True):
        """
        One request on a new mTLS h2 connection to the inbound listener.

        @return: C{(response headers dict or None, reset code or None, GOAWAY error code or None)}.
        """
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset

        from linkproxy.core import transport_header

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.ca)
        context.load_cert_chain(os.path.join(self.client_dir, "cert.pem"), os.path.join(self.client_dir, "key.pem"))
        # Lenient on what it sends: a peer proxy would never send these streams.
        conn = H2Connection(H2Configuration(client_side=True, validate_outbound_headers=False,
                                            normalize_outbound_headers=False, validate_inbound_headers=False,
                                            header_encoding=None))
        conn.initiate_connection()
        sid = 1
        head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"web.default"),
                (b":path", b"/up"), (b"l5d-orig-proto", b"HTTP/1.1")] + headers
        conn.send_headers(sid, head, end_stream=data is None and trailers is None)
        if data is not None:
            conn.send_data(sid, data, end_stream=trailers is None and end_with_data)
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)
        response = reset = goaway = None
        raw = socket.create_connection(("127.0.0.1", self.proxy.ports["inbound"]), timeout=READ_TIMEOUT)
        with context.wrap_socket(raw, server_hostname=self.server_name) as s:
            s.sendall(transport_header.encode(0, session_protocol="http2") + conn.data_to_send())
            done = False
            while not done:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, ssl.SSLError, ConnectionResetError) as e:
                    if isinstance(e, socket.timeout):
                        raise AssertionError("no answer from the proxy") from e
                    break
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, ResponseReceived):
                        response = dict(event.headers)
                    elif isinstance(event, DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded):
                        done = True
                    elif isinstance(event, StreamReset):
                        reset = event.error_code
                        done = True
                    elif isinstance(event, ConnectionTerminated):
                        goaway = event.error_code
                        done = True
                s.sendall(conn.data_to_send())
        return response, reset, goaway

    def test_content_length_disagrees_with_data(self):
        """
        Ended at HEADERS with a non-zero content-length, or short of it and ended by trailers: 400 with
        C{l5d-proxy-error}. DATA past it, or a DATA END_STREAM short of it: h2's own connection error
        (GOAWAY PROTOCOL_ERROR). In no case does the app parse a request; and the request after them gets
        its own response from an app connection that is in step (a matching body is one request, whole).
        """
        length = [(b"content-length", b"5")]
        response, _, _ = self.stream(length)
        self.assertEqual(response[b":status"], b"400")
        self.assertIn(b"content-length 5 but the stream ended without a body", response[b"l5d-proxy-error"])
        response, _, _ = self.stream([(b"content-length", b"10")], data=b"abc", trailers=[(b"x-t", b"1")])
        self.assertEqual(response[b":status"], b"400")
        self.assertIn(b"7 bytes short of its content-length", response[b"l5d-proxy-error"])
        for data in (b"hello" + SMUGGLED, b"hel"):
            response, _, goaway = self.stream(length, data=data)
            self.assertIsNone(response, data)
            self.assertEqual(goaway, 1, data)  # PROTOCOL_ERROR
        self.assertEqual(self.backend.requests, [])
        response, _, _ = self.stream(length, data=b"hello")
        self.assertEqual(response[b":status"], b"200")
        [(method, url, headers, body)] = self.backend.requests
        self.assertEqual((method, url, body), (b"POST", b"/up", b"hello"))
        self.assertIn((b"content-length", b"5"), headers)
        self.assertEqual(self.proxy.metric("response_total", direction="inbound", status_code="400"), 2)
