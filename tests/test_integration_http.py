"""
HTTP/1.1, HTTP/2 and gRPC through a real C{twist linkproxy}, in both directions, with clients this project did
not write: curl, Node's http2 module, grpcio and the websockets library. Then the proxy's own answers to bad
input and failing backends.

Outbound, the client talks to the outbound listener and names the backend in Host / C{:authority} (an IP
literal, resolved by the default discovery). Inbound, the client talks to the inbound listener and the proxy
forwards to C{--app}.
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import Proxy, TcpServer, free_port, recv_exactly, wait_for

try:
    import grpc
    from concurrent import futures
except ImportError:
    grpc = None

NODE_H2_SERVER = r"""
const http2 = require('http2');
const server = http2.createServer();
server.on('stream', (stream, headers) => {
  let n = 0;
  stream.on('data', (chunk) => { n += chunk.length; });
  stream.on('end', () => {
    stream.respond({':status': 200, 'content-type': 'text/plain'});
    stream.end(`h2 ${headers[':path']} ${n} bytes`);
  });
});
server.listen(0, '127.0.0.1', () => { console.log(server.address().port); });
"""

NODE_H2_CLIENT = r"""
const http2 = require('http2');
const [url, authority] = process.argv.slice(1);
const client = http2.connect(url);
client.on('error', (e) => { console.error(e.message); process.exit(2); });
const req = client.request({':path': '/from-node', ':authority': authority});
let body = '';
req.setEncoding('utf8');
req.on('response', (headers) => { req.status = headers[':status']; });
req.on('data', (chunk) => { body += chunk; });
req.on('end', () => { console.log(JSON.stringify({status: req.status, body})); client.close(); });
req.end();
"""


def need(tool):
    if shutil.which(tool) is None:
        raise SkipTest(f"{tool} is not installed")


def _closing_http(body=b"ok"):
    """
    A backend handler that answers one HTTP/1 request with C{body} and closes.
    """
    def handler(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    return handler


class NodeH2Server:
    """
    Node's http2 module serving h2c on 127.0.0.1: answers C{h2 PATH N bytes}.
    """

    def __init__(self, testcase):
        need("node")
        self.process = subprocess.Popen(["node", "-e", NODE_H2_SERVER], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            raise AssertionError("node h2 server did not start")
        self.port = int(line)

    def stop(self):
        self.process.kill()
        self.process.wait()


class GrpcServer:
    """
    A grpcio server with raw-bytes handlers: unary echo, server streaming (1000 messages), client streaming.
    """

    def __init__(self, testcase):
        if grpc is None:
            raise SkipTest("grpcio is not installed")

        def unary(request, context):
            return b"echo:" + request

        def server_stream(request, context):
            for i in range(1000):
                yield b"msg-%d" % i

        def client_stream(requests, context):
            count = total = 0
            for r in requests:
                count += 1
                total += len(r)
            return b"%d messages, %d bytes" % (count, total)

        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        testcase.addCleanup(lambda: self.server.stop(0).wait(5))


def grpc_calls(testcase, channel):
    """
    Unary, 1000-message server streaming, and client streaming larger than the 65535-byte flow window.
    """
    unary = channel.unary_unary("/test.Echo/Unary")
    testcase.assertEqual(unary(b"ping", timeout=20), b"echo:ping")
    stream = channel.unary_stream("/test.Echo/ServerStream")
    testcase.assertEqual(list(stream(b"go", timeout=30)), [b"msg-%d" % i for i in range(1000)])
    upload = channel.stream_unary("/test.Echo/ClientStream")
    chunks = [b"y" * 10000 for _ in range(30)]
    testcase.assertEqual(upload(iter(chunks), timeout=30), b"30 messages, 300000 bytes")


class Http1InteropTests(TestCase):
    """
    curl and a WebSocket client through both listeners.
    """

    def test_curl_both_directions(self):
        """
        curl's HTTP/1.1 GET and a 2 MiB chunked POST go through the outbound listener (routed by Host) and
        the inbound listener (to the app), and the golden metrics count them with their authority.
        """
        need("curl")
        app = TcpServer(self, _echo_length_http)
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={app.port}"})
        body = os.urandom(2 * 1024 * 1024)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        for url, extra in ((proxy.url("outbound", "/o"), ["-H", f"Host: 127.0.0.1:{app.port}"]),
                           (proxy.url("inbound", "/i"), [])):
            out = subprocess.run(["curl", "-sS", "--max-time", "20", *extra, url], capture_output=True, timeout=30)
            self.assertEqual(out.stdout, b"0 bytes", out.stderr)
            out = subprocess.run(["curl", "-sS", "--max-time", "20", *extra, "-H", "Transfer-Encoding: chunked",
                                  "--data-binary", "@" + path, url], capture_output=True, timeout=30)
            self.assertEqual(out.stdout, b"%d bytes" % len(body), out.stderr)
        self.assertEqual(proxy.metric("request_total", direction="outbound", authority=f"127.0.0.1:{app.port}"), 2)
        self.assertEqual(proxy.metric("response_total", direction="inbound", classification="success",
                                      status_code="200"), 2)
        self.assertIsNotNone(proxy.metric("response_latency_ms_bucket", direction="outbound", le="50.0"))

    def test_websocket_both_directions(self):
        """
        A WebSocket upgrade through each listener: 101 relayed, then messages (one of 1 MiB) echo back.
        """
        try:
            from websockets.sync.client import connect
            from websockets.sync.server import serve
        except ImportError:
            raise SkipTest("the websockets package is not installed")

        def echo(ws):
            for message in ws:
                ws.send(message)

        server = serve(echo, "127.0.0.1", 0, max_size=4 * 1024 * 1024)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(lambda: (server.shutdown(), thread.join(5)))
        port = server.socket.getsockname()[1]
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={port}"})
        big = os.urandom(1024 * 1024)
        for listener in ("outbound", "inbound"):
            sock = socket.create_connection(("127.0.0.1", proxy.ports[listener]), timeout=10)
            with connect(f"ws://127.0.0.1:{port}/echo", sock=sock, open_timeout=10, close_timeout=5,
                         max_size=4 * 1024 * 1024) as ws:
                ws.send("hello")
                self.assertEqual(ws.recv(timeout=10), "hello")
                ws.send(big)
                self.assertEqual(ws.recv(timeout=10), big)


class Http2InteropTests(TestCase):
    """
    curl with prior knowledge, Node's http2 client and grpcio through both listeners.
    """

    def test_curl_h2_both_directions(self):
        """
        curl --http2-prior-knowledge GET and POST reach a Node h2c server through each listener, as HTTP/2.
        """
        need("curl")
        server = NodeH2Server(self)
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={server.port}"})
        for url, extra in ((proxy.url("outbound", "/o"), ["-H", f"Host: 127.0.0.1:{server.port}"]),
                           (proxy.url("inbound", "/i"), [])):
            out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20", *extra, url,
                                  "-w", " %{http_version}"], capture_output=True, timeout=30)
            self.assertRegex(out.stdout.decode(), r"^h2 /[oi] 0 bytes 2$", out.stderr)
            out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20", *extra,
                                  "--data-binary", "x" * 100000, url], capture_output=True, timeout=30)
            self.assertRegex(out.stdout.decode(), r"^h2 /[oi] 100000 bytes$", out.stderr)

    def test_h2_garbage_closes_that_connection_and_is_counted(self):
        """
        HTTP/2 frames that break the protocol (HEADERS on stream 0, a frame over the maximum size) get a GOAWAY
        and a close for that connection alone; each is counted in C{tcp_protocol_error_total}, and curl keeps
        being served.
        """
        need("curl")
        server = NodeH2Server(self)
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={server.port}"})
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        headers_on_stream_0 = b"\x00\x00\x01\x01\x04\x00\x00\x00\x00\x82"
        oversized_data = b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385
        survivor = socket.create_connection(("127.0.0.1", proxy.ports["outbound"]), timeout=10)
        self.addCleanup(survivor.close)
        survivor.sendall(preface)
        for garbage in (headers_on_stream_0, oversized_data):
            with socket.create_connection(("127.0.0.1", proxy.ports["outbound"]), timeout=10) as s:
                s.sendall(preface + garbage)
                got = b""
                while True:  # bounded by the socket timeout: the proxy must close
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            frames = _h2_frame_types(got)
            self.assertIn(0x7, frames, got)  # GOAWAY
        self.assertEqual(proxy.metric("tcp_protocol_error_total", direction="outbound", protocol="h2"), 2)
        self.assertEqual(proxy.metric("tcp_protocol_error_total", direction="outbound", protocol="h2",
                                      error="frame_too_large"), 1)
        # The other client's connection is untouched (it answers a PING), and new requests are served.
        survivor.sendall(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"survivor")
        got = b""
        while b"\x00\x00\x08\x06\x01\x00\x00\x00\x00survivor" not in got:
            chunk = survivor.recv(65536)  # bounded by the socket timeout
            self.assertTrue(chunk, "the proxy closed a connection that sent no garbage")
            got += chunk
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20",
                              "-H", f"Host: 127.0.0.1:{server.port}", proxy.url("outbound", "/after")],
                             capture_output=True, timeout=30)
        self.assertEqual(out.stdout.decode(), "h2 /after 0 bytes", out.stderr)

    def test_node_client_both_directions(self):
        """
        Node's http2 client, with its own :authority, gets the Node server's answer through each listener.
        """
        server = NodeH2Server(self)
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={server.port}"})
        for listener in ("outbound", "inbound"):
            out = subprocess.run(["node", "-e", NODE_H2_CLIENT, proxy.url(listener), f"127.0.0.1:{server.port}"],
                                 capture_output=True, timeout=30)
            self.assertEqual(json.loads(out.stdout), {"status": 200, "body": "h2 /from-node 0 bytes"},
                             out.stderr)

    def test_grpc_both_directions(self):
        """
        grpcio unary, 1000-message server streaming and client streaming beyond the flow window, through
        each listener; gRPC statuses are counted.
        """
        server = GrpcServer(self)
        proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={server.port}"})
        outbound = grpc.insecure_channel(f"127.0.0.1:{proxy.ports['outbound']}",
                                         options=[("grpc.default_authority", f"127.0.0.1:{server.port}")])
        inbound = grpc.insecure_channel(f"127.0.0.1:{proxy.ports['inbound']}")
        self.addCleanup(outbound.close)
        self.addCleanup(inbound.close)
        grpc_calls(self, outbound)
        grpc_calls(self, inbound)
        self.assertEqual(proxy.metric("response_total", direction="outbound", grpc_status="0"), 3)
        self.assertEqual(proxy.metric("response_total", direction="inbound", grpc_status="0"), 3)


class ProxyErrorTests(TestCase):
    """
    Bad requests and failing backends get the proxy's own clear answers, and the proxy keeps serving.
    """

    def setUp(self):
        self.app = TcpServer(self, _closing_http(b"fine"))
        self.proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={self.app.port}", "response_timeout": "500ms"})

    def raw(self, request, listener="outbound"):
        with socket.create_connection(("127.0.0.1", self.proxy.ports[listener]), timeout=10) as s:
            s.sendall(request)
            return _read_response(s)

    def assertStillServing(self):
        head, body = self.raw(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.app.port}\r\n\r\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)

    def test_oversized_headers_get_431(self):
        """
        A request head over 64 KiB gets 431 with l5d-proxy-error.
        """
        head, _ = self.raw(b"GET / HTTP/1.1\r\nHost: x:1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 431"), head)
        self.assertIn(b"l5d-proxy-error:", head.lower())
        self.assertStillServing()

    def test_garbage_after_request_line_gets_400(self):
        """
        A request line followed by bytes that are no header gets 400 with l5d-proxy-error.
        """
        head, _ = self.raw(b"GET / HTTP/1.1\r\n\x00\x01\x02 not a header\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400"), head)
        self.assertIn(b"l5d-proxy-error:", head.lower())
        self.assertStillServing()

    def test_unreachable_503_and_timeout(self):
        """
        A refused endpoint gets 502, an unresolvable name 503, a silent backend 504: each names its cause.
        """
        dead = free_port()
        head, _ = self.raw(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{dead}\r\n\r\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 502"), head)
        self.assertIn(b"l5d-proxy-error:", head.lower())
        head, _ = self.raw(b"GET / HTTP/1.1\r\nHost: no-such-name.invalid:80\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503"), head)
        self.assertIn(b"l5d-proxy-error:", head.lower())
        silent = TcpServer(self, lambda conn: time.sleep(3))
        head, _ = self.raw(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{silent.port}\r\n\r\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 504"), head)
        self.assertIn(b"l5d-proxy-error:", head.lower())
        self.assertStillServing()

    def test_backend_reset_mid_body(self):
        """
        A backend that resets half way through its body: the client's connection ends (it cannot be given a
        clean status mid-body) rather than hanging, and the proxy goes on serving.
        """
        def reset_mid_body(conn):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"z" * 1000)
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        backend = TcpServer(self, reset_mid_body)
        with socket.create_connection(("127.0.0.1", self.proxy.ports["outbound"]), timeout=10) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode())
            got = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        self.assertTrue(got.startswith(b"HTTP/1.1 200"))
        self.assertLess(len(got), 100000)
        self.assertStillServing()

    def test_client_disconnect_mid_stream_cancels_upstream(self):
        """
        A client that leaves while the response streams: the proxy closes the upstream connection (the
        backend sees it go) and keeps serving.
        """
        gone = threading.Event()

        def endless(conn):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(200):  # bounded: at most ~10 s
                try:
                    conn.sendall(b"400\r\n" + b"s" * 1024 + b"\r\n")
                except OSError:
                    gone.set()
                    return
                time.sleep(0.05)
        backend = TcpServer(self, endless)
        s = socket.create_connection(("127.0.0.1", self.proxy.ports["outbound"]), timeout=10)
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\n\r\n".encode())
        recv_exactly(s, 2000)
        s.close()
        wait_for(gone.is_set, timeout=8, what="the backend to see the upstream connection closed")
        self.assertStillServing()


def _echo_length_http(conn):
    """
    Answers one HTTP/1 request (content-length or chunked body) with C{N bytes}, the body length it read.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lower = head.lower()
    n = 0
    if b"transfer-encoding: chunked" in lower:
        buf = rest
        while True:
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += conn.recv(65536)
            if size == 0:
                break
            n += size
            buf = buf[size + 2:]
    elif b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        n = len(rest)
        while n < length:
            n += len(conn.recv(65536))
    body = b"%d bytes" % n
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


