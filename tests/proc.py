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

    C{twist_args} come before the plugin name: twist's own options.
    """

    def __init__(self, testcase, config=None, args=(), env=None, ready=True, twist_args=("--log-format", "text")):
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
            [TWIST, *twist_args, "linkproxy", "--config", self.config_path, *args],
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

    def samples(self, name, **labels):
        """
        The label sets of every non-zero sample of C{name} whose labels include C{labels}.
        """
        from prometheus_client.parser import text_string_to_metric_families
        return [sample.labels for family in text_string_to_metric_families(self.metrics())
                for sample in family.samples
                if sample.name == name and sample.value and all(sample.labels.get(k) == v for k, v in labels.items())]

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


def write_atomically(path, text):
    """
    Replace the file at C{path} with C{text} the way config tooling does: write a temporary file beside it,
    then rename it over the old one, so a reader never sees a half-written file.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


class HttpBackend:
    """
    A keep-alive HTTP/1.1 backend on 127.0.0.1: answers every request with 200 and its C{name} as the body,
    after C{delay} seconds, and counts the responses it sent in full.

    Requests are read by their head and C{content-length} (no chunked request bodies).

    @ivar port: the port it listens on.
    @ivar requests: responses sent so far.
    """

    def __init__(self, testcase, name, delay=0.0):
        self.name = name
        self.delay = delay
        self.requests = 0
        self._lock = threading.Lock()
        self._conns = set()
        self._killed = False
        self._server = TcpServer(testcase, self._handle)
        self.port = self._server.port
        testcase.addCleanup(self.kill)

    @property
    def address(self):
        """C{"127.0.0.1:PORT"}."""
        return f"127.0.0.1:{self.port}"

    def _handle(self, conn):
        with self._lock:
            if self._killed:
                return
            self._conns.add(conn)
        try:
            body = self.name.encode()
            response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
                len(body), body)
            buffered = b""
            while not self._killed:
                while b"\r\n\r\n" not in buffered:
                    if len(buffered) > 65536:
                        return
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buffered) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                buffered = buffered[length:]
                if self.delay:
                    time.sleep(self.delay)
                # Counted before sending: a client may read the response before this thread runs again.
                with self._lock:
                    self.requests += 1
                conn.sendall(response)
        finally:
            with self._lock:
                self._conns.discard(conn)

    def kill(self):
        """
        Die like a crashed server: stop listening (later connects are refused) and close every open connection.
        """
        with self._lock:
            self._killed = True
            conns = list(self._conns)
        self._server.stop()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def http1_requests(port, host, count, threads=1, path="/", timeout=10.0):
    """
    Send C{count} GET requests for C{path} with C{Host: host} to 127.0.0.1:C{port}, over one keep-alive
    connection per thread (reopened after an error), from C{threads} threads at once.

    @return: a list of C{(status, headers, body)} in completion order; C{status} is C{None} (and C{body} the
        error text) for a request that got no response.
    """
    import http.client

    results = []
    lock = threading.Lock()
    left = [count]

    def take():
        with lock:
            if left[0] <= 0:
                return False
            left[0] -= 1
            return True

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            while take():
                try:
                    conn.request("GET", path, headers={"Host": host})
                    response = conn.getresponse()
                    result = (response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    result = (None, {}, repr(e).encode())
                with lock:
                    results.append(result)
        finally:
            conn.close()

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout * (count + 1)
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            raise AssertionError("http1_requests: a client thread did not finish")
    return results
