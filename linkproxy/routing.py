"""
Routers: the per-direction seam between the protocol layers and discovery/balancing (see L{IRouter}).

Besides C{IRouter.route}, the routers here offer an optional synchronous form, C{route_now(authority)}, for
callers on the data path: nearly every request is answered without waiting, and a Deferred per request (create,
add callbacks, run them) is a measurable part of a hop's CPU. Its contract:

  - it returns the L{ILease} that C{route} would fire with, when that is known at once;
  - it raises the L{linkproxy.core.errors.ProxyError} that C{route} would fail with at once;
  - it returns C{None} when C{route} would have to wait (discovery has not answered yet): the caller then calls
    C{route}, which redoes whatever C{route_now} did before giving up, so nothing is counted twice.

Callers look it up with C{getattr(router, "route_now", None)}; wrapping routers that lack it still work.
L{route_request} does the two steps for them.
"""

from weakref import WeakKeyDictionary, WeakSet

from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.core.errors import NoEndpoints
from linkproxy.interfaces import ILease, IRouter


def route_request(router, route_now, authority, now, later, failed):
    """
    Route one request: with C{route_now} when the router has it and knows the answer at once, else through
    C{router.route}.

    @param route_now: C{router.route_now}, looked up once per connection, or C{None}.
    @param now: called with the lease when it was known at once (still within the caller's event).
    @param later: called with the lease when C{route}'s Deferred fires.
    @param failed: called with a L{Failure} when routing fails, at once or later.
    @return: C{route}'s Deferred while the request waits for it (to cancel it), else C{None}.
    """
    if route_now is not None:
        try:
            lease = route_now(authority)
        except Exception:
            failed(Failure())
            return None
        if lease is not None:
            now(lease)
            return None
    d = router.route(authority)
    d.addCallbacks(later, failed)
    return None if d.called else d


@implementer(ILease)
class FixedLease:
    """
    A lease on an endpoint that no balancer tracks.
    """

    __slots__ = ("endpoint",)

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def release(self, success):
        pass


@implementer(IRouter)
class FixedRouter:
    """
    Routes every request to one endpoint, whatever its authority: the inbound side's route to the local app.
    """

    def __init__(self, endpoint):
        self._lease = FixedLease(endpoint) if endpoint is not None else None

    def route(self, authority):
        if self._lease is None:
            return fail(NoEndpoints("no endpoint configured"))
        return succeed(self._lease)

    def route_now(self, authority):
        """
        The synchronous form of L{route} (see the module docstring); never C{None}.
        """
        if self._lease is None:
            raise NoEndpoints("no endpoint configured")
        return self._lease


@implementer(ILease)
class BalancedLease:
    """
    A request's hold on an endpoint a balancer picked: L{release} reports the outcome to that balancer once.

    @ivar endpoint: the chosen L{Endpoint}.
    @ivar started: when the request started, in reactor seconds.
    """

    __slots__ = ("endpoint", "started", "_balancer", "_reactor")

    def __init__(self, endpoint, balancer, reactor, started):
        self.endpoint = endpoint
        self.started = started
        self._balancer = balancer
        self._reactor = reactor

    def release(self, success):
        """
        Feed the outcome to the balancer: the RTT from L{started} to now on success, none on failure, and
        neither for C{None} (cancelled by the client). Later calls are ignored.
        """
        balancer = self._balancer
        if balancer is None:
            return
        self._balancer = None
        now = self._reactor.seconds()
        balancer.finish(self.endpoint, now, now - self.started if success else None,
                        None if success is None else bool(success))


#: Requests that may wait for one target's first discovery update; past this they fail at once.
MAX_WAITERS_PER_TARGET = 1000
#: Spellings of one target (C{Web:80}, C{web:80}, ...) remembered for the fast path.
_MAX_ALIASES = 8
#: Targets and endpoint series a scrape reports per router; the rest are left out to bound the scrape.
MAX_METRIC_TARGETS = 500
MAX_METRIC_ENDPOINTS = 10000

_STATES = ("ready", "ejected", "probing")


