"""
Tests for L{linkproxy.routing.BalancedRouter}: discovery (a L{FakeDiscovery}) feeding real balancers, with time
on a L{Clock}.
"""

from random import Random

from prometheus_client import generate_latest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from linkproxy.admin.metrics import Metrics
from linkproxy.balancers import find_balancer
from linkproxy.config import Config
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import NoEndpoints
from linkproxy.discovery.cache import ResolutionCache
from linkproxy.interfaces import ILease, IRouter, ISyncRouter
from linkproxy.routing import AVOID_REPICKS, BalancedLease, BalancedRouter, FixedRouter, RouterService, route_request
from linkproxy.testing import FakeDiscovery

A = ("127.0.0.1", 8081)
B = ("127.0.0.1", 8082)


def result(d):
    """
    The result of a fired L{Deferred}, raising its failure.
    """
    out = []
    d.addBoth(out.append)
    if not out:
        raise AssertionError(f"{d!r} has not fired")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def failure_reason(testcase, d):
    """
    The C{reason} of the L{NoEndpoints} C{d} failed with.
    """
    error = testcase.failureResultOf(d, NoEndpoints).value
    testcase.assertEqual(error.status, 503)
    return error.reason


class SpyFactory:
    """
    A balancer factory wrapping a real one, recording every C{finish}.
    """

    name = "spy"

    def __init__(self, real):
        self.real = real
        self.finished = []
        self.built = []

    def build(self, random):
        spy = self
        inner = self.real.build(random)

        class Spy:
            def __getattr__(self, name):
                return getattr(inner, name)

            def finish(self, endpoint, now, rtt, success):
                spy.finished.append((endpoint.address, now, rtt, success))
                inner.finish(endpoint, now, rtt, success)

        balancer = Spy()
        self.built.append(balancer)
        return balancer


class NoPanicFactory:
    """
    A balancer factory wrapping a real one, hiding everything beyond L{IBalancer}: an older plugin.
    """

    name = "no-panic"

    def __init__(self, real):
        self.real = real

    def build(self, random):
        inner = self.real.build(random)

        class Old:
            def update(self, endpoints, now):
                inner.update(endpoints, now)

            def pick(self, now):
                return inner.pick(now)

            def start(self, endpoint, now):
                inner.start(endpoint, now)

            def finish(self, endpoint, now, rtt, success):
                inner.finish(endpoint, now, rtt, success)

            def snapshot(self, now):
                return inner.snapshot(now)

        return Old()


class StubbornFactory:
    """
    Builds old-style balancers that always pick the first endpoint, counting their picks.
    """

    name = "stubborn"

    def __init__(self):
        self.picks = 0

    def build(self, random):
        factory = self

        class Stubborn:
            endpoints = []

            def update(self, endpoints, now):
                self.endpoints = list(endpoints)

            def pick(self, now):
                factory.picks += 1
                return self.endpoints[0] if self.endpoints else None

            def start(self, endpoint, now):
                pass

            def finish(self, endpoint, now, rtt, success):
                pass

            def snapshot(self, now):
                return [(e, "ready", 0.0) for e in self.endpoints]

        return Stubborn()


