"""
When a proxy asks the identity service for its next certificate, as a pure function of time, the current
certificate and a random generator.

After a success the next request comes at C{fraction} (70 %) of the time the new leaf has left. After a
failure it comes after a jittered exponential backoff (L{linkproxy.core.backoff.Backoff}), so that proxies
that lost the service together do not come back together; while a certificate is still valid, a retry
never waits more than half the time it has left, so there are several attempts before it expires. Those
shortened retries do not grow the backoff: a proxy whose certificate ran out while the service was away
comes back within the backoff its own choices reached, not the one the rush before expiry would have.
"""

from linkproxy.core.backoff import Backoff

__all__ = ["RenewalSchedule", "DEFAULT_FRACTION"]

DEFAULT_FRACTION = 0.7

# Below this, retries would only load the service; a certificate this close to expiry is lost anyway.
_MIN_RETRY = 0.1


class RenewalSchedule:
    """
    The delays between certification attempts for one proxy.

    @ivar failures: the failed attempts since the last success that grew the backoff.
    @ivar attempts: every failed attempt since the last success.
    """

    def __init__(self, random, fraction=DEFAULT_FRACTION, backoff=None):
        """
        @param random: a C{random.Random}; tests seed it.
        @param fraction: of a new leaf's remaining lifetime after which it is renewed, in (0, 1).
        @param backoff: the L{Backoff} for retries; 1 s doubling to 60 s, with up to 50 % jitter, by default.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be between 0 and 1, not {fraction!r}")
        self._random = random
        self.fraction = float(fraction)
        self.backoff = backoff if backoff is not None else Backoff(1.0, 60.0, 0.5)
        self.failures = 0
        self.attempts = 0

    def succeeded(self, now, not_after):
        """
        @param now: when the new leaf was received, in seconds.
        @param not_after: its notAfter, in seconds.
        @return: the delay until it should be renewed.
        """
        self.failures = self.attempts = 0
        return max(0.0, (not_after - now) * self.fraction)

    def failed(self, now, not_after=None):
        """
        @param now: when the attempt failed, in seconds.
        @param not_after: the notAfter of the certificate still in use, or C{None} when there is none.
        @return: the delay until the next attempt.
        """
        delay = self.backoff.delay(self.failures, self._random)
        self.attempts += 1
        if not_after is not None and now < not_after:
            limit = max(_MIN_RETRY, (not_after - now) / 2.0)
            if delay > limit:
                return limit
        self.failures += 1
        return delay
