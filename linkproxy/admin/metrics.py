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

import errno
import re
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import INF, floatToGoString
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost

LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000,
    10000, 20000, 30000, 40000, 50000,
)

# The fixed labels of each family, for positional .labels(); bound bundles add Linkerd's variable ones
# (server_id or client_id, no_tls_reason, dst_*), see Metrics.http_route/tcp.
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
MAX_TCP_SERIES = 1000
MAX_AUTHORITY_VALUES = 1000
# Bounds on labels that discovery gives (dst_*), and on any label value's length.
MAX_DST_LABELS = 16
MAX_LABEL_VALUE = 253

#: Buckets of C{protocol_detect_duration_ms}: detection usually decides on the first read.
DETECT_BUCKETS_MS = (0.1, 0.5, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000)


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
        return self.child(tuple(zip(self.labelnames, (str(value) for value in labelvalues))))

    def child(self, pairs):
        """
        The child for C{pairs}, a tuple of C{(name, value)} label pairs, created on first use.

        Children of one family may carry different label names: Linkerd's do (C{server_id} only with
        C{tls="true"}, C{no_tls_reason} only without, C{dst_*} only where discovery gave labels), and the
        exposition format allows it.
        """
        child = self._children.get(pairs)
        if child is None:
            child = self._children[pairs] = self._new_child()
        return child

    def _new_child(self):
        raise NotImplementedError()

    def describe(self):
        return Metric(self.name, self.documentation, self.type)

    def collect(self):
        metric = Metric(self.name, self.documentation, self.type)
        for pairs, child in self._children.items():
            self._add_samples(metric, dict(pairs), child)
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


class _GaugeChild:
    """
    One labelled gauge of a L{GaugeFamily}.
    """

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount=1):
        self.value += amount

    def dec(self, amount=1):
        self.value -= amount

    def set(self, value):
        self.value = float(value)


class GaugeFamily(_Family):
    """
    The equivalent of a labelled C{prometheus_client.Gauge}, for the data path.
    """

    type = "gauge"

    def _new_child(self):
        return _GaugeChild()

    def _add_samples(self, metric, labels, child):
        metric.add_sample(self.name, labels, child.value)


def close_reason(reason):
    """
    Linkerd's end-of-stream labels for a connection's close: C{(classification, errno)}.

    A clean close is C{("success", "")}. Twisted reports a read or write error as C{ConnectionLost} without the
    errno it met; on a TCP socket that is a reset by the peer in practice, so it is labelled C{ECONNRESET}. A
    connection the proxy aborted itself (drain deadline, protocol error) is C{ECONNABORTED}. Any other failure
    carrying an OS errno gets that errno's name; the rest C{"UNKNOWN"}. The set of values is bounded.

    @param reason: the C{Failure} C{connectionLost} got, or C{None} for a clean close.
    """
    if reason is None:
        return _CLEAN
    value = getattr(reason, "value", reason)
    if isinstance(value, ConnectionDone):
        return _CLEAN
    code = getattr(value, "errno", None)
    if code is None and isinstance(getattr(value, "osError", None), OSError):
        code = value.osError.errno
    if isinstance(code, int) and code in errno.errorcode:
        return ("failure", errno.errorcode[code])
    if isinstance(value, ConnectionAborted):
        return ("failure", "ECONNABORTED")
    if isinstance(value, ConnectionLost):
        return ("failure", "ECONNRESET")
    return ("failure", "UNKNOWN")


_CLEAN = ("success", "")