class BalancedRouterTests(unittest.TestCase):
    """
    L{BalancedRouter} over a L{FakeDiscovery}.
    """

    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.discovery = FakeDiscovery()

    def router(self, balancer="round-robin", **kwargs):
        kwargs.setdefault("first_update_timeout", 1.0)
        return BalancedRouter(self.discovery, kwargs.pop("factory", None) or find_balancer(balancer), self.clock,
                              self.metrics, random=Random(1), **kwargs)

    def test_interfaces(self):
        """
        The router provides L{IRouter} and its leases L{ILease}.
        """
        self.discovery.push("web:80", [A])
        router = self.router()
        self.assertTrue(verifyObject(IRouter, router))
        self.assertTrue(verifyObject(ISyncRouter, router))
        lease = result(router.route("web:80"))
        self.assertIsInstance(lease, BalancedLease)
        self.assertTrue(verifyObject(ILease, lease))
        self.assertEqual(lease.endpoint, Endpoint(address=A))

    def test_waitsForFirstUpdate(self):
        """
        A request to a target discovery has not answered yet waits for its first update.
        """
        router = self.router()
        d = router.route("web:80")
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.discovery.push("web:80", [A])
        self.assertEqual(result(d).endpoint.address, A)
        self.assertEqual(self.clock.getDelayedCalls()[0].func.__name__, "_sweep")

    def test_firstUpdateTimeout(self):
        """
        Discovery not answering within C{first_update_timeout} fails the request with 503; the next one waits
        again.
        """
        router = self.router(first_update_timeout=2.0)
        d = router.route("web:80")
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIn("discovery timed out", failure_reason(self, d))
        again = router.route("web:80")
        self.assertNoResult(again)
        self.discovery.push("web:80", [B])
        self.assertEqual(result(again).endpoint.address, B)

    def test_firstUpdateEmpty(self):
        """
        Waiting requests whose first update is an empty set fail with "no endpoints".
        """
        router = self.router()
        d = router.route("web:80")
        self.discovery.push("web:80", [])
        self.assertEqual(failure_reason(self, d), "no endpoints for web:80")

    def test_cancelWaiting(self):
        """
        Cancelling a waiting request removes it and its timer.
        """
        router = self.router()
        d = router.route("web:80")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual([c.func.__name__ for c in self.clock.getDelayedCalls()], ["_sweep"])
        self.discovery.push("web:80", [A])

    def test_boundedWaiters(self):
        """
        Past C{max_waiters}, requests for a target still waiting for discovery fail at once.
        """
        router = self.router(max_waiters=2)
        router.route("web:80")
        router.route("web:80")
        self.assertIn("too many requests waiting", failure_reason(self, router.route("web:80")))

    def test_noEndpoints(self):
        """
        Once discovery says a target has no endpoints, requests fail fast with 503 "no endpoints for X".
        """
        self.discovery.push("web:80", [])
        router = self.router()
        self.assertEqual(failure_reason(self, router.route("web:80")), "no endpoints for web:80")

    def test_allEjected(self):
        """
        With a balancer that has no C{panic_pick} (an older plugin), when every endpoint is ejected after
        failures the 503 says so; after the ejection backoff a probe is let through.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router(factory=NoPanicFactory(find_balancer("round-robin")))
        for _ in range(14):
            result(router.route("web:80")).release(False)
        self.assertEqual(failure_reason(self, router.route("web:80")), "all 2 endpoints of web:80 are ejected")
        self.clock.advance(120.0)
        probe = result(router.route("web:80"))
        probe.release(True)
        states = {e.address: s for e, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states[probe.endpoint.address], "ready")

    def test_drained(self):
        """
        Endpoints of weight 0 are never picked, and the 503 says why.
        """
        self.discovery.push("web:80", [Endpoint(address=A, weight=0)])
        router = self.router()
        self.assertEqual(failure_reason(self, router.route("web:80")), "all 1 endpoints of web:80 have weight 0")

    def test_leaseReleasesOnce(self):
        """
        A lease reports its outcome to the balancer exactly once: the RTT since the route on success, none on
        failure.
        """
        spy = SpyFactory(find_balancer("p2c-ewma"))
        self.discovery.push("web:80", [A])
        router = self.router(factory=spy)
        lease = result(router.route("web:80"))
        self.clock.advance(0.25)
        lease.release(True)
        lease.release(False)
        self.assertEqual(spy.finished, [(A, 0.25, 0.25, True)])
        failed = result(router.route("web:80"))
        failed.release(False)
        failed.release(True)
        self.assertEqual(spy.finished[1:], [(A, 0.25, None, False)])

    def test_pendingFeedsBalancer(self):
        """
        With least-request, open leases count as load and released ones stop counting.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router("least-request")
        held = [result(router.route("web:80")) for _ in range(4)]
        self.assertEqual(sorted(lease.endpoint.address for lease in held), [A, A, B, B])
        for lease in held:
            if lease.endpoint.address == A:
                lease.release(True)
        picks = {result(router.route("web:80")).endpoint.address for _ in range(2)}
        self.assertEqual(picks, {A})

    def test_ejectionMovesTraffic(self):
        """
        An endpoint that keeps failing is ejected and traffic moves to the others.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router("p2c-ewma")
        failures = 0
        for _ in range(200):
            lease = result(router.route("web:80"))
            ok = lease.endpoint.address == B
            failures += not ok
            lease.release(ok)
            if failures == 7:
                break
        self.assertEqual(failures, 7)
        picks = {result(router.route("web:80")).endpoint.address for _ in range(50)}
        self.assertEqual(picks, {B})

    def test_liveUpdate(self):
        """
        Later updates replace the set the balancer picks from.
        """
        self.discovery.push("web:80", [A])
        router = self.router()
        self.assertEqual(result(router.route("web:80")).endpoint.address, A)
        self.discovery.push("web:80", [B])
        self.assertEqual(result(router.route("web:80")).endpoint.address, B)

    def test_oneResolutionPerTarget(self):
        """
        Spellings of a target differing in case share one resolution and one balancer; routers sharing a cache
        share resolutions too.
        """
        self.discovery.push("web:80", [A])
        cache = ResolutionCache(self.discovery, self.clock)
        router = self.router(cache=cache)
        other = self.router(cache=cache, direction="inbound")
        for authority in ["web:80", "WEB:80", "Web:80", "web:80"]:
            result(router.route(authority))
        result(other.route("web:80"))
        self.assertEqual(self.discovery.resolved, ["web:80"])
        self.assertEqual(router.targets(), ["web:80"])

    def test_invalidAuthority(self):
        """
        An authority that is not C{host:port} fails with 503 and resolves nothing.
        """
        router = self.router()
        self.assertIn("invalid authority", failure_reason(self, router.route("web")))
        self.assertEqual(self.discovery.resolved, [])

    def test_idleEviction(self):
        """
        A target without requests for C{idle_timeout} loses its balancer and resolution together; a later
        request starts both afresh.
        """
        self.discovery.push("web:80", [A])
        router = self.router(idle_timeout=10.0)
        first = router.balancer("web:80")
        self.assertIsNone(first)
        result(router.route("web:80"))
        first = router.balancer("web:80")
        for _ in range(5):
            self.clock.advance(9.0)
            result(router.route("web:80"))
        self.assertEqual(self.discovery.cancelled, [])
        self.clock.advance(12.5)
        self.assertEqual((router.targets(), self.discovery.cancelled), ([], ["web:80"]))
        result(router.route("web:80"))
        self.assertIsNot(router.balancer("web:80"), first)
        self.assertEqual(self.discovery.resolved, ["web:80", "web:80"])

    def test_close(self):
        """
        Closing fails waiting requests, cancels resolutions and timers, and later requests fail.
        """
        router = self.router()
        waiting = router.route("db:5432")
        service = RouterService(router)
        service.startService()
        service.stopService()
        self.assertIn("shutting down", failure_reason(self, waiting))
        self.assertEqual(self.discovery.cancelled, ["db:5432"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("shutting down", failure_reason(self, router.route("db:5432")))

    def test_metrics(self):
        """
        Endpoint counts by state and per-endpoint costs are read from the balancers at scrape time, alongside
        discovery's update counts.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router("least-request")
        failures = 0
        for _ in range(100):
            lease = result(router.route("web:80"))
            failures += lease.endpoint.address == A
            lease.release(lease.endpoint.address != A)
            if failures == 7:
                break
        held = result(router.route("web:80"))
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('outbound_http_balancer_endpoints{backend_name="web:80",direction="outbound",'
                      'endpoint_state="ready",target="web:80"} 1.0', text)
        self.assertIn('outbound_http_balancer_endpoints{backend_name="web:80",direction="outbound",'
                      'endpoint_state="ejected",target="web:80"} 1.0', text)
        self.assertIn('outbound_http_balancer_endpoints{backend_name="web:80",direction="outbound",'
                      'endpoint_state="probing",target="web:80"} 0.0', text)
        self.assertIn(f'balancer_endpoint_cost{{direction="outbound",endpoint="{held.endpoint.addr_str}",'
                      f'target="web:80"}} 2.0', text)
        self.assertIn('discovery_updates_total{backend="fake",target="web:80"} 1.0', text)
        # A second router on the same registry joins the same families rather than clashing.
        self.router(direction="inbound")

    def test_fromConfig(self):
        """
        C{from_config} builds discovery and balancer from the configuration.
        """
        config = Config(discovery="static:web:80=127.0.0.1:8081",
                        static_endpoints=(("web:80", A),), balancer="random")
        router = BalancedRouter.from_config(config, self.clock, self.metrics)
        self.assertEqual(result(router.route("web:80")).endpoint.address, A)
        self.assertEqual(failure_reason(self, router.route("other:80")), "no endpoints for other:80")
        router.close()

    def test_routeNow(self):
        """
        C{route_now} answers as C{route} would, without a Deferred: a lease counted by the balancer when one can
        be given at once, C{None} while discovery has not answered (then C{route} waits as usual).
        """
        spy = SpyFactory(find_balancer("p2c-ewma"))
        router = self.router(factory=spy)
        self.assertIsNone(router.route_now("web:80"))
        d = router.route("web:80")
        self.assertNoResult(d)
        self.discovery.push("web:80", [A])
        waited = result(d)
        lease = router.route_now("web:80")
        self.assertIsInstance(lease, BalancedLease)
        self.assertEqual(lease.endpoint.address, A)
        self.assertEqual(router.balancer("web:80").snapshot(self.clock.seconds())[0][2], 0.030 * 3)
        self.clock.advance(0.25)
        lease.release(True)
        waited.release(True)
        self.assertEqual(spy.finished, [(A, 0.25, 0.25, True), (A, 0.25, 0.25, True)])

    def test_routeNowFailures(self):
        """
        C{route_now} raises the L{NoEndpoints} C{route} would fail with: invalid authority, no endpoints, all
        ejected, and after L{BalancedRouter.close}.
        """
        self.discovery.push("web:80", [])
        self.discovery.push("api:80", [A])
        router = self.router(factory=NoPanicFactory(find_balancer("round-robin")))
        self.assertEqual(self.assertRaises(NoEndpoints, router.route_now, "web:80").reason,
                         "no endpoints for web:80")
        self.assertIn("invalid authority", self.assertRaises(NoEndpoints, router.route_now, "web:x").reason)
        for _ in range(7):
            router.route_now("api:80").release(False)
        self.assertEqual(self.assertRaises(NoEndpoints, router.route_now, "api:80").reason,
                         "all 1 endpoints of api:80 are ejected")
        router.close()
        self.assertIn("shutting down", self.assertRaises(NoEndpoints, router.route_now, "new:80").reason)


