"""
The live dashboard on the admin server: C{GET /dashboard}.

The page is hand-written HTML, CSS and JavaScript in C{linkproxy/admin/static/}, packaged with the wheel and
served from memory; it loads nothing from anywhere else (its C{Content-Security-Policy} says so to the browser).
It polls C{GET /dashboard/state.json} every second and reads C{GET /tap} with C{EventSource}.

Routes, all under C{/dashboard} (see L{Dashboard}):

    - C{GET /dashboard}: the page.
    - C{GET /dashboard/assets/NAME}: its stylesheet and scripts.
    - C{GET /dashboard/state.json}: what the page shows, computed on each request (L{Dashboard.state}).

The traffic numbers come from the very samples C{/metrics} renders (C{request_total}, C{response_total},
C{response_latency_ms}), summed per C{(direction, authority)} the way
C{sum by (direction, authority) (...)} would, and the latency quantiles are interpolated from the summed
histogram buckets as Prometheus' C{histogram_quantile} does (L{histogram_quantile}). Everything here is
cumulative since the process started; rates, and the quantiles of the latency chart, are computed by the page
from the difference between two polls, so the server keeps no history and any number of pages may watch.
"""

import datetime
import json
import math
from importlib.resources import files

from twisted.web.resource import Resource

__all__ = ["Dashboard", "histogram_quantile", "traffic", "balancers", "identity_state", "ASSET_TYPES"]

#: Bumped when the shape of C{state.json} changes incompatibly.
STATE_VERSION = 1

#: The quantiles C{state.json} reports for every (direction, authority).
QUANTILES = (0.5, 0.95, 0.99)

#: The content type of each asset, by file suffix; files with other suffixes are not served.
ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}

#: The page may talk to its own origin only: no CDN, no web font, no beacon. Favicons are a C{data:} URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_JSON = "application/json"
_INDEX = "index.html"


def histogram_quantile(q, buckets):
    """
    The C{q}-quantile of a histogram, interpolated linearly within the bucket it falls in, exactly as
    Prometheus' C{histogram_quantile} does.

    @param q: the quantile, between 0 and 1.
    @param buckets: C{(upper_bound, cumulative_count)} pairs, in any order; the largest bound must be C{+Inf}.
    @return: a L{float}, or C{None} when there is nothing to compute it from (no observations, fewer than two
        buckets, or no C{+Inf} bucket). Like Prometheus, an observation in the C{+Inf} bucket reports the
        largest finite bound, and the first bucket's lower bound is 0 (when its upper bound is positive).
    """
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted((float(bound), float(count)) for bound, count in buckets)
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return None
    # Counts that go down (from buckets scraped at different times) are levelled, as Prometheus does.
    level = 0.0
    for i, (bound, count) in enumerate(ordered):
        level = max(level, count)
        ordered[i] = (bound, level)
    observations = ordered[-1][1]
    if observations == 0:
        return None
    rank = q * observations
    b = next(i for i, (_, count) in enumerate(ordered) if count >= rank)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    if b == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    start, end, count = 0.0, ordered[b][0], ordered[b][1]
    if b > 0:
        start = ordered[b - 1][0]
        count -= ordered[b - 1][1]
        rank -= ordered[b - 1][1]
    if count == 0:
        return start
    return start + (end - start) * (rank / count)


def _samples(registry, names):
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names:
                yield sample


