"""
The tap through a real C{twist linkproxy}: a real C{linkproxy-tap} process sees every request of curl and
grpcio traffic once, with its fields; filters work; a subscriber that never reads costs neither memory nor
requests.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import ROOT, Proxy, http_get, wait_for, write_atomically
from tests.test_integration_stack import Backend, endpoints_yaml, http_sender, paced

TAP = os.path.join(os.path.dirname(sys.executable), "linkproxy-tap")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class TapProcess:
    """
    A C{linkproxy-tap} subprocess, its output collected in a file.
    """

    def __init__(self, testcase, proxy, *args):
        self.path = testcase.mktemp()
        self._out = open(self.path, "wb")
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([TAP, "--admin", proxy.url("admin"), *args], stdout=self._out,
                                        stderr=subprocess.STDOUT, env=env)
        testcase.addCleanup(self.stop)

    def lines(self):
        with open(self.path, "rb") as f:
            return f.read().decode().splitlines()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        self._out.close()


class TapTests(TestCase):
    """
    C{linkproxy-tap} against a proxy carrying HTTP/1 (curl) and gRPC (grpcio) traffic in both directions.
    """

    def setUp(self):
        self.curl = shutil.which("curl")
        if self.curl is None:
            raise SkipTest("curl is not installed")
        self.web = Backend(self, "http", "web")
        self.endpoints = os.path.abspath(self.mktemp())
        write_atomically(self.endpoints, endpoints_yaml({"web.test:80": [self.web]}))
        self.proxy = Proxy(self, {"discovery": f"file:{self.endpoints}", "app": f"tcp:127.0.0.1:{self.web.port}"})

    def curl_get(self, url, *args):
        out = subprocess.run([self.curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                              *args, url], capture_output=True, timeout=20)
        return out.stdout.decode()

    def wait_lines(self, tap, count):
        wait_for(lambda: len([line for line in tap.lines() if line.strip()]) >= count, timeout=10,
                 what=f"{count} tap lines")
        time.sleep(0.3)
        return [line for line in tap.lines() if line.strip()]

    def test_every_request_once(self):
        """
        Each of 5 outbound curl requests, 3 inbound ones and 4 grpcio calls appears once, with method,
        authority, path, status, endpoint and direction; retries are not involved.
        """
        try:
            import grpc
        except ImportError:
            raise SkipTest("grpcio is not installed")
        g = Backend(self, "grpc", "g")
        write_atomically(self.endpoints, endpoints_yaml({"web.test:80": [self.web], "grpc.test:80": [g]}))
        tap = TapProcess(self, self.proxy, "--json")
        time.sleep(1.5)  # the endpoints file is polled every second
        out = self.proxy.ports["outbound"]
        for i in range(5):
            self.assertEqual(self.curl_get(f"http://127.0.0.1:{out}/out/{i}", "-H", "Host: web.test"), "200")
        for i in range(3):
            self.assertEqual(self.curl_get(self.proxy.url("inbound", f"/in/{i}")), "200")
        channel = grpc.insecure_channel(f"127.0.0.1:{out}", options=[("grpc.default_authority", "grpc.test:80")])
        self.addCleanup(channel.close)
        unary = channel.unary_unary("/test.Stack/Unary")
        for i in range(4):
            self.assertTrue(unary(b"x", timeout=10).endswith(b":x"))
        events = [json.loads(line) for line in self.wait_lines(tap, 12)]
        paths = sorted(e["path"] for e in events)
        self.assertEqual(paths, sorted([f"/out/{i}" for i in range(5)] + [f"/in/{i}" for i in range(3)]
                                       + ["/test.Stack/Unary"] * 4))
        by_path = {e["path"]: e for e in events}
        self.assertEqual((by_path["/out/0"]["direction"], by_path["/out/0"]["authority"],
                          by_path["/out/0"]["endpoint"], by_path["/out/0"]["status"]),
                         ("outbound", "web.test:80", self.web.address, 200))
        self.assertEqual(by_path["/in/0"]["direction"], "inbound")
        rpc = by_path["/test.Stack/Unary"]
        self.assertEqual((rpc["method"], rpc["grpc_status"], rpc["version"], rpc["authority"]),
                         ("POST", "0", "2", "grpc.test:80"))
        self.assertTrue(all(e["final"] and e["attempt"] == 1 for e in events))

    def test_filters_and_lines(self):
        """
        C{--direction inbound --path /keep --limit 2}: only matching requests, printed as tap lines, and the
        process exits by itself after two.
        """
        tap = TapProcess(self, self.proxy, "--direction", "inbound", "--path", "/keep", "--limit", "2")
        time.sleep(0.5)
        out = self.proxy.ports["outbound"]
        self.curl_get(f"http://127.0.0.1:{out}/keep", "-H", "Host: web.test")
        self.curl_get(self.proxy.url("inbound", "/drop"))
        self.curl_get(self.proxy.url("inbound", "/keep/1"))
        self.curl_get(self.proxy.url("inbound", "/keep/2"))
        tap.process.wait(10)
        self.assertEqual(tap.process.returncode, 0)
        lines = tap.lines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(all("proxy=in" in line and ":path=/keep/" in line and ":status=200" in line
                            for line in lines), lines)

    def test_bad_filter_and_limit_of_subscribers(self):
        """
        A bad filter is a 400 naming it; past the subscriber bound the answer is 429.
        """
        status, _, body = http_get(self.proxy.url("admin", "/tap?colour=red"))
        self.assertEqual(status, 400)
        self.assertIn(b"colour", body)
        socks = []
        try:
            for _ in range(8):
                s = socket.create_connection(("127.0.0.1", self.proxy.ports["admin"]), timeout=5)
                s.sendall(b"GET /tap HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertIn(b"200", s.recv(100))
                socks.append(s)
            status, _, _ = http_get(self.proxy.url("admin", "/tap"))
            self.assertEqual(status, 429)
        finally:
            for s in socks:
                s.close()

    def test_stalled_subscriber(self):
        """
        A subscriber that never reads: 3,000 requests later the proxy's RSS has grown by less than 8 MiB, every
        request succeeded, and the stall did not halve the request rate.
        """
        port = self.proxy.ports["outbound"]
        send = http_sender(port, "web.test:80")
        paced(300, 10000, 2, send)  # warm up
        started = time.monotonic()
        self.assertEqual({r[0] for r in paced(1000, 10000, 2, send)}, {200})
        unwatched = time.monotonic() - started
        before = rss_kib(self.proxy.process.pid)
        stalled = socket.socket()
        self.addCleanup(stalled.close)
        # A small receive window set before connecting, so the proxy's writes back up soon.
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", self.proxy.ports["admin"]))
        stalled.sendall(b"GET /tap HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        results = paced(3000, 10000, 2, send)
        watched = (time.monotonic() - started) / 3
        self.assertEqual({r[0] for r in results}, {200})
        grown = rss_kib(self.proxy.process.pid) - before
        self.assertLess(grown, 8 * 1024, f"RSS grew by {grown} KiB")
        self.assertLess(watched, unwatched * 2, f"{watched:.3f}s per 1000 watched vs {unwatched:.3f}s")


class AccessLogTests(TestCase):
    """
    C{--access-log} through a real proxy: one line per request in the chosen format, to the chosen file.
    """

    def run_proxy(self, fmt):
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        web = Backend(self, "http", "web")
        endpoints = os.path.abspath(self.mktemp())
        write_atomically(endpoints, endpoints_yaml({"web.test:80": [web]}))
        log_path = os.path.abspath(self.mktemp())
        proxy = Proxy(self, {"discovery": f"file:{endpoints}", "app": f"tcp:127.0.0.1:{web.port}",
                             "access_log": fmt, "access_log_file": log_path})
        for path in ("/a", "/b?c=1"):
            subprocess.run([curl, "-sS", "-o", "/dev/null", "--max-time", "10", "-H", "Host: web.test",
                            f"http://127.0.0.1:{proxy.ports['outbound']}{path}"], timeout=20, check=True)
        subprocess.run([curl, "-sS", "-o", "/dev/null", "--max-time", "10", proxy.url("inbound", "/in")],
                       timeout=20, check=True)

        def lines():
            with open(log_path) as f:
                return f.read().splitlines()

        wait_for(lambda: len(lines()) >= 3, timeout=5, what="three access-log lines")
        proxy.stop()
        return lines()

    def test_json(self):
        """
        C{json}: one object per request with client address, method, authority, path, status, bytes and
        duration.
        """
        records = [json.loads(line) for line in self.run_proxy("json")]
        self.assertEqual([(r["direction"], r["method"], r["path"], r["status"]) for r in records],
                         [("outbound", "GET", "/a", 200), ("outbound", "GET", "/b?c=1", 200),
                          ("inbound", "GET", "/in", 200)])
        self.assertEqual(records[0]["authority"], "web.test:80")
        self.assertEqual(records[0]["client_addr"], "127.0.0.1")
        self.assertEqual(records[0]["response_bytes"], 3)
        self.assertGreater(records[0]["duration_ms"], 0)

    def test_apache(self):
        """
        C{apache}: the Common Log Format line, then the authority and the duration.
        """
        lines = self.run_proxy("apache")
        self.assertEqual(len(lines), 3)
        self.assertRegex(lines[0], r'^127\.0\.0\.1 - - \[[^]]+\] "GET /a HTTP/1\.1" 200 3 web\.test:80 [0-9.]+ms$')
