"""
Helpers for integration tests: run a real C{twist linkproxy} and small backends on 127.0.0.1.

Every process and thread started here is stopped by the test that started it (via C{addCleanup}).
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWIST = os.path.join(os.path.dirname(sys.executable), "twist")


def free_port():
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """
    Poll C{predicate} until it returns a true value, or fail after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_get(url, timeout=5.0, method="GET", data=None, headers=None):
    """
    A blocking HTTP request with the standard library; returns C{(status, headers, body)} even for errors.
    """
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Proxy:
    """
    A C{twist linkproxy} process on free loopback ports.

    @ivar ports: C{{"outbound", "inbound", "admin"}} to port numbers.
    """

    def __init__(self, testcase, config=None, args=(), env=None, ready=True):
        self.ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
        settings = {
            "outbound": f"tcp:{self.ports['outbound']}:interface=127.0.0.1",
            "inbound": f"tcp:{self.ports['inbound']}:interface=127.0.0.1",
            "admin": f"tcp:{self.ports['admin']}:interface=127.0.0.1",
            "shutdown_grace_period": "5s",
        }
        settings.update(config or {})
        self.config_path = os.path.abspath(testcase.mktemp() + ".yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(settings, f)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LINKPROXY_")}
        full_env["PYTHONPATH"] = ROOT
        full_env.update(env or {})
        self.log_path = os.path.abspath(testcase.mktemp() + ".log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [TWIST, "--log-format", "text", "linkproxy", "--config", self.config_path, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        testcase.addCleanup(self.stop)
        if ready:
            self.wait_ready()

    def url(self, name, path=""):
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def log(self):
        """The process's output so far, for failure messages."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"linkproxy exited with {self.process.returncode}:\n{self.log()}")
            try:
                return http_get(self.url("admin", "/ready"), timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, what="linkproxy /ready")

    def metrics(self):
        """The C{/metrics} text."""
        return http_get(self.url("admin", "/metrics"))[2].decode()

    def metric(self, name, **labels):
        """
        The value of one sample in C{/metrics} whose labels include C{labels}, or C{None}; summed when several
        samples match.
        """
        from prometheus_client.parser import text_string_to_metric_families
        total = None
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total = (total or 0) + sample.value
        return total

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """
        Stop the process (SIGTERM drains), waiting for it; killed if it will not go.

        @return: its exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class TcpServer:
    """
    A threaded TCP server on 127.0.0.1 running C{handler(conn)} for each connection.
    """

    def __init__(self, testcase, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._handler = handler
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        testcase.addCleanup(self.stop)

    def _serve(self):
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            conn.settimeout(10)
            self._handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


def http_or_echo(conn):
    """
    A backend handler: answers an HTTP/1 request with 200 and a body naming the path; echoes anything else.
    """
    data = conn.recv(65536)
    if data[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        path = data.split(b" ", 2)[1]
        body = b"hello " + path
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        return
    while data:
        conn.sendall(data)
        data = conn.recv(65536)


def recv_exactly(sock, n, timeout=5.0):
    """
    Read exactly C{n} bytes from a blocking socket, or fail.
    """
    sock.settimeout(timeout)
    chunks, have = [], 0
    while have < n:
        chunk = sock.recv(n - have)
        if not chunk:
            raise AssertionError(f"connection closed after {have} of {n} bytes")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)
