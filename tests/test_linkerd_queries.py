"""
Linkerd's own PromQL, through a real Prometheus, against a two-proxy mesh.

The 242 queries of C{../shared/linkerd-queries.json} (taken from linkerd/linkerd2: the Grafana dashboards, the
viz API's Go templates, the heartbeat) are evaluated by Debian's C{prometheus}, started here on loopback with
its own configuration, after it has scraped proxy A (client side) and proxy B (server side) every second while
traffic of every kind went through them.

How the queries are adapted, and why:
  - Label matchers on labels that Linkerd's Prometheus adds by Kubernetes relabelling (L{K8S_LABELS}: the pod's
    C{namespace}, C{pod}, C{deployment} and the other pod labels) are removed: outside Kubernetes nothing adds
    them. So are matchers whose value is a Grafana template variable (C{"$deployment"}, C{"$cluster"}...),
    whose value a user would pick from what the proxies export. Every other matcher stays, literal values
    included (C{dst_deployment="web"}, C{srv_name="web-http"}, C{authority=~"^web.default..."}).
  - C{$__rate_interval} and C{$interval} become C{1m} (scrapes are 1 s apart, so a minute holds many).
  - Grafana's C{label_values(EXPR, L)} becomes C{group by (L) (EXPR)}; when C{L} is a label the proxy should
    export (not a Kubernetes one), C{L!=""} is added, so that a variable listing nothing does not count.
  - The scrape job is named C{linkerd-proxy}, as in Linkerd's Prometheus configuration (C{job="..."} stays).
A query "returns data" when Prometheus answers it with at least one sample. The test lists every query it
ran with its outcome; the ones that cannot return data are in L{CANNOT_APPLY} with the reason.
"""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from tests.proc import ROOT, Proxy, TcpServer, free_port, http_get, wait_for
from tests.test_integration_mesh import CLIENT, WEB, trust_domain

QUERIES = os.path.join(ROOT, "..", "shared", "linkerd-queries.json")

#: Labels Linkerd's Prometheus configuration adds from Kubernetes metadata (relabel rules on the pod): the
#: namespace, pod, container and deployment-like workload names, and the pod labels copied as they are
#: (C{control_plane_ns} from C{linkerd.io/control-plane-ns}, C{extension} from the viz pods' label).
K8S_LABELS = frozenset({"namespace", "pod", "deployment", "container", "daemonset", "statefulset", "replicaset",
                        "job_name", "cronjob", "control_plane_ns", "control_plane_component", "extension",
                        "workload_ns", "proxy_deployment"})

#: Rate windows Grafana computes; a fixed one here.
RATE_INTERVAL = "1m"

#: The queries that cannot return data from linkproxy, and why.
GATEWAY_API = ("Gateway-API route metrics (outbound_{http,grpc}_route_*): Linkerd's proxy exports them for "
               "HTTPRoute/GRPCRoute resources; linkproxy has ServiceProfile-style routes (route_*) and no "
               "Gateway-API routes")
NAMED_SERVER = ("needs a Server resource named web-http (or an AuthorizationPolicy named web-authn): linkproxy "
                "has one policy mode per process and no policy resources, so its srv_*/authz_* labels name "
                "that mode as Linkerd names its default policies (srv_kind=\"default\", "
                "srv_name=\"all-unauthenticated\")")
OUTBOUND_ROUTE_TLS = ("outbound route metrics have no tls label: a request is counted on its route before an "
                      "endpoint, and so the TLS of its hop, is chosen (request_total has it per endpoint)")
CANNOT_APPLY = {
    "Q138": OUTBOUND_ROUTE_TLS,
    "Q142": OUTBOUND_ROUTE_TLS,
    **{f"Q{n}": GATEWAY_API for n in range(230, 240)},
    **{f"Q{n}": NAMED_SERVER for n in range(216, 224)},
    "Q242": ("request_handle_us (time the proxy spends on a request, in us) is not exported: it would need a "
             "clock reading per request per hop on the data path; response_latency_ms covers latency"),
}

#: Enough queries must return data (the issue's target).
TARGET = 220

_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


def _matchers(body):
    found, pos = [], 0
    body = body.strip()
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        if m is None:
            raise ValueError(f"cannot parse label matchers {body!r}")
        found.append(m.groups())
        pos = m.end()
        if pos < len(body):
            if body[pos] != ",":
                raise ValueError(f"cannot parse label matchers {body!r}")
            pos += 1
    return found


def _keep(name, value):
    return name not in K8S_LABELS and "$" not in value


def _rewrite_selector(match):
    kept = [f'{n}{op}"{v}"' for n, op, v in _matchers(match.group(1)) if _keep(n, v)]
    return "{" + ", ".join(kept) + "}" if kept else ""