class FixedRouterTests(unittest.TestCase):
    """
    L{FixedRouter}: one endpoint for every authority.
    """

    def test_route(self):
        """
        C{route} and C{route_now} hand out the same lease on the configured endpoint.
        """
        router = FixedRouter(Endpoint(address=A))
        self.assertTrue(verifyObject(IRouter, router))
        lease = result(router.route("anything:80"))
        self.assertEqual(lease.endpoint.address, A)
        self.assertIs(router.route_now("other:80"), lease)

    def test_noEndpoint(self):
        """
        Without an endpoint, both fail with L{NoEndpoints}.
        """
        router = FixedRouter(None)
        self.failureResultOf(router.route("web:80"), NoEndpoints)
        self.assertRaises(NoEndpoints, router.route_now, "web:80")


class RouteRequestTests(unittest.SynchronousTestCase):
    """
    L{route_request} answers at once when C{route_now} can, and otherwise through C{route}'s Deferred.
    """

    def setUp(self):
        self.calls = []
        self.now = lambda lease: self.calls.append(("now", lease))
        self.later = lambda lease: self.calls.append(("later", lease))
        self.failed = lambda failure: self.calls.append(("failed", failure.value))

    def _router(self, deferred):
        router = FixedRouter(Endpoint(A))
        router.route = lambda authority: deferred
        return router

    def test_at_once(self):
        router = FixedRouter(Endpoint(A))
        self.assertIsNone(route_request(router, router.route_now, "web:80", self.now, self.later, self.failed))
        [(how, lease)] = self.calls
        self.assertEqual((how, lease.endpoint), ("now", Endpoint(A)))

    def test_fails_at_once(self):
        router = FixedRouter(None)
        self.assertIsNone(route_request(router, router.route_now, "web:80", self.now, self.later, self.failed))
        [(how, error)] = self.calls
        self.assertEqual(how, "failed")
        self.assertIsInstance(error, NoEndpoints)

    def test_waits(self):
        """
        Without C{route_now}, or when it returns C{None}, the Deferred is returned until it fires.
        """
        router = FixedRouter(Endpoint(A))
        for route_now in (None, lambda authority: None):
            self.calls = []
            waiting = Deferred()
            router.route = lambda authority: waiting
            self.assertIs(route_request(router, route_now, "web:80", self.now, self.later, self.failed), waiting)
            self.assertEqual(self.calls, [])
            waiting.callback("lease")
            self.assertEqual(self.calls, [("later", "lease")])

    def test_fired_deferred_not_returned(self):
        router = self._router(fail(NoEndpoints("none")))
        self.assertIsNone(route_request(router, None, "web:80", self.now, self.later, self.failed))
        self.assertEqual([how for how, _ in self.calls], ["failed"])


