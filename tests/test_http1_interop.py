"""
Interop tests for L{linkproxy.net.http1}: real clients (curl, a WebSocket client) through an in-process
L{Http1ServerProtocol} on 127.0.0.1:0, routed by a L{FakeRouter} to a backend the test starts.
"""

import hashlib
import os
import shutil
import threading

from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from linkproxy.testing import FakeRouter
from tests.test_http1 import Loopback

CURL = shutil.which("curl")


def _digest_handler(conn, req):
    """
    Answer with the request's method, body length and SHA-256, so large bodies are compared without echoing.
    """
    body = req["body"]
    text = b"%s %d %s" % (req["method"], len(body), hashlib.sha256(body).hexdigest().encode())
    conn.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-backend: yes\r\n\r\n%s" % (len(text), text))


def _continue_on_expect(conn, req):
    if req["headers"].get(b"expect", b"").lower() == b"100-continue":
        conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class CurlTests(TestCase):
    """
    curl through the proxy, as an application would use it.
    """

    timeout = 30

    def setUp(self):
        if CURL is None:
            raise SkipTest("curl is not installed; the curl interop tests need it on PATH")

    async def _curl(self, *args):
        out, err, code = await getProcessOutputAndValue(
            CURL, ("-sS", "--http1.1", "--max-time", "20") + args, env={"PATH": os.environ.get("PATH", "")})
        self.assertEqual(code, 0, err)
        return out

    async def test_get(self):
        """
        curl GET with a Host header, and as a forward proxy (absolute-form target): both reach the backend.
        """
        lb = Loopback(self, _digest_handler)
        host, port = lb.proxy_addr
        out = await self._curl("-H", "Host: web.test", f"http://{host}:{port}/path")
        self.assertEqual(out, b"GET 0 " + hashlib.sha256(b"").hexdigest().encode())
        out = await self._curl("-i", "-x", f"http://{host}:{port}", "http://web.test:8080/p?q=1")
        self.assertIn(b"x-backend: yes", out)
        self.assertEqual(lb.router.authorities, ["web.test:80", "web.test:8080"])
        # Towards an origin server the absolute-form target becomes origin-form, Host rebuilt (RFC 9112 3.2).
        self.assertEqual(lb.backend.requests[1]["url"], b"/p?q=1")
        self.assertEqual(lb.backend.requests[1]["headers"].get(b"host"), b"web.test:8080")

    async def test_post_large_chunked(self):
        """
        A 5 MiB chunked upload with Expect: 100-continue arrives intact; the 100 is relayed.
        """
        lb = Loopback(self, _digest_handler)
        lb.backend.on_head = _continue_on_expect
        payload = os.urandom(5 * 1024 * 1024)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(payload)
        host, port = lb.proxy_addr
        out = await self._curl("-H", "Host: web.test", "-H", "Transfer-Encoding: chunked",
                               "--data-binary", "@" + path, f"http://{host}:{port}/upload")
        self.assertEqual(out, b"POST %d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode()))
        self.assertEqual(lb.backend.requests[0]["headers"][b"transfer-encoding"], b"chunked")

    async def test_503_header(self):
        """
        curl sees the proxy's own error with l5d-proxy-error.
        """
        lb = Loopback(self, _digest_handler, router=FakeRouter())
        host, port = lb.proxy_addr
        out = await self._curl("-i", "-H", "Host: nowhere", f"http://{host}:{port}/")
        self.assertTrue(out.startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"l5d-proxy-error: no endpoints for nowhere:80", out)


class WebSocketTests(TestCase):
    """
    A WebSocket echo through the proxy: Upgrade forwarded, 101 relayed, frames spliced both ways.
    """

    timeout = 30

    def setUp(self):
        try:
            from websockets.sync.server import serve
        except ImportError:
            raise SkipTest("the websockets package is not installed (pip install websockets)")

        def echo(ws):
            for message in ws:
                ws.send(message)

        self.ws_server = serve(echo, "127.0.0.1", 0, max_size=4 * 1024 * 1024)
        self.ws_thread = threading.Thread(target=self.ws_server.serve_forever, daemon=True)
        self.ws_thread.start()
        self.addCleanup(self._stop_server)

    def _stop_server(self):
        self.ws_server.shutdown()
        self.ws_thread.join(5)

    async def test_echo(self):
        """
        Text and binary messages, one of 1 MiB, come back unchanged; closing works through the splice.
        """
        from websockets.sync.client import connect

        backend = self.ws_server.socket.getsockname()[:2]
        lb = Loopback(self, None, router=FakeRouter(default=backend))
        host, port = lb.proxy_addr
        big = os.urandom(1024 * 1024)

        def talk():
            with connect(f"ws://{host}:{port}/echo", open_timeout=10, close_timeout=5,
                         max_size=4 * 1024 * 1024) as ws:
                ws.send("hello")
                first = ws.recv(timeout=10)
                ws.send(big)
                second = ws.recv(timeout=10)
            return first, second

        first, second = await deferToThread(talk)
        self.assertEqual(first, "hello")
        self.assertEqual(second, big)
        self.assertEqual(lb.router.authorities, [f"{host}:{port}"])