def _h2_frame_types(data):
    """
    The types of the HTTP/2 frames in C{data}, a server's bytes from the start of a connection.
    """
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length:]
    return types


def _read_response(sock):
    """
    Read one response head and its content-length body from a blocking socket.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, b""
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
    return head, body


class DstOverrideTests(TestCase):
    """
    C{l5d-dst-override} routes outbound requests only when C{--dst-override} is on.
    """

    def test_honoured_only_when_configured(self):
        """
        With --dst-override on, HTTP/1 and HTTP/2 requests go where the header says, whatever their Host;
        with it off (the default) the header is ignored and Host decides.
        """
        need("curl")
        app = TcpServer(self, _closing_http(b"override reached"))
        h2 = NodeH2Server(self)
        on = Proxy(self, {"dst_override": "on"})
        off = Proxy(self, {})
        for proxy, expect_h1, expect_h2 in ((on, b"override reached", b"h2 / 0 bytes"), (off, None, None)):
            out = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Host: nowhere.invalid",
                                  "-H", f"l5d-dst-override: 127.0.0.1:{app.port}", proxy.url("outbound", "/")],
                                 capture_output=True, timeout=20)
            out2 = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10",
                                   "-H", "Host: nowhere.invalid", "-H", f"l5d-dst-override: 127.0.0.1:{h2.port}",
                                   proxy.url("outbound", "/")], capture_output=True, timeout=20)
            if expect_h1 is None:
                self.assertIn(b"no endpoints", out.stdout)
                self.assertIn(b"no endpoints", out2.stdout)
            else:
                self.assertEqual(out.stdout, expect_h1, out.stderr)
                self.assertEqual(out2.stdout, expect_h2, out2.stderr)
