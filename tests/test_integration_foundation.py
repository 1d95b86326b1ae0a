"""
A real C{twist linkproxy} on loopback: HTTP, opaque bytes and a TLS ClientHello through the inbound listener,
TCP routes, readiness, metrics, config errors and the graceful drain.
"""

import os
import shutil
import signal
import socket
import subprocess

from twisted.trial.unittest import TestCase

from tests.proc import TWIST, ROOT, Proxy, TcpServer, free_port, http_get, http_or_echo, recv_exactly, wait_for


class InboundTests(TestCase):
    """
    Traffic through the inbound listener reaches the app, whatever its protocol.
    """

    def setUp(self):
        self.app = TcpServer(self, http_or_echo)
        self.proxy = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={self.app.port}", "detect_timeout": "300ms"})

    def test_http_through_inbound(self):
        """
        curl's HTTP/1 request through the inbound listener reaches the app and its response comes back;
        detection counts it as http1.
        """
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")
        out = subprocess.run(["curl", "-s", "--max-time", "5", self.proxy.url("inbound", "/x")],
                             capture_output=True, timeout=10)
        self.assertEqual(out.stdout, b"hello /x")
        self.assertEqual(self.proxy.metric("protocol_detect_total", direction="inbound", protocol="http1"), 1.0)

    def test_opaque_bytes_through_inbound(self):
        """
        Binary bytes are detected as opaque and spliced both ways; byte counters move.
        """
        payload = bytes(range(256)) * 64
        with socket.create_connection(("127.0.0.1", self.proxy.ports["inbound"]), timeout=5) as s:
            s.sendall(b"\x00" + payload)
            self.assertEqual(recv_exactly(s, len(payload) + 1), b"\x00" + payload)
        wait_for(lambda: self.proxy.metric("tcp_close_total", direction="inbound", peer="src"), what="close")
        self.assertEqual(self.proxy.metric("protocol_detect_total", direction="inbound", protocol="opaque",
                                           reason="detected"), 1.0)
        self.assertEqual(self.proxy.metric("tcp_read_bytes_total", direction="inbound", peer="src"),
                         len(payload) + 1)
        self.assertEqual(self.proxy.metric("tcp_write_bytes_total", direction="inbound", peer="src"),
                         len(payload) + 1)

    def test_detect_timeout_fails_open(self):
        """
        A client that says nothing within the detect timeout is forwarded as opaque TCP, not dropped.
        """
        with socket.create_connection(("127.0.0.1", self.proxy.ports["inbound"]), timeout=5) as s:
            wait_for(lambda: self.app.accepted == 1, what="proxy to connect to the app after the timeout")
            s.sendall(b"late words")
            self.assertEqual(recv_exactly(s, 10), b"late words")
        self.assertEqual(self.proxy.metric("protocol_detect_total", direction="inbound", reason="timeout"), 1.0)

    def test_tls_client_hello_sni_in_metrics(self):
        """
        A real TLS ClientHello from openssl s_client is detected as TLS and its SNI appears in /metrics.
        """
        if shutil.which("openssl") is None:
            self.skipTest("openssl is not installed")
        subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.proxy.ports['inbound']}",
                        "-servername", "web.default.svc.cluster.local"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        wait_for(lambda: self.proxy.metric("tls_client_hello_total", sni="web.default.svc.cluster.local"),
                 what="SNI in metrics")
        self.assertEqual(self.proxy.metric("protocol_detect_total", direction="inbound", protocol="tls"), 1.0)

    def test_ready_and_metrics(self):
        """
        /ready is 200 once every listener is bound, /live answers, and /metrics has Linkerd's TCP names.
        """
        self.assertEqual(http_get(self.proxy.url("admin", "/ready"))[0], 200)
        self.assertEqual(http_get(self.proxy.url("admin", "/live"))[0], 200)
        text = self.proxy.metrics()
        for name in ("tcp_open_total", "tcp_open_connections", "tcp_close_total", "tcp_read_bytes_total",
                     "tcp_write_bytes_total", "process_resident_memory_bytes"):
            self.assertIn(name, text)

    def test_sigterm_drains_open_connection(self):
        """
        SIGTERM stops accepting at once, lets an open connection finish within the grace period, then exits.

        Twisted re-raises the signal once the reactor has stopped, so a drained exit reports -SIGTERM, the
        conventional status of a process that ended on that signal.
        """
        s = socket.create_connection(("127.0.0.1", self.proxy.ports["inbound"]), timeout=5)
        s.sendall(b"\x01hold")
        self.assertEqual(recv_exactly(s, 5), b"\x01hold")
        self.proxy.process.terminate()
        wait_for(lambda: not _can_connect(self.proxy.ports["inbound"]), what="inbound listener to close")
        s.sendall(b"\x02still")
        self.assertEqual(recv_exactly(s, 6), b"\x02still")
        s.close()
        self.assertIn(self.proxy.process.wait(10), (0, -signal.SIGTERM))
        self.assertIn("draining 1 open connections", self.proxy.log())


class OutboundTcpRouteTests(TestCase):
    """
    Configured TCP routes forward opaque bytes to their target.
    """

    def test_tcp_route(self):
        """
        A route listener forwards to its target, and its connections are counted with the target address.
        """
        app = TcpServer(self, http_or_echo)
        route_port = free_port()
        proxy = Proxy(self, {"outbound": {
            "listen": f"tcp:{free_port()}:interface=127.0.0.1",
            "tcp_routes": [{"listen": f"tcp:{route_port}:interface=127.0.0.1",
                            "target": f"127.0.0.1:{app.port}"}]}})
        with socket.create_connection(("127.0.0.1", route_port), timeout=5) as s:
            s.sendall(b"ping")
            self.assertEqual(recv_exactly(s, 4), b"ping")
        wait_for(lambda: proxy.metric("tcp_open_total", direction="outbound", peer="dst",
                                      target_addr=f"127.0.0.1:{app.port}"), what="dst connection counted")

    def test_failed_connect_closes_client_and_is_counted(self):
        """
        A route whose target refuses connections closes the client and counts the connect error.
        """
        route_port, dead = free_port(), free_port()
        proxy = Proxy(self, {"tcp_routes": [{"listen": f"tcp:{route_port}:interface=127.0.0.1",
                                             "target": f"127.0.0.1:{dead}"}]})
        with socket.create_connection(("127.0.0.1", route_port), timeout=5) as s:
            s.settimeout(5)
            self.assertEqual(s.recv(10), b"")
        self.assertEqual(proxy.metric("tcp_connect_error_total", target_addr=f"127.0.0.1:{dead}",
                                      error="refused"), 1.0)


class ConfigErrorTests(TestCase):
    """
    A bad configuration is reported in full before anything is bound.
    """

    def test_all_problems_listed_and_nothing_bound(self):
        """
        Two bad options produce one message naming both, a non-zero exit, and no bound admin port.
        """
        admin = free_port()
        out = subprocess.run(
            [TWIST, "linkproxy", "--outbound", "nonsense:foo", "--detect-timeout", "-3",
             "--admin", f"tcp:{admin}:interface=127.0.0.1"],
            capture_output=True, timeout=30, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(b"--outbound", out.stderr)
        self.assertIn(b"--detect-timeout", out.stderr)
        self.assertFalse(_can_connect(admin))


def _can_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False

