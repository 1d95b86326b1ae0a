"""
Tests for L{linkproxy.core.balancer} and the factories in L{linkproxy.balancers}.
"""

import heapq
import math
from collections import Counter
from random import Random

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from linkproxy.balancers import (
    BUILTIN_BALANCERS,
    UnknownBalancer,
    available_balancers,
    find_balancer,
)
from linkproxy.core.backoff import Backoff
from linkproxy.core.balancer import (
    LeastRequestBalancer,
    P2CEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    choose_two,
)
from linkproxy.core.endpoint import Endpoint
from linkproxy.interfaces import IBalancer, IBalancerFactory, IResilientBalancer
from tests.test_balancer_plugins import PluginDirectoryMixin

pure = settings(derandomize=True, database=None, deadline=None, max_examples=100)
seeds = st.integers(min_value=0, max_value=2**32 - 1)

ALL = (P2CEwmaBalancer, LeastRequestBalancer, RoundRobinBalancer, RandomBalancer)
P2C = (P2CEwmaBalancer, LeastRequestBalancer)

# Upper 0.1% point of the chi-square distribution by degrees of freedom: with a fixed seed a test either
# always passes or always fails, and a correct balancer lands far below these.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def endpoint(i, weight=1.0):
    """
    An endpoint at C{10.0.0.i:80}.
    """
    return Endpoint(("10.0.0.%d" % (i,), 80), weight=weight)


def eject(balancer, ep, now):
    """
    Drive C{ep} into ejection with seven consecutive failed requests.
    """
    for _ in range(7):
        balancer.start(ep, now)
        balancer.finish(ep, now, None, False)


def chi_square(counts, weights):
    """
    Pearson's statistic for C{counts} against the shares C{weights} predict.
    """
    total = sum(counts)
    weight_total = sum(weights)
    return sum((c - total * w / weight_total) ** 2 / (total * w / weight_total) for c, w in zip(counts, weights))


def closed_loop(balancer, endpoints, latency, requests=20000, interval=0.001):
    """
    Send one request every C{interval} seconds on a L{Clock}, each taking C{latency[address]} seconds and
    succeeding; return how many each endpoint received.

    About C{latency / interval} requests are in flight at once, so load-aware balancers see real pending
    counts.
    """
    clock = Clock()
    balancer.update(endpoints, clock.seconds())
    in_flight = []
    counts = Counter()
    for n in range(requests):
        clock.advance(interval)
        now = clock.seconds()
        while in_flight and in_flight[0][0] <= now:
            done, _, ep = heapq.heappop(in_flight)
            balancer.finish(ep, done, latency[ep.address], True)
        ep = balancer.pick(now)
        balancer.start(ep, now)
        counts[ep.address] += 1
        heapq.heappush(in_flight, (now + latency[ep.address], n, ep))
    return counts


class ChooseTwoTests(SynchronousTestCase):
    """
    L{choose_two} draws the pair a power-of-two-choices balancer compares.
    """

    @pure
    @given(seeds, st.integers(min_value=2, max_value=50))
    def test_uniformDistinct(self, seed, n):
        """
        For a count C{n >= 2} the two indices are distinct and in C{range(n)}.
        """
        random = Random(seed)
        for _ in range(20):
            i, j = choose_two(n, random)
            self.assertNotEqual(i, j)
            self.assertTrue(0 <= i < n and 0 <= j < n)

    @pure
    @given(seeds, st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=2, max_size=30))
    def test_weightedDistinct(self, seed, weights):
        """
        For positive weights, however lopsided, the two indices are distinct and in range.
        """
        random = Random(seed)
        for _ in range(20):
            i, j = choose_two(weights, random)
            self.assertNotEqual(i, j)
            self.assertTrue(0 <= i < len(weights) and 0 <= j < len(weights))

    def test_weightedFirstDraw(self):
        """
        The first index follows the weights.
        """
        weights = [1.0, 2.0, 3.0, 4.0]
        random = Random(5)
        counts = Counter(choose_two(weights, random)[0] for _ in range(20000))
        self.assertLess(chi_square([counts[k] for k in range(4)], weights), CHI2_999[3])

    def test_weightedPairs(self):
        """
        Pairs follow weighted sampling without replacement: P(i, j) = w_i / W * w_j / (W - w_i).
        """
        weights = [1.0, 2.0, 3.0]
        random = Random(6)
        counts = Counter(choose_two(weights, random) for _ in range(30000))
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        expected = [weights[i] / 6.0 * weights[j] / (6.0 - weights[i]) for i, j in pairs]
        self.assertLess(chi_square([counts[p] for p in pairs], expected), CHI2_999[5])

    def test_tooFew(self):
        """
        Fewer than two choices, or a weight that is not positive, is a L{ValueError}.
        """
        self.assertRaises(ValueError, choose_two, 1, Random(0))
        self.assertRaises(ValueError, choose_two, [1.0], Random(0))
        self.assertRaises(ValueError, choose_two, [1.0, 0.0], Random(0))


