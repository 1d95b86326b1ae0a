"""
Tests for L{linkproxy.core.backoff} and L{linkproxy.core.accrual}: jittered exponential backoff and
consecutive-failure ejection with a single probe.
"""

from random import Random

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core.accrual import EJECTED, PROBING, READY, FailureAccrual
from linkproxy.core.backoff import Backoff

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
