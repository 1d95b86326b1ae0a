"""
Routers: the per-direction seam between the protocol layers and discovery/balancing (see L{IRouter}).

Both routers here provide L{ISyncRouter}: besides C{route(authority, avoid=None)} they offer the synchronous
C{route_now(authority, avoid=None)} for callers on the data path, since nearly every request is answered
without waiting and a Deferred per request (create, add callbacks, run them) is a measurable part of a hop's
CPU. Its contract:

  - it returns the L{ILease} that C{route} would fire with, when that is known at once;
  - it raises the L{linkproxy.core.errors.ProxyError} that C{route} would fail with at once;
  - it returns C{None} when C{route} would have to wait (discovery has not answered yet): the caller then calls
    C{route}, which redoes whatever C{route_now} did before giving up, so nothing is counted twice.

C{avoid} is the endpoint a retried request just failed on: the lease is on another endpoint whenever the
target has another one available. L{route_request} does the two steps for callers, and also works with
wrapping routers that only have C{route(authority)}.

Circuit breaking (L{BalancedRouter}): what counts as a failure is decided by the protocol glue with
L{linkproxy.core.classify} and reported through L{ILease.release}; the balancers eject an endpoint after 7
consecutive failures and probe it about once a second (L{linkproxy.core.accrual}). When every endpoint of a
target that has a weight is ejected, the router is in panic mode for that target: it sends each request to
the endpoint the balancer's C{panic_pick} offers (the one that failed least recently) instead of answering
503, counting C{balancer_panic_total}. Ejections, recoveries and panic mode's start and end are logged at
info, once per transition.
"""

from weakref import WeakKeyDictionary, WeakSet

from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.admin.metrics import CounterFamily
from linkproxy.core.errors import NoEndpoints
from linkproxy.interfaces import ILease, ISyncRouter

log = Logger(namespace="linkproxy.routing")

#: How often a router asks a balancer whose C{pick} takes no C{avoid} again, to steer a retry elsewhere.
AVOID_REPICKS = 3


def route_request(router, route_now, authority, now, later, failed, avoid=None):
    """
    Route one request: with C{route_now} when the router has it and knows the answer at once, else through
    C{router.route}.

    @param route_now: C{router.route_now}, looked up once per connection, or C{None}.
    @param now: called with the lease when it was known at once (still within the caller's event).
    @param later: called with the lease when C{route}'s Deferred fires.
    @param failed: called with a L{Failure} when routing fails, at once or later.
    @param avoid: the L{linkproxy.core.endpoint.Endpoint} a retried request just failed on, or C{None}.
        Passed on only when it is not C{None}, so routers whose methods take just the authority still work
        for first attempts.
    @return: C{route}'s Deferred while the request waits for it (to cancel it), else C{None}.
    """
    if route_now is not None:
        try:
            lease = route_now(authority) if avoid is None else route_now(authority, avoid)
        except Exception:
            failed(Failure())
            return None
        if lease is not None:
            now(lease)
            return None
    d = router.route(authority) if avoid is None else router.route(authority, avoid)
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

    def release(self, success, at=None):
        """
        Nothing tracks this endpoint, so the outcome is dropped.
        """


@implementer(ISyncRouter)
class FixedRouter:
    """
    Routes every request to one endpoint, whatever its authority: the inbound side's route to the local app.
    C{avoid} is ignored: there is no other endpoint to steer to.
    """

    def __init__(self, endpoint):
        self._lease = FixedLease(endpoint) if endpoint is not None else None

    def route(self, authority, avoid=None):
        """
        @return: a fired L{Deferred} with the one lease, or failing with L{NoEndpoints}.
        """
        if self._lease is None:
            return fail(NoEndpoints("no endpoint configured"))
        return succeed(self._lease)

    def route_now(self, authority, avoid=None):
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

    def release(self, success, at=None):
        """
        Feed the outcome to the balancer: on success the RTT from L{started} to C{at} (the response head's
        time) or, without it, to now; no RTT on failure; and neither for C{None} (not the endpoint's doing).
        Later calls are ignored.
        """
        balancer = self._balancer
        if balancer is None:
            return
        self._balancer = None
        now = self._reactor.seconds()
        if success:
            balancer.finish(self.endpoint, now, (now if at is None else at) - self.started, True)
        else:
            balancer.finish(self.endpoint, now, None, None if success is None else False)


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

    __slots__ = ("target", "balancer", "watch", "subscription", "ready", "waiters", "aliases", "_router",
                 "avoids", "panic_pick", "panicking", "panic_counter")

    def __init__(self, router, target, balancer, watch):
        self._router = router
        self.target = target
        self.balancer = balancer
        self.watch = watch
        self.subscription = None
        self.ready = False
        self.waiters = []
        self.aliases = []
        # What the balancer offers beyond IBalancer, found out once here rather than per request.
        self.avoids = _takes_avoid(balancer)
        self.panic_pick = getattr(balancer, "panic_pick", None)
        self.panicking = False
        self.panic_counter = None

    def reset(self, endpoints):
        self._router._updated(self, endpoints)


