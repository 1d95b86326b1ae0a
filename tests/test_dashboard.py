"""
Tests for L{linkproxy.admin.dashboard}: the quantile interpolation, C{/dashboard/state.json} against the
registry C{/metrics} renders, the balancers and identity it reports, and the packaged assets, all over the
real admin resource tree with StubTreq.
"""

import json
import math
import os
import re
import shutil
import subprocess
import time
from importlib.resources import files
from random import Random

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from linkproxy.admin.app import AdminApp
from linkproxy.admin.dashboard import (
    ASSET_TYPES, CONTENT_SECURITY_POLICY, Dashboard, histogram_quantile, identity_state,
)
from linkproxy.admin.loglevel import LogLevelControl
from linkproxy.admin.metrics import LATENCY_BUCKETS_MS, Metrics
from linkproxy.balancers import find_balancer
from linkproxy.identity import ca
from linkproxy.identity.store import IdentityStore
from linkproxy.routing import BalancedRouter
from linkproxy.testing import FakeDiscovery

BASE = "http://127.0.0.1:4191"
INF = math.inf
STATIC = files("linkproxy.admin").joinpath("static")
WEB = "web.default.serviceaccount.identity.linkproxy.local"


def _admin(metrics, clock, dashboard=None):
    return AdminApp(metrics=metrics, readiness=list, config_dump=dict, log_level=LogLevelControl("info"),
                    shutdown=lambda: None, reactor=clock, dashboard=dashboard)


class HistogramQuantileTests(SynchronousTestCase):
    """
    L{histogram_quantile} gives what Prometheus' C{histogram_quantile} gives for the same buckets.
    """

    def test_interpolatesWithinBucket(self):
        """
        The quantile is interpolated linearly between the bounds of the bucket its rank falls in; the first
        bucket starts at 0.
        """
        buckets = [(1, 0), (2, 10), (4, 20), (INF, 20)]
        self.assertEqual(histogram_quantile(0.5, buckets), 2.0)
        self.assertEqual(histogram_quantile(0.25, buckets), 1.5)
        self.assertEqual(histogram_quantile(0.75, buckets), 3.0)
        self.assertEqual(histogram_quantile(0.5, [(10, 4), (INF, 4)]), 5.0)

    def test_orderDoesNotMatter(self):
        """
        Buckets may come in any order (as summed from a dict); they are sorted by bound.
        """
        self.assertEqual(histogram_quantile(0.5, [(INF, 20), (4, 20), (1, 0), (2, 10)]), 2.0)

    def test_infBucket(self):
        """
        A rank in the C{+Inf} bucket reports the largest finite bound, as Prometheus does.
        """
        self.assertEqual(histogram_quantile(0.99, [(1, 0), (5, 50), (INF, 100)]), 5.0)
        self.assertEqual(histogram_quantile(0.5, [(1, 0), (INF, 3)]), 1.0)

    def test_nothingToTell(self):
        """
        No observations, fewer than two buckets, or no C{+Inf} bucket: C{None} (Prometheus' NaN).
        """
        self.assertIsNone(histogram_quantile(0.5, [(1, 0), (INF, 0)]))
        self.assertIsNone(histogram_quantile(0.5, [(INF, 5)]))
        self.assertIsNone(histogram_quantile(0.5, []))
        self.assertIsNone(histogram_quantile(0.5, [(1, 2), (2, 5)]))
        self.assertIsNone(histogram_quantile(math.nan, [(1, 2), (INF, 5)]))

    def test_outOfRange(self):
        """
        C{q} below 0 or above 1 gives minus or plus infinity, as in Prometheus.
        """
        self.assertEqual(histogram_quantile(-0.1, [(1, 2), (INF, 5)]), -INF)
        self.assertEqual(histogram_quantile(1.1, [(1, 2), (INF, 5)]), INF)

    def test_nonMonotonicLevelled(self):
        """
        Cumulative counts that go down (buckets read at different moments) are levelled up first.
        """
        self.assertEqual(histogram_quantile(0.5, [(1, 10), (2, 4), (4, 20), (INF, 20)]),
                         histogram_quantile(0.5, [(1, 10), (2, 10), (4, 20), (INF, 20)]))

    def test_nonPositiveFirstBound(self):
        """
        When the rank falls in a first bucket whose bound is not positive, that bound is the answer.
        """
        self.assertEqual(histogram_quantile(0.5, [(0, 5), (1, 6), (INF, 6)]), 0.0)

    @given(st.lists(st.floats(min_value=0, max_value=60000, allow_nan=False), min_size=1, max_size=200),
           st.floats(min_value=0.001, max_value=1))
    def test_boundedAndMonotonic(self, observations, q):
        """
        For any observations and C{q > 0}, the quantile lies within the bounds of the bucket that holds the
        true (nearest-rank) quantile, and never decreases with C{q}. (At C{q = 0} Prometheus answers the
        first bucket's lower bound, 0, and so does this.)
        """
        metrics = Metrics(process=False)
        child = metrics.response_latency_ms.labels("outbound", "a:80", "", "false", "", "", "200")
        for value in observations:
            child.observe(value)
        buckets = list(_summed_buckets(metrics, "outbound", "a:80").items())
        value = histogram_quantile(q, buckets)
        finite = list(LATENCY_BUCKETS_MS)
        self.assertTrue(0 <= value <= finite[-1], value)
        self.assertLessEqual(histogram_quantile(q / 2, buckets), value)
        # The true q-quantile (nearest rank) is in the same bucket, or at its bounds.
        ordered = sorted(observations)
        rank = max(0, math.ceil(q * len(ordered)) - 1)
        true = ordered[rank]
        if true <= finite[-1]:
            upper = next(b for b in finite if b >= true)
            lower = max((b for b in finite if b < upper), default=0.0)
            self.assertTrue(lower <= value <= upper, (q, true, value, lower, upper))


