"""
Consecutive-failure accrual: take an endpoint out of balancing after a run of failures, and let it back in
through a single probe request, paced at about one a second.

The life of an endpoint::

    ready --(max_failures consecutive failures)--> ejected until now + backoff.delay(n)
    ejected --(time reaches that deadline)--> probing: exactly one real request (the probe) may be sent
    probing --(an outcome arrives: success)--> ready, failure count and n reset to 0
    probing --(an outcome arrives: failure)--> ejected again until now + backoff.delay(n + 1)
    probing --(the probe is cancelled by its client)--> ejected again until now + backoff.delay(n)

C{n} counts consecutive ejections. The default L{ProbeInterval} waits 1 to 1.25 s whatever C{n} is: a
recovered endpoint takes traffic again about a second after it recovers, and one that stays down is sent at
most one request (one connection attempt) a second. An exponential L{linkproxy.core.backoff.Backoff} may be
given instead, for the older, growing ejections.

What counts as a failure is the caller's business (see L{linkproxy.core.classify}); outcomes the client caused
are reported through L{FailureAccrual.on_cancel}, never as failures.

Time and randomness are parameters.
"""

from random import Random
from typing import Optional

from linkproxy.core.backoff import ProbeInterval

READY = "ready"
EJECTED = "ejected"
PROBING = "probing"


class FailureAccrual:
    """
    The failure-accrual state of one endpoint.

    Outcomes are matched to requests only by time, because L{linkproxy.interfaces.IBalancer.finish} carries no
    request identity: an outcome arriving while the endpoint is ejected belongs to a request sent before the
    ejection (or sent in panic mode, see L{linkproxy.routing}) and does not change the ejection, and the first
    outcome arriving while it is probing decides the probe, even when it comes from such an older request (it
    is still fresh news about the endpoint).

    @ivar max_failures: consecutive failures that eject the endpoint.
    @ivar backoff: what decides how long each ejection lasts: a L{ProbeInterval} (the default) or a
        L{linkproxy.core.backoff.Backoff}, or anything with their C{delay(attempt, random)}.
    @ivar failures: the current run of consecutive failures.
    @ivar ejections: consecutive ejections so far; the attempt number of the next backoff delay.
    @ivar ejected_until: when the current ejection ends, or C{None} while ready.
    @ivar probe_in_flight: C{True} once the probe has been sent and until its outcome arrives.
    @ivar last_failure: when the latest failure was reported (ignored ones included), or C{None}; panic mode
        prefers the endpoint that failed least recently.
    """

    __slots__ = ("max_failures", "backoff", "failures", "ejections", "ejected_until", "probe_in_flight",
                 "last_failure")

    def __init__(self, max_failures: int = 7, backoff=None):
        """
        @param backoff: a L{ProbeInterval} or L{linkproxy.core.backoff.Backoff}; C{ProbeInterval()} when C{None}.
        @raise ValueError: when C{max_failures} is less than 1.
        """
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, not {max_failures!r}")
        self.max_failures = max_failures
        self.backoff = backoff if backoff is not None else ProbeInterval()
        self.failures = 0
        self.ejections = 0
        self.ejected_until: Optional[float] = None
        self.probe_in_flight = False
        self.last_failure: Optional[float] = None

    def __repr__(self) -> str:
        return (
            f"<FailureAccrual failures={self.failures} ejections={self.ejections}"
            f" ejected_until={self.ejected_until!r} probe_in_flight={self.probe_in_flight}>"
        )

    def state(self, now: float) -> str:
        """
        @return: L{READY}, L{EJECTED} or L{PROBING} as of C{now}.
        """
        if self.ejected_until is None:
            return READY
        if now < self.ejected_until:
            return EJECTED
        return PROBING

    def available(self, now: float) -> bool:
        """
        Whether a request may be sent now: the endpoint is ready, or probing with its probe not yet sent.
        """
        if self.ejected_until is None:
            return True
        return now >= self.ejected_until and not self.probe_in_flight

    def on_start(self, now: float) -> None:
        """
        A request is being sent; while probing, it becomes the probe.
        """
        if self.ejected_until is not None and now >= self.ejected_until:
            self.probe_in_flight = True

    def on_cancel(self, now: float, random: Optional[Random] = None) -> None:
        """
        A request ended without an outcome (its client gave up, or the proxy refused it): it says nothing
        about the endpoint. If it was the probe, the endpoint may be probed again, by the next request once
        another C{backoff} delay has passed, so that clients cancelling probes cannot make the proxy probe a
        dead endpoint faster than the backoff allows.

        @param random: the balancer's generator, for that delay's jitter; without it (the older form of this
            call) the next request may probe at once.
        """
        if self.ejected_until is not None and now >= self.ejected_until:
            self.probe_in_flight = False
            if random is not None:
                self.ejected_until = now + self.backoff.delay(self.ejections - 1 if self.ejections else 0, random)

    def on_finish(self, now: float, success: bool, random: Random) -> Optional[str]:
        """
        Record one request's outcome.

        @param random: the balancer's generator, for the backoff jitter.
        @return: L{EJECTED} when this outcome took the endpoint out of a ready state, L{READY} when it brought
            it back (its probe succeeded), else C{None}; failed probes, which eject again, give C{None}.
        """
        if not success:
            self.last_failure = now
        if self.ejected_until is not None:
            if now < self.ejected_until:
                return None
            self.probe_in_flight = False
            if success:
                self.ejected_until = None
                self.failures = 0
                self.ejections = 0
                return READY
            self._eject(now, random)
            return None
        if success:
            self.failures = 0
            return None
        self.failures += 1
        if self.failures >= self.max_failures:
            self._eject(now, random)
            return EJECTED
        return None

    def _eject(self, now: float, random: Random) -> None:
        self.ejected_until = now + self.backoff.delay(self.ejections, random)
        self.ejections += 1
        self.failures = 0
