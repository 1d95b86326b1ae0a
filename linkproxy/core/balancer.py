"""
The built-in load balancers, all providing L{linkproxy.interfaces.IBalancer}.

  - L{P2CEwmaBalancer}: power of two choices over peak-EWMA cost, as Linkerd does (the default).
  - L{LeastRequestBalancer}: power of two choices over the number of requests in flight.
  - L{RoundRobinBalancer}: smooth weighted round-robin, as nginx does it.
  - L{RandomBalancer}: weighted random.

They share endpoint bookkeeping: per-endpoint state (requests in flight, RTT estimate, failure accrual) is keyed
by L{Endpoint.address} and survives L{update} for endpoints that remain; endpoints with weight C{0} are never
picked; ejected endpoints are never picked, and a probing one is offered for its single probe (see
L{linkproxy.core.accrual}).

They also provide L{linkproxy.interfaces.IResilientBalancer}:

  - C{pick(now, avoid)} never returns C{avoid} while another endpoint is available (for retries): the
    power-of-two-choices balancers compare two of the others, round-robin skips it, random draws from the
    others;
  - C{panic_pick(now, avoid)} is the endpoint to use when every endpoint with a weight is ejected: the one that
    failed least recently (panic mode, see L{linkproxy.routing});
  - C{listen(listener)} reports ejections and recoveries as they happen, for the router to log.

Weights: the power-of-two-choices balancers sample the pair by weight and then compare C{cost / weight}. Under
load this settles where C{cost / weight} is level across endpoints, so traffic follows the weights; when idle
(every cost equal) the heavier endpoint of a pair wins outright, which favours heavy endpoints more than their
weight alone would.

Sans-I/O: time is the C{now} parameter and randomness comes from the L{random.Random} each balancer is given.
"""

from bisect import bisect_right
from itertools import accumulate
from random import Random
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from zope.interface import implementer

from linkproxy.core.accrual import EJECTED, FailureAccrual
from linkproxy.core.backoff import Backoff, ProbeInterval
from linkproxy.core.endpoint import Address, Endpoint
from linkproxy.core.ewma import PeakEwma
from linkproxy.interfaces import IResilientBalancer

__all__ = [
    "choose_two",
    "P2CEwmaBalancer",
    "LeastRequestBalancer",
    "RoundRobinBalancer",
    "RandomBalancer",
]


def choose_two(n_or_weights: Union[int, Sequence[float]], random: Random) -> Tuple[int, int]:
    """
    Pick two distinct indices at random: the pair a power-of-two-choices balancer compares.

    @param n_or_weights: either a count C{n}, to pick uniformly from C{range(n)}, or a sequence of positive
        weights, to pick index C{i} with probability proportional to C{weights[i]} and then the second index the
        same way from the rest (weighted sampling without replacement).
    @param random: the generator to draw from (two draws).
    @return: C{(i, j)} with C{i != j}.
    @raise ValueError: with fewer than two choices, or a weight that is not positive.
    """
    if isinstance(n_or_weights, int):
        return _choose_two_uniform(n_or_weights, random)
    weights = list(n_or_weights)
    if len(weights) < 2:
        raise ValueError(f"choose_two needs at least two choices, not {len(weights)}")
    for w in weights:
        if not w > 0:
            raise ValueError(f"choose_two needs positive weights, not {w!r}")
    return _choose_two_cumulative(list(accumulate(weights)), random)


def _choose_two_uniform(n: int, random: Random) -> Tuple[int, int]:
    if n < 2:
        raise ValueError(f"choose_two needs at least two choices, not {n}")
    i = random.randrange(n)
    # Draw from the n - 1 others and step over i, so j is uniform over them and never equals i.
    j = random.randrange(n - 1)
    if j >= i:
        j += 1
    return i, j


def _choose_two_cumulative(cumulative: Sequence[float], random: Random) -> Tuple[int, int]:
    """
    L{choose_two} over running totals of positive weights (C{cumulative[k] = sum(weights[:k + 1])}).
    """
    n = len(cumulative)
    total = cumulative[-1]
    i = _index_at(cumulative, random.random() * total)
    low = cumulative[i - 1] if i else 0.0
    width = cumulative[i] - low
    # Draw over the total with i's interval cut out, then map back by skipping over that interval.
    x = random.random() * (total - width)
    if x >= low:
        x += width
    j = _index_at(cumulative, x)
    if j == i:
        # Only reachable through float rounding at an interval edge; any neighbour keeps the pair distinct.
        j = i + 1 if i + 1 < n else i - 1
    return i, j