def adapt(expr):
    """
    Linkerd's query C{expr} as evaluated here (see the module docstring).
    """
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$interval", RATE_INTERVAL)
    lv = _LABEL_VALUES.match(expr)
    if lv is not None:
        inner, label = lv.group(1).strip(), lv.group(2)
        if label not in K8S_LABELS:
            if "{" in inner:
                inner = inner.replace("{", "{" + f'{label}!="", ', 1)
            else:
                inner += "{" + f'{label}!=""' + "}"
        expr = f"group by ({label}) ({inner})"
    return _SELECTOR.sub(_rewrite_selector, expr)


def _app(conn):
    """
    The workload: keep-alive HTTP/1.1, 500 for paths with "fail" in them, 200 otherwise; echo for anything
    that does not start like an HTTP request.
    """
    buf = conn.recv(65536)
    if buf[:4] not in (b"GET ", b"POST", b"HEAD", b"PUT "):
        while buf:
            conn.sendall(buf)
            buf = conn.recv(65536)
        return
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        status = b"500 Internal Server Error" if b"fail" in path else b"200 OK"
        body = b"hello " + path
        conn.sendall(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))


def _reset(sock):
    # Close with RST: the proxy's read meets ECONNRESET.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Prometheus:
    """
    Debian's prometheus on a free loopback port, scraping C{targets} every second as job C{linkerd-proxy}.
    """

    def __init__(self, testcase, binary, targets):
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
        self.port = free_port()
        config = os.path.join(directory, "prometheus.yml")
        with open(config, "w") as f:
            yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                            "scrape_configs": [{"job_name": "linkerd-proxy", "scrape_interval": "1s",
                                                "static_configs": [{"targets": list(targets)}]}]}, f)
        self._log = open(os.path.join(directory, "prometheus.log"), "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(directory, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self._log, stderr=subprocess.STDOUT)
        testcase.addCleanup(self.stop)

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}")
            try:
                return http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(ready, 20, what="prometheus ready")

    def query(self, expr):
        """
        @return: the C{data} of C{/api/v1/query}.
        """
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        if answer.get("status") != "success":
            raise AssertionError(f"{expr}: {answer}")
        return answer["data"]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def _returns_data(data):
    if data["resultType"] in ("vector", "matrix"):
        return len(data["result"]) > 0
    return True


