"""
Discovery and load balancing through a real C{twist linkproxy}: HTTP/1 requests sent to the outbound listener
with a C{Host} naming a logical service reach the endpoints that file or DNS discovery lists, as the chosen
balancer spreads them, and follow live edits, dead endpoints and empty sets.
"""

import os
import subprocess
import sys
import threading
import time
from collections import Counter

from twisted.trial.unittest import TestCase

from tests.proc import HttpBackend, Proxy, http1_requests, wait_for, write_atomically

SERVICE = "web.default:80"


def endpoints_yaml(services):
    """
    The endpoints file text for C{{"host:port": [backend, ...]}}.
    """
    lines = ["services:"]
    for target, backends in services.items():
        if not backends:
            lines.append(f"  {target}: []")
            continue
        lines.append(f"  {target}:")
        lines.extend(f"    - addr: {backend.address}" for backend in backends)
    return "\n".join(lines) + "\n"


class _FileDiscoveryMixin:
    """
    A proxy whose outbound router uses C{file:} discovery on an endpoints file the test can rewrite.
    """

    def start_proxy(self, services, balancer="p2c-ewma"):
        self.endpoints_path = os.path.abspath(self.mktemp() + ".endpoints.yaml")
        write_atomically(self.endpoints_path, endpoints_yaml(services))
        self.proxy = Proxy(self, {"discovery": f"file:{self.endpoints_path}", "balancer": balancer})
        return self.proxy

    def send(self, count, threads=1, host=SERVICE):
        return http1_requests(self.proxy.ports["outbound"], host, count, threads=threads)

    def bodies(self, results):
        """
        The backend names that answered, failing with the proxy log when any request did not get a 200.
        """
        bad = [r for r in results if r[0] != 200]
        if bad:
            self.fail(f"{len(bad)} of {len(results)} requests failed, e.g. {bad[:3]}\n"
                      f"proxy log tail:\n{self.proxy.log()[-3000:]}")
        return Counter(body.decode() for _, _, body in results)


class BalancerChoiceTests(_FileDiscoveryMixin, TestCase):
    """
    The balancer named by C{--balancer} decides how requests spread over a fast and a slow endpoint.
    """

    def setUp(self):
        self.fast = HttpBackend(self, "fast")
        self.slow = HttpBackend(self, "slow", delay=0.05)

    def spread(self, balancer):
        self.start_proxy({SERVICE: [self.fast, self.slow]}, balancer)
        answered = self.bodies(self.send(60)) + self.bodies(self.send(140, threads=4))
        self.assertEqual(sum(answered.values()), 200)
        # Counted where the requests landed, not where the proxy says it sent them.
        self.assertEqual((self.fast.requests, self.slow.requests), (answered["fast"], answered["slow"]))
        return self.fast.requests / (self.fast.requests + self.slow.requests)

    def test_p2c_ewma_prefers_fast_endpoint(self):
        """
        With p2c-ewma, the endpoint that answers at once gets most requests (over 75%) of 60 sequential and
        140 concurrent ones, because the slow one's peak-EWMA latency makes it lose most comparisons.
        """
        share = self.spread("p2c-ewma")
        self.assertGreater(share, 0.75, f"fast={self.fast.requests} slow={self.slow.requests}")

    def test_round_robin_splits_evenly(self):
        """
        With round-robin, the same traffic is split about evenly (40-60%) whatever the latencies.
        """
        share = self.spread("round-robin")
        self.assertTrue(0.4 <= share <= 0.6, f"fast={self.fast.requests} slow={self.slow.requests}")


