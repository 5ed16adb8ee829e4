"""The one backoff every retry loop uses: growth, cap, jitter, a deadline in seconds, resets."""

from __future__ import annotations

import random

import pytest

from backoff import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_up_to_the_cap_with_jitter_below_the_nominal_value():
    clock = Clock()
    retry = Backoff(0.5, 10.0, jitter=0.5, rng=random.Random(7), clock=clock)
    delays = [retry.failed() for _ in range(8)]
    nominal = [0.5, 1, 2, 4, 8, 10, 10, 10]
    for got, want in zip(delays, nominal):
        assert want * 0.5 <= got <= want
    assert len(set(delays)) == len(delays), "jittered"


def test_no_jitter_gives_the_nominal_delays():
    retry = Backoff(0.25, 2.0, jitter=0.0, clock=Clock())
    assert [retry.failed() for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]


def run_until_given_up(retry: Backoff, clock: Clock, attempt_s: float) -> float:
    """Fail every attempt (each taking attempt_s), sleeping as told; return the time from the
    first failure to the give-up."""
    first = None
    while True:
        clock.now += attempt_s
        first = clock.now if first is None else first
        delay = retry.failed()
        if delay is None:
            return clock.now - first
        clock.now += delay


@pytest.mark.parametrize("give_up, attempt_s", [(5.0, 0.0), (120.0, 0.01), (120.0, 3.0), (1.0, 0.2)])
def test_gives_up_on_time_in_seconds_not_attempts(give_up, attempt_s):
    clock = Clock()
    retry = Backoff(0.5, 10.0, give_up, rng=random.Random(1), clock=clock)
    elapsed = run_until_given_up(retry, clock, attempt_s)
    assert give_up <= elapsed <= give_up + attempt_s + 1e-9


def test_the_last_wait_ends_at_the_deadline_for_one_more_attempt():
    clock = Clock()
    retry = Backoff(4.0, 10.0, 5.0, jitter=0.0, clock=clock)
    assert retry.failed() == 4.0
    clock.now += 4.0
    assert retry.failed() == pytest.approx(1.0), "cut to the deadline, not 8 s"
    clock.now += 1.0
    assert retry.failed() is None


def test_success_resets_delay_and_deadline():
    clock = Clock()
    retry = Backoff(1.0, 10.0, 30.0, jitter=0.0, clock=clock)
    for _ in range(4):
        clock.now += retry.failed()
    retry.succeeded()
    assert retry.failures == 0 and retry.failing_for() == 0.0
    assert retry.failed() == 1.0


def test_reaching_the_service_restarts_the_deadline_but_not_the_delay():
    """A session that gets ready and dies at once: the service is there (no give-up), but the
    next attempt still waits longer (no reconnect storm)."""
    clock = Clock()
    retry = Backoff(1.0, 100.0, 10.0, jitter=0.0, clock=clock)
    for expected in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
        retry.reached()
        delay = retry.failed()
        assert delay == min(expected, 10.0)
        clock.now += delay


def test_never_gives_up_without_a_deadline():
    clock = Clock()
    retry = Backoff(1.0, 5.0, None, clock=clock)
    for _ in range(1000):
        delay = retry.failed()
        assert delay is not None
        clock.now += delay


@pytest.mark.parametrize("kwargs", [dict(initial_s=0), dict(initial_s=2, max_s=1), dict(jitter=1.0),
                                    dict(give_up_after_s=-1)])
def test_nonsense_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
