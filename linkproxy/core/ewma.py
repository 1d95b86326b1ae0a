"""
Peak-EWMA latency estimation, after tower's C{load::PeakEwma} (itself after Finagle).

The estimate is an exponentially weighted moving average of round-trip times that jumps straight to any RTT
worse than itself (the "peak"), so one slow response is felt at once, and that then decays: toward later,
faster observations when they arrive, and toward zero while nothing is observed, so an endpoint that was slow
once is tried again eventually.

Time is always a parameter (seconds on a monotonic clock); nothing here reads a clock.
"""

import math
from typing import Optional


class PeakEwma:
    """
    The peak-EWMA RTT estimate of one endpoint.

    State is C{(estimate, stamp)}: the estimate in seconds as of time C{stamp}. With C{tau = decay}:

      - L{observe}C{(rtt, now)}: with C{elapsed = now - stamp}, if C{rtt > estimate} then
        C{estimate = rtt}; otherwise, with C{w = exp(-elapsed / tau)},
        C{estimate = estimate * w + rtt * (1 - w)}. Either way C{stamp = now}.
      - L{estimate_at}C{(now)} is C{estimate * exp(-(now - stamp) / tau)}: tower's decay, which is an update
        with a zero RTT, so the estimate fades toward zero while nothing is observed.
      - L{cost}C{(now, pending)} is C{estimate_at(now) * (pending + 1)}.

    One deliberate difference from tower: reading the cost does not change state. Tower's C{load()} stores the
    decayed value and moves the stamp, so how often a balancer happens to look at an endpoint would change the
    weight of its next observation; here only observations move the stamp, and metric scrapes or extra P2C
    comparisons cannot skew the estimate. Repeated reads return the same values tower would, because decay
    toward zero composes (C{exp(-a) * exp(-b) == exp(-(a + b))}).

    Before any time is known (C{now=None} at construction and no observation yet) the default does not decay.

    @ivar default_rtt: the starting estimate, in seconds, used until real RTTs arrive.
    @ivar decay: the time constant C{tau} in seconds: after C{tau} without observations the estimate has
        fallen to about 37% of its value.
    @ivar estimate: the estimate as of C{stamp}, in seconds.
    @ivar stamp: when the estimate was last set, or C{None}.
    """

    def __init__(self, default_rtt: float = 0.030, decay: float = 10.0, now: Optional[float] = None):
        """
        @param now: when the endpoint appeared; the default estimate starts decaying from here.
        @raise ValueError: when C{default_rtt} is negative or C{decay} is not positive.
        """
        if not default_rtt >= 0:
            raise ValueError(f"default_rtt must not be negative, not {default_rtt!r}")
        if not decay > 0:
            raise ValueError(f"decay must be positive, not {decay!r}")
        self.default_rtt = float(default_rtt)
        self.decay = float(decay)
        self.estimate = self.default_rtt
        self.stamp = now

    def __repr__(self) -> str:
        return f"<PeakEwma estimate={self.estimate!r} stamp={self.stamp!r} decay={self.decay!r}>"

    def _weight(self, now: float) -> float:
        """
        How much of the stored estimate survives to C{now}.
        """
        if self.stamp is None:
            return 1.0
        # A clock that steps back must not amplify the estimate.
        elapsed = max(0.0, now - self.stamp)
        return math.exp(-elapsed / self.decay)

    def observe(self, rtt: float, now: float) -> None:
        """
        Fold one measured round-trip time into the estimate.

        @param rtt: seconds, not negative.
        @param now: when the response arrived.
        """
        if rtt > self.estimate:
            self.estimate = float(rtt)
        else:
            w = self._weight(now)
            self.estimate = self.estimate * w + rtt * (1.0 - w)
        self.stamp = now

    def estimate_at(self, now: float) -> float:
        """
        The estimate decayed toward zero from C{stamp} to C{now}, in seconds. Does not change state.
        """
        return self.estimate * self._weight(now)

    def cost(self, now: float, pending: int) -> float:
        """
        The expected time to drain this endpoint's queue plus one more request. Does not change state.

        @param pending: requests in flight to this endpoint.
        """
        return self.estimate_at(now) * (pending + 1)