@implementer(ISyncRouter)
class BalancedRouter:
    """
    Routes each request to an endpoint of its target that the target's balancer picks, from the endpoint set
    discovery keeps current.

    One balancer per target, built from C{balancer_factory}, lives as long as the target's shared resolution:
    both are evicted together after C{idle_timeout} seconds without a request.

    A request to a target that has not had its first discovery update waits for it, at most
    C{first_update_timeout} seconds (then 503, "discovery timed out"); once discovery has answered, a target
    with nothing to pick fails at once (503), saying whether it has no endpoints or all of them are ejected.

    When every endpoint that has a weight is ejected, requests still go out, to the endpoint the balancer's
    C{panic_pick} gives (panic mode; balancers without C{panic_pick} answer 503 as before).

    Metrics, read at scrape time from the balancers' snapshots (nothing per request):
    C{outbound_http_balancer_endpoints{direction, target, backend_name, endpoint_state}} and
    C{balancer_endpoint_cost{direction, target, endpoint}};
    and C{balancer_panic_total{direction, target}}, requests sent in panic mode.
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
        self._collector = None
        if metrics is not None:
            self._collector = _balancer_collector(metrics)
            self._collector.add(self)

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

    def route(self, authority, avoid=None):
        """
        Pick an endpoint of C{authority} (C{"host:port"}).

        @param avoid: an L{linkproxy.core.endpoint.Endpoint} not to pick while the target has another available
            (a retry's previous endpoint), or C{None}.
        @return: a L{Deferred} firing with a L{BalancedLease}, or failing with L{NoEndpoints}.
        """
        try:
            state = self._targets.get(authority) or self._new_state(authority)
            now = self._reactor.seconds()
            state.watch.touch(now)
            if state.ready:
                return succeed(self._lease(state, now, avoid))
        except NoEndpoints as e:
            return fail(e)
        return self._wait(state, avoid)

    def route_now(self, authority, avoid=None):
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
        return self._lease(state, now, avoid)

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
            listen = getattr(balancer, "listen", None)
            if listen is not None:
                listen(self._listener(state))
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
        for deferred, timer, avoid in waiters:
            if timer.active():
                timer.cancel()
            # Hand over the result of the pick; the request's Deferred fires with the lease or the failure.
            try:
                lease = self._lease(state, now, avoid)
            except NoEndpoints as e:
                deferred.errback(e)
            else:
                deferred.callback(lease)

    def _lease(self, state, now, avoid=None):
        # A lease on the endpoint the balancer picks (in panic mode, the one it falls back to); NoEndpoints
        # when it has none to give. The hot path is the first branch and one flag test.
        balancer = state.balancer
        if avoid is None:
            endpoint = balancer.pick(now)
        else:
            endpoint = self._pick_avoiding(state, now, avoid)
        if endpoint is None:
            endpoint = self._panic(state, now, avoid)
        elif state.panicking:
            self._panic_over(state, now)
        balancer.start(endpoint, now)
        return BalancedLease(endpoint, balancer, self._reactor, now)

    def _pick_avoiding(self, state, now, avoid):
        balancer = state.balancer
        if state.avoids:
            return balancer.pick(now, avoid)
        # A plugin that cannot be told: ask again a few times; if it keeps choosing avoid, take it (a retry to
        # the same endpoint beats no retry).
        address = avoid.address
        for _ in range(AVOID_REPICKS):
            endpoint = balancer.pick(now)
            if endpoint is None or endpoint.address != address:
                return endpoint
        return endpoint

    def _panic(self, state, now, avoid):
        # Nothing available: every endpoint with a weight is ejected (or probing with its probe out), or
        # there is none. Panic mode sends to the balancer's fallback rather than failing all traffic.
        panic_pick = state.panic_pick
        endpoint = panic_pick(now, avoid) if panic_pick is not None else None
        if endpoint is None:
            raise NoEndpoints(_why(state, now))
        counter = state.panic_counter
        if counter is None:
            counter = state.panic_counter = self._panic_counter(state.target)
        counter.inc()
        if not state.panicking:
            state.panicking = True
            log.info("{direction} target {target}: all {count} endpoints are ejected; panic mode: sending to "
                     "the least recently failed ({endpoint})", direction=self.direction, target=state.target,
                     count=len(state.balancer.snapshot(now)), endpoint=endpoint.addr_str, event="panic",
                     reason="all endpoints ejected")
        return endpoint

    def _panic_over(self, state, now):
        # Only reached while panicking. A probe is picked the ordinary way, yet is no sign of recovery: panic
        # mode lasts until an endpoint is ready again, so that a dead target logs one entry, not one a second.
        if not any(s == "ready" for _, s, _ in state.balancer.snapshot(now)):
            return
        state.panicking = False
        log.info("{direction} target {target}: an endpoint is available again; panic mode over",
                 direction=self.direction, target=state.target, event="panic_over",
                 reason="endpoint available")

    def _panic_counter(self, target):
        if self._collector is None:
            return _NO_COUNTER
        return self._collector.panic_child(self.direction, target)

    def _listener(self, state):
        # What the balancer reports ejections and recoveries to: logged here, where the target is known.
        direction = self.direction

        def transition(endpoint, event, reason):
            log.info("{direction} endpoint {endpoint} of {target} {event}: {reason}", direction=direction,
                     endpoint=endpoint.addr_str, target=state.target, event=event, reason=reason)

        return transition

    def _wait(self, state, avoid=None):
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
        waiter.extend((deferred, timer, avoid))
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
        for deferred, timer, _ in waiters:
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


def _takes_avoid(balancer):
    """
    Whether C{balancer.pick} has an C{avoid} parameter (L{linkproxy.interfaces.IResilientBalancer}), from its
    signature, once: older plugins' C{pick(now)} would raise L{TypeError} if given one.
    """
    from inspect import Parameter, signature

    try:
        parameters = signature(balancer.pick).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    avoid = parameters.get("avoid")
    return avoid is not None and avoid.kind in (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD)


class _NoCounter:
    """
    Stands in for a counter child when the router has no metrics.
    """

    def inc(self, amount=1):
        pass


_NO_COUNTER = _NoCounter()


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
        # Panic-mode requests: a plain counter family, whose children routers bind once per target, so that
        # it survives target eviction and costs one addition per panic request.
        self.panic = CounterFamily("balancer_panic", "Requests sent to an ejected endpoint because every "
                                   "endpoint of their target was ejected (panic mode)", ("direction", "target"))
        self._panic_keys = set()

    def add(self, router):
        self._routers.add(router)

    def panic_child(self, direction, target):
        """
        The C{balancer_panic_total} child of one target; past L{MAX_METRIC_TARGETS} targets new ones share
        C{target="overflow"}, bounding the series a scrape reports.
        """
        key = (direction, target)
        if key not in self._panic_keys:
            if len(self._panic_keys) >= MAX_METRIC_TARGETS:
                return self.panic.labels(direction, "overflow")
            self._panic_keys.add(key)
        return self.panic.labels(direction, target)

    def describe(self):
        # Declared so the registry refuses a second registration of these names, yet collects lazily.
        return [GaugeMetricFamily("outbound_http_balancer_endpoints", "", labels=()),
                GaugeMetricFamily("balancer_endpoint_cost", "", labels=()),
                self.panic.describe()]

    def collect(self):
        # Linkerd's name and label (endpoint_state="ready"|"pending"); linkproxy's states are ready, ejected
        # and probing (an ejected endpoint on trial), so those are the values. The HTTP and TCP balancers of a
        # target are one balancer here, hence one family.
        counts = GaugeMetricFamily(
            "outbound_http_balancer_endpoints", "Endpoints of each target's balancer, by state",
            labels=("direction", "target", "backend_name", "endpoint_state"))
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
                    counts.add_metric((router.direction, target, target, state), count)
        return [counts, costs, self.panic.collect()]


_COLLECTORS = WeakKeyDictionary()


def _balancer_collector(metrics):
    collector = _COLLECTORS.get(metrics)
    if collector is None:
        collector = _COLLECTORS[metrics] = _BalancerCollector()
        metrics.registry.register(collector)
    return collector