class LinkerdQueriesTests(TestCase):
    """
    Linkerd's dashboards and CLI queries against linkproxy's metrics.
    """

    timeout = 120

    def setUp(self):
        if not os.path.exists(QUERIES):
            raise SkipTest(f"Linkerd's queries are not at {os.path.normpath(QUERIES)} (../shared/ from the repo)")
        self.binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists(
            "/usr/bin/prometheus") else None)
        if self.binary is None:
            raise SkipTest("prometheus is not installed (Debian package prometheus)")
        with open(QUERIES) as f:
            self.queries = json.load(f)["queries"]

    def _mesh(self):
        domain = trust_domain(self)
        app = TcpServer(self, _app)
        b_inbound = free_port()
        app_addr = f"127.0.0.1:{app.port}"
        web_labels = {"deployment": "web", "namespace": "default", "service": "web", "pod": "web-0",
                      "serviceaccount": "web"}
        meshed = {"addr": app_addr, "identity": WEB, "proxy": f"127.0.0.1:{b_inbound}", "labels": web_labels}
        east = {"deployment": "web", "namespace": "default", "service": "web-east", "target_cluster": "east",
                "target_service": "web", "target_namespace": "default"}
        routes = {"routes": [{"name": "api-read", "match": {"method": "GET", "path_regex": "^/api/"}}]}
        endpoints = os.path.abspath(self.mktemp() + ".yaml")
        with open(endpoints, "w") as f:
            yaml.safe_dump({
                "services": {
                    "web.default.svc.cluster.local:80": [meshed],
                    "web.default.svc.cluster.local:9000": [meshed],
                    # Services mirrored from other clusters: one through a meshed gateway, one plain.
                    "web-east.default.svc.cluster.local:80": [dict(meshed, labels=dict(east, pod="web-east-0"))],
                    "web-west.default.svc.cluster.local:80": [
                        {"addr": app_addr, "labels": dict(east, pod="web-west-0", target_cluster="west")}],
                },
                "profiles": {"web.default.svc.cluster.local:80": routes,
                             "web-east.default.svc.cluster.local:80": routes,
                             "web-west.default.svc.cluster.local:80": routes},
            }, f)
        b = Proxy(self, {"app": f"tcp:host=127.0.0.1:port={app.port}", "identity_dir": domain,
                         "identity_name": WEB, "discovery": f"file:{endpoints}",
                         "inbound": f"tcp:{b_inbound}:interface=127.0.0.1"})
        b.ports["inbound"] = b_inbound
        tcp_route = free_port()
        a = Proxy(self, {"identity_dir": domain, "identity_name": CLIENT, "discovery": f"file:{endpoints}",
                         "tcp_routes": f"tcp:{tcp_route}:interface=127.0.0.1->web.default.svc.cluster.local:9000"})
        return a, b, tcp_route

    def _traffic(self, a, b, tcp_route):
        def requests(port, host, paths):
            for path in paths:
                status, _, _ = http_get(f"http://127.0.0.1:{port}{path}", headers={"Host": host}, timeout=10)
                self.assertIn(status, (200, 500))

        paths = ["/"] * 10 + ["/api/items"] * 10 + ["/fail"] * 3
        threads = [threading.Thread(target=requests, args=args) for args in [
            (a.ports["outbound"], "web.default.svc.cluster.local", paths),
            (a.ports["outbound"], "web-east.default.svc.cluster.local", paths),
            (a.ports["outbound"], "web-west.default.svc.cluster.local", paths),
            # Plaintext straight to B's inbound: tls="no_identity" there.
            (b.ports["inbound"], "web.default.svc.cluster.local", paths)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Opaque TCP through both proxies, closed cleanly; one more left open while Prometheus scrapes.
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", tcp_route), timeout=5) as s:
                s.sendall(b"ping\n")
                self.assertEqual(s.recv(5), b"ping\n")
        held = socket.create_connection(("127.0.0.1", tcp_route), timeout=5)
        self.addCleanup(held.close)
        held.sendall(b"ping\n")
        held.recv(5)
        # Connections reset by the client, outbound (opaque) and inbound (opaque and HTTP): errno on close.
        for port, first in ((tcp_route, b"ping\n"), (b.ports["inbound"], b"\x00ping\n"),
                            (b.ports["inbound"], b"GET / HTTP/1.1\r\nHost: web\r\n")):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(first)
            if first.endswith(b"\n") and not first.startswith(b"GET"):
                s.recv(16)
            else:
                time.sleep(0.2)
            _reset(s)

    def test_linkerd_queries(self):
        """
        At least TARGET of Linkerd's 242 queries return data; the others are exactly the ones CANNOT_APPLY
        lists. Every query is printed with its outcome.
        """
        a, b, tcp_route = self._mesh()
        prometheus = Prometheus(self, self.binary, [f"127.0.0.1:{a.ports['admin']}",
                                                    f"127.0.0.1:{b.ports['admin']}"])
        self._traffic(a, b, tcp_route)
        # Pooled connections close after 3 s idle; then a few scrapes of the final state.
        time.sleep(4)
        wait_for(lambda: len(prometheus.query('up{job="linkerd-proxy"} == 1')["result"]) == 2, 10,
                 what="both proxies scraped")
        time.sleep(3)

        lines, empty = [], []
        for q in self.queries:
            expr = adapt(q["expr"])
            data = prometheus.query(expr)
            ok = _returns_data(data)
            if not ok:
                empty.append(q["id"])
            lines.append(f"{q['id']} {'data ' if ok else 'EMPTY'} {q['source']} ({q['where']})\n"
                         f"    linkerd: {q['expr']}\n    ran:     {expr}"
                         + ("" if ok else f"\n    reason:  {CANNOT_APPLY.get(q['id'], 'UNEXPECTED')}"))
        returned = len(self.queries) - len(empty)
        report = "\n".join(lines) + f"\n{returned} of {len(self.queries)} queries return data; empty: {empty}\n"
        with open(os.path.abspath("linkerd-queries-report.txt"), "w") as f:
            f.write(report)
        print(report)
        unexpected = [i for i in empty if i not in CANNOT_APPLY]
        self.assertEqual(unexpected, [], f"queries without data and without a reason:\n{report}")
        self.assertGreaterEqual(returned, TARGET)

    def test_adapt(self):
        """
        Kubernetes-relabel and templated matchers go; the rest stays; label_values becomes a group by.
        """
        self.assertEqual(
            adapt('sum(irate(request_total{namespace="$namespace", deployment!="", dst_deployment!="", '
                  'dst_deployment="$deployment", direction="outbound"}[$__rate_interval])) by (namespace)'),
            'sum(irate(request_total{dst_deployment!="", direction="outbound"}[1m])) by (namespace)')
        self.assertEqual(adapt('tcp_open_connections{namespace="$namespace"}'), "tcp_open_connections")
        self.assertEqual(adapt("label_values(request_total, dst_target_cluster)"),
                         'group by (dst_target_cluster) (request_total{dst_target_cluster!=""})')
        self.assertEqual(adapt('label_values(process_start_time_seconds{deployment!=""}, namespace)'),
                         "group by (namespace) (process_start_time_seconds)")
        self.assertEqual(adapt('x{dst=~"(web.default.svc.cluster.local)(:\\\\d+)?", job="linkerd-proxy"}'),
                         'x{dst=~"(web.default.svc.cluster.local)(:\\\\d+)?", job="linkerd-proxy"}')