def _summed_buckets(metrics, direction, authority):
    """
    C{{le: cumulative count}} of C{response_latency_ms} summed over every other label, from the C{/metrics}
    text.
    """
    from prometheus_client import generate_latest

    buckets = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if (s.name == "response_latency_ms_bucket" and s.labels["direction"] == direction
                    and s.labels["authority"] == authority):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


class JavaScriptQuantileTests(SynchronousTestCase):
    """
    The page's C{quantile.js} computes the same quantiles as the server, for its latency chart.
    """

    def test_sameAsPython(self):
        """
        Under node, C{histogramQuantile} agrees with L{histogram_quantile} on a spread of histograms.
        """
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise SkipTest("needs node (.ci/run installs it)")
        bounds = [float(b) for b in LATENCY_BUCKETS_MS] + [INF]
        rng = Random(7)
        cases = [[0.0] * len(bounds), [0.0] * (len(bounds) - 1) + [5.0]]
        for _ in range(40):
            counts, total = [], 0.0
            for _ in bounds:
                total += rng.choice([0, 0, 1, 3, 10])
                counts.append(total)
            cases.append(counts)
        quantiles = [0.0, 0.5, 0.9, 0.95, 0.99, 1.0]
        script = (
            "const q = require(process.argv[1]);"
            "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
            "const bounds = q.parseBounds(cases.bounds);"
            "console.log(JSON.stringify(cases.counts.map(c => cases.qs.map(x => q.histogramQuantile(x, bounds, c)))));"
        )
        payload = json.dumps({"bounds": [b if b != INF else "+Inf" for b in bounds], "counts": cases,
                              "qs": quantiles})
        out = subprocess.run([node, "-e", script, str(STATIC.joinpath("quantile.js"))], input=payload.encode(),
                             capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr.decode())
        got = json.loads(out.stdout)
        for counts, row in zip(cases, got):
            for q, value in zip(quantiles, row):
                expected = histogram_quantile(q, zip(bounds, counts))
                if expected is None:
                    self.assertIsNone(value, (q, counts))
                else:
                    self.assertAlmostEqual(value, expected, places=9, msg=(q, counts))