class FileDiscoveryTests(_FileDiscoveryMixin, TestCase):
    """
    C{file:} discovery follows edits of the endpoints file while the proxy runs.
    """

    def test_live_edit_and_bad_edit(self):
        """
        Replacing the file's only endpoint A with B moves traffic to B within a few seconds without a restart;
        a later invalid file keeps B (the last good set) and counts C{discovery_errors_total{backend="file"}}.
        """
        a, b = HttpBackend(self, "a"), HttpBackend(self, "b")
        proxy = self.start_proxy({SERVICE: [a]})
        self.assertEqual(self.bodies(self.send(5)), {"a": 5})

        write_atomically(self.endpoints_path, endpoints_yaml({SERVICE: [b]}))
        wait_for(lambda: self.send(1)[0][2] == b"b", timeout=10, interval=0.2, what="traffic to move to B")
        self.assertEqual(self.bodies(self.send(10, threads=2)), {"b": 10})
        a_requests = a.requests

        write_atomically(self.endpoints_path, "services:\n  web.default:80: [ {addr: \n")
        wait_for(lambda: (proxy.metric("discovery_errors_total", backend="file") or 0) >= 1, timeout=10,
                 interval=0.2, what='discovery_errors_total{backend="file"} >= 1')
        self.assertEqual(self.bodies(self.send(10, threads=2)), {"b": 10})
        self.assertEqual(a.requests, a_requests)
        self.assertIn("keeping the last good version", proxy.log())

    def test_empty_endpoint_list_is_503(self):
        """
        A service listed with no endpoints, and one not listed at all, are answered by the proxy itself: 503
        with an C{l5d-proxy-error} saying there are no endpoints.
        """
        other = HttpBackend(self, "other")
        self.start_proxy({SERVICE: [], "other.default:80": [other]})
        for host in (SERVICE, "missing.default:80"):
            [(status, headers, body)] = self.send(1, host=host)
            self.assertEqual(status, 503, body)
            self.assertIn("no endpoints", headers.get("l5d-proxy-error", ""), headers)
            self.assertIn(host, headers["l5d-proxy-error"])
        self.assertEqual(self.bodies(self.send(1, host="other.default:80")), {"other": 1})
        self.assertEqual(other.requests, 1)


