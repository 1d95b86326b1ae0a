"""
The metrics registry: Linkerd's proxy metric names on a private prometheus_client registry.

The data path never looks label children up per request. It asks this module once per connection (or per
route) for a small bundle of bound children, and calls C{inc}/C{observe} on those.

The per-request HTTP families (C{request_total}, C{response_total}, C{response_latency_ms}) are not
prometheus_client metrics but L{CounterFamily} and L{HistogramFamily}: prometheus_client takes a lock on every
C{inc} and searches the buckets in Python on every C{observe}, about 2 us per request per hop here. These keep
plain numbers (everything runs on the reactor thread) and render the very same samples at scrape time. So do
the route families of profiles (C{route_request_total} and friends, Linkerd's ServiceProfile names), bound per
(direction, target, route) by L{Metrics.route}.
"""

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import INF, floatToGoString

LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000,
    10000, 20000, 30000, 40000, 50000,
)

HTTP_LABELS = ("direction", "authority", "target_addr", "tls", "client_id", "server_id")
TCP_LABELS = ("direction", "peer", "tls", "target_addr")
# Route metrics carry both this proxy's "authority" (as its golden metrics do) and Linkerd's "dst" (what
# `linkerd viz routes` selects on), with the same value: the profile's target.
ROUTE_LABELS = ("direction", "authority", "dst", "rt_route", "tls")

# gRPC codes Linkerd classifies as failures.
GRPC_FAILURE_CODES = frozenset({"2", "4", "7", "13", "14", "15"})

# Bounds on label values that hostile or buggy peers choose; past these, values fold into "overflow".
MAX_SNI_VALUES = 100
MAX_HTTP_ROUTES = 1000
MAX_ROUTE_SERIES = 1000


def classify(status_code, grpc_status):
    """
    Linkerd's response classification: 5xx is a failure; so is a failing gRPC status.

    @param status_code: the HTTP status as an C{int}.
    @param grpc_status: the C{grpc-status} text, or C{""} for non-gRPC responses.
    @return: C{"success"} or C{"failure"}.
    """
    if status_code >= 500 or grpc_status in GRPC_FAILURE_CODES:
        return "failure"
    return "success"


class _CounterChild:
    """
    One labelled counter of a L{CounterFamily}.
    """

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount=1):
        """
        Add C{amount} (not negative), as C{prometheus_client.Counter.inc} does.
        """
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _HistogramChild:
    """
    One labelled histogram of a L{HistogramFamily}: per-bucket counts (not cumulative) and the sum.
    """

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds):
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount):
        """
        Count C{amount} in the first bucket whose bound is C{>= amount}, as C{prometheus_client.Histogram.observe}
        does (a NaN is added to the sum and counted in no bucket).
        """
        self.sum += amount
        if amount == amount:
            self.counts[bisect_left(self._bounds, amount)] += 1.0


class _Family:
    """
    A labelled metric family whose children are plain numbers, rendered as prometheus_client would render the
    equivalent metric. Not thread-safe: only the reactor thread may update or collect it.
    """

    type = None

    def __init__(self, name, documentation, labelnames):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        # Label values -> child, in creation order (the order prometheus_client renders children in).
        self._children = {}

    def labels(self, *labelvalues):
        """
        The child for C{labelvalues} (positional, in C{labelnames} order), created on first use.
        """
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(labelvalues)}")
        key = tuple(str(value) for value in labelvalues)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _new_child(self):
        raise NotImplementedError()

    def describe(self):
        return Metric(self.name, self.documentation, self.type)

    def collect(self):
        metric = Metric(self.name, self.documentation, self.type)
        for key, child in self._children.items():
            self._add_samples(metric, dict(zip(self.labelnames, key)), child)
        return metric

    def _add_samples(self, metric, labels, child):
        raise NotImplementedError()


class CounterFamily(_Family):
    """
    The equivalent of a labelled C{prometheus_client.Counter} (C{name} without C{_total}), for the data path.
    """

    type = "counter"

    def _new_child(self):
        return _CounterChild()

    def _add_samples(self, metric, labels, child):
        metric.add_sample(self.name + "_total", labels, child.value)