class TcpMetrics:
    """
    Bound children for one TCP peer of one connection (or one route): open/close/bytes/duration.

    C{read_bytes} and C{write_bytes} are plain counters the opaque splice adds to per read; connections whose
    bytes are counted elsewhere (HTTP, see L{TcpConnection}) add their totals when they close, as Linkerd does.
    """

    __slots__ = ("_metrics", "labels", "_open_total", "open_connections", "_closes", "read_bytes",
                 "write_bytes")

    def __init__(self, metrics, labels):
        self._metrics = metrics
        #: the label pairs of every child here.
        self.labels = labels
        self._open_total = metrics.tcp_open_total.child(labels)
        self.open_connections = metrics.tcp_open_connections.child(labels)
        #: bound C{Counter}-like children; the data path calls C{.inc(n)} on them.
        self.read_bytes = metrics.tcp_read_bytes_total.child(labels)
        self.write_bytes = metrics.tcp_write_bytes_total.child(labels)
        self._closes = {}

    def opened(self):
        """
        A connection with these labels opened.

        @return: the time it opened, for L{closed}.
        """
        self._open_total.value += 1
        self.open_connections.value += 1
        return self._metrics.clock()

    def closed(self, success=True, started=None, reason=None, read=0, written=0):
        """
        A connection counted by L{opened} closed.

        @param success: without C{reason}: whether it closed cleanly.
        @param started: what L{opened} returned; the lifetime goes to C{tcp_connection_duration_ms}.
        @param reason: the C{Failure} from C{connectionLost} (it decides C{classification} and C{errno}).
        @param read: bytes read that were not counted on C{read_bytes} as they came.
        @param written: bytes written that were not counted on C{write_bytes} as they went.
        """
        self.open_connections.value -= 1
        if reason is not None:
            eos = close_reason(reason)
        else:
            eos = _CLEAN if success else ("failure", "ECONNRESET")
        pair = self._closes.get(eos)
        if pair is None:
            m = self._metrics
            labels = self.labels + (("classification", eos[0]), ("errno", eos[1]))
            pair = self._closes[eos] = (m.tcp_close_total.child(labels),
                                        m.tcp_connection_duration_ms.child(labels))
        pair[0].value += 1
        if started is not None:
            pair[1].observe((self._metrics.clock() - started) * 1000.0)
        if read:
            self.read_bytes.value += read
        if written:
            self.write_bytes.value += written


class TcpConnection:
    """
    The TCP metrics of one accepted connection whose protocol counts its bytes into plain numbers (C{rx},
    C{tx}) rather than on bound children: the sniffer adds every read, the direct writer every write. Its
    labels are bound once they are known (after detection, or the TLS handshake) with L{bind}; it is counted
    under C{default} if it closes before that. L{skip} hands the counting to another protocol (the opaque
    splice counts its own).
    """

    __slots__ = ("_default", "bundle", "rx", "tx", "_started", "_done")

    def __init__(self, default):
        self._default = default
        self.bundle = None
        self.rx = 0
        self.tx = 0
        self._started = None
        self._done = False

    def bind(self, bundle):
        """
        Count this connection under C{bundle} (a L{TcpMetrics}); the first call wins.
        """
        if self.bundle is None and not self._done:
            self.bundle = bundle
            self._started = bundle.opened()

    def skip(self):
        """
        Another protocol counts this connection from now on: count nothing here.
        """
        if self.bundle is None:
            self._done = True

    def closed(self, reason=None):
        """
        The connection closed: count it with its bytes and lifetime.
        """
        if self._done:
            return
        self._done = True
        bundle = self.bundle
        if bundle is None:
            if self._default is None:
                return
            bundle = self._default
            self._started = bundle.opened()
        bundle.closed(started=self._started, reason=reason, read=self.rx, written=self.tx)


def _label_value(value, limit=MAX_LABEL_VALUE):
    value = str(value)
    return value if len(value) <= limit else value[:limit]


_DST_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def dst_labels(endpoint):
    """
    The C{dst_*} label pairs of an endpoint: its discovery C{labels} (from the endpoints file, or the
    Kubernetes backend), each key prefixed C{dst_}, as Linkerd's destination service gives them. Bounded: at
    most L{MAX_DST_LABELS} keys, valid Prometheus label names only, values cut at L{MAX_LABEL_VALUE}.
    """
    labels = getattr(endpoint, "labels", None) if endpoint is not None else None
    if not labels:
        return ()
    pairs = []
    for key in sorted(labels):
        if len(pairs) >= MAX_DST_LABELS:
            break
        if isinstance(key, str) and _DST_KEY.match(key):
            pairs.append(("dst_" + key, _label_value(labels[key])))
    return tuple(pairs)