class DeadEndpointTests(_FileDiscoveryMixin, TestCase):
    """
    An endpoint that dies under traffic costs a few requests, is ejected, and the survivor takes everything.
    """

    def test_endpoint_killed_mid_run(self):
        """
        Two endpoints take round-robin traffic from three clients; one is killed (listener and connections
        closed). At most a handful of requests fail (the 7 consecutive failures that eject it, plus those in
        flight), each with a 502 and C{l5d-proxy-error}; once /metrics shows the endpoint ejected every request
        succeeds on the survivor.

        Only requests started within 0.9 s of the kill are sent: an ejection lasts at least 1 s (then one
        real request probes the endpoint, and fails), and it cannot start before the kill.
        """
        survivor, victim = HttpBackend(self, "survivor"), HttpBackend(self, "victim")
        proxy = self.start_proxy({SERVICE: [survivor, victim]}, "round-robin")
        warm = self.bodies(self.send(20, threads=2))
        self.assertEqual(warm, {"survivor": 10, "victim": 10})

        records = []  # (started, status, l5d-proxy-error or error text, body)
        lock = threading.Lock()
        stop = threading.Event()
        kill_at = [None]

        def client():
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", proxy.ports["outbound"], timeout=5)
            try:
                for _ in range(5000):
                    started = time.monotonic()
                    if stop.is_set() or (kill_at[0] is not None and started > kill_at[0] + 0.9):
                        return
                    try:
                        conn.request("GET", "/", headers={"Host": SERVICE})
                        response = conn.getresponse()
                        record = (started, response.status, response.getheader("l5d-proxy-error"),
                                  response.read())
                    except (OSError, http.client.HTTPException) as e:
                        conn.close()
                        record = (started, None, repr(e), b"")
                    with lock:
                        records.append(record)
            finally:
                conn.close()

        clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]

        def stop_clients():
            stop.set()
            for thread in clients:
                thread.join(10)
        self.addCleanup(stop_clients)
        for thread in clients:
            thread.start()
        time.sleep(0.2)
        kill_at[0] = time.monotonic()
        victim.kill()
        wait_for(lambda: (proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected") or 0) >= 1,
                 timeout=0.8,
                 interval=0.02, what="the killed endpoint to be ejected")
        seen_ejected = time.monotonic()
        # The clients stop by themselves 0.9 s after the kill.
        for thread in clients:
            thread.join(10)
        self.assertFalse(any(thread.is_alive() for thread in clients))

        after_kill = [r for r in records if r[0] >= kill_at[0]]
        failed = [r for r in after_kill if r[1] != 200]
        later = [r for r in records if r[0] > seen_ejected]
        detail = (f"{len(failed)} failed of {len(after_kill)} after the kill, e.g. {failed[:3]}; "
                  f"{len(later)} after the ejection was seen\nproxy log tail:\n{proxy.log()[-3000:]}")
        self.assertLessEqual(len(failed), 12, detail)
        for started, status, error, body in failed:
            self.assertEqual(status, 502, detail)
            self.assertTrue(error, detail)
        self.assertGreaterEqual(len(later), 10, detail)
        self.assertEqual([(r[1], r[3]) for r in later], [(200, b"survivor")] * len(later), detail)
        self.assertEqual(
            proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ejected", target=SERVICE), 1.0)
        self.assertEqual(proxy.metric("outbound_http_balancer_endpoints", endpoint_state="ready", target=SERVICE), 1.0)


# A DNS server for A records only, on UDP 127.0.0.1 (port printed on stdout): stdlib struct packing, no
# dependencies. Names given as NAME=IP arguments; any other name is NXDOMAIN, and a known name asked for
# another type gets an empty NOERROR answer. It exits when its stdin closes (the test is gone) or after 120 s
# without a query.
_DNS_SERVER = r"""
import os, socket, struct, sys, threading
records = dict(arg.lower().split("=", 1) for arg in sys.argv[1:])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
sock.settimeout(120)
while True:
    try:
        data, peer = sock.recvfrom(4096)
    except socket.timeout:
        break
    if len(data) < 17:
        continue
    qid, flags = struct.unpack("!HH", data[:4])
    i, labels = 12, []
    while i < len(data) and data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace"))
        i += 1 + data[i]
    i += 1
    if i + 4 > len(data):
        continue
    qtype, = struct.unpack("!H", data[i:i + 2])
    question = data[12:i + 4]
    ip = records.get(".".join(labels).lower().rstrip("."))
    answer = b""
    if ip is not None and qtype == 1:
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(ip)
    rcode = 0 if ip is not None else 3
    header = struct.pack("!HHHHHH", qid, 0x8480 | (flags & 0x0100) | rcode, 1, 1 if answer else 0, 0, 0)
    sock.sendto(header + question + answer, peer)
"""


class DnsDiscoveryTests(TestCase):
    """
    C{--discovery dns:IP:PORT} resolves logical names through that DNS server.
    """

    def start_dns(self, **names):
        process = subprocess.Popen([sys.executable, "-c", _DNS_SERVER] + [f"{k}={v}" for k, v in names.items()],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def stop():
            process.stdin.close()
            process.kill()
            process.wait(10)
            process.stdout.close()
        self.addCleanup(stop)
        line = process.stdout.readline()
        self.assertTrue(line.strip().isdigit(), f"DNS server did not start: {line!r}")
        return int(line)

    def test_dns_names_resolve_and_unknown_is_503(self):
        """
        A name with an A record (127.0.0.1) reaches the backend on the port in the Host header; a name the
        server does not know (NXDOMAIN) is answered 503 with an C{l5d-proxy-error} and reaches nothing.
        """
        backend = HttpBackend(self, "web")
        dns_port = self.start_dns(**{"web.test": "127.0.0.1"})
        proxy = Proxy(self, {"discovery": f"dns:127.0.0.1:{dns_port}"})
        port = proxy.ports["outbound"]

        results = http1_requests(port, f"web.test:{backend.port}", 5, threads=1)
        self.assertEqual([(s, b) for s, _, b in results], [(200, b"web")] * 5, proxy.log()[-3000:])
        self.assertEqual(backend.requests, 5)

        [(status, headers, body)] = http1_requests(port, f"unknown.test:{backend.port}", 1)
        self.assertEqual(status, 503, body)
        self.assertIn("no endpoints", headers.get("l5d-proxy-error", ""), headers)
        self.assertIn("unknown.test", headers["l5d-proxy-error"])
        self.assertEqual(backend.requests, 5)
