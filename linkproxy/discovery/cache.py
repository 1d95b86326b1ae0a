"""
Resolutions shared per target: one L{IDiscovery.resolve} per logical target however many routers and
connections use it, evicted (and cancelled) once nothing has used it for C{idle_timeout} seconds.

    cache = ResolutionCache(discovery, reactor, idle_timeout=60.0)
    watch = cache.watch("web.default.svc.cluster.local:80")
    watch.endpoints                         # None until discovery's first update, then a tuple
    subscription = watch.subscribe(receiver, evicted=on_evicted)
    watch.touch(reactor.seconds())          # on every use; an untouched watch is evicted when idle
    subscription.cancel()

Subscribers are L{IResolutionReceiver}s and always get whole sets (C{reset}): the cache folds a backend's
C{add}/C{remove} into the current set, so a balancer is fed one way whatever the backend does.

Use is recorded in an ordered dict (least recently used first), so touching is O(1) and the idle sweep only
looks at the entries it evicts plus one.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.core.endpoint import Endpoint
from linkproxy.discovery import backend_name, normalize_target
from linkproxy.discovery.metrics import discovery_metrics
from linkproxy.interfaces import IResolutionReceiver

__all__ = ["ResolutionCache", "Watch", "Subscription", "MAX_TARGETS", "MAX_ENDPOINTS"]

#: Targets watched at once by default; past it the least recently used is evicted to make room.
MAX_TARGETS = 10000
#: Endpoints kept per target by default; a bigger set is truncated (and logged).
MAX_ENDPOINTS = 10000

_log = Logger(namespace="linkproxy.discovery.cache")


class Subscription:
    """
    One subscriber's hold on a L{Watch}; L{cancel} stops its updates.
    """

    __slots__ = ("_watch", "receiver", "evicted")

    def __init__(self, watch, receiver, evicted):
        self._watch = watch
        self.receiver = receiver
        self.evicted = evicted

    def cancel(self):
        """
        Stop delivering updates to this subscriber. The watch itself lives on until it is idle.
        """
        watch, self._watch = self._watch, None
        if watch is not None and self in watch._subscriptions:
            watch._subscriptions.remove(self)


@implementer(IResolutionReceiver)
class Watch:
    """
    The shared resolution of one target: its current endpoint set and its subscribers.

    @ivar target: the canonical target, C{"host:port"}.
    @ivar endpoints: a tuple of L{Endpoint}, or C{None} until discovery's first update.
    @ivar last_used: when L{touch} was last called (or the watch created), in reactor seconds.
    @ivar updates: how many updates discovery has delivered.
    """

    def __init__(self, cache, target, now):
        self._cache = cache
        self.target = target
        self.endpoints: Optional[Tuple[Endpoint, ...]] = None
        self.last_used = now
        self.updates = 0
        self._by_address: Dict = {}
        self._subscriptions: List[Subscription] = []
        self._resolution = None
        self._truncated = False
        self.evicted = False

    def __repr__(self):
        count = "?" if self.endpoints is None else len(self.endpoints)
        return f"<Watch {self.target} endpoints={count} subscribers={len(self._subscriptions)}>"

    def touch(self, now):
        """
        Record a use at C{now}; the watch is evicted only after C{idle_timeout} seconds without one.
        """
        self.last_used = now
        if not self.evicted:
            self._cache._entries.move_to_end(self.target)

    def subscribe(self, receiver, evicted: Optional[Callable[[], None]] = None) -> Subscription:
        """
        Deliver the current set (when there is one) to C{receiver} now, and every later set as it arrives.

        @param receiver: an L{IResolutionReceiver}; only its C{reset} is called.
        @param evicted: called with no arguments when this watch is evicted (no more updates follow).
        """
        subscription = Subscription(self, receiver, evicted)
        if self.evicted:
            return subscription
        self._subscriptions.append(subscription)
        if self.endpoints is not None:
            receiver.reset(self.endpoints)
        return subscription

    # IResolutionReceiver, called by the discovery backend.

    def reset(self, endpoints):
        """
        Discovery replaced the whole set.
        """
        by_address = {}
        for endpoint in endpoints:
            by_address[endpoint.address] = endpoint
        self._by_address = by_address
        self._publish()

    def add(self, endpoints):
        """
        Discovery added (or replaced, by address) endpoints.
        """
        for endpoint in endpoints:
            self._by_address[endpoint.address] = endpoint
        self._publish()

    def remove(self, addresses):
        """
        Discovery removed endpoints by address.
        """
        for address in addresses:
            self._by_address.pop(tuple(address), None)
        self._publish()

    def _publish(self):
        if self.evicted:
            return
        cache = self._cache
        endpoints = tuple(self._by_address.values())
        if len(endpoints) > cache.max_endpoints:
            if not self._truncated:
                _log.warn("{target} has {count} endpoints; using the first {limit}", target=self.target,
                          count=len(endpoints), limit=cache.max_endpoints)
                self._truncated = True
            endpoints = endpoints[:cache.max_endpoints]
        _log_change(cache.backend, self.target, self.endpoints, endpoints)
        self.endpoints = endpoints
        self.updates += 1
        if cache._metrics is not None:
            cache._metrics.updated(cache.backend, self.target)
        for subscription in list(self._subscriptions):
            try:
                subscription.receiver.reset(endpoints)
            except Exception:
                _log.failure("subscriber of {target} failed on an update", target=self.target)


def _log_change(backend, target, old, new):
    """
    Log a target's new endpoint set at info, when it differs from the one before: once per change, not once
    per update (a DNS poll that finds the same addresses says nothing).
    """
    before = {e.address: e for e in old} if old is not None else {}
    after = {e.address: e for e in new}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for address in after.keys() & before.keys() if after[address] != before[address])
    if old is None:
        _log.info("{target}: discovered {count} endpoints ({backend})", target=target, count=len(new),
                  added=added, removed=removed, changed=changed, backend=backend)
    elif added or removed or changed:
        _log.info("{target}: {count} endpoints ({added} added, {removed} removed, {changed} changed)",
                  target=target, count=len(new), added=added, removed=removed, changed=changed, backend=backend)


class ResolutionCache:
    """
    Shares one discovery resolution per target among every user, and evicts idle ones.

    @ivar discovery: the L{linkproxy.interfaces.IDiscovery} resolutions come from.
    @ivar idle_timeout: seconds without a L{Watch.touch} after which a watch is evicted.
    @ivar backend: the C{backend} label of C{discovery_updates_total}.
    @ivar max_endpoints: endpoints kept per target.
    """

    def __init__(self, discovery, reactor, idle_timeout=60.0, *, max_targets=MAX_TARGETS,
                 max_endpoints=MAX_ENDPOINTS, metrics=None, backend=None):
        """
        @param discovery: an L{linkproxy.interfaces.IDiscovery}.
        @param reactor: an C{IReactorTime}: the clock for idleness and the sweep timer.
        @param idle_timeout: seconds a watch may go unused before it is evicted.
        @param max_targets: watches held at once; a new one past this evicts the least recently used.
        @param metrics: a L{linkproxy.admin.metrics.Metrics} for C{discovery_updates_total}, or C{None}.
        @param backend: the metric label; the discovery's C{backend} attribute (or class name) by default.
        """
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
        if max_targets < 1 or max_endpoints < 1:
            raise ValueError("max_targets and max_endpoints must be at least 1")
        self.discovery = discovery
        self._reactor = reactor
        self.idle_timeout = float(idle_timeout)
        self.max_targets = max_targets
        self.max_endpoints = max_endpoints
        self.backend = backend if backend is not None else backend_name(discovery)
        self._metrics = discovery_metrics(metrics)
        # Least recently used first.
        self._entries: "OrderedDict[str, Watch]" = OrderedDict()
        self._sweeper = None
        self._closed = False

    def __len__(self):
        return len(self._entries)

    def __contains__(self, target):
        return self.get(target) is not None

    def get(self, target) -> Optional[Watch]:
        """
        The watch of C{target} if there is one; creates nothing.
        """
        entry = self._entries.get(target)
        if entry is None:
            try:
                entry = self._entries.get(normalize_target(target))
            except ValueError:
                return None
        return entry

    def watch(self, target) -> Watch:
        """
        The shared watch of C{target}, starting its resolution when there is none yet, and counting as a use.

        @param target: C{"host:port"}; the host is compared ignoring case.
        @raise ValueError: when C{target} is not C{host:port}, or the cache is closed.
        """
        now = self._reactor.seconds()
        entry = self._entries.get(target)
        if entry is None:
            key = normalize_target(target)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._start(key, now)
        entry.touch(now)
        return entry

    def _start(self, key, now) -> Watch:
        if self._closed:
            raise ValueError("the resolution cache is closed")
        while len(self._entries) >= self.max_targets:
            oldest = next(iter(self._entries.values()))
            _log.info("watching {limit} targets; evicting the least recently used, {target}",
                      limit=self.max_targets, target=oldest.target)
            self._evict(oldest)
        entry = Watch(self, key, now)
        self._entries[key] = entry
        try:
            entry._resolution = self.discovery.resolve(key, entry)
        except Exception:
            # A broken backend must not break the request path: the target simply has no endpoints.
            _log.failure("discovery backend {backend} failed to resolve {target}", backend=self.backend,
                         target=key)
            if entry.endpoints is None:
                entry.reset(())
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._sweep_interval(), self._sweep)
        return entry

    def _sweep_interval(self):
        # A watch is evicted between idle_timeout and 1.25 * idle_timeout after its last use.
        return self.idle_timeout / 4

    def _sweep(self):
        self._sweeper = None
        deadline = self._reactor.seconds() - self.idle_timeout
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.last_used > deadline:
                break
            self._evict(oldest)
        if self._entries and not self._closed:
            self._sweeper = self._reactor.callLater(self._sweep_interval(), self._sweep)

    def evict(self, target) -> bool:
        """
        Evict C{target}'s watch now: cancel its resolution and tell its subscribers.

        @return: C{True} when there was one.
        """
        entry = self.get(target)
        if entry is None:
            return False
        self._evict(entry)
        return True

    def _evict(self, entry: Watch):
        entry.evicted = True
        self._entries.pop(entry.target, None)
        resolution, entry._resolution = entry._resolution, None
        if resolution is not None:
            try:
                resolution.cancel()
            except Exception:
                _log.failure("cancelling the resolution of {target} failed", target=entry.target)
        subscriptions, entry._subscriptions = entry._subscriptions, []
        for subscription in subscriptions:
            if subscription.evicted is not None:
                try:
                    subscription.evicted()
                except Exception:
                    _log.failure("subscriber of {target} failed on eviction", target=entry.target)

    def targets(self) -> List[str]:
        """
        The watched targets, least recently used first.
        """
        return list(self._entries)

    def close(self):
        """
        Evict every watch and stop the sweep timer; later L{watch} calls raise.
        """
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for entry in list(self._entries.values()):
            self._evict(entry)