class LeaseTimingTests(unittest.SynchronousTestCase):
    """
    L{BalancedLease.release} measures the RTT to the response head when told when it was.
    """

    def setUp(self):
        self.clock = Clock()
        self.discovery = FakeDiscovery()
        self.discovery.push("web:80", [A])
        self.spy = SpyFactory(find_balancer("p2c-ewma"))
        self.router = BalancedRouter(self.discovery, self.spy, self.clock, None, random=Random(2))

    def test_at(self):
        """
        C{release(True, at)} gives the balancer the RTT to C{at} and the outcome's time as C{now}; without
        C{at} the RTT runs to now, and a failure carries no RTT even with C{at}.
        """
        lease = self.router.route_now("web:80")
        self.clock.advance(0.1)
        head = self.clock.seconds()
        self.clock.advance(2.0)
        lease.release(True, head)
        plain = self.router.route_now("web:80")
        self.clock.advance(0.3)
        plain.release(True)
        failed = self.router.route_now("web:80")
        self.clock.advance(0.1)
        failed.release(False, self.clock.seconds())
        neutral = self.router.route_now("web:80")
        neutral.release(None, self.clock.seconds())
        self.assertEqual([(round(rtt, 9) if rtt else rtt, success) for _, _, rtt, success in self.spy.finished],
                         [(0.1, True), (0.3, True), (None, False), (None, None)])
        self.assertEqual(self.spy.finished[0][1], 2.1)

    def test_fixedLease(self):
        """
        A L{FixedRouter}'s lease takes C{at} too, and ignores it.
        """
        lease = FixedRouter(Endpoint(A)).route_now("web:80")
        self.assertTrue(verifyObject(ILease, lease))
        lease.release(True, 1.0)
        lease.release(False)