class HistogramFamily(_Family):
    """
    The equivalent of a labelled C{prometheus_client.Histogram}, for the data path.
    """

    type = "histogram"

    def __init__(self, name, documentation, labelnames, buckets):
        super().__init__(name, documentation, labelnames)
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("buckets not in sorted order")
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in bounds)

    def _new_child(self):
        return _HistogramChild(self.bounds)

    def _add_samples(self, metric, labels, child):
        acc = 0.0
        for le, count in zip(self._le, child.counts):
            acc += count
            metric.add_sample(self.name + "_bucket", dict(labels, le=le), acc)
        metric.add_sample(self.name + "_count", labels, acc)
        metric.add_sample(self.name + "_sum", labels, child.sum)


class _FamiliesCollector:
    """
    Registers L{_Family} objects on a registry, rendered in the order given.
    """

    def __init__(self, families):
        self._families = families

    def describe(self):
        return [family.describe() for family in self._families]

    def collect(self):
        return [family.collect() for family in self._families]


class TcpMetrics:
    """
    Bound children for one TCP peer of one connection (or one route): open/close/bytes.
    """

    __slots__ = ("_open_total", "open_connections", "_close_ok", "_close_fail", "read_bytes", "write_bytes")

    def __init__(self, metrics, labels):
        self._open_total = metrics.tcp_open_total.labels(*labels)
        self.open_connections = metrics.tcp_open_connections.labels(*labels)
        self._close_ok = metrics.tcp_close_total.labels(*labels, "success")
        self._close_fail = metrics.tcp_close_total.labels(*labels, "failure")
        #: bound C{Counter} children; the data path calls C{.inc(n)} on them.
        self.read_bytes = metrics.tcp_read_bytes_total.labels(*labels)
        self.write_bytes = metrics.tcp_write_bytes_total.labels(*labels)

    def opened(self):
        """A connection with these labels opened."""
        self._open_total.inc()
        self.open_connections.inc()

    def closed(self, success=True):
        """A connection counted by L{opened} closed, cleanly or not."""
        self.open_connections.dec()
        (self._close_ok if success else self._close_fail).inc()


class HttpRouteMetrics:
    """
    Bound children for one (direction, authority, target, tls, identities) route.
    """

    __slots__ = ("_metrics", "_labels", "requests", "_responses")

    def __init__(self, metrics, labels):
        self._metrics = metrics
        self._labels = labels
        #: bound C{request_total} child.
        self.requests = metrics.request_total.labels(*labels)
        self._responses = {}

    def response(self, status_code, grpc_status, latency_ms):
        """
        Count one response and its time to first byte.

        @param status_code: HTTP status as C{int}.
        @param grpc_status: C{grpc-status} text, or C{""}.
        @param latency_ms: milliseconds from request start to the response's first byte.
        """
        key = (status_code, grpc_status)
        pair = self._responses.get(key)
        if pair is None:
            code = str(status_code)
            pair = self._responses[key] = (
                self._metrics.response_total.labels(
                    *self._labels, classify(status_code, grpc_status), code, grpc_status),
                self._metrics.response_latency_ms.labels(*self._labels, code),
            )
        pair[0].inc()
        pair[1].observe(latency_ms)


