"""
Discovery's metric families, added to a L{linkproxy.admin.metrics.Metrics} registry once however many
backends, caches and routers share it.

  - C{discovery_updates_total{backend, target}}: endpoint-set updates delivered per target. Targets come from
    clients (Host headers), so past L{MAX_TARGETS} distinct values they fold into C{"overflow"}.
  - C{discovery_errors_total{backend}}: failed refreshes (a bad file edit, a DNS error other than NXDOMAIN).
"""

from weakref import WeakKeyDictionary

from prometheus_client import Counter

__all__ = ["MAX_TARGETS", "DiscoveryMetrics", "discovery_metrics"]

#: Distinct C{target} label values kept before new ones fold into C{"overflow"}.
MAX_TARGETS = 1000

_BY_METRICS = WeakKeyDictionary()


class DiscoveryMetrics:
    """
    Bound access to the discovery families on one registry.
    """

    def __init__(self, registry):
        self._updates = Counter("discovery_updates", "Endpoint-set updates discovery delivered",
                                ("backend", "target"), registry=registry)
        self._errors = Counter("discovery_errors", "Discovery refreshes that failed", ("backend",),
                               registry=registry)
        self._update_children = {}
        self._error_children = {}

    def updated(self, backend, target):
        """
        Count one update for C{target} from C{backend}.
        """
        key = (backend, target)
        child = self._update_children.get(key)
        if child is None:
            if len(self._update_children) >= MAX_TARGETS:
                key = (backend, "overflow")
                child = self._update_children.get(key)
            if child is None:
                child = self._update_children[key] = self._updates.labels(*key)
        child.inc()

    def error(self, backend):
        """
        Count one failed refresh of C{backend}.
        """
        child = self._error_children.get(backend)
        if child is None:
            child = self._error_children[backend] = self._errors.labels(backend)
        child.inc()


def discovery_metrics(metrics):
    """
    The L{DiscoveryMetrics} of a L{linkproxy.admin.metrics.Metrics}, created on first use.

    @param metrics: a L{linkproxy.admin.metrics.Metrics}, or C{None}.
    @return: a L{DiscoveryMetrics}, or C{None} when C{metrics} is C{None}.
    """
    if metrics is None:
        return None
    found = _BY_METRICS.get(metrics)
    if found is None:
        found = _BY_METRICS[metrics] = DiscoveryMetrics(metrics.registry)
    return found
