"""
C{--h2-upgrade on} through two real C{twist linkproxy} processes: curl speaks HTTP/1.1 to proxy A, A carries the
request to proxy B as an HTTP/2 stream (C{l5d-orig-proto: HTTP/1.1}) over one mTLS connection, and B sends it to
the app as HTTP/1.1 again.
"""

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twisted.trial.unittest import SkipTest, TestCase

from tests.test_integration_mesh import CLIENT, WEB, Mesh

UPGRADE = {"h2_upgrade": "on"}
CHUNK = bytes(range(256)) * 64          # 16 KiB
CHUNKS = 64                             # 1 MiB in all


class _App(BaseHTTPRequestHandler):
    """
    GET /echo: the request line and headers as received (JSON). POST /upload: the body's length and sha256.
    GET /chunked: 1 MiB in 64 chunks, with a trailer.
    """

    protocol_version = "HTTP/1.1"

    def _send(self, body, content_type="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.seen.append((self.requestline, list(self.headers.items())))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "x-digest")
            self.end_headers()
            for _ in range(CHUNKS):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                self.wfile.flush()
            self.wfile.write(b"0\r\nx-digest: done\r\n\r\n")
            return
        self._send(json.dumps({"line": self.requestline, "headers": list(self.headers.items())}).encode())

    def do_POST(self):
        self.server.seen.append((self.requestline, list(self.headers.items())))
        digest, n = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                digest.update(data)
                n += len(data)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    break
                digest.update(data)
                n += len(data)
                left -= len(data)
        self._send(json.dumps({"length": n, "sha256": digest.hexdigest(), "line": self.requestline}).encode())

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog (5) drops connects from a burst of concurrent requests, and B's connects time out.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # A proxy that stops resets its idle pooled connections; not the test's concern.
        pass


class App:
    """
    The app behind proxy B, in a thread; C{seen} lists (request line, headers) per request.
    """

    def __init__(self, testcase):
        self.server = _Server(("127.0.0.1", 0), _App)
        self.server.seen = []
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()

        def stop():
            self.server.shutdown()
            self.server.server_close()
            thread.join(5)
        testcase.addCleanup(stop)

    @property
    def seen(self):
        return self.server.seen


def _curl(*args):
    out = subprocess.run(["curl", "--http1.1", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"curl {' '.join(args)} failed ({out.returncode}): {out.stderr.decode()}")
    return out.stdout


class UpgradeTests(TestCase):
    """
    HTTP/1.1 clients through A with C{--h2-upgrade on}, to an HTTP/1.1 app behind B.
    """

    def setUp(self):
        self.app = App(self)
        self.mesh = Mesh(self, self.app.port, a_config=UPGRADE)
        self.url = self.mesh.a.url("outbound", "")

    def _mtls_connections(self):
        # Connections B accepted that began with a TLS ClientHello: the meshed ones.
        return self.mesh.b.metric("protocol_detect_total", direction="inbound", protocol="tls",
                                  reason="detected") or 0

    def test_curl_reaches_app_as_http11(self):
        """
        curl's HTTP/1.1 request reaches the app as an HTTP/1.1 request, without l5d-orig-proto and with A's
        identity in l5d-client-id; B counts it as a meshed inbound request.
        """
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        body = json.loads(_curl("-H", "Host: web.default", "-H", "X-Probe: Mixed-Case", self.url + "/echo?x=1"))
        self.assertEqual(body["line"], "GET /echo?x=1 HTTP/1.1")
        headers = {k.lower(): v for k, v in body["headers"]}
        self.assertNotIn("l5d-orig-proto", headers)
        self.assertEqual(headers["l5d-client-id"], CLIENT)
        self.assertEqual(headers["host"], "web.default")
        self.assertEqual(headers["x-probe"], "Mixed-Case")
        self.assertEqual(self.mesh.b.metric("request_total", direction="inbound", tls="true", client_id=CLIENT), 1)
        self.assertEqual(self.mesh.b.metric("response_total", direction="inbound", tls="true", status_code="200",
                                            classification="success"), 1)
        self.assertEqual(self.mesh.a.metric("request_total", direction="outbound", tls="true", server_id=WEB), 1)

    def test_response_headers(self):
        """
        The client gets an HTTP/1.1 response with the app's headers and a content-length, and no l5d-orig-proto.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.mesh.a.ports["outbound"], timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/echo", headers={"Host": "web.default"})
        resp = conn.getresponse()
        body = resp.read()
        self.assertEqual((resp.status, resp.version), (200, 11))
        self.assertEqual(resp.getheader("content-type"), "application/json")
        self.assertEqual(int(resp.getheader("content-length")), len(body))
        self.assertIsNone(resp.getheader("l5d-orig-proto"))
        # keep-alive: a second request on the same client connection
        conn.request("GET", "/echo", headers={"Host": "web.default"})
        self.assertEqual(conn.getresponse().status, 200)

    def test_requests_share_one_connection(self):
        """
        Concurrent HTTP/1 clients through A are multiplexed on one mTLS (HTTP/2) connection to B, and B counts
        every request.
        """
        results, errors = [], []

        def client():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.mesh.a.ports["outbound"], timeout=10)
                for _ in range(10):
                    conn.request("GET", "/echo", headers={"Host": "web.default"})
                    resp = conn.getresponse()
                    resp.read()
                    results.append(resp.status)
                    if resp.status != 200:
                        errors.append(resp.getheader("l5d-proxy-error"))
                conn.close()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(results, [200] * 80)
        self.assertEqual(self._mtls_connections(), 1)
        self.assertEqual(self.mesh.b.metric("request_total", direction="inbound", tls="true"), 80)
        self.assertTrue(all(line.endswith("HTTP/1.1") for line, _ in self.app.seen))

    def test_post_one_mib(self):
        """
        A 1 MiB POST body (content-length, then chunked) arrives intact at the app.
        """
        body = os.urandom(1 << 20)
        expected = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest(), "line": "POST /upload HTTP/1.1"}
        conn = http.client.HTTPConnection("127.0.0.1", self.mesh.a.ports["outbound"], timeout=20)
        self.addCleanup(conn.close)
        conn.request("POST", "/upload", body=body, headers={"Host": "web.default"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertEqual(json.loads(resp.read()), expected)
        conn.request("POST", "/upload", body=iter([body[i:i + 100000] for i in range(0, len(body), 100000)]),
                     headers={"Host": "web.default"}, encode_chunked=True)
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertEqual(json.loads(resp.read()), expected)
        if shutil.which("curl") is not None:
            path = os.path.abspath(self.mktemp())
            with open(path, "wb") as f:
                f.write(body)
            out = _curl("-H", "Host: web.default", "--data-binary", "@" + path, self.url + "/upload")
            self.assertEqual(json.loads(out), expected)

    def test_chunked_response(self):
        """
        A chunked response (1 MiB in 64 chunks, with a trailer) streams back intact, chunked.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.mesh.a.ports["outbound"], timeout=20)
        self.addCleanup(conn.close)
        conn.request("GET", "/chunked", headers={"Host": "web.default"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.getheader("transfer-encoding"), "chunked")
        self.assertEqual(resp.read(), CHUNK * CHUNKS)
        if shutil.which("curl") is not None:
            out = _curl("-H", "Host: web.default", self.url + "/chunked")
            self.assertEqual(out, CHUNK * CHUNKS)

    def test_unreachable_app(self):
        """
        When B cannot reach the app, the client gets B's 502 with l5d-proxy-error, as HTTP/1.1.
        """
        self.app.server.shutdown()
        self.app.server.server_close()
        conn = http.client.HTTPConnection("127.0.0.1", self.mesh.a.ports["outbound"], timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/echo", headers={"Host": "web.default"})
        resp = conn.getresponse()
        resp.read()
        self.assertEqual(resp.status, 502)
        self.assertIsNotNone(resp.getheader("l5d-proxy-error"))
