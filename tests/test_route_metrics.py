"""
Tests for the profile route metrics of L{linkproxy.admin.metrics}: names and labels as scraped, as
Linkerd's ServiceProfile metrics and its dashboards' queries have them.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.admin.metrics import LATENCY_BUCKETS_MS, MAX_ROUTE_SERIES, ROUTE_LABELS, Metrics


def scrape(metrics):
    return generate_latest(metrics.registry).decode()


def sample(name, value, *label_sets, **labels):
    """
    One exposition line as prometheus_client writes it: labels sorted by name, the value as a float.
    """
    merged = {}
    for label_set in label_sets:
        merged.update(label_set)
    merged.update(labels)
    body = ",".join(f'{k}="{v}"' for k, v in sorted(merged.items()))
    return f"{name}{{{body}}} {float(value)}"


class RouteMetricsTests(SynchronousTestCase):
    """
    L{Metrics.route} and its L{RouteMetrics} bundles.
    """

    def setUp(self):
        self.metrics = Metrics(process=False)

    def test_scrape(self):
        """
        Each count lands in its family with C{direction, authority, dst, rt_route, tls}, responses also with
        C{classification, status_code}.
        """
        route = self.metrics.route("outbound", "web.test:80", "api-read", tls="true")
        route.requests.inc()
        route.actual_requests.inc()
        route.actual_response(503, "", 12.0)
        route.retries.inc()
        route.actual_requests.inc()
        route.actual_response(200, "", 3.0)
        route.response(200, "", 16.0)
        route.budget_exhausted.inc()
        grpc = self.metrics.route("outbound", "web.test:80", "default")
        grpc.requests.inc()
        grpc.response(200, "14", 2.0)
        text = scrape(self.metrics)
        api = dict(direction="outbound", authority="web.test:80", dst="web.test:80", rt_route="api-read",
                   tls="true")
        default = dict(direction="outbound", authority="web.test:80", dst="web.test:80", rt_route="default")
        ok, failed = dict(classification="success", status_code="200"), dict(classification="failure")
        for line in [
            "# TYPE route_request_total counter",
            sample("route_request_total", 1, api),
            sample("route_response_total", 1, api, ok),
            "# TYPE route_response_latency_ms histogram",
            sample("route_response_latency_ms_bucket", 0, api, status_code="200", le="10.0"),
            sample("route_response_latency_ms_bucket", 1, api, status_code="200", le="20.0"),
            sample("route_response_latency_ms_count", 1, api, status_code="200"),
            sample("route_response_latency_ms_sum", 16, api, status_code="200"),
            sample("route_actual_request_total", 2, api),
            sample("route_actual_response_total", 1, api, failed, status_code="503"),
            sample("route_actual_response_total", 1, api, ok),
            sample("route_actual_response_latency_ms_bucket", 1, api, status_code="503", le="20.0"),
            sample("route_retry_requests_total", 1, api),
            sample("route_retry_budget_exhausted_total", 1, api),
            sample("route_request_total", 1, default),
            # gRPC UNAVAILABLE under HTTP 200 is a failure, as on the golden metrics.
            sample("route_response_total", 1, default, failed, status_code="200"),
        ]:
            self.assertIn(line + "\n", text)

    def test_sameAsPrometheusClient(self):
        """
        The families render exactly what the equivalent prometheus_client metrics would.
        """
        disable_created_metrics()
        ref = CollectorRegistry(auto_describe=False)
        response_labels = ROUTE_LABELS + ("classification", "status_code")
        request = Counter("route_request", "Requests on each profile route", ROUTE_LABELS, registry=ref)
        response = Counter("route_response", "Responses on each profile route, after retries, classified",
                           response_labels, registry=ref)
        latency = Histogram("route_response_latency_ms", "Time from request to the response's first byte on "
                            "each profile route, retries included, in ms", ROUTE_LABELS + ("status_code",),
                            buckets=LATENCY_BUCKETS_MS, registry=ref)
        route = self.metrics.route("inbound", "web.test:80", "r", "no_identity")
        labels = ("inbound", "web.test:80", "web.test:80", "r", "no_identity")
        for code, grpc, ms in [(200, "", 0.5), (200, "", 7), (500, "", 70), (200, "2", 50000.5), (404, "", 1)]:
            route.requests.inc()
            request.labels(*labels).inc()
            route.response(code, grpc, ms)
            failure = code >= 500 or grpc == "2"
            response.labels(*labels, "failure" if failure else "success", str(code)).inc()
            latency.labels(*labels, str(code)).observe(ms)
        ours = scrape(self.metrics)
        theirs = generate_latest(ref).decode()
        start = ours.index("# HELP route_request_total")
        end = ours.index("# HELP route_actual_request_total")
        self.assertEqual(ours[start:end], theirs)

    def test_cached(self):
        """
        One bundle per label set.
        """
        self.assertIs(self.metrics.route("outbound", "a:80", "r"), self.metrics.route("outbound", "a:80", "r"))
        self.assertIsNot(self.metrics.route("outbound", "a:80", "r"),
                         self.metrics.route("outbound", "a:80", "r", tls="true"))

    def test_bounded(self):
        """
        Past the limit, new label sets share one C{overflow} series.
        """
        for i in range(MAX_ROUTE_SERIES):
            self.metrics.route("outbound", f"t{i}:80", "r")
        extra = self.metrics.route("outbound", "late:80", "r")
        self.assertIs(self.metrics.route("outbound", "later:80", "x"), extra)
        extra.requests.inc()
        self.assertEqual(self.metrics.registry.get_sample_value("route_request_total", {
            "direction": "outbound", "authority": "overflow", "dst": "overflow", "rt_route": "overflow"}), 1.0)
        self.assertEqual(len(self.metrics._routes), MAX_ROUTE_SERIES + 1)

    def test_linkerdQueries(self):
        """
        Every label Linkerd's route queries select or group by is on the route families, apart from those
        Prometheus adds from Kubernetes (namespace, deployment, pod): its route dashboard selects
        C{direction}, C{rt_route} and C{tls}, and C{linkerd viz routes} selects C{dst} and groups by
        C{rt_route, dst, classification}.
        """
        self.assertLessEqual({"direction", "rt_route", "tls", "dst"}, set(ROUTE_LABELS))
        self.assertIn("authority", ROUTE_LABELS)