def tls_labels(tls, peer_key="", peer_id="", no_tls_reason=""):
    """
    Linkerd's TLS labels: C{tls="true"} with the peer's identity (C{server_id} outbound, C{client_id}
    inbound), or C{tls="no_identity"} with C{no_tls_reason}.

    @param tls: C{"true"}, or anything else for no TLS (C{"false"} is read as C{"no_identity"}).
    @param peer_key: C{"server_id"} or C{"client_id"}.
    @param no_tls_reason: C{"loopback"}, C{"not_provided_by_remote"}, C{"not_provided_by_service_discovery"},
        C{"disabled"}...; C{""} when unknown (then the label is left out).
    """
    if tls == "true":
        return (("tls", "true"), (peer_key, peer_id)) if peer_key and peer_id else (("tls", "true"),)
    if tls in ("false", "", None):
        tls = "no_identity"
    return (("tls", tls), ("no_tls_reason", no_tls_reason)) if no_tls_reason else (("tls", tls),)


class HttpRouteMetrics:
    """
    Bound children for one (direction, authority, target, TLS, identities, dst_*) route.
    """

    __slots__ = ("_metrics", "_labels", "requests", "_responses")

    def __init__(self, metrics, labels):
        self._metrics = metrics
        self._labels = labels
        #: bound C{request_total} child.
        self.requests = metrics.request_total.child(labels)
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
            labels = self._labels
            pair = self._responses[key] = (
                self._metrics.response_total.child(labels + (
                    ("classification", classify(status_code, grpc_status)), ("status_code", code),
                    ("grpc_status", grpc_status))),
                self._metrics.response_latency_ms.child(labels + (("status_code", code),)),
            )
        pair[0].value += 1
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
        self.requests = metrics.route_request_total.child(labels)
        #: bound C{route_actual_request_total} child: once per attempt, retries included.
        self.actual_requests = metrics.route_actual_request_total.child(labels)
        #: bound C{route_retry_requests_total} child: once per retry sent.
        self.retries = metrics.route_retry_requests_total.child(labels)
        #: bound C{route_retry_budget_exhausted_total} child: once per retry the budget refused.
        self.budget_exhausted = metrics.route_retry_budget_exhausted_total.child(labels)
        self._responses = {}
        self._actual_responses = {}

    def _pair(self, cache, total, latency, status_code, grpc_status):
        key = (status_code, grpc_status)
        pair = cache.get(key)
        if pair is None:
            code = str(status_code)
            pair = cache[key] = (
                total.child(self._labels + (("classification", classify(status_code, grpc_status)),
                                            ("status_code", code))),
                latency.child(self._labels + (("status_code", code),)),
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

    def __init__(self, process=True, clock=time.monotonic):
        #: seconds on a monotonic clock, for connection lifetimes.
        self.clock = clock
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

        # TCP metrics (Linkerd names), for every connection: plain numbers too (see TcpMetrics).
        self.tcp_open_total = CounterFamily("tcp_open", "TCP connections opened", TCP_LABELS)
        self.tcp_open_connections = GaugeFamily("tcp_open_connections", "TCP connections open now", TCP_LABELS)
        self.tcp_close_total = CounterFamily("tcp_close", "TCP connections closed",
                                             TCP_LABELS + ("classification", "errno"))
        self.tcp_connection_duration_ms = HistogramFamily(
            "tcp_connection_duration_ms", "Connection lifetimes, in ms", TCP_LABELS + ("classification", "errno"),
            buckets=LATENCY_BUCKETS_MS)
        self.tcp_read_bytes_total = CounterFamily("tcp_read_bytes", "Bytes read from the peer", TCP_LABELS)
        self.tcp_write_bytes_total = CounterFamily("tcp_write_bytes", "Bytes written to the peer", TCP_LABELS)
        r.register(_FamiliesCollector((
            self.tcp_open_total, self.tcp_open_connections, self.tcp_close_total, self.tcp_connection_duration_ms,
            self.tcp_read_bytes_total, self.tcp_write_bytes_total)))
        self.tcp_connect_error_total = Counter(
            "tcp_connect_error", "Upstream connects that failed or timed out", ("direction", "target_addr", "error"),
            registry=r)
        self.tcp_protocol_error_total = Counter(
            "tcp_protocol_error", "Connections closed for garbage on the TCP, TLS or HTTP layer",
            ("direction", "protocol", "error"), registry=r)

        # Errors the proxy answered for itself, Linkerd's {inbound,outbound}_http_errors_total{error}.
        self.http_errors_total = {
            direction: CounterFamily(f"{direction}_http_errors", f"{direction.capitalize()} HTTP requests the "
                                     "proxy answered with its own error (l5d-proxy-error)", ("error",))
            for direction in ("inbound", "outbound")}
        r.register(_FamiliesCollector(tuple(self.http_errors_total.values())))

        # What this proxy is.
        build = Gauge("proxy_build_info", "linkproxy's build: version and runtime", ("version", "git_sha",
                                                                                   "profile", "vendor"),
                      registry=r)
        build.labels(_version(), "", "release", "linkproxy").set(1)

        # Protocol detection.
        self.protocol_detect_total = Counter(
            "protocol_detect", "Protocol detection outcomes", ("direction", "protocol", "reason"), registry=r)
        self.tls_client_hello_total = Counter(
            "tls_client_hello", "TLS ClientHellos seen during detection, by SNI", ("direction", "sni"),
            registry=r)
        self._sni_seen = set()
        self.protocol_detect_duration_ms = HistogramFamily(
            "protocol_detect_duration_ms", "Time from accept to the protocol decision, in ms",
            ("direction", "protocol"), buckets=DETECT_BUCKETS_MS)
        r.register(_FamiliesCollector((self.protocol_detect_duration_ms,)))

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
        self._authorities = set()

    def _bounded_authority(self, authority):
        seen = self._authorities
        if authority in seen or not authority:
            return authority
        if len(seen) >= MAX_AUTHORITY_VALUES:
            return "overflow"
        seen.add(authority)
        return authority

    def tcp(self, direction, peer, tls, target_addr, *, authority="", peer_id="", no_tls_reason="", dst=()):
        """
        @param peer: C{"src"} for the accepted side, C{"dst"} for the connection the proxy opened.
        @param tls: C{"true"}, or C{"no_identity"} (C{"false"} means the same) with C{no_tls_reason}.
        @param authority: the logical target, when the connection has one.
        @param peer_id: the peer's identity under TLS: C{client_id} for C{src}, C{server_id} for C{dst}.
        @param dst: C{dst_*} label pairs (L{dst_labels}).
        @return: the cached L{TcpMetrics} for these labels. Past L{MAX_TCP_SERIES} label sets, new ones share
            one whose authority and target are C{"overflow"}.
        """
        key = (direction, peer, tls, target_addr, authority, peer_id, no_tls_reason, dst)
        bundle = self._tcp.get(key)
        if bundle is None:
            if len(self._tcp) >= MAX_TCP_SERIES:
                key = (direction, peer, tls, "overflow", "overflow" if authority else "", "", no_tls_reason, ())
                bundle = self._tcp.get(key)
            if bundle is None:
                labels = (("direction", direction), ("peer", peer))
                if key[4]:
                    labels += (("authority", self._bounded_authority(key[4])),)
                labels += (("target_addr", key[3]),)
                labels += tls_labels(tls, "client_id" if peer == "src" else "server_id", key[5], no_tls_reason)
                bundle = self._tcp[key] = TcpMetrics(self, labels + key[7])
        return bundle

    def http_route(self, direction, authority, target_addr, tls="false", client_id="", server_id="", *,
                   no_tls_reason="", dst=()):
        """
        @param tls: C{"true"}, or C{"no_identity"} (C{"false"} means the same) with C{no_tls_reason}.
        @param dst: C{dst_*} label pairs (L{dst_labels}), outbound.
        @return: the cached L{HttpRouteMetrics} for these labels; bind it once per connection or route.
        """
        key = (direction, authority, target_addr, tls, client_id, server_id, no_tls_reason, dst)
        bundle = self._http.get(key)
        if bundle is None:
            if len(self._http) >= MAX_HTTP_ROUTES:
                key = (direction, "overflow", "overflow", tls, client_id, server_id, no_tls_reason, ())
                bundle = self._http.get(key)
            if bundle is None:
                labels = (("direction", direction), ("authority", key[1]), ("target_addr", key[2]))
                if direction == "inbound":
                    labels += tls_labels(tls, "client_id", client_id, no_tls_reason)
                else:
                    labels += tls_labels(tls, "server_id", server_id, no_tls_reason)
                bundle = self._http[key] = HttpRouteMetrics(self, labels + key[7])
        return bundle

    def http_error(self, direction, error):
        """
        Count one response the proxy made itself, by a bounded C{error} label (L{error_label}).
        """
        family = self.http_errors_total.get(direction)
        if family is not None:
            family.child((("error", error_label(error)),)).value += 1

    def route(self, direction, authority, rt_route, tls=None):
        """
        The bound metrics of one profile route; bind it once per route (or per connection and route), not per
        request.

        @param direction: C{"outbound"} or C{"inbound"}.
        @param authority: the profile's target, canonical C{"host:port"} (the C{authority} and C{dst} labels).
        @param rt_route: the route's name, or C{"default"}.
        @param tls: inbound, the client connection's C{tls} (C{"true"} or C{"no_identity"}); C{None} leaves
            the label out (outbound: a route is counted before its endpoint, and so the hop's TLS, is known).
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
                labels = (("direction", key[0]), ("authority", key[1]), ("dst", key[1]), ("rt_route", key[2]))
                if tls is not None:
                    labels += (("tls", tls),)
                bundle = self._routes[key] = RouteMetrics(self, labels)
        return bundle

    def detected(self, direction, protocol, reason, sni=None, elapsed=None):
        """
        Count one detection outcome, and the SNI of a ClientHello when there was one.

        @param protocol: C{"tls"}, C{"h2"}, C{"http1"} or C{"opaque"}.
        @param reason: C{"detected"}, C{"timeout"}, C{"opaque_port"}, C{"eof"}, C{"overflow"}...
        @param elapsed: seconds from accept to the decision, for C{protocol_detect_duration_ms}.
        """
        self.protocol_detect_total.labels(direction, protocol, reason).inc()
        if elapsed is not None:
            self.protocol_detect_duration_ms.labels(direction, protocol).observe(elapsed * 1000.0)
        if protocol == "tls":
            label = sni or ""
            if label not in self._sni_seen:
                if len(self._sni_seen) >= MAX_SNI_VALUES:
                    label = "overflow"
                else:
                    self._sni_seen.add(label)
            self.tls_client_hello_total.labels(direction, label).inc()


_POLICY_NAMES = {"unauthenticated": "all-unauthenticated", "authenticated": "all-authenticated",
                 "allow": "identity-allow-list", "deny": "deny"}


def policy_name(policy):
    """
    The C{srv_name}/C{authz_name} of an inbound policy mode, after Linkerd's default policy names.
    """
    return _POLICY_NAMES.get(policy, "overflow")


_ERROR_LABEL = re.compile(r"(?<!^)(?=[A-Z])")


def error_label(error):
    """
    The C{error} label of a proxy error: its class in snake case (C{NoEndpoints} is C{no_endpoints},
    C{ResponseTimeout} is C{response_timeout}); a closed set, the classes of L{linkproxy.core.errors}.
    """
    if isinstance(error, str):
        return error
    return _ERROR_LABEL.sub("_", type(error).__name__).lower()


def _version():
    from linkproxy import __version__
    return __version__