class _Target:
    """
    One logical target of a L{BalancedRouter}: its balancer, fed by the shared resolution.
    """

    __slots__ = ("target", "balancer", "watch", "subscription", "ready", "waiters", "aliases", "_router")

    def __init__(self, router, target, balancer, watch):
        self._router = router
        self.target = target
        self.balancer = balancer
        self.watch = watch
        self.subscription = None
        self.ready = False
        self.waiters = []
        self.aliases = []

    def reset(self, endpoints):
        self._router._updated(self, endpoints)


@implementer(IRouter)
class BalancedRouter:
    """
    Routes each request to an endpoint of its target that the target's balancer picks, from the endpoint set
    discovery keeps current.

    One balancer per target, built from C{balancer_factory}, lives as long as the target's shared resolution:
    both are evicted together after C{idle_timeout} seconds without a request.

    A request to a target that has not had its first discovery update waits for it, at most
    C{first_update_timeout} seconds (then 503, "discovery timed out"); once discovery has answered, a target
    with nothing to pick fails at once (503), saying whether it has no endpoints or all of them are ejected.

    Metrics, read at scrape time from the balancers' snapshots (nothing per request):
    C{balancer_endpoints{direction, target, state}} and C{balancer_endpoint_cost{direction, target, endpoint}}.
    """

    def __init__(self, discovery, balancer_factory, reactor, metrics, *, random=None, first_update_timeout=1.0,
                 direction="outbound", idle_timeout=60.0, cache=None, max_waiters=MAX_WAITERS_PER_TARGET):
        """
        @param discovery: an L{linkproxy.interfaces.IDiscovery}; ignored when C{cache} is given.
        @param balancer_factory: an L{linkproxy.interfaces.IBalancerFactory}.
        @param reactor: an C{IReactorTime}; all times come from its C{seconds()}.
        @param metrics: a L{linkproxy.admin.metrics.Metrics}, or C{None} for no metrics.
        @param random: the L{Random} each balancer's own generator is seeded from (seed it in tests).
        @param first_update_timeout: seconds a request waits for a target's first discovery update.
        @param direction: the C{direction} metric label.
        @param idle_timeout: seconds without a request before a target is evicted (when this router builds its
            own cache).
        @param cache: a L{linkproxy.discovery.cache.ResolutionCache} to share with other routers, or C{None}.
        @param max_waiters: requests that may wait for one target's first update.
        """
        from random import Random

        from linkproxy.discovery.cache import ResolutionCache

        if not first_update_timeout > 0:
            raise ValueError(f"first_update_timeout must be positive, not {first_update_timeout!r}")
        self._owns_cache = cache is None
        self._cache = cache if cache is not None else ResolutionCache(discovery, reactor, idle_timeout,
                                                                      metrics=metrics)
        self._factory = balancer_factory
        self._reactor = reactor
        self._random = random if random is not None else Random()
        self._first_update_timeout = float(first_update_timeout)
        self._max_waiters = max_waiters
        self.direction = direction
        # Spelling of an authority as asked -> target state; several spellings may share one state.
        self._targets = {}
        # Canonical target -> state.
        self._by_key = {}
        self._closed = False
        if metrics is not None:
            _balancer_collector(metrics).add(self)

    @classmethod
    def from_config(cls, config, reactor, metrics, *, direction="outbound", **kwargs):
        """
        Build the router a configuration asks for: C{config.discovery} and C{config.balancer}, waiting for
        discovery no longer than C{config.connect_timeout}.

        @raise KeyError: the balancer or discovery backend is unknown.
        @raise ValueError: the discovery spec is unusable.
        """
        from linkproxy.balancers import find_balancer
        from linkproxy.discovery import build_discovery

        discovery = build_discovery(config.discovery, config, reactor, metrics=metrics)
        kwargs.setdefault("first_update_timeout", config.connect_timeout)
        return cls(discovery, find_balancer(config.balancer), reactor, metrics, direction=direction, **kwargs)

    @property
    def cache(self):
        """
        The L{linkproxy.discovery.cache.ResolutionCache} this router's resolutions come from.
        """
        return self._cache

    def targets(self):
        """
        The canonical targets this router holds a balancer for, sorted.
        """
        return sorted(self._by_key)

    def balancer(self, target):
        """
        The balancer of C{target}, or C{None} (for the dashboard and tests).
        """
        state = self._state(target)
        return state.balancer if state is not None else None

    def _state(self, target):
        state = self._targets.get(target)
        if state is None:
            try:
                state = self._by_key.get(_normalize(target))
            except ValueError:
                return None
        return state

    def route(self, authority):
        """
        Pick an endpoint of C{authority} (C{"host:port"}).

        @return: a L{Deferred} firing with a L{BalancedLease}, or failing with L{NoEndpoints}.
        """
        try:
            state = self._targets.get(authority) or self._new_state(authority)
            now = self._reactor.seconds()
            state.watch.touch(now)
            if state.ready:
                return succeed(self._lease(state, now))
        except NoEndpoints as e:
            return fail(e)
        return self._wait(state)

    def route_now(self, authority):
        """
        The synchronous form of L{route} (see the module docstring).

        @return: a L{BalancedLease}, or C{None} while the target waits for its first discovery update.
        @raise NoEndpoints: when L{route} would fail at once.
        """
        state = self._targets.get(authority) or self._new_state(authority)
        now = self._reactor.seconds()
        state.watch.touch(now)
        if not state.ready:
            return None
        return self._lease(state, now)

    def _new_state(self, authority):
        # The target state for an authority spelling not seen yet; NoEndpoints when it cannot be routed.
        if self._closed:
            raise NoEndpoints(f"no endpoints for {authority}: the proxy is shutting down")
        try:
            return self._target(authority)
        except ValueError as e:
            raise NoEndpoints(f"invalid authority {authority!r}: {e}")

    def _target(self, authority):
        from random import Random

        key = _normalize(authority)
        state = self._by_key.get(key)
        if state is None:
            watch = self._cache.watch(key)
            balancer = self._factory.build(Random(self._random.getrandbits(64)))
            state = _Target(self, key, balancer, watch)
            self._by_key[key] = state
            state.subscription = watch.subscribe(state, evicted=lambda: self._evicted(state))
        if len(state.aliases) < _MAX_ALIASES:
            state.aliases.append(authority)
            self._targets[authority] = state
        return state

    def _updated(self, state, endpoints):
        now = self._reactor.seconds()
        state.balancer.update(endpoints, now)
        state.ready = True
        waiters, state.waiters = state.waiters, []
        for deferred, timer in waiters:
            if timer.active():
                timer.cancel()
            # Hand over the result of the pick; the request's Deferred fires with the lease or the failure.
            try:
                lease = self._lease(state, now)
            except NoEndpoints as e:
                deferred.errback(e)
            else:
                deferred.callback(lease)

    def _lease(self, state, now):
        # A lease on the endpoint the balancer picks; NoEndpoints when it has none to give.
        balancer = state.balancer
        endpoint = balancer.pick(now)
        if endpoint is None:
            raise NoEndpoints(_why(state, now))
        balancer.start(endpoint, now)
        return BalancedLease(endpoint, balancer, self._reactor, now)

    def _wait(self, state):
        if len(state.waiters) >= self._max_waiters:
            return fail(NoEndpoints(f"no endpoints for {state.target}: too many requests waiting for discovery"))
        waiter = []

        def cancel(deferred):
            if waiter in state.waiters:
                state.waiters.remove(waiter)
            if waiter[1].active():
                waiter[1].cancel()

        deferred = Deferred(cancel)
        timer = self._reactor.callLater(self._first_update_timeout, self._timed_out, state, waiter)
        waiter.extend((deferred, timer))
        state.waiters.append(waiter)
        return deferred

    def _timed_out(self, state, waiter):
        if waiter in state.waiters:
            state.waiters.remove(waiter)
            waiter[0].errback(NoEndpoints(
                f"no endpoints for {state.target}: discovery timed out after {self._first_update_timeout:g} s"))

    def _evicted(self, state):
        self._forget(state, f"no endpoints for {state.target}: discovery of it stopped")

    def _forget(self, state, reason):
        if self._by_key.get(state.target) is state:
            del self._by_key[state.target]
        for alias in state.aliases:
            if self._targets.get(alias) is state:
                del self._targets[alias]
        waiters, state.waiters = state.waiters, []
        for deferred, timer in waiters:
            if timer.active():
                timer.cancel()
            deferred.errback(NoEndpoints(reason))

    def snapshot(self, now=None):
        """
        The balancers' view for metrics and the dashboard.

        @return: C{[(target, [(endpoint, state, cost), ...]), ...]} sorted by target.
        """
        if now is None:
            now = self._reactor.seconds()
        return [(key, self._by_key[key].balancer.snapshot(now)) for key in sorted(self._by_key)]

    def close(self):
        """
        Stop: fail waiting requests, drop every balancer, and cancel the resolutions (when this router owns its
        cache). Later routes fail with L{NoEndpoints}.
        """
        self._closed = True
        for state in list(self._by_key.values()):
            if state.subscription is not None:
                state.subscription.cancel()
            self._forget(state, f"no endpoints for {state.target}: the proxy is shutting down")
        if self._owns_cache:
            self._cache.close()