class _RecordingMixin:
    """
    Records every pair a power-of-two-choices balancer compares.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compared = []

    def _compare(self, a, b, now):
        self.compared.append((a.endpoint, b.endpoint))
        return super()._compare(a, b, now)


class RecordingP2CEwma(_RecordingMixin, P2CEwmaBalancer):
    """
    A L{P2CEwmaBalancer} that records its comparisons.
    """


class RecordingLeastRequest(_RecordingMixin, LeastRequestBalancer):
    """
    A L{LeastRequestBalancer} that records its comparisons.
    """


class BalancerTests(PluginDirectoryMixin, SynchronousTestCase):
    """
    Behaviour every built-in balancer shares.
    """

    def test_providesInterface(self):
        """
        Each balancer provides L{IBalancer} and each built-in factory provides L{IBalancerFactory} and
        builds one.
        """
        for cls in ALL:
            verifyObject(IBalancer, cls(Random(0)))
            verifyObject(IResilientBalancer, cls(Random(0)))
        for name, factory in BUILTIN_BALANCERS.items():
            verifyObject(IBalancerFactory, factory)
            self.assertEqual(factory.name, name)
            verifyObject(IBalancer, factory.build(Random(0)))

    def test_findBuiltins(self):
        """
        L{find_balancer} returns the built-ins by their documented names, and L{available_balancers} lists them
        first.
        """
        # Listing scans the plugin directories; an empty one of our own makes sure caches written by the scan
        # are cleaned up afterwards.
        self.install_plugins({})
        expected = ["p2c-ewma", "round-robin", "least-request", "random"]
        for name in expected:
            self.assertEqual(find_balancer(name).name, name)
        self.assertEqual(available_balancers()[:4], expected)
        self.assertIsInstance(find_balancer("p2c-ewma").build(Random(0)), P2CEwmaBalancer)

    def test_findUnknown(self):
        """
        An unknown name raises a L{KeyError} whose message names it and lists the available balancers.
        """
        self.install_plugins({})
        exc = self.assertRaises(KeyError, find_balancer, "no-such-balancer")
        self.assertIsInstance(exc, UnknownBalancer)
        self.assertIn("'no-such-balancer'", str(exc))
        self.assertIn("p2c-ewma, round-robin, least-request, random", str(exc))

    def test_emptyPicksNone(self):
        """
        With no endpoints, or only zero-weight ones, there is nothing to pick.
        """
        for cls in ALL:
            balancer = cls(Random(0))
            self.assertIsNone(balancer.pick(0.0))
            balancer.update([], 0.0)
            self.assertIsNone(balancer.pick(0.0))
            balancer.update([endpoint(1, 0), endpoint(2, 0)], 0.0)
            self.assertIsNone(balancer.pick(0.0), cls)

    def test_zeroWeightNeverPicked(self):
        """
        A zero-weight endpoint is drained: never picked while others exist.
        """
        for cls in ALL:
            balancer = cls(Random(1))
            balancer.update([endpoint(1, 0), endpoint(2), endpoint(3)], 0.0)
            picks = {balancer.pick(0.0).address for _ in range(300)}
            self.assertEqual(picks, {endpoint(2).address, endpoint(3).address}, cls)

    def test_singleEndpoint(self):
        """
        One candidate is returned as is.
        """
        for cls in ALL:
            balancer = cls(Random(0))
            balancer.update([endpoint(1)], 0.0)
            self.assertEqual(balancer.pick(0.0), endpoint(1))

    def test_allEjectedPicksNone(self):
        """
        When every endpoint is ejected, L{pick} returns C{None} until a backoff ends.
        """
        for cls in ALL:
            balancer = cls(Random(2), backoff=Backoff(min=1.0, max=1.0, jitter=0.0))
            eps = [endpoint(1), endpoint(2)]
            balancer.update(eps, 0.0)
            for ep in eps:
                eject(balancer, ep, 0.0)
            self.assertIsNone(balancer.pick(0.5), cls)
            self.assertIn(balancer.pick(1.0), eps)

    def test_probeOnlyOnce(self):
        """
        Once its backoff ends, an ejected endpoint is picked for exactly one request until that request's
        outcome arrives; a successful probe makes it ready again.
        """
        for cls in ALL:
            balancer = cls(Random(3), backoff=Backoff(min=1.0, max=1.0, jitter=0.0))
            sick, well = endpoint(1), endpoint(2)
            balancer.update([sick, well], 0.0)
            eject(balancer, sick, 0.0)
            picks = Counter()
            for _ in range(500):
                ep = balancer.pick(2.0)
                balancer.start(ep, 2.0)
                picks[ep] += 1
            self.assertEqual(picks[sick], 1, cls)
            self.assertEqual(dict((ep, state) for ep, state, _ in balancer.snapshot(2.0))[sick], "probing")
            balancer.finish(sick, 2.1, 0.01, True)
            self.assertEqual(dict((ep, state) for ep, state, _ in balancer.snapshot(2.1))[sick], "ready")
            picks = Counter(balancer.pick(2.1) for _ in range(500))
            self.assertGreater(picks[sick], 0, cls)

    def test_probeFailureEjectsAgain(self):
        """
        A failed probe ejects the endpoint again, for the next (longer) backoff.
        """
        balancer = P2CEwmaBalancer(Random(4), backoff=Backoff(min=1.0, max=60.0, jitter=0.0))
        sick, well = endpoint(1), endpoint(2)
        balancer.update([sick, well], 0.0)
        eject(balancer, sick, 0.0)
        balancer.start(sick, 1.0)
        balancer.finish(sick, 1.0, None, False)
        self.assertEqual(balancer.snapshot(2.9)[0][1], "ejected")
        self.assertEqual(balancer.snapshot(3.0)[0][1], "probing")

    @pure
    @given(
        seeds,
        st.lists(st.sampled_from([0.0, 1.0, 1.0, 2.0, 5.0]), min_size=1, max_size=8),
        st.data(),
    )
    def test_neverPickEjected(self, seed, weights, data):
        """
        For every balancer, any weights and any non-empty subset ejected, an ejected endpoint is never picked
        while a ready one exists, and C{None} is picked only when no positive-weight endpoint is ready.
        """
        eps = [endpoint(i, w) for i, w in enumerate(weights)]
        ejected = data.draw(st.sets(st.sampled_from(range(len(eps)))), label="ejected")
        for cls in ALL:
            balancer = cls(Random(seed))
            balancer.update(eps, 0.0)
            for i in ejected:
                eject(balancer, eps[i], 0.0)
            ready = {eps[i].address for i in range(len(eps)) if i not in ejected and weights[i] > 0}
            for _ in range(50):
                picked = balancer.pick(0.5)
                if ready:
                    self.assertIn(picked.address, ready, cls)
                    balancer.start(picked, 0.5)
                    balancer.finish(picked, 0.5, 0.01, True)
                else:
                    self.assertIsNone(picked, cls)

    @pure
    @given(seeds, st.lists(st.sampled_from([1.0, 1.0, 3.0]), min_size=2, max_size=8), st.data())
    def test_p2cNeverComparesSelf(self, seed, weights, data):
        """
        With two or more candidates the power-of-two-choices balancers compare two different endpoints on
        every pick, on the fast path and with some endpoints ejected.
        """
        eps = [endpoint(i, w) for i, w in enumerate(weights)]
        ejected = data.draw(st.sets(st.sampled_from(range(len(eps))), max_size=len(eps) - 2), label="ejected")
        for cls in (RecordingP2CEwma, RecordingLeastRequest):
            balancer = cls(Random(seed))
            balancer.update(eps, 0.0)
            for _ in range(30):
                balancer.pick(0.0)
            for i in ejected:
                eject(balancer, eps[i], 0.0)
            for _ in range(30):
                balancer.pick(0.5)
            self.assertEqual(len(balancer.compared), 60)
            for a, b in balancer.compared:
                self.assertNotEqual(a.address, b.address)

    def test_randomWeights(self):
        """
        L{RandomBalancer} picks in proportion to weight.
        """
        weights = [1.0, 2.0, 3.0, 4.0]
        eps = [endpoint(i, w) for i, w in enumerate(weights)]
        balancer = RandomBalancer(Random(10))
        balancer.update(eps, 0.0)
        counts = Counter(balancer.pick(0.0).address for _ in range(40000))
        self.assertLess(chi_square([counts[ep.address] for ep in eps], weights), CHI2_999[3])

    def test_randomWeightsWithEjection(self):
        """
        With one endpoint ejected, L{RandomBalancer} still follows the weights of the rest.
        """
        weights = [1.0, 2.0, 3.0, 4.0]
        eps = [endpoint(i, w) for i, w in enumerate(weights)]
        balancer = RandomBalancer(Random(11))
        balancer.update(eps, 0.0)
        eject(balancer, eps[3], 0.0)
        counts = Counter(balancer.pick(0.1).address for _ in range(30000))
        self.assertEqual(counts[eps[3].address], 0)
        self.assertLess(chi_square([counts[ep.address] for ep in eps[:3]], weights[:3]), CHI2_999[2])

    def test_roundRobinWeightsExact(self):
        """
        Smooth weighted round-robin gives each endpoint exactly its share over every full cycle, and spreads
        the heavy endpoint out (weights 5, 1, 1: never more than two in a row within a cycle, as in nginx's
        example C{a a b a c a a}).
        """
        eps = [endpoint(0, 5), endpoint(1, 1), endpoint(2, 1)]
        balancer = RoundRobinBalancer(Random(12))
        balancer.update(eps, 0.0)
        sequence = [balancer.pick(0.0) for _ in range(7 * 100)]
        counts = Counter(sequence)
        self.assertEqual([counts[ep] for ep in eps], [500, 100, 100])
        for k in range(100):
            cycle = sequence[7 * k:7 * k + 7]
            cycle_counts = Counter(cycle)
            self.assertEqual([cycle_counts[ep] for ep in eps], [5, 1, 1])
            pattern = "".join("a" if ep == eps[0] else "b" for ep in cycle)
            self.assertLessEqual(max(len(run) for run in pattern.split("b")), 2, pattern)

    def test_roundRobinTiesRandom(self):
        """
        Equal weights make ties that are broken at random, so differently seeded proxies start on different
        endpoints, while each still visits every endpoint once per cycle.
        """
        eps = [endpoint(i) for i in range(5)]
        firsts = set()
        for seed in range(20):
            balancer = RoundRobinBalancer(Random(seed))
            balancer.update(eps, 0.0)
            cycle = [balancer.pick(0.0) for _ in range(5)]
            self.assertEqual(sorted(ep.address for ep in cycle), sorted(ep.address for ep in eps))
            firsts.add(cycle[0])
        self.assertGreater(len(firsts), 1)

    def test_weightsUnderLoad(self):
        """
        Under a steady load with equal latencies, every balancer's share of traffic follows the weights: the
        power-of-two-choices ones by levelling C{cost / weight}, the others by construction.
        """
        weights = [1.0, 2.0, 3.0, 4.0]
        eps = [endpoint(i, w) for i, w in enumerate(weights)]
        latency = {ep.address: 0.05 for ep in eps}
        for cls in ALL:
            counts = closed_loop(cls(Random(13)), eps, latency)
            shares = [counts[ep.address] / 20000 for ep in eps]
            for share, weight in zip(shares, weights):
                # trial's assertAlmostEqual ignores delta=.
                self.assertLess(abs(share - weight / 10.0), 0.015, (cls, shares))

    def test_ewmaPrefersFaster(self):
        """
        After observing RTTs of 10 ms and 100 ms, p2c-ewma sends the large majority of traffic to the faster
        endpoint; least-request, which sees only pending counts, prefers it less.
        """
        fast, slow = endpoint(1), endpoint(2)
        latency = {fast.address: 0.010, slow.address: 0.100}
        counts = closed_loop(P2CEwmaBalancer(Random(14)), [fast, slow], latency)
        ewma_share = counts[fast.address] / 20000
        self.assertGreater(ewma_share, 0.95)
        counts = closed_loop(LeastRequestBalancer(Random(14)), [fast, slow], latency)
        self.assertGreater(counts[fast.address] / 20000, 0.5)
        self.assertLess(counts[fast.address] / 20000, ewma_share)

    def test_ewmaPeakShiftsTraffic(self):
        """
        A single slow response is felt at once: p2c-ewma moves idle traffic away from that endpoint.
        """
        a, b = endpoint(1), endpoint(2)
        balancer = P2CEwmaBalancer(Random(15))
        balancer.update([a, b], 0.0)
        balancer.start(a, 0.0)
        balancer.finish(a, 1.0, 1.0, True)
        picks = Counter(balancer.pick(1.0) for _ in range(200))
        self.assertEqual(picks[b], 200)

    def test_updateKeepsState(self):
        """
        L{update} keeps pending counts, RTT estimates and ejections for addresses that remain (even when their
        weight changes), drops removed ones, and starts new ones fresh.
        """
        clock = Clock()
        a, b, c = endpoint(1), endpoint(2), endpoint(3)
        balancer = P2CEwmaBalancer(Random(16), backoff=Backoff(min=10.0, max=10.0, jitter=0.0))
        balancer.update([a, b, c], clock.seconds())
        balancer.start(a, clock.seconds())
        balancer.start(a, clock.seconds())
        balancer.start(b, clock.seconds())
        balancer.finish(b, clock.seconds(), 0.5, True)
        eject(balancer, c, clock.seconds())
        clock.advance(1.0)
        before = {ep.address: (state, cost) for ep, state, cost in balancer.snapshot(clock.seconds())}

        c2 = endpoint(3, weight=2.0)
        d = endpoint(4)
        balancer.update([c2, b, a, d], clock.seconds())
        after = {ep.address: (state, cost) for ep, state, cost in balancer.snapshot(clock.seconds())}
        for ep in (a, b, c):
            self.assertEqual(after[ep.address], before[ep.address])
        self.assertEqual(after[d.address], ("ready", 0.030))
        self.assertEqual([ep for ep, _, _ in balancer.snapshot(clock.seconds())], [c2, b, a, d])

        balancer.update([a], clock.seconds())
        balancer.update([a, b], clock.seconds())
        self.assertEqual(balancer.snapshot(clock.seconds())[1][2], 0.030 * 1)
        # a's two requests are still pending, so its cost is three times its decayed default.
        self.assertAlmostEqual(balancer.snapshot(clock.seconds())[0][2], 3 * 0.030 * math.exp(-1.0 / 10.0))

    def test_updateKeepsEjection(self):
        """
        An ejected endpoint stays ejected across L{update}, for every balancer, and is still not picked.
        """
        for cls in ALL:
            a, b = endpoint(1), endpoint(2)
            balancer = cls(Random(17), backoff=Backoff(min=10.0, max=10.0, jitter=0.0))
            balancer.update([a, b], 0.0)
            eject(balancer, a, 0.0)
            balancer.update([b, a, endpoint(3)], 1.0)
            self.assertNotIn(a, {balancer.pick(1.0) for _ in range(100)}, cls)
            self.assertEqual([s for ep, s, _ in balancer.snapshot(1.0) if ep == a], ["ejected"])

    def test_unknownEndpointOutcome(self):
        """
        Starting or finishing a request for an endpoint no longer in the set is ignored, and a finish without a
        start never drives pending below zero.
        """
        for cls in ALL:
            balancer = cls(Random(18))
            balancer.update([endpoint(1)], 0.0)
            balancer.start(endpoint(9), 0.0)
            balancer.finish(endpoint(9), 0.0, 0.1, False)
            balancer.finish(endpoint(1), 0.0, None, True)
            balancer.start(endpoint(1), 0.0)
            self.assertEqual(balancer.snapshot(0.0)[0][1], "ready")
            if cls is LeastRequestBalancer:
                self.assertEqual(balancer.snapshot(0.0)[0][2], 2.0)

    def test_snapshotCosts(self):
        """
        Snapshot costs are each balancer's load measure: peak-EWMA cost, pending plus one, or pending.
        """
        a = endpoint(1)
        expected = {
            P2CEwmaBalancer: 0.2 * 3,
            LeastRequestBalancer: 3.0,
            RoundRobinBalancer: 2.0,
            RandomBalancer: 2.0,
        }
        for cls, cost in expected.items():
            balancer = cls(Random(19))
            balancer.update([a], 0.0)
            for _ in range(3):
                balancer.start(a, 0.0)
            balancer.finish(a, 0.0, 0.2, True)
            self.assertEqual(balancer.snapshot(0.0), [(a, "ready", cost)], cls)

    def test_invalidParameters(self):
        """
        Bad EWMA or accrual parameters are refused when the balancer is built.
        """
        self.assertRaises(ValueError, P2CEwmaBalancer, Random(0), decay=0.0)
        self.assertRaises(ValueError, P2CEwmaBalancer, Random(0), default_rtt=-1.0)
        self.assertRaises(ValueError, RandomBalancer, Random(0), max_failures=0)


class CancelTests(SynchronousTestCase):
    """
    A request its client cancelled frees its slot but is neither a success nor a failure.
    """

    def test_cancellations_never_eject(self):
        """
        Any number of cancelled requests leave the only endpoint ready (a load generator stopping must not
        eject the endpoint it was using).
        """
        balancer = P2CEwmaBalancer(Random(1))
        endpoint = Endpoint(address=("10.0.0.1", 80))
        balancer.update([endpoint], 0.0)
        for i in range(50):
            picked = balancer.pick(float(i))
            balancer.start(picked, float(i))
            balancer.finish(picked, float(i), None, None)
        self.assertEqual([(e, state) for e, state, _ in balancer.snapshot(60.0)], [(endpoint, "ready")])
        self.assertIs(balancer.pick(60.0), endpoint)

    def test_cancelled_probe_frees_the_probe(self):
        """
        When the probe request is cancelled, the next request may probe the endpoint instead of it staying
        ejected with a probe that will never report.
        """
        balancer = RoundRobinBalancer(Random(1))
        endpoint = Endpoint(address=("10.0.0.1", 80))
        balancer.update([endpoint], 0.0)
        for _ in range(7):
            balancer.start(endpoint, 0.0)
            balancer.finish(endpoint, 0.0, None, False)
        self.assertIsNone(balancer.pick(0.5))
        later = 120.0
        probe = balancer.pick(later)
        self.assertIs(probe, endpoint)
        balancer.start(probe, later)
        self.assertIsNone(balancer.pick(later))
        balancer.finish(probe, later, None, None)
        # The next probe waits for the probe pace (1 to 1.25 s), so cancelled probes cannot speed it up.
        self.assertIsNone(balancer.pick(later + 0.99))
        self.assertIs(balancer.pick(later + 1.25), endpoint)


class AvoidTests(SynchronousTestCase):
    """
    C{pick(now, avoid)} never returns C{avoid} while another endpoint is available.
    """

    def test_neverAvoided(self):
        """
        Every built-in balancer, with uniform or mixed weights, picks among the others.
        """
        for cls in ALL:
            for weights in ((1, 1, 1), (5, 1, 1), (1, 1, 9)):
                balancer = cls(Random(5))
                eps = [endpoint(i + 1, w) for i, w in enumerate(weights)]
                balancer.update(eps, 0.0)
                for avoid in eps:
                    picks = Counter()
                    for _ in range(300):
                        ep = balancer.pick(0.0, avoid)
                        balancer.start(ep, 0.0)
                        # No RTT, so that costs stay level and every balancer spreads over the others.
                        balancer.finish(ep, 0.0, None, None)
                        picks[ep] += 1
                    self.assertNotIn(avoid, picks, (cls, weights))
                    if len(set(weights)) == 1:
                        # Idle P2C with mixed weights lets the heavier one win outright; level ones share.
                        self.assertEqual(len(picks), 2, (cls, weights, picks))

    def test_matchedByAddress(self):
        """
        C{avoid} is matched by address: the same endpoint with other metadata is still avoided.
        """
        for cls in ALL:
            balancer = cls(Random(6))
            balancer.update([endpoint(1), endpoint(2)], 0.0)
            other = Endpoint(endpoint(1).address, weight=3.0, identity="x")
            self.assertEqual({balancer.pick(0.0, other) for _ in range(50)}, {endpoint(2)}, cls)

    def test_onlyCandidate(self):
        """
        When C{avoid} is the only available endpoint it is picked all the same (a retry to it beats none),
        and an unknown C{avoid} changes nothing.
        """
        for cls in ALL:
            balancer = cls(Random(7))
            sick, well = endpoint(1), endpoint(2)
            balancer.update([sick, well], 0.0)
            eject(balancer, sick, 0.0)
            self.assertEqual(balancer.pick(0.5, well), well, cls)
            self.assertEqual(balancer.pick(0.5, endpoint(9)), well, cls)

    def test_avoidWithEjected(self):
        """
        With one endpoint ejected and one avoided, the third is the only choice.
        """
        for cls in ALL:
            balancer = cls(Random(8))
            eps = [endpoint(1), endpoint(2), endpoint(3)]
            balancer.update(eps, 0.0)
            eject(balancer, eps[0], 0.0)
            self.assertEqual({balancer.pick(0.5, eps[1]) for _ in range(50)}, {eps[2]}, cls)

    def test_p2cComparesOthers(self):
        """
        The power-of-two-choices balancers compare two of the other endpoints, never C{avoid}.
        """
        for cls in (RecordingP2CEwma, RecordingLeastRequest):
            balancer = cls(Random(9))
            eps = [endpoint(i) for i in range(1, 5)]
            balancer.update(eps, 0.0)
            for _ in range(100):
                balancer.pick(0.0, eps[0])
            self.assertTrue(balancer.compared)
            self.assertTrue(all(eps[0] not in pair for pair in balancer.compared))

    def test_roundRobinSkips(self):
        """
        Round-robin skips the avoided endpoint and carries on its rotation afterwards.
        """
        balancer = RoundRobinBalancer(Random(10))
        eps = [endpoint(1), endpoint(2), endpoint(3)]
        balancer.update(eps, 0.0)
        first = [balancer.pick(0.0) for _ in range(3)]
        self.assertEqual(sorted(first, key=eps.index), eps)
        self.assertNotEqual(balancer.pick(0.0, first[0]), first[0])
        later = Counter(balancer.pick(0.0) for _ in range(300))
        self.assertTrue(all(95 <= n <= 105 for n in later.values()), later)


class PanicPickTests(SynchronousTestCase):
    """
    C{panic_pick(now, avoid)}: when nothing is available, the endpoint that failed least recently.
    """

    def test_leastRecentlyFailed(self):
        """
        With every endpoint ejected, L{pick} gives nothing and C{panic_pick} the one whose latest failure is
        oldest; each failure sends an endpoint to the back of that order.
        """
        for cls in ALL:
            balancer = cls(Random(11))
            eps = [endpoint(1), endpoint(2), endpoint(3)]
            balancer.update(eps, 0.0)
            eject(balancer, eps[1], 1.0)
            eject(balancer, eps[0], 1.2)
            eject(balancer, eps[2], 1.4)
            self.assertIsNone(balancer.pick(1.5))
            self.assertEqual(balancer.panic_pick(1.5), eps[1], cls)
            balancer.start(eps[1], 1.6)
            balancer.finish(eps[1], 1.6, None, False)
            self.assertEqual(balancer.panic_pick(1.6), eps[0], cls)
            self.assertEqual(balancer.panic_pick(1.6, eps[0]), eps[2], cls)

    def test_nothingToFallBackTo(self):
        """
        Empty sets and weight-0 endpoints give C{None}: panic mode never sends to a drained endpoint.
        """
        for cls in ALL:
            balancer = cls(Random(12))
            self.assertIsNone(balancer.panic_pick(0.0))
            balancer.update([endpoint(1, 0)], 0.0)
            self.assertIsNone(balancer.panic_pick(0.0))
            balancer.update([endpoint(1, 0), endpoint(2)], 0.0)
            eject(balancer, endpoint(2), 0.0)
            self.assertEqual(balancer.panic_pick(0.0), endpoint(2))
            self.assertEqual(balancer.panic_pick(0.0, endpoint(2)), endpoint(2), "the only one left")

    def test_panicOutcomesDoNotExtendEjection(self):
        """
        Requests sent in panic mode while the ejection lasts do not change it; the probe still comes on time.
        """
        balancer = P2CEwmaBalancer(Random(13), backoff=Backoff(min=1.0, max=1.0, jitter=0.0))
        ep = endpoint(1)
        balancer.update([ep], 0.0)
        eject(balancer, ep, 0.0)
        for i in range(50):
            now = 0.01 * i
            self.assertEqual(balancer.panic_pick(now), ep)
            balancer.start(ep, now)
            balancer.finish(ep, now, None, bool(i % 2))
        self.assertEqual(balancer.snapshot(0.99)[0][1], "ejected")
        self.assertEqual(balancer.pick(1.0), ep)
        balancer.start(ep, 1.0)
        balancer.finish(ep, 1.01, 0.01, True)
        self.assertEqual(balancer.snapshot(1.01)[0][1], "ready")


class ListenTests(SynchronousTestCase):
    """
    C{listen(listener)} reports ejections and recoveries, once each.
    """

    def test_transitions(self):
        """
        The seventh consecutive failure reports an ejection with its reason, failed probes report nothing,
        and a successful probe reports the recovery.
        """
        for cls in ALL:
            events = []
            balancer = cls(Random(14))
            balancer.listen(lambda *event: events.append(event))
            ep, other = endpoint(1), endpoint(2)
            balancer.update([ep, other], 0.0)
            eject(balancer, ep, 0.0)
            self.assertEqual(events, [(ep, "ejected", "7 consecutive failures")])
            probe_at = 1.25
            self.assertEqual(balancer.pick(probe_at, other), ep)
            balancer.start(ep, probe_at)
            balancer.finish(ep, probe_at, None, False)
            self.assertEqual(len(events), 1)
            probe_at += 1.25
            balancer.start(ep, probe_at)
            balancer.finish(ep, probe_at, 0.01, True)
            self.assertEqual(events[1:], [(ep, "recovered", "probe succeeded")], cls)
            balancer.listen(None)
            eject(balancer, ep, 10.0)
            self.assertEqual(len(events), 2)

    def test_healthyCountTracksTransitions(self):
        """
        After ejection and recovery the balancer is back on its fast path (no endpoint counted unhealthy).
        """
        balancer = P2CEwmaBalancer(Random(15))
        ep = endpoint(1)
        balancer.update([ep], 0.0)
        eject(balancer, ep, 0.0)
        self.assertEqual(balancer._unhealthy, 1)
        balancer.start(ep, 2.0)
        balancer.finish(ep, 2.0, 0.01, True)
        self.assertEqual(balancer._unhealthy, 0)


class NeutralOutcomeTests(SynchronousTestCase):
    """
    Outcomes reported as C{None} (client cancels and resets, the proxy's own refusals) never eject.
    """

    def test_thousandsNeverEject(self):
        """
        Ten thousand C{None} outcomes leave every endpoint ready and picked, for every balancer.
        """
        for cls in ALL:
            balancer = cls(Random(16))
            eps = [endpoint(1), endpoint(2)]
            balancer.update(eps, 0.0)
            for i in range(10000):
                now = i * 0.0001
                ep = balancer.pick(now)
                balancer.start(ep, now)
                balancer.finish(ep, now, None, None)
            self.assertEqual({state for _, state, _ in balancer.snapshot(1.0)}, {"ready"}, cls)
            self.assertEqual({balancer.pick(1.0) for _ in range(100)}, set(eps), cls)

    def test_failuresEjectAfterSeven(self):
        """
        Failure-classified outcomes (C{False}, as the glue reports a 5xx) eject after seven in a row, and
        C{None} outcomes between them neither reset nor extend the run.
        """
        balancer = LeastRequestBalancer(Random(17))
        ep, other = endpoint(1), endpoint(2)
        balancer.update([ep, other], 0.0)
        for i in range(6):
            balancer.start(ep, 0.0)
            balancer.finish(ep, 0.0, None, False)
            balancer.start(ep, 0.0)
            balancer.finish(ep, 0.0, None, None)
        self.assertEqual(balancer.snapshot(0.0)[0][1], "ready")
        balancer.start(ep, 0.0)
        balancer.finish(ep, 0.0, None, False)
        self.assertEqual(balancer.snapshot(0.0)[0][1], "ejected")
