"""The stand-in's reply pacing options, which the benchmarks use to model a bursty or
jittery Voice Agent API: a fixed first chunk, one late chunk (a gap), random jitter."""

from __future__ import annotations

import time

import numpy as np

from standin import StandIn, StandInOptions, tone
from test_standin import RATE, client, pcm_of, silence


async def test_a_late_chunk_leaves_a_gap_then_the_reply_catches_up() -> None:
    opts = StandInOptions(reply_seconds=0.5, think_ms=50, first_chunk_ms=40, chunk_gap_ms=(1, 150))
    async with StandIn(opts) as agent, client(agent) as c:
        await c.ready()
        await agent.trigger_reply(seconds=0.6, freq_hz=700)
        await c.expect("reply.done", timeout=4)
    arrivals = [(t, len(pcm_of(e))) for t, e in c.events if e["type"] == "reply.audio"]
    assert arrivals[0][1] == 40 * RATE // 1000, "the first chunk is first_chunk_ms long"
    assert arrivals[1][0] - arrivals[0][0] >= 0.15, "the second chunk came without the gap"
    # After the gap the reply is behind real time: the next chunks come at once, a burst.
    assert arrivals[2][0] - arrivals[1][0] < 0.03
    assert sum(n for _, n in arrivals) == int(0.6 * RATE)


async def test_jitter_holds_chunks_back_but_loses_nothing() -> None:
    opts = StandInOptions(think_ms=50, lead_ms=20, chunk_ms=(40, 40), chunk_jitter_ms=60)
    async with StandIn(opts) as agent, client(agent) as c:
        await c.ready()
        await agent.trigger_reply(seconds=1.0, freq_hz=700)
        await c.expect("reply.done", timeout=4)
    arrivals = [t for t, e in c.events if e["type"] == "reply.audio"]
    gaps = np.diff(arrivals)
    assert gaps.max() > 0.06, "no chunk was held back beyond its 40 ms"
    assert sum(len(pcm_of(e)) for _, e in c.events if e["type"] == "reply.audio") == RATE


async def test_barge_in_jitter_delays_the_decision_by_up_to_its_ms() -> None:
    """barge_in_jitter_ms holds the decision back a random 0..ms after the audio that
    triggers it (the bench's barge-ins then fall at every phase of the bridge's clocks)."""
    async def barge_in(jitter_ms: int, draw: str) -> float:
        opts = StandInOptions(think_ms=50, barge_in_jitter_ms=jitter_ms)
        async with StandIn(opts) as agent, client(agent) as c:
            agent.rng.uniform = lambda lo, hi: hi if draw == "max" else lo  # type: ignore[method-assign]
            await c.ready()
            reply = await agent.trigger_reply(seconds=3.0)
            await c.expect("reply.started")
            t0 = time.monotonic()
            await c.stream(np.concatenate([tone(300, 0.5), silence(0.3)]))
            await c.expect("reply.done", timeout=4)
            assert reply.status == "interrupted"
            return reply.interrupted_at - t0

    at_once, held, no_draw = await barge_in(300, "min"), await barge_in(300, "max"), await barge_in(0, "max")
    assert held - at_once > 0.25, f"held back {1000 * (held - at_once):.0f} ms, not the 300 drawn"
    assert abs(no_draw - at_once) < 0.1, "without jitter the decision waits for nothing"