class RouteMetrics:
    """
    Bound children for one profile route: C{(direction, target, rt_route, tls)}.

    A request on the route counts once in C{requests} and L{response}; each attempt it makes, the first and
    every retry, counts in C{actual_requests} and L{actual_response}.
    """

    __slots__ = ("_metrics", "_labels", "requests", "actual_requests", "retries", "budget_exhausted",
                 "_responses", "_actual_responses")

    def __init__(self, metrics, labels):
        self._metrics = metrics
        self._labels = labels
        #: bound C{route_request_total} child: once per request, however many attempts.
        self.requests = metrics.route_request_total.labels(*labels)
        #: bound C{route_actual_request_total} child: once per attempt, retries included.
        self.actual_requests = metrics.route_actual_request_total.labels(*labels)
        #: bound C{route_retry_requests_total} child: once per retry sent.
        self.retries = metrics.route_retry_requests_total.labels(*labels)
        #: bound C{route_retry_budget_exhausted_total} child: once per retry the budget refused.
        self.budget_exhausted = metrics.route_retry_budget_exhausted_total.labels(*labels)
        self._responses = {}
        self._actual_responses = {}

    def _pair(self, cache, total, latency, status_code, grpc_status):
        key = (status_code, grpc_status)
        pair = cache.get(key)
        if pair is None:
            code = str(status_code)
            pair = cache[key] = (
                total.labels(*self._labels, classify(status_code, grpc_status), code),
                latency.labels(*self._labels, code),
            )
        return pair

    def response(self, status_code, grpc_status, latency_ms):
        """
        Count the response the client got (after any retries) and its time from the request's start.

        @param status_code: HTTP status as C{int}.
        @param grpc_status: C{grpc-status} text, or C{""}.
        @param latency_ms: milliseconds from request start to the response's first byte.
        """
        m = self._metrics
        pair = self._pair(self._responses, m.route_response_total, m.route_response_latency_ms, status_code,
                          grpc_status)
        pair[0].inc()
        pair[1].observe(latency_ms)

    def actual_response(self, status_code, grpc_status, latency_ms):
        """
        Count the response of one attempt (retried or not), and that attempt's time to its first byte.
        """
        m = self._metrics
        pair = self._pair(self._actual_responses, m.route_actual_response_total,
                          m.route_actual_response_latency_ms, status_code, grpc_status)
        pair[0].inc()
        pair[1].observe(latency_ms)