class AvoidRoutingTests(unittest.SynchronousTestCase):
    """
    C{route(authority, avoid)} and C{route_now(authority, avoid)} steer retries off the endpoint that failed.
    """

    def setUp(self):
        self.clock = Clock()
        self.discovery = FakeDiscovery()
        self.discovery.push("web:80", [A, B])

    def router(self, factory):
        return BalancedRouter(self.discovery, factory, self.clock, None, random=Random(3))

    def test_builtins(self):
        """
        Every built-in balancer, through the router, never gives C{avoid} while the other endpoint is there.
        """
        for name in ("p2c-ewma", "round-robin", "least-request", "random"):
            router = self.router(find_balancer(name))
            for avoid, other in ((A, B), (B, A)):
                for _ in range(50):
                    lease = router.route_now("web:80", Endpoint(avoid))
                    self.assertEqual(lease.endpoint.address, other, name)
                    lease.release(True)
                    lease = result(router.route("web:80", Endpoint(avoid)))
                    self.assertEqual(lease.endpoint.address, other, name)
                    lease.release(True)

    def test_oldStylePlugin(self):
        """
        A plugin whose C{pick} takes no C{avoid} is asked again instead (here round-robin underneath, so the
        second pick is the other endpoint); one that keeps picking C{avoid} is asked L{AVOID_REPICKS} times and
        then its pick is used.
        """
        router = self.router(NoPanicFactory(find_balancer("round-robin")))
        for _ in range(20):
            lease = router.route_now("web:80", Endpoint(A))
            self.assertEqual(lease.endpoint.address, B)
            lease.release(True)
        stubborn = StubbornFactory()
        router = self.router(stubborn)
        self.assertEqual(router.route_now("web:80").endpoint.address, A)
        self.assertEqual(stubborn.picks, 1)
        self.assertEqual(router.route_now("web:80", Endpoint(A)).endpoint.address, A)
        self.assertEqual(stubborn.picks, 1 + AVOID_REPICKS)
        self.assertEqual(router.route_now("web:80", Endpoint(B)).endpoint.address, A)
        self.assertEqual(stubborn.picks, 2 + AVOID_REPICKS)

    def test_waitingRoute(self):
        """
        A retry that has to wait for discovery still avoids the endpoint once the set arrives.
        """
        router = self.router(find_balancer("round-robin"))
        for _ in range(10):
            d = router.route("new%d:80" % (_,), Endpoint(A))
            self.assertNoResult(d)
            self.discovery.push("new%d:80" % (_,), [A, B])
            self.assertEqual(result(d).endpoint.address, B)

    def test_routeRequest(self):
        """
        L{route_request} passes C{avoid} to C{route_now}, or to C{route} when it must wait, and leaves it out
        when it is C{None}, so routers that only know C{route(authority)} keep working.
        """
        calls = []
        router = self.router(find_balancer("round-robin"))
        for _ in range(10):
            route_request(router, router.route_now, "web:80", calls.append, calls.append, calls.append,
                          Endpoint(A))
        self.assertEqual({lease.endpoint.address for lease in calls}, {B})
        calls = []
        for _ in range(10):
            route_request(router, None, "web:80", calls.append, calls.append, calls.append, Endpoint(B))
        self.assertEqual({lease.endpoint.address for lease in calls}, {A})
        seen = []

        class OldRouter:
            def route(self, authority):
                seen.append(authority)
                return router.route(authority)

        route_request(OldRouter(), None, "web:80", calls.append, calls.append, calls.append)
        self.assertEqual(seen, ["web:80"])

    def test_fixedRouterIgnoresAvoid(self):
        """
        L{FixedRouter} has one endpoint and gives it whatever C{avoid} says.
        """
        router = FixedRouter(Endpoint(A))
        self.assertTrue(verifyObject(ISyncRouter, router))
        self.assertEqual(router.route_now("x:80", Endpoint(A)).endpoint.address, A)
        self.assertEqual(result(router.route("x:80", Endpoint(A))).endpoint.address, A)


