"""
Traffic split: the weighted pick of a backend target per request, for a profile's C{split:} legs.

    splitter = Splitter((SplitLeg("web-v1.test:80", 90), SplitLeg("web-v2.test:80", 10)))
    target = splitter.pick(rng)    # "web-v1.test:80" about 90% of the time

The cumulative weights are computed once per split (a profile edit builds a new L{Splitter}), so a pick is one
C{random()} and one C{bisect}. The generator is passed in, so tests seed it.
"""

from bisect import bisect_right
from random import Random
from typing import Tuple

from linkproxy.core.profile import SplitLeg

__all__ = ["Splitter"]


class Splitter:
    """
    Picks one leg of a split at random, in proportion to the legs' weights.

    @ivar legs: the legs given, weight-0 ones included.
    @ivar targets: the targets that can be picked (weight above 0), in order.
    """

    __slots__ = ("legs", "targets", "_bounds", "_total", "_only")

    def __init__(self, legs: Tuple[SplitLeg, ...]):
        """
        @param legs: at least one with a weight above 0.
        @raise ValueError: when no leg has a weight above 0.
        """
        self.legs = tuple(legs)
        targets = []
        bounds = []
        total = 0
        for leg in self.legs:
            # A weight-0 leg is declared but drained: it is never picked.
            if leg.weight > 0:
                total += int(leg.weight)
                targets.append(leg.target)
                bounds.append(total)
        if not total:
            raise ValueError("a split needs at least one leg with a weight above 0")
        self.targets = tuple(targets)
        self._bounds = tuple(bounds)
        self._total = total
        # One live leg needs no random draw.
        self._only = targets[0] if len(targets) == 1 else None

    def __repr__(self):
        return f"<Splitter {[(leg.target, leg.weight) for leg in self.legs]}>"

    def pick(self, rng: Random) -> str:
        """
        @param rng: the generator to draw from.
        @return: the canonical target of the leg picked.
        """
        if self._only is not None:
            return self._only
        # A draw in [0, total) lands in leg i when bounds[i-1] <= draw < bounds[i]. random() rather than
        # randrange(): it is one C call, and with totals below 2**27 (100 legs of 10**6) its 53 bits leave
        # no measurable bias.
        return self.targets[bisect_right(self._bounds, rng.random() * self._total)]
