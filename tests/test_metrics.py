"""
Tests for L{linkproxy.admin.metrics}: the data-path families render exactly what prometheus_client would.
"""

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.admin.metrics import LATENCY_BUCKETS_MS, CounterFamily, HistogramFamily, Metrics

# The labels of a route without TLS, as Linkerd names them (with TLS, server_id or client_id replaces
# no_tls_reason): one label set for every route below, so that prometheus_client can render the reference.
_LABELS = ("direction", "authority", "target_addr", "tls", "no_tls_reason")
_RESPONSE_LABELS = _LABELS + ("classification", "status_code", "grpc_status")


def _reference():
    """
    The three HTTP families as prometheus_client metrics, declared as linkproxy declared them before.
    """
    disable_created_metrics()
    r = CollectorRegistry(auto_describe=False)
    request = Counter("request", "Requests the proxy received", _LABELS, registry=r)
    response = Counter("response", "Responses, classified", _RESPONSE_LABELS, registry=r)
    latency = Histogram("response_latency_ms", "Time from request to the response's first byte, in ms",
                        _LABELS + ("status_code",), buckets=LATENCY_BUCKETS_MS, registry=r)
    return r, request, response, latency


# Latencies on, around and between bucket bounds, past the last bound, zero and negative.
_LATENCIES = [0.0, 0.25, 1, 1.0000001, 2.5, 5, 5.5, 49.999, 50, 50.5, 999, 1000, 50000, 50000.5, 1e9, -3.0]


class HttpFamiliesTests(SynchronousTestCase):
    """
    C{request_total}, C{response_total} and C{response_latency_ms} through L{Metrics.http_route}.
    """

    def _drive(self, route, request, response, latency):
        """
        The same sequence of updates on linkproxy's bundles and on the reference metrics.
        """
        routes = [
            ("outbound", "web:80", "10.0.0.1:80", "no_identity", "not_provided_by_service_discovery"),
            ("inbound", "web:80", "127.0.0.1:8080", "no_identity", "not_provided_by_remote"),
            ("outbound", "api:8080", "", "no_identity", "disabled"),
        ]
        statuses = [(200, ""), (503, ""), (200, "0"), (200, "14"), (404, ""), (200, "")]
        for i, labels in enumerate(routes):
            bundle = route(*labels[:4], no_tls_reason=labels[4])
            for j, amount in enumerate(_LATENCIES[i:] + _LATENCIES[:i]):
                status, grpc = statuses[(i + j) % len(statuses)]
                bundle.requests.inc()
                bundle.response(status, grpc, amount)
                request.labels(*labels).inc()
                classification = "failure" if status >= 500 or grpc in ("14",) else "success"
                response.labels(*labels, classification, str(status), grpc).inc()
                latency.labels(*labels, str(status)).observe(amount)

    def test_sameExposition(self):
        """
        The text exposition of the three families is byte for byte what prometheus_client renders for the same
        updates: order of families and children, labels, bucket bounds, cumulative counts, sums.
        """
        metrics = Metrics(process=False)
        ref, request, response, latency = _reference()
        self._drive(metrics.http_route, request, response, latency)
        ours = generate_latest(metrics.registry).decode()
        theirs = generate_latest(ref).decode()
        # Ours continues with the TCP and detection families; the HTTP ones come first, as before.
        self.assertTrue(ours.startswith(theirs), f"\n--- ours\n{ours[:3000]}\n--- reference\n{theirs[:3000]}")

    def test_emptyExposition(self):
        """
        With no requests yet, the families are still announced (HELP and TYPE lines), as prometheus_client does.
        """
        metrics = Metrics(process=False)
        ref = _reference()[0]
        self.assertTrue(generate_latest(metrics.registry).decode().startswith(generate_latest(ref).decode()))

    def test_getSampleValue(self):
        """
        The registry's own lookups see the families.
        """
        metrics = Metrics(process=False)
        bundle = metrics.http_route("outbound", "web:80", "10.0.0.1:80")
        bundle.requests.inc()
        bundle.response(200, "", 7.0)
        labels = dict(direction="outbound", authority="web:80", target_addr="10.0.0.1:80", tls="no_identity")
        get = metrics.registry.get_sample_value
        self.assertEqual(get("request_total", labels), 1.0)
        self.assertEqual(get("response_total", dict(labels, classification="success", status_code="200",
                                                    grpc_status="")), 1.0)
        self.assertEqual(get("response_latency_ms_bucket", dict(labels, status_code="200", le="5.0")), 0.0)
        self.assertEqual(get("response_latency_ms_bucket", dict(labels, status_code="200", le="10.0")), 1.0)
        self.assertEqual(get("response_latency_ms_count", dict(labels, status_code="200")), 1.0)
        self.assertEqual(get("response_latency_ms_sum", dict(labels, status_code="200")), 7.0)

    def test_duplicateNamesRefused(self):
        """
        The families claim their names on the registry, so a second metric of the same name is refused.
        """
        metrics = Metrics(process=False)
        with self.assertRaises(ValueError):
            Counter("request", "again", registry=metrics.registry)
        with self.assertRaises(ValueError):
            Histogram("response_latency_ms", "again", registry=metrics.registry)


class FamilyTests(SynchronousTestCase):
    """
    L{CounterFamily} and L{HistogramFamily} on their own.
    """

    def test_counterRejectsNegative(self):
        """
        Counters only go up, as with prometheus_client.
        """
        child = CounterFamily("c", "doc", ("a",)).labels("x")
        with self.assertRaises(ValueError):
            child.inc(-1)
        child.inc(2.5)
        self.assertEqual(child.value, 2.5)

    def test_labelCount(self):
        """
        The number of label values must match the label names.
        """
        family = CounterFamily("c", "doc", ("a", "b"))
        self.assertRaises(ValueError, family.labels, "x")
        self.assertIs(family.labels("x", 1), family.labels("x", "1"))

    def test_histogramNaN(self):
        """
        A NaN goes to the sum and to no bucket, as with prometheus_client.
        """
        child = HistogramFamily("h", "doc", (), buckets=(1, 2)).labels()
        child.observe(float("nan"))
        self.assertEqual(child.counts, [0.0, 0.0, 0.0])
        self.assertTrue(math.isnan(child.sum))

    def test_histogramBuckets(self):
        """
        The implicit C{+Inf} bucket is added, and bounds must be sorted.
        """
        family = HistogramFamily("h", "doc", (), buckets=(1, 2))
        self.assertEqual(family.bounds, (1.0, 2.0, math.inf))
        child = family.labels()
        for amount in (0.5, 1, 1.5, 2, 3):
            child.observe(amount)
        self.assertEqual(child.counts, [2.0, 2.0, 1.0])
        self.assertRaises(ValueError, HistogramFamily, "h", "doc", (), buckets=(2, 1))
