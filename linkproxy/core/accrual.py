"""
Consecutive-failure accrual: take an endpoint out of balancing after a run of failures, and let it back in
through a single probe request once a backoff has passed.

The life of an endpoint::

    ready --(max_failures consecutive failures)--> ejected until now + backoff.delay(n)
    ejected --(time reaches that deadline)--> probing: exactly one real request (the probe) may be sent
    probing --(an outcome arrives: success)--> ready, failure count and n reset to 0
    probing --(an outcome arrives: failure)--> ejected again with backoff.delay(n + 1)

C{n} counts consecutive ejections, so the backoff grows each time a probe fails. Time and randomness are
parameters.
"""

from random import Random
from typing import Optional

from linkproxy.core.backoff import Backoff

READY = "ready"
EJECTED = "ejected"
PROBING = "probing"


class FailureAccrual:
    """
    The failure-accrual state of one endpoint.

    Outcomes are matched to requests only by time, because L{linkproxy.interfaces.IBalancer.finish} carries no
    request identity: an outcome arriving while the endpoint is ejected belongs to a request sent before the
    ejection and is ignored, and the first outcome arriving while it is probing decides the probe, even when it
    comes from such an older request (it is still fresh news about the endpoint).

    @ivar max_failures: consecutive failures that eject the endpoint.
    @ivar backoff: the L{Backoff} deciding how long each ejection lasts.
    @ivar failures: the current run of consecutive failures.
    @ivar ejections: consecutive ejections so far; the attempt number of the next backoff delay.
    @ivar ejected_until: when the current ejection ends, or C{None} while ready.
    @ivar probe_in_flight: C{True} once the probe has been sent and until its outcome arrives.
    """

    def __init__(self, max_failures: int = 7, backoff: Optional[Backoff] = None):
        """
        @raise ValueError: when C{max_failures} is less than 1.
        """
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, not {max_failures!r}")
        self.max_failures = max_failures
        self.backoff = backoff if backoff is not None else Backoff()
        self.failures = 0
        self.ejections = 0
        self.ejected_until: Optional[float] = None
        self.probe_in_flight = False

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

    def on_cancel(self, now: float) -> None:
        """
        A request ended without an outcome (its client gave up): it says nothing about the endpoint. If it
        was the probe, the endpoint may be probed again by the next request.
        """
        if self.ejected_until is not None and now >= self.ejected_until:
            self.probe_in_flight = False

    def on_finish(self, now: float, success: bool, random: Random) -> None:
        """
        Record one request's outcome.

        @param random: the balancer's generator, for the backoff jitter.
        """
        if self.ejected_until is not None:
            if now < self.ejected_until:
                return
            self.probe_in_flight = False
            if success:
                self.ejected_until = None
                self.failures = 0
                self.ejections = 0
            else:
                self._eject(now, random)
            return
        if success:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.max_failures:
            self._eject(now, random)

    def _eject(self, now: float, random: Random) -> None:
        self.ejected_until = now + self.backoff.delay(self.ejections, random)
        self.ejections += 1
        self.failures = 0
