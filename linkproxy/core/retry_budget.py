"""
The retry budget: how many retries a target's routes may make, as Linkerd's proxy (tower's C{TpsBudget}) and
finagle bound them.

Over a window of C{ttl} seconds the budget holds a reserve of C{min_per_second * ttl} retries, plus C{ratio}
per original request deposited in the window, minus the retries withdrawn in the window. A retry may go when
at least one is available. So a healthy target with few requests can still retry a few, and a failing one
adds at most C{ratio} extra load however many clients retry.

    budget = RetryBudget(BudgetSpec(ratio=0.2, min_per_second=10, ttl=10), now)
    budget.deposit(now)          # once per original request
    if budget.withdraw(now):     # before each retry
        ...retry...

The window moves in steps of C{ttl / 10}: ten slots hold the net tokens of their tenth of the window, and a
running total keeps the balance, so each call is a division, a comparison and an add (plus, after an idle
stretch, clearing at most ten slots). A deposit or withdrawal counts for between 0.9 and 1.0 C{ttl}
(tower's counts for 1.0 to 1.1 C{ttl}; this bound never lets old traffic count for more than C{ttl}).

Tokens are integers scaled by L{SCALE}, so a ratio such as 0.2 or 0.3 is exact and the balance never drifts:
tower truncates C{1 / ratio} to an integer, which for 0.3 allows a third of requests as retries, not 0.3.
Time is passed in; nothing here reads a clock.
"""

from fractions import Fraction

from linkproxy.core.profile import BudgetSpec

__all__ = ["RetryBudget", "SLOTS", "SCALE"]

#: Slots the window is divided into (tower's ten).
SLOTS = 10
#: Token units per retry.
SCALE = 1_000_000


def _exact(value: float) -> Fraction:
    # The decimal the operator wrote (0.3), not the binary float nearest it (0.29999...).
    return Fraction(repr(float(value)))


class RetryBudget:
    """
    One target's retry budget, fed by its original requests and drawn on by its retries.

    Not thread-safe: it lives on the reactor thread with the requests that use it.

    @ivar spec: the L{BudgetSpec} it was built from.
    """

    __slots__ = ("spec", "_rate", "_deposit", "_reserve", "_slots", "_index", "_epoch", "_total")

    def __init__(self, spec: BudgetSpec, now: float):
        """
        @param spec: its parameters (validated by L{linkproxy.core.profile.parse_profiles}).
        @param now: the current time in seconds (reactor time).
        """
        if not spec.ttl > 0:
            raise ValueError(f"ttl must be positive, not {spec.ttl!r}")
        if spec.ratio < 0 or spec.min_per_second < 0:
            raise ValueError("ratio and min_per_second must not be negative")
        self.spec = spec
        # Slots per second. Multiplied, not floor-divided by the slot width: 1.0 // 0.1 is 9.0 in floats.
        self._rate = SLOTS / spec.ttl
        # Rounded down: the budget may allow a hair less than the ratio, never more.
        self._deposit = int(_exact(spec.ratio) * SCALE)
        self._reserve = int(_exact(spec.min_per_second) * _exact(spec.ttl) * SCALE)
        self._slots = [0] * SLOTS
        self._index = 0
        self._epoch = int(now * self._rate)
        # The sum of the slots: the balance without the reserve.
        self._total = 0

    def __repr__(self):
        return f"<RetryBudget {self.spec} available={self._total + self._reserve} / {SCALE}>"

    def _advance(self, now: float) -> None:
        epoch = int(now * self._rate)
        steps = epoch - self._epoch
        if steps <= 0:
            # The same slot (or a clock that stepped back, which must not resurrect expired slots).
            return
        self._epoch = epoch
        slots = self._slots
        index = self._index
        for _ in range(steps if steps < SLOTS else SLOTS):
            index += 1
            if index == SLOTS:
                index = 0
            self._total -= slots[index]
            slots[index] = 0
        self._index = index

    def deposit(self, now: float) -> None:
        """
        Count one original request (not a retry): it earns C{ratio} retries for C{ttl} seconds.
        """
        # Once per request: skip the call when still in the current slot, the common case.
        if int(now * self._rate) != self._epoch:
            self._advance(now)
        self._slots[self._index] += self._deposit
        self._total += self._deposit

    def withdraw(self, now: float) -> bool:
        """
        Ask for one retry.

        @return: C{True} when the budget allows it (it is then counted), C{False} when it is exhausted.
        """
        self._advance(now)
        if self._total + self._reserve < SCALE:
            return False
        self._slots[self._index] -= SCALE
        self._total -= SCALE
        return True

    def available(self, now: float) -> float:
        """
        Retries the budget would allow now (for the dashboard and tests).
        """
        self._advance(now)
        return (self._total + self._reserve) / SCALE