def _normalize(authority):
    from linkproxy.discovery import normalize_target

    return normalize_target(authority)


def _why(state, now):
    """
    Why C{state}'s balancer had nothing to pick, as the C{l5d-proxy-error} text.
    """
    snapshot = state.balancer.snapshot(now)
    target = state.target
    if not snapshot:
        return f"no endpoints for {target}"
    total = len(snapshot)
    unavailable = sum(1 for _, s, _ in snapshot if s != "ready")
    drained = sum(1 for endpoint, s, _ in snapshot if s == "ready" and not endpoint.weight > 0)
    if unavailable == total:
        return f"all {total} endpoints of {target} are ejected"
    if drained == total:
        return f"all {total} endpoints of {target} have weight 0"
    return f"no available endpoint of {target} ({unavailable} ejected, {drained} with weight 0, of {total})"


class RouterService(Service):
    """
    Ties a L{BalancedRouter} to the process's service tree, so stopping the proxy cancels its discovery
    watches and timers.
    """

    def __init__(self, router):
        self.router = router
        self.setName(f"router-{router.direction}")

    def stopService(self):
        Service.stopService(self)
        self.router.close()


class _BalancerCollector:
    """
    The C{balancer_*} families of one registry, read from every registered router at scrape time.
    """

    def __init__(self):
        self._routers = WeakSet()

    def add(self, router):
        self._routers.add(router)

    def describe(self):
        # Declared so the registry refuses a second registration of these names, yet collects lazily.
        return [GaugeMetricFamily("balancer_endpoints", "", labels=()),
                GaugeMetricFamily("balancer_endpoint_cost", "", labels=())]

    def collect(self):
        counts = GaugeMetricFamily(
            "balancer_endpoints", "Endpoints of each target's balancer, by state",
            labels=("direction", "target", "state"))
        costs = GaugeMetricFamily(
            "balancer_endpoint_cost", "Each endpoint's load as its balancer measures it (peak-EWMA cost, "
            "or requests in flight)", labels=("direction", "target", "endpoint"))
        series = 0
        for router in sorted(list(self._routers), key=lambda r: r.direction):
            for target, snapshot in router.snapshot()[:MAX_METRIC_TARGETS]:
                by_state = dict.fromkeys(_STATES, 0)
                for endpoint, state, cost in snapshot:
                    by_state[state] = by_state.get(state, 0) + 1
                    if series < MAX_METRIC_ENDPOINTS:
                        series += 1
                        costs.add_metric((router.direction, target, endpoint.addr_str), float(cost))
                for state, count in by_state.items():
                    counts.add_metric((router.direction, target, state), count)
        return [counts, costs]


_COLLECTORS = WeakKeyDictionary()


def _balancer_collector(metrics):
    collector = _COLLECTORS.get(metrics)
    if collector is None:
        collector = _COLLECTORS[metrics] = _BalancerCollector()
        metrics.registry.register(collector)
    return collector