def _index_at(cumulative: Sequence[float], x: float) -> int:
    k = bisect_right(cumulative, x)
    # x can round up to the total itself.
    return k if k < len(cumulative) else len(cumulative) - 1


class _Slot:
    """
    What a balancer knows about one endpoint.
    """

    __slots__ = ("endpoint", "weight", "pending", "ewma", "accrual", "current")

    def __init__(self, endpoint: Endpoint, accrual: FailureAccrual, ewma: Optional[PeakEwma]):
        self.endpoint = endpoint
        self.weight = _usable_weight(endpoint.weight)
        self.pending = 0
        self.ewma = ewma
        self.accrual = accrual
        # Smooth weighted round-robin's running "current weight".
        self.current = 0.0


def _usable_weight(weight: float) -> float:
    # Negative or NaN weights from discovery mean nothing sensible; treat them like 0 (drained).
    return float(weight) if weight > 0 else 0.0


class _Balancer:
    """
    Endpoint bookkeeping shared by the built-in balancers; subclasses supply L{_pick} and L{_cost}.
    """

    def __init__(self, random: Random, *, max_failures: int = 7,
                 backoff: Optional[Union[Backoff, ProbeInterval]] = None):
        """
        @param random: the generator this balancer owns (seeded in tests).
        @param max_failures: consecutive failures that eject an endpoint.
        @param backoff: how long ejections last; L{ProbeInterval}C{()} (1 to 1.25 s) when C{None}.
        """
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, not {max_failures!r}")
        self._random = random
        self._max_failures = max_failures
        self._backoff = backoff if backoff is not None else ProbeInterval()
        self._listener = None
        # Built once: the reason every ejection by this balancer gives.
        self._ejected_reason = f"{max_failures} consecutive failures"
        self._slots: List[_Slot] = []
        self._by_address: Dict[Address, _Slot] = {}
        self._live: List[_Slot] = []
        self._cumulative: List[float] = []
        self._uniform = True
        # Slots whose accrual is not ready (ejected or probing). While it is 0, every live slot is a
        # candidate and picks skip the per-request filtering pass.
        self._unhealthy = 0

    def _new_ewma(self, now: float) -> Optional[PeakEwma]:
        return None

    def update(self, endpoints: Iterable[Endpoint], now: float) -> None:
        """
        Replace the endpoint set, keeping state for addresses that remain.

        When an address appears twice, the later endpoint wins.
        """
        by_address: Dict[Address, _Slot] = {}
        for endpoint in endpoints:
            slot = by_address.get(endpoint.address) or self._by_address.get(endpoint.address)
            if slot is None:
                slot = _Slot(endpoint, FailureAccrual(self._max_failures, self._backoff), self._new_ewma(now))
            else:
                slot.endpoint = endpoint
                slot.weight = _usable_weight(endpoint.weight)
            by_address[endpoint.address] = slot
        self._by_address = by_address
        self._slots = list(by_address.values())
        self._live = [slot for slot in self._slots if slot.weight > 0]
        self._cumulative = list(accumulate(slot.weight for slot in self._live))
        self._uniform = len({slot.weight for slot in self._live}) <= 1
        self._unhealthy = sum(1 for slot in self._slots if slot.accrual.ejected_until is not None)

    def _candidates(self, now: float) -> List[_Slot]:
        if not self._unhealthy:
            return self._live
        return [slot for slot in self._live if slot.accrual.available(now)]

    def listen(self, listener) -> None:
        """
        Report endpoint health transitions to C{listener(endpoint, event, reason)}, called from L{finish}
        when they happen: C{event} is C{"ejected"} (C{reason} e.g. C{"7 consecutive failures"}) or
        C{"recovered"} (C{"probe succeeded"}). Failed probes, which only extend an ejection, are not reported.

        @param listener: the callable, or C{None} to stop reporting.
        """
        self._listener = listener

    def pick(self, now: float, avoid: Optional[Endpoint] = None) -> Optional[Endpoint]:
        """
        Choose an endpoint, or return C{None} when the set is empty, all weights are 0, or every endpoint is
        ejected (or probing with its probe already out).

        @param avoid: an endpoint (matched by address) not to pick while another is available: the one a
            retried request just failed on. When it is the only one available it is picked all the same.
        """
        candidates = self._candidates(now)
        if not candidates:
            return None
        if avoid is not None and len(candidates) > 1:
            # Only retries get here, so the new list costs nothing on the ordinary path.
            address = avoid.address
            others = [slot for slot in candidates if slot.endpoint.address != address]
            if len(others) < len(candidates):
                candidates = others
        if len(candidates) == 1:
            return candidates[0].endpoint
        return self._pick(candidates, candidates is self._live, now).endpoint

    def panic_pick(self, now: float, avoid: Optional[Endpoint] = None) -> Optional[Endpoint]:
        """
        The endpoint to send to when L{pick} found none available although some have a weight: the one whose
        latest failure is oldest (ties go to discovery order). Every failure moves an endpoint to the back, so
        panic traffic spreads over the ejected endpoints and settles on any that answer.

        @param avoid: as for L{pick}.
        @return: an L{Endpoint}, or C{None} when no endpoint has a weight (or the set is empty).
        """
        best = None
        best_failure = 0.0
        address = avoid.address if avoid is not None and len(self._live) > 1 else None
        for slot in self._live:
            if slot.endpoint.address == address:
                continue
            failed = slot.accrual.last_failure
            if failed is None:
                return slot.endpoint
            if best is None or failed < best_failure:
                best, best_failure = slot, failed
        return best.endpoint if best is not None else None

    def _pick(self, candidates: List[_Slot], all_live: bool, now: float) -> _Slot:
        raise NotImplementedError()

    def _cost(self, slot: _Slot, now: float) -> float:
        return float(slot.pending)

    def start(self, endpoint: Endpoint, now: float) -> None:
        """
        A request to C{endpoint} begins; if the endpoint is probing, this request is its probe.

        Call it right after L{pick} returned C{endpoint}, before picking again, so a probing endpoint gets
        exactly one probe.
        """
        slot = self._by_address.get(endpoint.address)
        if slot is None:
            return
        slot.pending += 1
        slot.accrual.on_start(now)

    def finish(self, endpoint: Endpoint, now: float, rtt: Optional[float], success: Optional[bool]) -> None:
        """
        The request L{start} counted has its outcome: feed the RTT estimate (when C{rtt} is known) and the
        failure accrual.

        @param success: C{True} or C{False} (see L{linkproxy.core.classify} for what counts as a failure);
            C{None} when the outcome was not the endpoint's doing (the client cancelled or reset, or the proxy
            refused the request), which frees its pending slot (and a probe, paced by the backoff) but counts
            neither way.

        Outcomes for endpoints no longer in the set are ignored.
        """
        slot = self._by_address.get(endpoint.address)
        if slot is None:
            return
        if slot.pending > 0:
            slot.pending -= 1
        if success is None:
            slot.accrual.on_cancel(now, self._random)
            return
        if rtt is not None and slot.ewma is not None:
            slot.ewma.observe(rtt, now)
        change = slot.accrual.on_finish(now, success, self._random)
        if change is not None:
            listener = self._listener
            if change == EJECTED:
                self._unhealthy += 1
                if listener is not None:
                    listener(slot.endpoint, "ejected", self._ejected_reason)
            else:
                self._unhealthy -= 1
                if listener is not None:
                    listener(slot.endpoint, "recovered", "probe succeeded")

    def snapshot(self, now: float) -> List[Tuple[Endpoint, str, float]]:
        """
        @return: C{(endpoint, state, cost)} for every endpoint in the set, in update order; C{state} is
            C{"ready"}, C{"ejected"} or C{"probing"}, and C{cost} is this balancer's load measure before
            weighting (the peak-EWMA cost for L{P2CEwmaBalancer}, requests in flight plus one for
            L{LeastRequestBalancer}, requests in flight otherwise).
        """
        return [(slot.endpoint, slot.accrual.state(now), self._cost(slot, now)) for slot in self._slots]