class PanicModeTests(unittest.SynchronousTestCase):
    """
    When every endpoint of a target is ejected, requests still go out (panic mode), counted and logged.
    """

    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.discovery = FakeDiscovery()

    def router(self, balancer="p2c-ewma", **kwargs):
        return BalancedRouter(self.discovery, find_balancer(balancer), self.clock, self.metrics,
                              random=Random(4), **kwargs)

    def panic_total(self, target="web:80", direction="outbound"):
        text = generate_latest(self.metrics.registry).decode()
        prefix = f'balancer_panic_total{{direction="{direction}",target="{target}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix):])
        return None

    def fail_all(self, router, times, target="web:80"):
        for _ in range(times):
            router.route_now(target).release(False)
            self.clock.advance(0.001)

    def test_singleEndpointStillServes(self):
        """
        One endpoint that failed 7 times in a row still serves the next request (and the ones after), each
        counted in C{balancer_panic_total}; the gauge says it is ejected.
        """
        self.discovery.push("web:80", [A])
        router = self.router()
        self.fail_all(router, 7)
        self.assertIsNone(self.panic_total())
        for i in range(5):
            lease = router.route_now("web:80")
            self.assertEqual(lease.endpoint.address, A)
            lease.release(False)
            self.assertEqual(self.panic_total(), i + 1.0)
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('outbound_http_balancer_endpoints{backend_name="web:80",direction="outbound",'
                      'endpoint_state="ejected",target="web:80"} 1.0', text)
        self.assertIn("# TYPE balancer_panic_total counter", text)

    def test_leastRecentlyFailed(self):
        """
        In panic mode each request goes to the endpoint that failed least recently; as they keep failing,
        traffic rotates over them rather than piling onto one.
        """
        C = ("127.0.0.1", 8083)
        self.discovery.push("web:80", [A, B, C])
        router = self.router("round-robin")
        self.fail_all(router, 21)
        picks = []
        for _ in range(6):
            lease = router.route_now("web:80")
            picks.append(lease.endpoint.address)
            self.clock.advance(0.01)
            lease.release(False)
        self.assertEqual(len(set(picks[:3])), 3)
        self.assertEqual(picks[3:], picks[:3])

    def test_recoversWithinASecond(self):
        """
        Once the endpoints answer again, requests in the probe pace (at most 1.25 s) go on as panic requests;
        then each endpoint's next request is its probe, its success makes it ready, and panic mode ends.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router()
        self.fail_all(router, 14)
        ejected_at = self.clock.seconds()
        # Panic requests, answered fine while the ejection lasts, do not end it early...
        while self.clock.seconds() < ejected_at + 0.9:
            router.route_now("web:80").release(True)
            self.clock.advance(0.01)
        states = {s for _, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states, {"ejected"})
        # ...but within 1.25 s of the ejection the probes go out and succeed.
        while self.clock.seconds() < ejected_at + 1.26:
            router.route_now("web:80").release(True)
            self.clock.advance(0.01)
        states = {s for _, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states, {"ready"})
        before = self.panic_total()
        router.route_now("web:80").release(True)
        self.assertEqual(self.panic_total(), before)

    def test_drainedAndEmptyStill503(self):
        """
        Panic mode never sends to weight-0 endpoints, and an empty set still fails: the 503s keep their texts.
        """
        self.discovery.push("web:80", [Endpoint(address=A, weight=0)])
        self.discovery.push("db:80", [])
        self.discovery.push("mix:80", [Endpoint(address=A, weight=0), B])
        router = self.router()
        self.assertEqual(self.assertRaises(NoEndpoints, router.route_now, "web:80").reason,
                         "all 1 endpoints of web:80 have weight 0")
        self.assertEqual(self.assertRaises(NoEndpoints, router.route_now, "db:80").reason,
                         "no endpoints for db:80")
        self.fail_all(router, 7, "mix:80")
        self.assertEqual(router.route_now("mix:80").endpoint.address, B)
        self.assertEqual(self.panic_total("mix:80"), 1.0)

    def test_avoidInPanic(self):
        """
        A retry in panic mode goes to another ejected endpoint than the one it just failed on.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router()
        self.fail_all(router, 14)
        first = router.route_now("web:80")
        retry = router.route_now("web:80", first.endpoint)
        self.assertNotEqual(retry.endpoint.address, first.endpoint.address)

    def test_logged(self):
        """
        Ejection and recovery are logged at info with endpoint, target and reason; panic mode is logged once
        when it starts (not per request) and once when it ends.
        """
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        self.discovery.push("web:80", [A])
        router = self.router(direction="inbound")
        with capturedLogs() as events:
            self.fail_all(router, 7)
            for _ in range(20):
                router.route_now("web:80").release(False)
            self.clock.advance(1.25)
            router.route_now("web:80").release(True)
            router.route_now("web:80").release(True)
        mine = [e for e in events if e.get("log_namespace") == "linkproxy.routing"]
        self.assertEqual([e["event"] for e in mine], ["ejected", "panic", "recovered", "panic_over"])
        self.assertTrue(all(e["log_level"] is LogLevel.info for e in mine))
        ejected, panic, recovered, over = mine
        self.assertEqual((ejected["endpoint"], ejected["target"], ejected["reason"], ejected["direction"]),
                         ("127.0.0.1:8081", "web:80", "7 consecutive failures", "inbound"))
        self.assertEqual((recovered["endpoint"], recovered["target"], recovered["reason"]),
                         ("127.0.0.1:8081", "web:80", "probe succeeded"))
        self.assertEqual((panic["target"], panic["endpoint"], panic["count"]), ("web:80", "127.0.0.1:8081", 1))
        self.assertEqual(over["target"], "web:80")
        self.assertEqual(formatEvent(ejected),
                         "inbound endpoint 127.0.0.1:8081 of web:80 ejected: 7 consecutive failures")

    def test_failureClassifiedResponses(self):
        """
        Responses the glue classifies with L{outcome} eject after seven failures in a row (5xx, gRPC
        UNAVAILABLE or INTERNAL); 4xx never do.
        """
        from linkproxy.core.classify import outcome

        self.discovery.push("web:80", [A, B])
        router = self.router("round-robin")
        for _ in range(100):
            lease = router.route_now("web:80")
            lease.release(outcome(404, "") if lease.endpoint.address == A else outcome(200, ""))
        states = {e.address: s for e, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states, {A: "ready", B: "ready"})
        statuses = iter([(503, ""), (200, "14"), (500, ""), (200, "13"), (502, ""), (504, ""), (599, "")])
        for _ in range(14):
            lease = router.route_now("web:80")
            lease.release(outcome(*next(statuses)) if lease.endpoint.address == A else True)
        states = {e.address: s for e, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states, {A: "ejected", B: "ready"})
        self.assertEqual({router.route_now("web:80").endpoint.address for _ in range(20)}, {B})

    def test_neutralReleasesNeverEject(self):
        """
        Thousands of C{release(None)} (client cancels and resets, the proxy's own refusals) never eject.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router()
        for _ in range(5000):
            router.route_now("web:80").release(None)
            self.clock.advance(0.0001)
        states = {s for _, s, _ in router.balancer("web:80").snapshot(self.clock.seconds())}
        self.assertEqual(states, {"ready"})
        self.assertIsNone(self.panic_total())

    def test_deadEndpointProbeRate(self):
        """
        Under 100 requests a second, with one of two endpoints refusing every connection, the dead one gets at
        most one request a second once ejected, and every retry of a failed request (C{avoid}) goes to the
        live one.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router()
        to_dead = []
        ejected_at = None
        for _ in range(3000):
            now = self.clock.seconds()
            lease = router.route_now("web:80")
            if lease.endpoint.address == A:
                to_dead.append(now)
                lease.release(False)
                retry = router.route_now("web:80", lease.endpoint)
                self.assertEqual(retry.endpoint.address, B)
                retry.release(True)
            else:
                lease.release(True)
            if ejected_at is None and router.balancer("web:80").snapshot(now)[0][1] != "ready":
                ejected_at = now
            self.clock.advance(0.01)
        after = [t for t in to_dead if t > ejected_at]
        gaps = [b - a for a, b in zip([ejected_at] + after, after)]
        self.assertTrue(all(gap >= 1.0 - 1e-9 for gap in gaps), min(gaps))
        # P2C may prefer the live endpoint at a probe's first chance, so some seconds see no probe at all.
        self.assertTrue(10 <= len(after) <= 30, len(after))

    def test_overflow(self):
        """
        Past the bound on targets, panic counts share C{target="overflow"}.
        """
        from linkproxy import routing

        self.patch(routing, "MAX_METRIC_TARGETS", 1)
        router = self.router()
        for target in ("a:80", "b:80"):
            self.discovery.push(target, [A])
            self.fail_all(router, 8, target)
        self.assertEqual(self.panic_total("a:80"), 1.0)
        self.assertEqual(self.panic_total("overflow"), 1.0)

    def test_longOutageLogsOnce(self):
        """
        A target whose only endpoint stays dead for a minute at 100 requests a second logs one ejection and one
        panic-mode entry: the probes, picked the ordinary way once a second, do not end panic mode.
        """
        from twisted.logger import capturedLogs

        self.discovery.push("web:80", [A])
        router = self.router()
        with capturedLogs() as events:
            for _ in range(6000):
                router.route_now("web:80").release(False)
                self.clock.advance(0.01)
        mine = [e["event"] for e in events if e.get("log_namespace") == "linkproxy.routing"]
        self.assertEqual(mine, ["ejected", "panic"])
        self.assertGreater(self.panic_total(), 5000)
