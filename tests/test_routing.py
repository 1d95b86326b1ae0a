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
from linkproxy.interfaces import ILease, IRouter
from linkproxy.routing import BalancedLease, BalancedRouter, FixedRouter, RouterService, route_request
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
        When every endpoint is ejected after failures, the 503 says so; after the ejection backoff a probe is
        let through.
        """
        self.discovery.push("web:80", [A, B])
        router = self.router()
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
        self.assertIn('balancer_endpoints{direction="outbound",state="ready",target="web:80"} 1.0', text)
        self.assertIn('balancer_endpoints{direction="outbound",state="ejected",target="web:80"} 1.0', text)
        self.assertIn('balancer_endpoints{direction="outbound",state="probing",target="web:80"} 0.0', text)
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
        router = self.router()
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