class _PowerOfTwoChoices(_Balancer):
    """
    Sample two distinct candidates (by weight) and take the one with the lower C{cost / weight}.
    """

    def _pick(self, candidates: List[_Slot], all_live: bool, now: float) -> _Slot:
        if all_live:
            if self._uniform:
                i, j = _choose_two_uniform(len(candidates), self._random)
            else:
                i, j = _choose_two_cumulative(self._cumulative, self._random)
        else:
            i, j = choose_two([slot.weight for slot in candidates], self._random)
        return self._compare(candidates[i], candidates[j], now)

    def _compare(self, a: _Slot, b: _Slot, now: float) -> _Slot:
        # Ties go to the first draw, which was itself drawn by weight.
        if self._cost(a, now) * b.weight <= self._cost(b, now) * a.weight:
            return a
        return b


@implementer(IResilientBalancer)
class P2CEwmaBalancer(_PowerOfTwoChoices):
    """
    Power of two choices over peak-EWMA cost: C{rtt_estimate * (pending + 1)} (see L{PeakEwma}).
    """

    def __init__(
        self,
        random: Random,
        *,
        default_rtt: float = 0.030,
        decay: float = 10.0,
        max_failures: int = 7,
        backoff: Optional[Backoff] = None,
    ):
        """
        @param random: the generator this balancer owns (seeded in tests).
        @param default_rtt: the RTT estimate, in seconds, of an endpoint not yet measured.
        @param decay: the peak-EWMA time constant, in seconds.
        @param max_failures: consecutive failures that eject an endpoint.
        @param backoff: how long ejections last; L{Backoff}C{()} when C{None}.
        """
        # Fail on bad parameters now, not when the first endpoint arrives.
        PeakEwma(default_rtt, decay)
        super().__init__(random, max_failures=max_failures, backoff=backoff)
        self._default_rtt = default_rtt
        self._decay = decay

    def _new_ewma(self, now: float) -> Optional[PeakEwma]:
        return PeakEwma(self._default_rtt, self._decay, now=now)

    def _cost(self, slot: _Slot, now: float) -> float:
        return slot.ewma.cost(now, slot.pending)


