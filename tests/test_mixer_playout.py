"""The mixer's writer against a real ``rtc.AudioSource``, observed at its output: an
``AudioStream`` on a local track built from the source yields exactly what the source plays,
10 ms every 10 ms. No room needed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mixer import Mixer, MixerSettings

RATE = 24000
REPLY_HZ = 1000.0


def without_tone(x: np.ndarray, freq: float, offset: int) -> np.ndarray:
    """``x`` minus its least-squares sinusoid at ``freq`` (the reply), leaving the bed."""
    t = (np.arange(len(x)) + offset) / RATE
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return x - basis @ coef


def tone_amplitude(x: np.ndarray, freq: float) -> float:
    n = len(x)
    w = np.hanning(n)
    return float(2 * abs(np.sum(x * w * np.exp(-2j * np.pi * freq * np.arange(n) / RATE))) / np.sum(w))


async def run_barge_in(flush: bool, queue_ms: int = 100) -> tuple[list[tuple[float, np.ndarray]], float, np.ndarray]:
    from livekit import rtc

    mixer = Mixer(MixerSettings(ambient_fade_in_ms=0, duck_db=0.0), queue_ms=queue_ms, flush_on_barge_in=flush)
    source = mixer.start()
    bed = (np.random.default_rng(7).standard_normal(RATE) * 0.05).astype(np.float32)  # a 1 s noise loop
    mixer.set_bed("noise", bed, volume=1.0, fade_ms=0)
    track = rtc.LocalAudioTrack.create_audio_track("observed", source)
    stream = rtc.AudioStream.from_track(track=track, sample_rate=RATE, num_channels=1)
    heard: list[tuple[float, np.ndarray]] = []

    async def observe() -> None:
        async for ev in stream:
            heard.append((time.monotonic(), np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32767))

    observer = asyncio.create_task(observe())
    try:
        await asyncio.sleep(0.4)
        t = np.arange(RATE * 3) / RATE
        reply = (0.2 * np.sin(2 * np.pi * REPLY_HZ * t) * 32767).astype("<i2")
        mixer.push_reply("r1", reply.tobytes())
        await asyncio.sleep(1.0)
        t_interrupt = time.monotonic()
        mixer.interrupt("r1")
        await asyncio.sleep(0.6)
    finally:
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
        await stream.aclose()
        await mixer.aclose()
    return heard, t_interrupt, bed


def bed_positions(heard: list[tuple[float, np.ndarray]], bed: np.ndarray, since: float) -> list[int]:
    """Where in the bed loop each observed 10 ms chunk starts (the reply tone removed)."""
    spectrum = np.fft.rfft(bed)
    positions = []
    for i, (t, chunk) in enumerate(heard):
        if t < since:
            continue
        clean = without_tone(chunk, REPLY_HZ, 0)
        corr = np.fft.irfft(np.fft.rfft(np.pad(clean, (0, RATE - len(clean)))).conj() * spectrum, n=RATE)
        positions.append(int(np.argmax(corr)))
    return positions


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
async def test_barge_in_at_the_output_with_a_continuous_bed(flush):
    heard, t_interrupt, bed = await run_barge_in(flush)
    chunks = [(t - t_interrupt, c) for t, c in heard]
    before = [tone_amplitude(c, REPLY_HZ) for dt, c in chunks if -0.3 < dt < -0.05]
    assert min(before) > 0.12, "the reply was not playing before the barge-in"
    # When does the reply leave the output for good? (The noise bed has a little energy at 1 kHz.)
    gone = next(dt for dt, c in chunks if dt > 0 and tone_amplitude(c, REPLY_HZ) < 0.04
                and all(tone_amplitude(c2, REPLY_HZ) < 0.04 for dt2, c2 in chunks if dt < dt2 < dt + 0.2))
    if flush:
        assert gone < 0.04, f"with the flush the reply left the output {gone * 1000:.0f} ms after the barge-in"
    else:
        assert gone > 0.09, f"without the flush the queued reply should play out ({gone * 1000:.0f} ms)"
    # The bed continues sample for sample across the barge-in: every chunk starts exactly
    # 240 samples after the previous one in the loop (no skip, no repeat).
    positions = bed_positions(heard, bed, t_interrupt - 0.3)
    steps = {(b - a) % RATE for a, b in zip(positions, positions[1:])}
    assert steps == {240}, f"the bed jumped: steps {sorted(steps)}"


async def test_underruns_count_only_once_the_track_is_on_air():
    """The worker starts the writer before it publishes its track (LiveKit's threads must
    start on the audio thread): a starved start-up is not an underrun, nor warned about."""
    mixer = Mixer(MixerSettings(), on_air=False)
    mixer.start()

    def starve() -> None:  # the writer waits for the mixer's lock for 300 ms: 3 queues
        with mixer._lock:
            time.sleep(0.3)

    try:
        await asyncio.sleep(0.3)
        starve()
        await asyncio.sleep(0.3)
        assert mixer.core.counters.underruns == 0
        mixer.on_air = True
        starve()
        await asyncio.sleep(0.3)
        assert mixer.core.counters.underruns >= 1
    finally:
        await mixer.aclose()