class Metrics:
    """
    Every metric family linkproxy exports, on its own L{CollectorRegistry}.

    @ivar registry: what C{/metrics} renders.
    """

    def __init__(self, process=True):
        # Linkerd exports no *_created series; they double the scrape size for nothing.
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=False)
        if process:
            ProcessCollector(registry=r)

        # HTTP golden metrics (Linkerd names), updated per request: cheap families, see the module docstring.
        self.request_total = CounterFamily("request", "Requests the proxy received", HTTP_LABELS)
        self.response_total = CounterFamily(
            "response", "Responses, classified", HTTP_LABELS + ("classification", "status_code", "grpc_status"))
        self.response_latency_ms = HistogramFamily(
            "response_latency_ms", "Time from request to the response's first byte, in ms",
            HTTP_LABELS + ("status_code",), buckets=LATENCY_BUCKETS_MS)
        r.register(_FamiliesCollector((self.request_total, self.response_total, self.response_latency_ms)))

        # TCP metrics (Linkerd names).
        self.tcp_open_total = Counter("tcp_open", "TCP connections opened", TCP_LABELS, registry=r)
        self.tcp_open_connections = Gauge("tcp_open_connections", "TCP connections open now", TCP_LABELS,
                                          registry=r)
        self.tcp_close_total = Counter("tcp_close", "TCP connections closed", TCP_LABELS + ("classification",),
                                       registry=r)
        self.tcp_read_bytes_total = Counter("tcp_read_bytes", "Bytes read from the peer", TCP_LABELS,
                                            registry=r)
        self.tcp_write_bytes_total = Counter("tcp_write_bytes", "Bytes written to the peer", TCP_LABELS,
                                             registry=r)
        self.tcp_connect_error_total = Counter(
            "tcp_connect_error", "Upstream connects that failed or timed out", ("direction", "target_addr", "error"),
            registry=r)
        self.tcp_protocol_error_total = Counter(
            "tcp_protocol_error", "Connections closed for garbage on the TCP, TLS or HTTP layer",
            ("direction", "protocol", "error"), registry=r)

        # Protocol detection.
        self.protocol_detect_total = Counter(
            "protocol_detect", "Protocol detection outcomes", ("direction", "protocol", "reason"), registry=r)
        self.tls_client_hello_total = Counter(
            "tls_client_hello", "TLS ClientHellos seen during detection, by SNI", ("direction", "sni"),
            registry=r)
        self._sni_seen = set()

        # Profile route metrics (Linkerd's ServiceProfile names), cheap families as above.
        response_labels = ROUTE_LABELS + ("classification", "status_code")
        self.route_request_total = CounterFamily("route_request", "Requests on each profile route", ROUTE_LABELS)
        self.route_response_total = CounterFamily(
            "route_response", "Responses on each profile route, after retries, classified", response_labels)
        self.route_response_latency_ms = HistogramFamily(
            "route_response_latency_ms", "Time from request to the response's first byte on each profile "
            "route, retries included, in ms", ROUTE_LABELS + ("status_code",), buckets=LATENCY_BUCKETS_MS)
        self.route_actual_request_total = CounterFamily(
            "route_actual_request", "Attempts on each profile route, retries included", ROUTE_LABELS)
        self.route_actual_response_total = CounterFamily(
            "route_actual_response", "Responses to each attempt on each profile route, classified",
            response_labels)
        self.route_actual_response_latency_ms = HistogramFamily(
            "route_actual_response_latency_ms", "Time from each attempt to its response's first byte, in ms",
            ROUTE_LABELS + ("status_code",), buckets=LATENCY_BUCKETS_MS)
        self.route_retry_requests_total = CounterFamily(
            "route_retry_requests", "Retries sent on each profile route", ROUTE_LABELS)
        self.route_retry_budget_exhausted_total = CounterFamily(
            "route_retry_budget_exhausted", "Retries not sent because the retry budget was exhausted",
            ROUTE_LABELS)
        r.register(_FamiliesCollector((
            self.route_request_total, self.route_response_total, self.route_response_latency_ms,
            self.route_actual_request_total, self.route_actual_response_total,
            self.route_actual_response_latency_ms, self.route_retry_requests_total,
            self.route_retry_budget_exhausted_total)))

        self._tcp = {}
        self._http = {}
        self._routes = {}

    def tcp(self, direction, peer, tls, target_addr):
        """
        @param peer: C{"src"} for the accepted side, C{"dst"} for the connection the proxy opened.
        @param tls: C{"true"}, C{"false"} or a Linkerd-style reason such as C{"no_identity"}.
        @return: the cached L{TcpMetrics} for these labels.
        """
        key = (direction, peer, tls, target_addr)
        bundle = self._tcp.get(key)
        if bundle is None:
            bundle = self._tcp[key] = TcpMetrics(self, key)
        return bundle

    def http_route(self, direction, authority, target_addr, tls="false", client_id="", server_id=""):
        """
        @return: the cached L{HttpRouteMetrics} for these labels; bind it once per connection or route.
        """
        key = (direction, authority, target_addr, tls, client_id, server_id)
        bundle = self._http.get(key)
        if bundle is None:
            if len(self._http) >= MAX_HTTP_ROUTES:
                key = (direction, "overflow", "overflow", tls, client_id, server_id)
                bundle = self._http.get(key)
            if bundle is None:
                bundle = self._http[key] = HttpRouteMetrics(self, key)
        return bundle

    def route(self, direction, authority, rt_route, tls="false"):
        """
        The bound metrics of one profile route; bind it once per route (or per connection and route), not per
        request.

        @param direction: C{"outbound"} or C{"inbound"}.
        @param authority: the profile's target, canonical C{"host:port"} (the C{authority} and C{dst} labels).
        @param rt_route: the route's name, or C{"default"}.
        @param tls: C{"true"}, C{"false"} or a Linkerd-style reason, as on the golden metrics.
        @return: the cached L{RouteMetrics} for these labels. Past L{MAX_ROUTE_SERIES} label sets, new ones
            share one whose target and route are C{"overflow"}.
        """
        key = (direction, authority, rt_route, tls)
        bundle = self._routes.get(key)
        if bundle is None:
            if len(self._routes) >= MAX_ROUTE_SERIES:
                key = (direction, "overflow", "overflow", tls)
                bundle = self._routes.get(key)
            if bundle is None:
                bundle = self._routes[key] = RouteMetrics(self, (key[0], key[1], key[1], key[2], key[3]))
        return bundle

    def detected(self, direction, protocol, reason, sni=None):
        """
        Count one detection outcome, and the SNI of a ClientHello when there was one.

        @param protocol: C{"tls"}, C{"h2"}, C{"http1"} or C{"opaque"}.
        @param reason: C{"detected"}, C{"timeout"}, C{"opaque_port"}, C{"eof"}, C{"overflow"}...
        """
        self.protocol_detect_total.labels(direction, protocol, reason).inc()
        if protocol == "tls":
            label = sni or ""
            if label not in self._sni_seen:
                if len(self._sni_seen) >= MAX_SNI_VALUES:
                    label = "overflow"
                else:
                    self._sni_seen.add(label)
            self.tls_client_hello_total.labels(direction, label).inc()
