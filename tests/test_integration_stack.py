"""
The request stack through real C{twist linkproxy} processes and backends that a test can SIGKILL: failover,
retries within a budget, route and gRPC timeouts, hostile clients, panic mode, traffic split and origin-form.

Backends are separate processes (L{tests.stack_backend}); every load loop is bounded in count and time.
"""

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import ROOT, Proxy, wait_for, write_atomically

SERVICE = "web.test:80"


class Backend:
    """
    One L{tests.stack_backend} process on a free port.
    """

    def __init__(self, testcase, kind, name):
        self.name = name
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.process = subprocess.Popen([sys.executable, "-m", "tests.stack_backend", kind, name],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.port = int(self.process.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"
        testcase.addCleanup(self.stop)

    def kill(self):
        """SIGKILL, by PID."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def stop(self):
        self.kill()
        self.process.stdout.close()

    def requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/__stats")
            import json
            return json.loads(conn.getresponse().read())["requests"]
        finally:
            conn.close()


def endpoints_yaml(services, profiles=""):
    lines = ["services:"]
    for target, backends in services.items():
        lines.append(f"  {target}:")
        lines.extend(f"    - addr: {b.address}" for b in backends)
    return "\n".join(lines) + "\n" + profiles


def paced(count, rate, threads, send, seconds_limit=60.0):
    """
    Call C{send(conn_state)} C{count} times in all from C{threads} threads, C{rate} per second in all.

    @return: the list of results C{send} returned.
    """
    results = []
    lock = threading.Lock()
    start = time.monotonic()
    interval = threads / float(rate)

    def run(index):
        state = {}
        n = count // threads + (1 if index < count % threads else 0)
        for i in range(n):
            due = start + (i + index / threads) * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - start > seconds_limit:
                break
            result = send(state)
            with lock:
                results.append(result)
        if state.get("conn") is not None:
            state["conn"].close()

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds_limit + 10)
    return results


def http_sender(port, host, path="/", method="GET"):
    def send(state):
        conn = state.get("conn")
        if conn is None:
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, headers={"Host": host})
            response = conn.getresponse()
            body = response.read()
            return response.status, dict((k.lower(), v) for k, v in response.getheaders()), body
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            state["conn"] = None
            return None, {}, repr(e).encode()
    return send


class _StackMixin:
    def start(self, services, profiles="", **config):
        self.endpoints_path = os.path.abspath(self.mktemp() + ".endpoints.yaml")
        write_atomically(self.endpoints_path, endpoints_yaml(services, profiles))
        settings = {"discovery": f"file:{self.endpoints_path}"}
        settings.update(config)
        self.proxy = Proxy(self, settings)
        return self.proxy

    def failures(self, results, ok=(200,)):
        return [r for r in results if r[0] not in ok]

    def assertNoFailures(self, results, ok=(200,)):
        bad = self.failures(results, ok)
        if bad:
            self.fail(f"{len(bad)} of {len(results)} requests failed, e.g. {bad[:3]}\n"
                      f"proxy log tail:\n{self.proxy.log()[-3000:]}")


class FailoverTests(_StackMixin, TestCase):
    """
    An endpoint SIGKILLed under load loses no request, and is probed about once a second afterwards.
    """

    def test_http1_sigkill(self):
        """
        Three backends, 100 GET/s from four keep-alive clients for 5 s; one backend is SIGKILLed at 1.5 s.
        Every request gets a 200, and the dead port sees at most about one connect attempt per second after
        its ejection.
        """
        backends = [Backend(self, "http", f"b{i}") for i in range(3)]
        proxy = self.start({SERVICE: backends})
        victim = backends[1]
        threading.Timer(1.5, victim.kill).start()
        results = paced(500, 100, 4, http_sender(proxy.ports["outbound"], SERVICE))
        self.assertEqual(len(results), 500)
        self.assertNoFailures(results)
        dead = victim.address
        wait_for(lambda: (proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected") or 0)
                 + (proxy.metric("outbound_http_balancer_endpoints", endpoint_state="probing") or 0) >= 1, timeout=5,
                 what="the killed endpoint to be ejected")
        before = proxy.metric("tcp_connect_error_total", target_addr=dead) or 0
        paced(200, 100, 2, http_sender(proxy.ports["outbound"], SERVICE))
        time.sleep(1.0)
        after = proxy.metric("tcp_connect_error_total", target_addr=dead) or 0
        # About 3 s of traffic and waiting: about one probe a second, with slack for jitter.
        self.assertLessEqual(after - before, 5, f"{after - before} connect attempts to the dead port")

    def test_grpc_sigkill(self):
        """
        The same with grpcio unary calls through the outbound listener, on a route marked retryable (a unary
        call has a body and is not idempotent, so one caught in flight by the kill is replayed only where the
        operator said so): 0 failed calls.
        """
        try:
            import grpc
        except ImportError:
            raise SkipTest("grpcio is not installed")
        backends = [Backend(self, "grpc", f"g{i}") for i in range(3)]
        proxy = self.start({"grpc.test:80": backends}, """profiles:
  grpc.test:80:
    routes:
      - {name: unary, match: {path_regex: "^/test.Stack/"}, retryable: true}
""")
        channel = grpc.insecure_channel(f"127.0.0.1:{proxy.ports['outbound']}",
                                        options=[("grpc.default_authority", "grpc.test:80")])
        self.addCleanup(channel.close)
        unary = channel.unary_unary("/test.Stack/Unary")
        self.assertTrue(unary(b"hello", timeout=10).endswith(b":hello"))
        threading.Timer(1.5, backends[0].kill).start()

        def send(state):
            try:
                return (200, {}, unary(b"x", timeout=10))
            except grpc.RpcError as e:
                return (None, {}, f"{e.code()}: {e.details()}".encode())

        results = paced(500, 100, 4, send)
        self.assertEqual(len(results), 500)
        self.assertNoFailures(results)


class RetryTests(_StackMixin, TestCase):
    """
    Retryable routes reach the healthy outcome through retries, within the retry budget.
    """

    PROFILE = """profiles:
  web.test:80:
    retry_budget: {ratio: 0.2, min_per_second: 2, ttl: 2s}
    routes:
      - name: flaky
        match: {path_regex: "^/(flaky|fail)"}
        retryable: true
"""

    def test_flaky_endpoint(self):
        """
        An endpoint answering 503 to 10% of requests: at least 99% of 400 requests succeed, and the route
        metrics count the retries.
        """
        backend = Backend(self, "http", "flaky")
        proxy = self.start({SERVICE: [backend]}, self.PROFILE)
        results = paced(400, 200, 2, http_sender(proxy.ports["outbound"], SERVICE, "/flaky?p=0.1"))
        ok = len([r for r in results if r[0] == 200])
        self.assertGreaterEqual(ok / len(results), 0.99, f"{ok} of {len(results)} succeeded")
        retries = proxy.metric("route_retry_requests_total", rt_route="flaky") or 0
        self.assertGreater(retries, 10)
        self.assertEqual(proxy.metric("route_request_total", rt_route="flaky"), 400)
        self.assertEqual(proxy.metric("route_actual_request_total", rt_route="flaky"), 400 + retries)
        self.assertEqual(proxy.metric("route_actual_response_total", rt_route="flaky"), 400 + retries)
        self.assertEqual(proxy.metric("route_response_total", rt_route="flaky", classification="success"), ok)
        self.assertEqual(backend.requests(), 400 + retries)

    def test_failing_endpoint_no_retry_storm(self):
        """
        An endpoint answering 503 to everything: the retries stay within the budget (ratio 0.2 of requests
        plus a reserve of 2/s), the exhaustion is counted, and the client gets the 503s.
        """
        backend = Backend(self, "http", "down")
        proxy = self.start({SERVICE: [backend]}, self.PROFILE)
        started = time.monotonic()
        results = paced(200, 100, 2, http_sender(proxy.ports["outbound"], SERVICE, "/fail"))
        elapsed = time.monotonic() - started
        self.assertEqual({r[0] for r in results} - {503}, set())
        retries = proxy.metric("route_retry_requests_total", rt_route="flaky") or 0
        # The budget is a rate: 0.2 per request, plus 2/s of reserve, counted over a sliding 2 s window. Without
        # it each request would make 3 attempts: 400 retries.
        self.assertLessEqual(retries, 0.2 * 200 + 2 * (elapsed + 2) + 2)
        self.assertGreater(proxy.metric("route_retry_budget_exhausted_total", rt_route="flaky") or 0, 0)
        self.assertEqual(backend.requests(), 200 + retries)


class TimeoutTests(_StackMixin, TestCase):
    """
    A route timeout answers 504 on time; a gRPC deadline answers DEADLINE_EXCEEDED.
    """

    def test_route_timeout(self):
        """
        A route with C{timeout: 500ms} to an endpoint that takes 2 s: 504 with l5d-proxy-error naming the
        route, within 100 ms of the deadline.
        """
        backend = Backend(self, "http", "slow")
        proxy = self.start({SERVICE: [backend]}, """profiles:
  web.test:80:
    routes:
      - name: slow
        match: {path_regex: "^/slow"}
        timeout: 500ms
""")
        send = http_sender(proxy.ports["outbound"], SERVICE, "/slow?ms=2000")
        send({})  # warm the connection path
        started = time.monotonic()
        status, headers, _ = send({})
        elapsed = time.monotonic() - started
        self.assertEqual(status, 504)
        self.assertIn("route slow", headers.get("l5d-proxy-error", ""))
        self.assertTrue(0.5 <= elapsed < 0.6, f"answered after {elapsed:.3f} s")

    def test_grpc_timeout(self):
        """
        A gRPC call with C{grpc-timeout: 300m} to an endpoint that takes 2 s gets a trailers-only
        DEADLINE_EXCEEDED (grpc-status 4) from the proxy, with l5d-proxy-error, sent by curl.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        backend = Backend(self, "grpc", "g")
        proxy = self.start({"grpc.test:80": [backend]})
        message = b"\x00\x00\x00\x00\x04slow"
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(message)
        started = time.monotonic()
        out = subprocess.run(
            [curl, "-sS", "-i", "--http2-prior-knowledge", "--max-time", "10",
             "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "grpc-timeout: 300m",
             "-H", "host: grpc.test:80", "--data-binary", f"@{path}",
             f"http://127.0.0.1:{proxy.ports['outbound']}/test.Stack/Unary"],
            capture_output=True, timeout=20)
        elapsed = time.monotonic() - started
        text = out.stdout.decode("latin-1").lower()
        self.assertIn("grpc-status: 4", text)
        self.assertIn("l5d-proxy-error: grpc-timeout", text)
        self.assertLess(elapsed, 1.5)


class HostileInputTests(_StackMixin, TestCase):
    """
    Malformed requests and client resets never eject a healthy endpoint.
    """

    def test_garbage_and_resets_do_not_eject(self):
        """
        2,000 malformed requests and 300 client resets mid-request against a single healthy endpoint: it
        stays ready and the next normal request gets a 200.
        """
        backend = Backend(self, "http", "healthy")
        proxy = self.start({SERVICE: [backend]})
        port = proxy.ports["outbound"]
        bad = [b"GET / HTTP/1.1\r\nHost: web.test\r\nContent-Length: x\r\n\r\n",
               b"\x16\x03garbage\r\n\r\n", b"GET /\x00 HTTP/1.1\r\nHost: web.test\r\n\r\n",
               b"GET / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 10\r\n\r\nabc"]
        for i in range(2000):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(bad[i % len(bad)])
                if i % len(bad) == 3:
                    s.shutdown(socket.SHUT_WR)
                try:
                    s.recv(4096)
                except OSError:
                    pass
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /slow?ms=50 HTTP/1.1\r\nHost: web.test:80\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        status, _, _ = http_sender(port, SERVICE)({})
        self.assertEqual(status, 200)
        self.assertFalse(proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected"))
        self.assertFalse(proxy.metric("outbound_http_balancer_endpoints", endpoint_state="probing"))


class PanicTests(_StackMixin, TestCase):
    """
    A target whose only endpoint was ejected still gets its requests through (panic mode).
    """

    def test_ejected_endpoint_still_serves(self):
        """
        Seven 503s in a row eject the only endpoint; the next request is still sent to it and gets its 200,
        and the panic is counted.
        """
        backend = Backend(self, "http", "only")
        proxy = self.start({SERVICE: [backend]})
        send = http_sender(proxy.ports["outbound"], SERVICE, "/fail")
        self.assertEqual([send({})[0] for _ in range(7)], [503] * 7)
        wait_for(lambda: proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected")
                 or proxy.metric("outbound_http_balancer_endpoints", endpoint_state="probing"), timeout=2,
                 what="ejection")
        status, _, body = http_sender(proxy.ports["outbound"], SERVICE, "/ok")({})
        self.assertEqual((status, body), (200, b"only"))
        self.assertGreaterEqual(proxy.metric("balancer_panic_total") or 0, 1)


class SplitTests(_StackMixin, TestCase):
    """
    A profile's split: sends each request to a leg by weight, and follows live edits.
    """

    def split_yaml(self, a, b):
        return f"""profiles:
  web.test:80:
    split:
      - {{target: web-v1.test:80, weight: {a}}}
      - {{target: web-v2.test:80, weight: {b}}}
"""

    def test_split_and_live_edit(self):
        """
        90/10 over 2,000 requests lands within 3 points; an edit to 50/50 applies within 2 s.
        """
        v1, v2 = Backend(self, "http", "v1"), Backend(self, "http", "v2")
        services = {"web-v1.test:80": [v1], "web-v2.test:80": [v2]}
        proxy = self.start(services, self.split_yaml(90, 10))
        send = http_sender(proxy.ports["outbound"], SERVICE)
        results = paced(2000, 2000, 4, send)
        self.assertNoFailures(results)
        share = sum(1 for r in results if r[2] == b"v1") / len(results)
        self.assertTrue(0.87 <= share <= 0.93, f"v1 got {share:.3f}")

        write_atomically(self.endpoints_path, endpoints_yaml(services, self.split_yaml(50, 50)))
        edited = time.monotonic()

        def balanced():
            batch = paced(100, 1000, 2, send)
            return 0.3 <= sum(1 for r in batch if r[2] == b"v1") / len(batch) <= 0.7

        wait_for(balanced, timeout=4, interval=0.0, what="the 50/50 split to apply")
        self.assertLess(time.monotonic() - edited, 2.5)
        results = paced(1000, 2000, 4, send)
        share = sum(1 for r in results if r[2] == b"v1") / len(results)
        self.assertTrue(0.45 <= share <= 0.55, f"v1 got {share:.3f}")


class OriginFormTests(_StackMixin, TestCase):
    """
    An absolute-form request through the outbound listener reaches the app in origin-form.
    """

    def test_curl_proxy(self):
        """
        curl -x: the app sees C{/path?q=1} and C{Host: web.test}.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        backend = Backend(self, "http", "app")
        proxy = self.start({SERVICE: [backend]})
        out = subprocess.run([curl, "-sS", "-i", "--max-time", "10", "-x",
                              f"http://127.0.0.1:{proxy.ports['outbound']}", "http://web.test/path?q=1"],
                             capture_output=True, timeout=20)
        text = out.stdout.decode().lower()
        self.assertIn("200 ok", text)
        self.assertIn("x-seen-target: /path?q=1\r\n", text)
        self.assertIn("x-seen-host: web.test\r\n", text)