def traffic(registry, quantiles=QUANTILES):
    """
    The golden metrics of every C{(direction, authority)}, from the samples C{/metrics} renders.

    @param registry: the L{prometheus_client.CollectorRegistry} behind C{/metrics}.
    @return: a list, sorted by direction then authority, of dicts: C{direction}, C{authority}, C{requests}
        (C{request_total}), C{responses}, C{successes} and C{failures} (C{response_total} by
        C{classification}), C{success_rate} (C{successes / responses}, or C{None}), C{latency_ms} (C{count},
        C{sum} and C{p50}, C{p95}, C{p99} from the summed C{response_latency_ms} buckets) and C{buckets} (the
        summed cumulative bucket counts, in the order of the top-level C{latency_buckets_ms}).
    """
    rows = {}

    def row(labels):
        key = (labels.get("direction", ""), labels.get("authority", ""))
        found = rows.get(key)
        if found is None:
            found = rows[key] = {"requests": 0.0, "successes": 0.0, "failures": 0.0, "count": 0.0,
                                 "sum": 0.0, "buckets": {}}
        return found

    names = {"request_total", "response_total", "response_latency_ms_bucket", "response_latency_ms_count",
             "response_latency_ms_sum"}
    for sample in _samples(registry, names):
        r = row(sample.labels)
        if sample.name == "request_total":
            r["requests"] += sample.value
        elif sample.name == "response_total":
            r["successes" if sample.labels.get("classification") == "success" else "failures"] += sample.value
        elif sample.name == "response_latency_ms_bucket":
            bound = float(sample.labels["le"])
            r["buckets"][bound] = r["buckets"].get(bound, 0.0) + sample.value
        elif sample.name == "response_latency_ms_count":
            r["count"] += sample.value
        else:
            r["sum"] += sample.value

    out = []
    for (direction, authority), r in sorted(rows.items()):
        responses = r["successes"] + r["failures"]
        latency = {"count": r["count"], "sum": _finite(r["sum"])}
        for q in quantiles:
            latency[_quantile_key(q)] = _finite(histogram_quantile(q, r["buckets"].items()))
        out.append({
            "direction": direction,
            "authority": authority,
            "requests": r["requests"],
            "responses": responses,
            "successes": r["successes"],
            "failures": r["failures"],
            "success_rate": r["successes"] / responses if responses else None,
            "latency_ms": latency,
            "buckets": [count for _, count in sorted(r["buckets"].items())],
        })
    return out


def _quantile_key(q):
    # 0.5 -> "p50", 0.95 -> "p95", 0.99 -> "p99", 0.999 -> "p99.9"
    return "p" + format(q * 100, "g")


def _finite(value):
    # JSON has no NaN or infinity; a number that is not finite is reported as unknown.
    return value if value is not None and math.isfinite(value) else None


def balancers(routers, now):
    """
    Every balancer's endpoints, from the routers' snapshots (what the C{balancer_*} metrics read).

    @param routers: L{linkproxy.routing.BalancedRouter}s (anything with C{direction} and C{snapshot(now)}).
    @return: a list of dicts C{direction}, C{target}, C{endpoints}: a list of C{endpoint} (C{host:port}),
        C{state} (C{ready}, C{ejected} or C{probing}), C{cost} (the balancer's load measure: peak-EWMA cost
        in seconds for C{p2c-ewma}, requests in flight for the others), C{weight} and C{identity} (or C{None}
        for an endpoint that is not meshed).
    """
    out = []
    for router in routers:
        for target, snapshot in router.snapshot(now):
            endpoints = []
            for endpoint, state, cost in snapshot:
                cost = float(cost)
                endpoints.append({
                    "endpoint": endpoint.addr_str,
                    "state": state,
                    "cost": cost if math.isfinite(cost) else None,
                    "weight": float(endpoint.weight),
                    "identity": endpoint.identity,
                })
            out.append({"direction": router.direction, "target": target, "endpoints": endpoints})
    return out


def identity_state(store, now):
    """
    This proxy's identity, for the page.

    @param store: the L{linkproxy.identity.store.IdentityStore}, or C{None} when identity is off.
    @return: C{None} when identity is off, else a dict: C{name}, C{ready} (a usable certificate is installed),
        C{not_after} (the leaf's notAfter as a unix time, or C{None} before the first one), C{not_after_iso},
        C{expires_in_s}, C{self_issued}, C{generation} and C{problem} (the C{/ready} reason, or C{None}).
    """
    if store is None:
        return None
    current = store.current
    state = {"name": store.name, "ready": False, "not_after": None, "not_after_iso": None,
             "expires_in_s": None, "self_issued": None, "generation": None,
             "problem": store.not_ready_reason()}
    if current is not None:
        state.update({
            "ready": state["problem"] is None,
            "not_after": current.not_after,
            "not_after_iso": datetime.datetime.fromtimestamp(current.not_after, datetime.timezone.utc)
            .isoformat().replace("+00:00", "Z"),
            "expires_in_s": current.not_after - now,
            "self_issued": current.self_issued,
            "generation": current.generation,
        })
    return state