@implementer(IResilientBalancer)
class LeastRequestBalancer(_PowerOfTwoChoices):
    """
    Power of two choices over requests in flight: cost C{pending + 1}, so that weight still breaks ties
    between idle endpoints.
    """

    def _cost(self, slot: _Slot, now: float) -> float:
        return float(slot.pending + 1)


@implementer(IResilientBalancer)
class RoundRobinBalancer(_Balancer):
    """
    Smooth weighted round-robin (nginx): each pick adds every candidate's weight to its running total, takes
    the candidate with the highest total and subtracts the sum of weights from it. Over any run of picks each
    endpoint's share stays within one pick of its weight share, and heavy endpoints are interleaved with light
    ones rather than served in bursts.

    Ties go to a random candidate, so proxies that start together do not all begin on the same endpoint.
    """

    def _pick(self, candidates: List[_Slot], all_live: bool, now: float) -> _Slot:
        total = 0.0
        best: List[_Slot] = []
        best_current = float("-inf")
        for slot in candidates:
            slot.current += slot.weight
            total += slot.weight
            if slot.current > best_current:
                best_current = slot.current
                best = [slot]
            elif slot.current == best_current:
                best.append(slot)
        chosen = best[0] if len(best) == 1 else best[self._random.randrange(len(best))]
        chosen.current -= total
        return chosen


@implementer(IResilientBalancer)
class RandomBalancer(_Balancer):
    """
    Pick a candidate at random with probability proportional to its weight.
    """

    def _pick(self, candidates: List[_Slot], all_live: bool, now: float) -> _Slot:
        if all_live:
            if self._uniform:
                return candidates[self._random.randrange(len(candidates))]
            cumulative = self._cumulative
        else:
            cumulative = list(accumulate(slot.weight for slot in candidates))
        return candidates[_index_at(cumulative, self._random.random() * cumulative[-1])]
