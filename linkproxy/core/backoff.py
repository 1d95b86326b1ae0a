"""
Jittered delays as pure functions of the attempt number and a random generator: L{Backoff}, exponential, and
L{ProbeInterval}, a steady pace.

The shape follows linkerd2-proxy's C{ExponentialBackoff}: the base delay doubles with each attempt from C{min}
and saturates at C{max}; jitter then adds up to C{jitter} times the base, never going past C{max}.
"""

from random import Random
from typing import Tuple

# 2 ** 64 already dwarfs any sane max/min ratio; capping the exponent keeps huge attempt numbers from
# building enormous integers on every call.
_MAX_EXPONENT = 64


class Backoff:
    """
    Delay policy for retrying something that failed C{attempt} times before.

    For attempt C{n} (counting from 0) the base is C{b = min(max, min * 2 ** n)} and the delay is
    C{min(max, b + b * jitter * u)} with C{u} uniform in C{[0, 1)} drawn from the caller's generator.
    So every delay lies in L{bounds}C{(n)}: C{[b, min(max, b * (1 + jitter))]}, and with C{jitter <= 1} the
    delays never shrink as C{n} grows (the next base is already at least the previous upper bound).

    @ivar min: the base delay of attempt 0, in seconds.
    @ivar max: the ceiling for every delay, in seconds.
    @ivar jitter: the largest extra delay, as a fraction of the base.
    """

    def __init__(self, min: float = 1.0, max: float = 60.0, jitter: float = 0.5):
        """
        @raise ValueError: when C{min} is not positive, C{max < min}, or C{jitter} is negative.
        """
        if not min > 0:
            raise ValueError(f"backoff min must be positive, not {min!r}")
        if not max >= min:
            raise ValueError(f"backoff max ({max!r}) must be at least min ({min!r})")
        if not jitter >= 0:
            raise ValueError(f"backoff jitter must not be negative, not {jitter!r}")
        self.min = float(min)
        self.max = float(max)
        self.jitter = float(jitter)

    def __repr__(self) -> str:
        return f"Backoff(min={self.min!r}, max={self.max!r}, jitter={self.jitter!r})"

    def base(self, attempt: int) -> float:
        """
        The delay for C{attempt} before jitter.

        @param attempt: how many times this has been tried before; C{0} for the first retry.
        """
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, not {attempt!r}")
        exponent = attempt if attempt < _MAX_EXPONENT else _MAX_EXPONENT
        return min(self.max, self.min * (2 ** exponent))

    def bounds(self, attempt: int) -> Tuple[float, float]:
        """
        The closed range every L{delay} for C{attempt} falls in.

        @return: C{(low, high)} in seconds.
        """
        base = self.base(attempt)
        return base, min(self.max, base * (1.0 + self.jitter))

    def delay(self, attempt: int, random: Random) -> float:
        """
        A jittered delay for C{attempt}, drawing one number from C{random}.

        @param attempt: how many times this has been tried before; C{0} for the first retry.
        @param random: the caller's generator, so tests can seed it.
        @return: seconds, within L{bounds}C{(attempt)}.
        """
        base = self.base(attempt)
        # Always draw, even with no jitter, so the generator's sequence does not depend on the configuration.
        u = random.random()
        return min(self.max, base + base * self.jitter * u)


class ProbeInterval:
    """
    A steady, jittered pace: every attempt waits C{interval} to C{interval * (1 + jitter)} seconds, whatever
    its number. The default paces failure accrual's probes (see L{linkproxy.core.accrual}): a recovered
    endpoint is back within about a second, and a dead one is tried at most once a second.

    It has the same C{delay}/C{bounds} methods as L{Backoff}, so either can drive an accrual.

    @ivar interval: the shortest delay, in seconds.
    @ivar jitter: the largest extra delay, as a fraction of C{interval}.
    """

    def __init__(self, interval: float = 1.0, jitter: float = 0.25):
        """
        @raise ValueError: when C{interval} is not positive or C{jitter} is negative.
        """
        if not interval > 0:
            raise ValueError(f"probe interval must be positive, not {interval!r}")
        if not jitter >= 0:
            raise ValueError(f"probe interval jitter must not be negative, not {jitter!r}")
        self.interval = float(interval)
        self.jitter = float(jitter)

    def __repr__(self) -> str:
        return f"ProbeInterval(interval={self.interval!r}, jitter={self.jitter!r})"

    def bounds(self, attempt: int) -> Tuple[float, float]:
        """
        The closed range every L{delay} falls in, the same for every C{attempt}.

        @return: C{(low, high)} in seconds.
        """
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, not {attempt!r}")
        return self.interval, self.interval * (1.0 + self.jitter)

    def delay(self, attempt: int, random: Random) -> float:
        """
        A jittered delay, drawing one number from C{random}.

        @param attempt: ignored (kept for the L{Backoff} signature), but must not be negative.
        @return: seconds, within L{bounds}.
        """
        if attempt < 0:
            raise ValueError(f"attempt must not be negative, not {attempt!r}")
        # Jitter only ever lengthens the wait, so the pace never exceeds one attempt per interval.
        return self.interval + self.interval * self.jitter * random.random()
