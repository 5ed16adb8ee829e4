"""Retry timing, one way for every retry loop: exponential backoff with jitter, a cap, and a
give-up deadline measured in seconds of continuous failure.

    retry = Backoff(initial_s=0.5, max_s=10, give_up_after_s=120)
    while True:
        try:
            await attempt()
            retry.succeeded()              # the next failure starts again from initial_s
        except Transient as e:
            delay = retry.failed()         # None: failing for give_up_after_s, give up
            if delay is None:
                raise GaveUp(...)
            await asyncio.sleep(delay)

Rules:

* The n-th failure in a row waits ``min(max_s, initial_s * 2**(n-1))`` scaled by a random factor
  in ``[1 - jitter, 1]`` (so many workers restarted together do not retry in step).
* The deadline runs from the first failure of the current run of failures. No wait ends past it:
  the last wait is cut so that one more attempt happens at the deadline, and a failure at or after
  the deadline gives up. A give-up therefore comes ``give_up_after_s`` after the first failure,
  plus at most one attempt's own duration, never minutes later.
* ``succeeded()`` resets both the delay and the deadline. ``reached()`` resets only the deadline
  (the other side answered, so we are not "unable to reach it", but whatever followed was not a
  success worth restarting the backoff for; the bridge uses it for a session that got ready and
  died at once).

Pure: the clock and the random source are injected, so tests step through it without sleeping.
"""

from __future__ import annotations

import random
import time
from typing import Callable


class Backoff:
    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 10.0,
        give_up_after_s: float | None = None,
        *,
        jitter: float = 0.5,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("need 0 < initial_s <= max_s")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if give_up_after_s is not None and give_up_after_s < 0:
            raise ValueError("give_up_after_s must not be negative")
        self.initial_s = initial_s
        self.max_s = max_s
        self.give_up_after_s = give_up_after_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._clock = clock
        self.failures = 0  # in a row, since the last success
        self.failing_since: float | None = None  # start of the deadline's window

    def failed(self) -> float | None:
        """Record a failure. Returns how long to wait before the next attempt, or None when
        the failures have lasted ``give_up_after_s``: stop retrying."""
        now = self._clock()
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        delay = min(self.max_s, self.initial_s * 2 ** min(self.failures - 1, 60))
        delay *= 1.0 - self.jitter * self._rng.random()
        if self.give_up_after_s is not None:
            left = self.failing_since + self.give_up_after_s - now
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def succeeded(self) -> None:
        """A success: the next failure waits ``initial_s`` again, with a fresh deadline."""
        self.failures = 0
        self.failing_since = None

    def reached(self) -> None:
        """The other side answered: restart the give-up deadline, keep the growing delay."""
        self.failing_since = None

    def failing_for(self) -> float:
        """Seconds since the first failure of the current run (0 if not failing)."""
        return 0.0 if self.failing_since is None else self._clock() - self.failing_since
