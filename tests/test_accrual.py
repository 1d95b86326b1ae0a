"""
Tests for L{linkproxy.core.backoff} and L{linkproxy.core.accrual}: jittered exponential backoff, the steady
probe pace, and consecutive-failure ejection with a single probe.
"""

from random import Random

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core.accrual import EJECTED, PROBING, READY, FailureAccrual
from linkproxy.core.backoff import Backoff, ProbeInterval

pure = settings(derandomize=True, database=None, deadline=None, max_examples=200)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


class BackoffTests(SynchronousTestCase):
    """
    L{Backoff.delay} doubles from C{min}, saturates at C{max}, and adds bounded jitter.
    """

    def test_bases(self):
        """
        The base doubles with each attempt until it reaches C{max}.
        """
        backoff = Backoff(min=1.0, max=60.0, jitter=0.5)
        self.assertEqual([backoff.base(n) for n in range(8)], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        self.assertEqual(backoff.base(10**9), 60.0)

    def test_noJitter(self):
        """
        With no jitter the delay is exactly the base.
        """
        backoff = Backoff(min=0.5, max=10.0, jitter=0.0)
        random = Random(1)
        self.assertEqual([backoff.delay(n, random) for n in range(6)], [0.5, 1.0, 2.0, 4.0, 8.0, 10.0])

    def test_jittered(self):
        """
        Delays for one attempt vary with the generator, so proxies that fail together do not retry together.
        """
        backoff = Backoff()
        random = Random(7)
        delays = {backoff.delay(3, random) for _ in range(50)}
        self.assertGreater(len(delays), 40)

    def test_invalid(self):
        """
        Non-positive C{min}, C{max < min} or negative jitter are refused with L{ValueError}.
        """
        self.assertRaises(ValueError, Backoff, 0.0, 1.0, 0.5)
        self.assertRaises(ValueError, Backoff, 2.0, 1.0, 0.5)
        self.assertRaises(ValueError, Backoff, 1.0, 2.0, -0.1)
        self.assertRaises(ValueError, Backoff().base, -1)

    @pure
    @given(
        seeds,
        st.integers(min_value=0, max_value=200),
        st.floats(min_value=0.001, max_value=10.0),
        st.floats(min_value=1.0, max_value=1000.0),
        st.floats(min_value=0.0, max_value=1.0),
    )
    def test_withinBounds(self, seed, attempt, low, ratio, jitter):
        """
        Every delay lies in C{[base, min(max, base * (1 + jitter))]}, inside C{[min, max]}.
        """
        backoff = Backoff(min=low, max=low * ratio, jitter=jitter)
        delay = backoff.delay(attempt, Random(seed))
        lo, hi = backoff.bounds(attempt)
        self.assertEqual(lo, backoff.base(attempt))
        self.assertLessEqual(lo, delay)
        self.assertLessEqual(delay, hi)
        self.assertLessEqual(backoff.min, delay)
        self.assertLessEqual(delay, backoff.max)

    @pure
    @given(seeds, st.floats(min_value=0.0, max_value=1.0))
    def test_grows(self, seed, jitter):
        """
        With jitter at most 1, successive attempts never get shorter delays, whatever the draws.
        """
        backoff = Backoff(min=1.0, max=60.0, jitter=jitter)
        random = Random(seed)
        delays = [backoff.delay(n, random) for n in range(12)]
        self.assertEqual(delays, sorted(delays))


class ProbeIntervalTests(SynchronousTestCase):
    """
    L{ProbeInterval}: the same jittered delay, C{interval} to C{interval * (1 + jitter)}, for every attempt.
    """

    def test_defaults(self):
        """
        By default every delay lies in [1, 1.25] s, and the delays vary with the generator.
        """
        pace = ProbeInterval()
        random = Random(3)
        delays = [pace.delay(n, random) for n in range(200)]
        self.assertEqual(pace.bounds(0), (1.0, 1.25))
        self.assertEqual(pace.bounds(50), (1.0, 1.25))
        self.assertTrue(all(1.0 <= d <= 1.25 for d in delays), delays)
        self.assertGreater(len(set(delays)), 150)

    def test_invalid(self):
        """
        A non-positive interval, negative jitter or a negative attempt are refused with L{ValueError}.
        """
        self.assertRaises(ValueError, ProbeInterval, 0.0)
        self.assertRaises(ValueError, ProbeInterval, 1.0, -0.1)
        self.assertRaises(ValueError, ProbeInterval().delay, -1, Random(0))
        self.assertRaises(ValueError, ProbeInterval().bounds, -1)

    @pure
    @given(seeds, st.integers(min_value=0, max_value=10**6), st.floats(min_value=0.001, max_value=100.0),
           st.floats(min_value=0.0, max_value=2.0))
    def test_withinBounds(self, seed, attempt, interval, jitter):
        """
        Every delay lies within L{ProbeInterval.bounds}, never below the interval.
        """
        pace = ProbeInterval(interval, jitter)
        lo, hi = pace.bounds(attempt)
        self.assertEqual(lo, interval)
        self.assertTrue(lo <= pace.delay(attempt, Random(seed)) <= hi)


class FailureAccrualTests(SynchronousTestCase):
    """
    L{FailureAccrual} ejects after C{max_failures} consecutive failures and lets one probe through after the
    backoff.
    """

    def setUp(self):
        self.clock = Clock()
        self.random = Random(1234)

    def fail(self, accrual, times=1):
        """
        Send C{times} requests that fail, now.
        """
        for _ in range(times):
            accrual.on_start(self.clock.seconds())
            accrual.on_finish(self.clock.seconds(), False, self.random)

    def test_ejectsAfterSeven(self):
        """
        Six consecutive failures leave the endpoint ready; the seventh ejects it for a delay within the first
        backoff's bounds.
        """
        backoff = Backoff()
        accrual = FailureAccrual(max_failures=7, backoff=backoff)
        self.fail(accrual, 6)
        self.assertEqual(accrual.state(self.clock.seconds()), READY)
        self.assertTrue(accrual.available(self.clock.seconds()))
        self.fail(accrual)
        now = self.clock.seconds()
        self.assertEqual(accrual.state(now), EJECTED)
        self.assertFalse(accrual.available(now))
        lo, hi = backoff.bounds(0)
        self.assertTrue(now + lo <= accrual.ejected_until <= now + hi, accrual.ejected_until)

    def test_successResetsRun(self):
        """
        A success between failures restarts the count: 6 failures, a success, 6 failures stays ready.
        """
        accrual = FailureAccrual()
        self.fail(accrual, 6)
        accrual.on_finish(self.clock.seconds(), True, self.random)
        self.fail(accrual, 6)
        self.assertEqual(accrual.state(self.clock.seconds()), READY)

    def test_probeSuccessRestores(self):
        """
        Once the ejection ends the endpoint is probing and takes one request; that request's success makes it
        ready with its counters reset.
        """
        accrual = FailureAccrual()
        self.fail(accrual, 7)
        self.clock.advance(accrual.ejected_until - self.clock.seconds())
        now = self.clock.seconds()
        self.assertEqual(accrual.state(now), PROBING)
        self.assertTrue(accrual.available(now))
        accrual.on_start(now)
        self.assertEqual(accrual.state(now), PROBING)
        self.assertFalse(accrual.available(now), "only one probe at a time")
        self.clock.advance(0.05)
        accrual.on_finish(self.clock.seconds(), True, self.random)
        self.assertEqual(accrual.state(self.clock.seconds()), READY)
        self.assertEqual((accrual.failures, accrual.ejections), (0, 0))
        # The next ejection starts from the first backoff again.
        self.fail(accrual, 7)
        lo, hi = accrual.backoff.bounds(0)
        self.assertTrue(lo <= accrual.ejected_until - self.clock.seconds() <= hi)

    def test_probeFailureBacksOffFurther(self):
        """
        Each failed probe ejects again with the next attempt's backoff, so ejections grow.
        """
        backoff = Backoff(min=1.0, max=60.0, jitter=0.5)
        accrual = FailureAccrual(backoff=backoff)
        self.fail(accrual, 7)
        durations = [accrual.ejected_until - self.clock.seconds()]
        for attempt in range(1, 8):
            self.clock.advance(accrual.ejected_until - self.clock.seconds())
            self.assertEqual(accrual.state(self.clock.seconds()), PROBING)
            self.fail(accrual)
            self.assertEqual(accrual.state(self.clock.seconds()), EJECTED)
            duration = accrual.ejected_until - self.clock.seconds()
            lo, hi = backoff.bounds(attempt)
            self.assertTrue(lo <= duration <= hi, (attempt, duration))
            durations.append(duration)
        self.assertEqual(durations, sorted(durations))
        self.assertEqual(durations[-1], 60.0)

    def test_outcomesWhileEjectedIgnored(self):
        """
        Outcomes of requests sent before the ejection, arriving during it, neither extend nor end it.
        """
        accrual = FailureAccrual()
        self.fail(accrual, 7)
        until = accrual.ejected_until
        self.clock.advance(0.5)
        accrual.on_finish(self.clock.seconds(), False, self.random)
        accrual.on_finish(self.clock.seconds(), True, self.random)
        self.assertEqual(accrual.ejected_until, until)
        self.assertEqual(accrual.state(self.clock.seconds()), EJECTED)

    def test_invalid(self):
        """
        C{max_failures} below 1 is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, FailureAccrual, 0)

    @pure
    @given(seeds, st.integers(min_value=1, max_value=20), st.lists(st.booleans(), max_size=60))
    def test_ejectsExactlyAtThreshold(self, seed, max_failures, outcomes):
        """
        While never ejected, the endpoint is ejected exactly when the run of trailing failures reaches
        C{max_failures}.
        """
        random = Random(seed)
        accrual = FailureAccrual(max_failures=max_failures)
        run = 0
        for success in outcomes:
            accrual.on_start(0.0)
            accrual.on_finish(0.0, success, random)
            run = 0 if success else run + 1
            if run == max_failures:
                self.assertEqual(accrual.state(0.0), EJECTED)
                return
            self.assertEqual(accrual.state(0.0), READY)


class ProbePaceTests(SynchronousTestCase):
    """
    With the default L{ProbeInterval}, a recovered endpoint is back within about a second and a dead one is
    probed at most once a second.
    """

    def setUp(self):
        self.clock = Clock()
        self.random = Random(99)

    def eject(self, accrual):
        for _ in range(accrual.max_failures):
            accrual.on_start(self.clock.seconds())
            accrual.on_finish(self.clock.seconds(), False, self.random)

    def test_recoversWithinASecondAndAQuarter(self):
        """
        The probe becomes allowed 1 to 1.25 s after the ejection, and its success makes the endpoint ready.
        """
        accrual = FailureAccrual()
        self.eject(accrual)
        self.clock.advance(0.99)
        self.assertFalse(accrual.available(self.clock.seconds()))
        self.clock.advance(0.26)
        now = self.clock.seconds()
        self.assertTrue(accrual.available(now))
        accrual.on_start(now)
        self.assertEqual(accrual.on_finish(now + 0.01, True, self.random), READY)
        self.assertEqual(accrual.state(now + 0.01), READY)

    def test_deadEndpointProbedOncePerSecond(self):
        """
        An endpoint whose every probe fails (as a connect to a killed process does, at once) is sent no more
        than one request a second, over a long outage; every ejection stays within the pace's bounds.
        """
        accrual = FailureAccrual()
        self.eject(accrual)
        ejected_at = self.clock.seconds()
        probes = []
        # Offer a request every 10 ms for 60 s, as 100 req/s of traffic would.
        for _ in range(6000):
            self.clock.advance(0.01)
            now = self.clock.seconds()
            if accrual.available(now):
                accrual.on_start(now)
                probes.append(now)
                self.assertIsNone(accrual.on_finish(now, False, self.random))
        self.assertTrue(48 <= len(probes) <= 60, len(probes))
        gaps = [b - a for a, b in zip([ejected_at] + probes, probes)]
        self.assertTrue(all(gap >= 1.0 for gap in gaps), min(gaps))
        self.assertTrue(all(gap <= 1.25 + 0.01 + 1e-9 for gap in gaps), max(gaps))

    def test_cancelledProbesKeepThePace(self):
        """
        Probes that their clients cancel free the probe, but the next one still waits for the pace, so clients
        giving up cannot make the proxy probe a dead endpoint faster.
        """
        accrual = FailureAccrual()
        self.eject(accrual)
        probes = 0
        for _ in range(1000):
            self.clock.advance(0.01)
            now = self.clock.seconds()
            if accrual.available(now):
                accrual.on_start(now)
                probes += 1
                accrual.on_cancel(now + 0.005, self.random)
        self.assertTrue(8 <= probes <= 10, probes)
        self.assertEqual(accrual.failures, 0)

    def test_cancelWithoutRandomFreesAtOnce(self):
        """
        The older C{on_cancel(now)} form frees the probe for the very next request.
        """
        accrual = FailureAccrual()
        self.eject(accrual)
        later = accrual.ejected_until
        accrual.on_start(later)
        self.assertFalse(accrual.available(later))
        accrual.on_cancel(later)
        self.assertTrue(accrual.available(later))

    def test_neutralOutcomesNeverEject(self):
        """
        Thousands of cancelled requests, between failures or not, never eject nor count as failures.
        """
        accrual = FailureAccrual()
        for i in range(5000):
            now = i * 0.001
            accrual.on_start(now)
            accrual.on_cancel(now, self.random)
            if i % 1000 == 0:
                accrual.on_start(now)
                accrual.on_finish(now, False, self.random)
        self.assertEqual(accrual.state(5.0), READY)
        self.assertEqual(accrual.failures, 5)

    def test_transitions(self):
        """
        L{FailureAccrual.on_finish} says when the endpoint was ejected and when it recovered, and nothing for a
        failed probe; it records the latest failure's time, even for outcomes it otherwise ignores.
        """
        accrual = FailureAccrual(max_failures=2)
        self.assertIsNone(accrual.on_finish(1.0, False, self.random))
        self.assertEqual(accrual.last_failure, 1.0)
        self.assertEqual(accrual.on_finish(2.0, False, self.random), EJECTED)
        self.assertIsNone(accrual.on_finish(2.5, False, self.random))
        self.assertEqual(accrual.last_failure, 2.5)
        probe_at = accrual.ejected_until
        self.assertIsNone(accrual.on_finish(probe_at, False, self.random))
        self.assertEqual(accrual.on_finish(accrual.ejected_until, True, self.random), READY)
        self.assertIsNone(accrual.on_finish(100.0, True, self.random))