class StateTests(SynchronousTestCase):
    """
    C{GET /dashboard/state.json}, through the admin app.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000.5)
        self.metrics = Metrics(process=False)

    def get(self, path, admin=None):
        admin = admin or _admin(self.metrics, self.clock)
        treq = StubTreq(admin.app.resource())
        response = self.successResultOf(treq.get(BASE + path))
        return response, self.successResultOf(response.content())

    def state(self, admin=None):
        response, body = self.get("/dashboard/state.json", admin)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return json.loads(body)

    def traffic(self):
        """
        Traffic for two authorities, one of them over several label sets (target, TLS, client) and statuses.
        """
        web = [self.metrics.http_route("outbound", "web:80", "10.0.0.1:80"),
               self.metrics.http_route("outbound", "web:80", "10.0.0.2:80", tls="true", server_id="web.id"),
               self.metrics.http_route("outbound", "web:80", "10.0.0.3:80", tls="no_identity")]
        rng = Random(3)
        for i in range(500):
            route = web[i % 3]
            route.requests.inc()
            status = 503 if i % 50 == 0 else 200
            route.response(status, "", rng.expovariate(1 / 12.0))
        grpc = self.metrics.http_route("inbound", "api:9000", "127.0.0.1:9000", tls="true", client_id="c.id")
        for i in range(40):
            grpc.requests.inc()
            grpc.response(200, "14" if i % 4 == 0 else "0", 2.5 + i)
        # A request still waiting for its response counts in request_total only.
        grpc.requests.inc()

    def expected(self, direction, authority):
        """
        What the metrics text says for one (direction, authority), summed by hand.
        """
        from prometheus_client import generate_latest

        requests = successes = failures = count = total = 0.0
        for family in text_string_to_metric_families(generate_latest(self.metrics.registry).decode()):
            for s in family.samples:
                if s.labels.get("direction") != direction or s.labels.get("authority") != authority:
                    continue
                if s.name == "request_total":
                    requests += s.value
                elif s.name == "response_total":
                    if s.labels["classification"] == "success":
                        successes += s.value
                    else:
                        failures += s.value
                elif s.name == "response_latency_ms_count":
                    count += s.value
                elif s.name == "response_latency_ms_sum":
                    total += s.value
        buckets = _summed_buckets(self.metrics, direction, authority)
        return {"requests": requests, "successes": successes, "failures": failures, "count": count,
                "sum": total, "buckets": buckets}

    def test_shape(self):
        """
        With no traffic, no routers and no identity the state has its top-level keys, the histogram's bounds
        and empty lists.
        """
        state = self.state()
        self.assertEqual(state["version"], 1)
        self.assertEqual(state["time"], 1_700_000_000.5)
        self.assertEqual(state["poll_interval_s"], 1.0)
        self.assertEqual(state["latency_buckets_ms"], [float(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"])
        self.assertEqual((state["traffic"], state["balancers"], state["identity"]), ([], [], None))

    def test_trafficMatchesMetrics(self):
        """
        Per (direction, authority), the counts, success rate and latency quantiles are the C{/metrics}
        samples summed over every other label, with quantiles interpolated as C{histogram_quantile} does.
        """
        self.traffic()
        state = self.state()
        self.assertEqual([(r["direction"], r["authority"]) for r in state["traffic"]],
                         [("inbound", "api:9000"), ("outbound", "web:80")])
        for row in state["traffic"]:
            want = self.expected(row["direction"], row["authority"])
            self.assertEqual(row["requests"], want["requests"])
            self.assertEqual((row["successes"], row["failures"]), (want["successes"], want["failures"]))
            self.assertEqual(row["responses"], want["successes"] + want["failures"])
            self.assertEqual(row["success_rate"], want["successes"] / (want["successes"] + want["failures"]))
            self.assertEqual(row["latency_ms"]["count"], want["count"])
            self.assertAlmostEqual(row["latency_ms"]["sum"], want["sum"])
            for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                self.assertEqual(row["latency_ms"][key], histogram_quantile(q, want["buckets"].items()))
            self.assertEqual(row["buckets"], [want["buckets"][le] for le in sorted(want["buckets"])])
            self.assertEqual(len(row["buckets"]), len(state["latency_buckets_ms"]))
        web = state["traffic"][1]
        self.assertEqual((web["requests"], web["failures"], web["success_rate"]), (500, 10, 0.98))
        api = state["traffic"][0]
        # gRPC UNAVAILABLE (14) is a failure although the HTTP status is 200; one request is still open.
        self.assertEqual((api["requests"], api["responses"], api["failures"]), (41, 40, 10))
        self.assertEqual(api["latency_ms"]["p50"], histogram_quantile(0.5, [(20, 18), (30, 28), (40, 38),
                                                                           (50, 40), (INF, 40)]))

    def test_noResponsesYet(self):
        """
        An authority with requests but no response yet has no success rate and no quantiles (C{null}).
        """
        self.metrics.http_route("outbound", "slow:80", "10.0.0.9:80").requests.inc()
        [row] = self.state()["traffic"]
        self.assertEqual((row["requests"], row["responses"], row["success_rate"]), (1, 0, None))
        self.assertEqual(row["latency_ms"], {"count": 0, "sum": 0, "p50": None, "p95": None, "p99": None})

    def test_balancers(self):
        """
        Each router's targets are listed with every endpoint's state and cost from the balancer snapshot; an
        endpoint that failed 7 times in a row is ejected, then probing once its ejection has run out.
        """
        discovery = FakeDiscovery()
        router = BalancedRouter(discovery, find_balancer("p2c-ewma"), self.clock, self.metrics,
                                random=Random(1))
        self.addCleanup(router.close)
        a, b = ("127.0.0.1", 8081), ("127.0.0.1", 8082)
        discovery.push("web:80", [a, b])
        lease = router.route_now("web:80")
        self.clock.advance(0.02)
        lease.release(True)
        admin = _admin(self.metrics, self.clock, Dashboard(self.metrics, routers=[router], reactor=self.clock))
        [balancer] = self.state(admin)["balancers"]
        self.assertEqual((balancer["direction"], balancer["target"]), ("outbound", "web:80"))
        snapshot = {e.addr_str: (state, cost) for e, state, cost in router.snapshot()[0][1]}
        self.assertEqual({e["endpoint"]: (e["state"], e["cost"]) for e in balancer["endpoints"]}, snapshot)
        self.assertEqual({e["weight"] for e in balancer["endpoints"]}, {1.0})
        self.assertEqual({e["identity"] for e in balancer["endpoints"]}, {None})

        bal = router.balancer("web:80")
        victim = [e for e, _, _ in bal.snapshot(self.clock.seconds()) if e.address == b][0]
        for _ in range(7):
            bal.start(victim, self.clock.seconds())
            bal.finish(victim, self.clock.seconds(), None, False)
        states = {e["endpoint"]: e["state"] for e in self.state(admin)["balancers"][0]["endpoints"]}
        self.assertEqual(states, {"127.0.0.1:8081": "ready", "127.0.0.1:8082": "ejected"})
        self.clock.advance(30)
        states = {e["endpoint"]: e["state"] for e in self.state(admin)["balancers"][0]["endpoints"]}
        self.assertEqual(states["127.0.0.1:8082"], "probing")

    def test_identity(self):
        """
        With an identity store, the state names the identity and its certificate's notAfter, and how long
        until then by the reactor's clock.
        """
        directory = self.mktemp()
        ca.init_trust_domain(directory)
        clock = Clock()
        clock.advance(time.time())
        store = IdentityStore(directory, WEB, reactor=clock, metrics=self.metrics)
        self.addCleanup(store.stop)
        dashboard = Dashboard(self.metrics, identity=store, reactor=clock)
        admin = _admin(self.metrics, clock, dashboard)
        before = self.state(admin)["identity"]
        self.assertEqual((before["name"], before["ready"], before["not_after"]), (WEB, False, None))
        self.assertIn("not loaded yet", before["problem"])

        store.start()
        clock.advance(60)
        identity = self.state(admin)["identity"]
        not_after = store.current.not_after
        self.assertEqual(identity["name"], WEB)
        self.assertTrue(identity["ready"])
        self.assertIsNone(identity["problem"])
        self.assertEqual(identity["not_after"], not_after)
        self.assertAlmostEqual(identity["expires_in_s"], not_after - clock.seconds())
        self.assertTrue(identity["not_after_iso"].endswith("Z"))
        self.assertTrue(identity["self_issued"])
        self.assertEqual(identity["generation"], store.current.generation)
        self.assertEqual(self.metrics.registry.get_sample_value("identity_cert_expiration_timestamp_seconds"),
                         not_after)

    def test_identityOff(self):
        """
        Without an identity store the identity is C{null}.
        """
        self.assertIsNone(identity_state(None, 0))

    def test_localClientsOnly(self):
        """
        Like every admin route but the probes and the scrape, the page, its assets and its state answer
        only clients on this host: another address gets 403.
        """
        from twisted.internet.address import IPv4Address

        from tests.test_admin import _FromClient

        resource = _FromClient(_admin(self.metrics, self.clock).app.resource(), IPv4Address("TCP", "10.1.2.3", 5))
        treq = StubTreq(resource)
        for path in ("/dashboard", "/dashboard/state.json", "/dashboard/assets/dashboard.js"):
            response = self.successResultOf(treq.get(BASE + path))
            self.assertEqual(response.code, 403, path)
            self.assertNotIn(b"traffic", self.successResultOf(response.content()))

    def test_postNotAllowed(self):
        """
        The dashboard only answers C{GET} (and C{HEAD}).
        """
        treq = StubTreq(_admin(self.metrics, self.clock).app.resource())
        response = self.successResultOf(treq.post(BASE + "/dashboard/state.json", data=b""))
        self.assertEqual(response.code, 405)


class AssetTests(SynchronousTestCase):
    """
    The page and its assets: packaged, served with the right types, and self-contained.
    """

    def setUp(self):
        self.treq = StubTreq(_admin(Metrics(process=False), Clock()).app.resource())

    def get(self, path):
        response = self.successResultOf(self.treq.get(BASE + path))
        return response, self.successResultOf(response.content())

    def assets(self):
        return {entry.name: entry.read_bytes() for entry in STATIC.iterdir()}

    def test_page(self):
        """
        C{GET /dashboard} is the HTML page, with a content security policy that allows this origin only.
        """
        response, body = self.get("/dashboard")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders("content-security-policy"), [CONTENT_SECURITY_POLICY])
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(body, self.assets()["index.html"])
        self.assertIn("default-src 'none'", CONTENT_SECURITY_POLICY)

    def test_assetTypes(self):
        """
        Every packaged asset is served under C{/dashboard/assets/} with the content type of its suffix.
        """
        assets = self.assets()
        self.assertEqual(sorted(assets), ["dashboard.css", "dashboard.js", "index.html", "quantile.js"])
        for name, content in assets.items():
            response, body = self.get("/dashboard/assets/" + name)
            self.assertEqual(response.code, 200, name)
            suffix = os.path.splitext(name)[1]
            self.assertEqual(response.headers.getRawHeaders("content-type"), [ASSET_TYPES[suffix]], name)
            self.assertEqual(body, content)
        self.assertEqual(ASSET_TYPES[".js"], "text/javascript; charset=utf-8")
        self.assertEqual(ASSET_TYPES[".css"], "text/css; charset=utf-8")

    def test_notFound(self):
        """
        Unknown names, paths that try to leave the directory and deeper paths are 404s.
        """
        for path in ("/dashboard/assets/nope.js", "/dashboard/assets/..%2Fapp.py", "/dashboard/assets/../app.py",
                     "/dashboard/nope", "/dashboard/assets/x/dashboard.js", "/dashboard/assets"):
            response, body = self.get(path)
            self.assertEqual(response.code, 404, path)

    def test_pageReferencesExist(self):
        """
        Everything the page links to is a packaged asset, named by a path on this server.
        """
        html = self.assets()["index.html"].decode()
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        self.assertTrue(refs)
        for ref in refs:
            if ref.startswith("data:"):
                continue
            self.assertTrue(ref.startswith("/dashboard/assets/"), ref)
            self.assertEqual(self.get(ref)[0].code, 200, ref)

    def test_noAbsoluteUrls(self):
        """
        No asset names anything outside the admin server: no C{http://}, C{https://}, C{ws://} or
        protocol-relative C{//host} URL, no C{@import} and no web font.
        """
        for name, content in self.assets().items():
            text = content.decode("utf-8")
            self.assertIsNone(re.search(r"(?i)\b(?:https?|wss?|ftp)://", text), name)
            self.assertIsNone(re.search(r"""(?i)(?:src|href|url)\s*[=(]\s*["']?//""", text), name)
            self.assertNotIn("@import", text, name)
            self.assertNotIn("@font-face", text, name)

    def test_packaged(self):
        """
        Every file in C{static/} is a served type at the top level of the directory, which is what the
        C{linkproxy.admin = static/*} package data in setup.cfg puts in the wheel.
        """
        for entry in STATIC.iterdir():
            self.assertTrue(entry.is_file(), entry.name)
            self.assertIn(os.path.splitext(entry.name)[1], ASSET_TYPES, entry.name)
        setup_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg")
        with open(setup_cfg) as f:
            self.assertIn("linkproxy.admin = static/*", f.read())
