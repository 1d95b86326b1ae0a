"""
Tests for L{linkproxy.core.ewma}: peak-EWMA RTT estimation driven by a L{task.Clock}.
"""

import math

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core.ewma import PeakEwma

# Fixed generation so a failure reproduces everywhere, and no example database is written into the checkout.
pure = settings(derandomize=True, database=None, deadline=None, max_examples=200)

rtts = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
steps = st.floats(min_value=0.0, max_value=120.0, allow_nan=False)


class PeakEwmaTests(SynchronousTestCase):
    """
    L{PeakEwma} jumps to peaks, blends lower RTTs by elapsed time, and decays toward zero when idle.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000.0)

    def test_defaultCost(self):
        """
        A fresh estimate costs C{default_rtt * (pending + 1)} at the moment it was created.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        self.assertEqual(ewma.cost(self.clock.seconds(), 0), 0.030)
        self.assertEqual(ewma.cost(self.clock.seconds(), 3), 0.030 * 4)

    def test_defaultDecays(self):
        """
        The default estimate decays toward zero as C{exp(-elapsed / decay)}, as tower's does.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        self.clock.advance(10.0)
        self.assertAlmostEqual(ewma.cost(self.clock.seconds(), 0), 0.030 * math.exp(-1.0))
        self.clock.advance(0.1)
        self.assertAlmostEqual(ewma.estimate_at(self.clock.seconds()), 0.030 * math.exp(-1.01))

    def test_defaultWithoutTime(self):
        """
        Without a creation time and before any observation, the default does not decay.
        """
        ewma = PeakEwma(default_rtt=0.5, decay=1.0)
        self.assertEqual(ewma.cost(1e9, 1), 1.0)

    def test_peak(self):
        """
        An RTT above the estimate replaces it outright, however little time has passed.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        self.clock.advance(0.001)
        ewma.observe(2.5, self.clock.seconds())
        self.assertEqual(ewma.estimate, 2.5)
        self.assertEqual(ewma.cost(self.clock.seconds(), 1), 5.0)

    def test_lowerRttBlends(self):
        """
        An RTT below the estimate moves it toward that RTT with weight C{1 - exp(-elapsed / decay)}.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        ewma.observe(1.0, self.clock.seconds())
        self.clock.advance(5.0)
        ewma.observe(0.1, self.clock.seconds())
        w = math.exp(-0.5)
        self.assertAlmostEqual(ewma.estimate, 1.0 * w + 0.1 * (1 - w))
        self.assertEqual(ewma.stamp, self.clock.seconds())

    def test_lowerRttSameInstant(self):
        """
        A lower RTT observed at the same instant as the last update leaves the estimate alone: no time, no
        decay.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        ewma.observe(1.0, self.clock.seconds())
        ewma.observe(0.1, self.clock.seconds())
        self.assertEqual(ewma.estimate, 1.0)

    def test_peakDecaysAfterwards(self):
        """
        After a peak, the cost fades with idle time: tower's C{compound_decay} shape.
        """
        ewma = PeakEwma(default_rtt=0.020, decay=1.0, now=self.clock.seconds())
        ewma.observe(0.2, self.clock.seconds())
        self.assertEqual(ewma.cost(self.clock.seconds(), 0), 0.2)
        self.clock.advance(1.0)
        self.assertLess(ewma.cost(self.clock.seconds(), 0), 0.1)
        self.clock.advance(10.0)
        self.assertLess(ewma.cost(self.clock.seconds(), 0), 0.0001)

    def test_clockBackwards(self):
        """
        A C{now} before the last update is treated as no elapsed time rather than growing the estimate.
        """
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=self.clock.seconds())
        ewma.observe(1.0, self.clock.seconds())
        self.assertEqual(ewma.cost(self.clock.seconds() - 5.0, 0), 1.0)

    def test_invalid(self):
        """
        A negative default RTT or a non-positive decay is refused with L{ValueError}.
        """
        self.assertRaises(ValueError, PeakEwma, -1.0, 10.0)
        self.assertRaises(ValueError, PeakEwma, 0.030, 0.0)
        self.assertRaises(ValueError, PeakEwma, 0.030, float("nan"))

    @pure
    @given(st.lists(st.tuples(steps, rtts), max_size=30), st.lists(steps, min_size=1, max_size=10))
    def test_readsArePure(self, observations, reads):
        """
        Reading the cost never changes state: after any observations, a sequence of reads at increasing
        times gives exactly C{estimate * exp(-(now - stamp) / decay)} each time, and tower's composed decay.
        """
        clock = Clock()
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=clock.seconds())
        for step, rtt in observations:
            clock.advance(step)
            ewma.observe(rtt, clock.seconds())
        estimate, stamp = ewma.estimate, ewma.stamp
        previous = ewma.cost(clock.seconds(), 0)
        for step in reads:
            clock.advance(step)
            now = clock.seconds()
            cost = ewma.cost(now, 0)
            self.assertAlmostEqual(cost, estimate * math.exp(-(now - stamp) / 10.0))
            self.assertLessEqual(cost, previous)
            previous = cost
        self.assertEqual((ewma.estimate, ewma.stamp), (estimate, stamp))

    @pure
    @given(st.lists(st.tuples(steps, rtts), min_size=1, max_size=30))
    def test_observeBounds(self, observations):
        """
        After each observation the estimate equals the RTT if it was a peak, and otherwise lies between the
        RTT and the previous estimate.
        """
        clock = Clock()
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=clock.seconds())
        for step, rtt in observations:
            clock.advance(step)
            before = ewma.estimate
            ewma.observe(rtt, clock.seconds())
            if rtt > before:
                self.assertEqual(ewma.estimate, rtt)
            else:
                self.assertGreaterEqual(ewma.estimate, rtt - 1e-12)
                self.assertLessEqual(ewma.estimate, before + 1e-12)

    @pure
    @given(steps, rtts, st.integers(min_value=0, max_value=1000))
    def test_costScalesWithPending(self, step, rtt, pending):
        """
        The cost is the decayed estimate times C{pending + 1}.
        """
        clock = Clock()
        ewma = PeakEwma(default_rtt=0.030, decay=10.0, now=clock.seconds())
        ewma.observe(rtt, clock.seconds())
        clock.advance(step)
        now = clock.seconds()
        self.assertAlmostEqual(ewma.cost(now, pending), ewma.estimate_at(now) * (pending + 1))