def _load_assets():
    """
    The packaged assets, C{{name: (bytes, content type)}}, read once (they are small).
    """
    assets = {}
    for entry in files("linkproxy.admin").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in ASSET_TYPES:
            assets[entry.name] = (entry.read_bytes(), ASSET_TYPES[suffix])
    return assets


class Dashboard:
    """
    What C{/dashboard} shows, and the resource that serves it.

    The admin app hands every request under C{/dashboard} to L{resource}.
    """

    def __init__(self, metrics, *, routers=(), identity=None, reactor=None, poll_interval=1.0):
        """
        @param metrics: the L{linkproxy.admin.metrics.Metrics} whose C{registry} C{/metrics} renders.
        @param routers: the L{linkproxy.routing.BalancedRouter}s whose balancers the page lists.
        @param identity: the L{linkproxy.identity.store.IdentityStore}, or C{None} when identity is off.
        @param reactor: an C{IReactorTime}; its C{seconds()} is the time the state is stamped with.
        @param poll_interval: seconds between the page's polls of C{state.json}.
        """
        if reactor is None:
            from twisted.internet import reactor
        self._metrics = metrics
        self._routers = tuple(routers)
        self._identity = identity
        self._reactor = reactor
        self._poll_interval = float(poll_interval)
        self._assets = _load_assets()
        self._resource = _DashboardResource(self)

    def resource(self):
        """
        The leaf resource for C{/dashboard} and everything under it.
        """
        return self._resource

    def state(self):
        """
        Everything the page shows, as a JSON-serialisable dict:

            - C{version}: L{STATE_VERSION}.
            - C{time}: the server's unix time when it was computed; the page divides count differences by
              differences of this, so its rates do not depend on when the poll arrived.
            - C{poll_interval_s}: how often the page polls.
            - C{latency_buckets_ms}: the histogram's upper bounds (the last is C{"+Inf"}).
            - C{traffic}: L{traffic}.
            - C{balancers}: L{balancers}.
            - C{identity}: L{identity_state}.
        """
        from linkproxy.admin.metrics import LATENCY_BUCKETS_MS

        now = self._reactor.seconds()
        rows = traffic(self._metrics.registry)
        return {
            "version": STATE_VERSION,
            "time": now,
            "poll_interval_s": self._poll_interval,
            "latency_buckets_ms": [float(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"],
            "traffic": rows,
            "balancers": balancers(self._routers, now),
            "identity": identity_state(self._identity, now),
        }

    def asset(self, name):
        """
        @return: C{(body, content type)} of a packaged asset, or C{None}.
        """
        return self._assets.get(name)


class _DashboardResource(Resource):
    """
    C{/dashboard} (the page), C{/dashboard/state.json} and C{/dashboard/assets/NAME}; 404 for anything else.
    """

    isLeaf = True

    def __init__(self, dashboard):
        super().__init__()
        self._dashboard = dashboard

    def render_GET(self, request):
        path = request.postpath
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if path == [b"state.json"]:
            return self._body(request, _JSON, (json.dumps(self._dashboard.state(), allow_nan=False)
                                               + "\n").encode("utf-8"))
        if path == []:
            asset = self._dashboard.asset(_INDEX)
        elif len(path) == 2 and path[0] == b"assets":
            asset = self._dashboard.asset(path[1].decode("utf-8", "replace"))
        else:
            asset = None
        if asset is None:
            request.setResponseCode(404)
            return self._body(request, "text/plain; charset=utf-8", b"not found\n")
        body, content_type = asset
        if content_type.startswith("text/html"):
            request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode("ascii"))
            request.setHeader(b"Referrer-Policy", b"no-referrer")
        return self._body(request, content_type, body)

    def _body(self, request, content_type, body):
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body
