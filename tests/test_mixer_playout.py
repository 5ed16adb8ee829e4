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


def mixer_over_noise(settings: MixerSettings | None = None, **kw: object) -> tuple[Mixer, np.ndarray]:
    """A started Mixer (``kw`` to Mixer) playing a 1 s noise loop as its bed, at once."""
    mixer = Mixer(settings or MixerSettings(ambient_fade_in_ms=0, duck_db=0.0), **kw)  # type: ignore[arg-type]
    mixer.start()
    bed = (np.random.default_rng(7).standard_normal(RATE) * 0.05).astype(np.float32)
    mixer.set_bed("noise", bed, volume=1.0, fade_ms=0)
    return mixer, bed


def reply_tone(seconds: float) -> np.ndarray:
    """The reply: a REPLY_HZ tone at 0.2, int16."""
    return (0.2 * np.sin(2 * np.pi * REPLY_HZ * np.arange(int(RATE * seconds)) / RATE) * 32767).astype("<i2")


def assert_bed_whole(heard: list[tuple[float, np.ndarray]], bed: np.ndarray, since: float) -> None:
    """Every observed 10 ms chunk since ``since`` starts 240 samples after the previous one
    in the bed loop (no skip, no repeat)."""
    positions = bed_positions(heard, bed, since)
    steps = {(b - a) % RATE for a, b in zip(positions, positions[1:])}
    assert steps == {240}, f"the bed jumped: steps {sorted(steps)}"


async def run_barge_in(flush: bool, queue_ms: int = 100, direct: bool = True
                       ) -> tuple[list[tuple[float, np.ndarray]], float, np.ndarray]:
    from livekit import rtc

    mixer, bed = mixer_over_noise(queue_ms=queue_ms, flush_on_barge_in=flush, direct_calls=direct)
    assert (mixer._direct is not None) == direct, \
        "the SDK internals the writer calls directly are gone (see mixer._DirectSource)"
    track = rtc.LocalAudioTrack.create_audio_track("observed", mixer.source)
    stream = rtc.AudioStream.from_track(track=track, sample_rate=RATE, num_channels=1)
    heard: list[tuple[float, np.ndarray]] = []

    async def observe() -> None:
        async for ev in stream:
            heard.append((time.monotonic(), np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32767))

    observer = asyncio.create_task(observe())
    try:
        await asyncio.sleep(0.4)
        reply = reply_tone(3.0)
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


@pytest.mark.parametrize("flush,direct", [(True, True), (False, True), (True, False)],
                         ids=["flush", "no-flush", "flush-through-public-calls"])
async def test_barge_in_at_the_output_with_a_continuous_bed(flush, direct):
    """The flush replaces the source's queue in one go (mixer._DirectSource), or through the
    SDK's public calls where its internals are not there: either way the reply stops within
    a few ms and the bed goes on sample for sample."""
    heard, t_interrupt, bed = await run_barge_in(flush, direct=direct)
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
    assert_bed_whole(heard, bed, t_interrupt - 0.3)


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


class Output:
    """What our source emitted, read back from our own track, with the emission clock
    fitted to the arrivals (the source emits 10 ms every 10 ms; arrivals lag by a varying
    dispatch delay, never less than zero)."""

    def __init__(self, heard: list[tuple[float, np.ndarray]]) -> None:
        self.data = np.concatenate([c for _, c in heard])
        starts = np.cumsum([0] + [len(c) for _, c in heard[:-1]])
        self.t0 = min(t - s / RATE for (t, _), s in zip(heard, starts))

    def time_of(self, index: int) -> float:
        return self.t0 + index / RATE

    def index_at(self, t: float) -> int:
        return max(0, int((t - self.t0) * RATE))

    def first_tone(self, since: float, freq: float = REPLY_HZ, threshold: float = 0.1) -> int | None:
        """Start of the first 2.5 ms window after ``since`` carrying the tone."""
        n = 60
        for i in range(self.index_at(since), len(self.data) - n, n):
            if tone_amplitude(self.data[i:i + 2 * n], freq) > threshold:
                return i
        return None


async def observe_mixer(mixer: Mixer, body) -> list[tuple[float, np.ndarray]]:
    from livekit import rtc

    source = mixer.source
    track = rtc.LocalAudioTrack.create_audio_track("observed", source)
    stream = rtc.AudioStream.from_track(track=track, sample_rate=RATE, num_channels=1)
    heard: list[tuple[float, np.ndarray]] = []

    async def observe() -> None:
        async for ev in stream:
            heard.append((time.monotonic(), np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32767))

    observer = asyncio.create_task(observe())
    try:
        await body()
    finally:
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
        await stream.aclose()
    return heard


async def test_a_reply_starts_at_once_over_a_queued_bed_without_a_click():
    """The source holds 100-200 ms of bed; a reply must not wait behind it: its first
    sample leaves the source within a frame or two of being pushed, and the bed goes on
    sample for sample across the re-mixed frames."""
    mixer, bed = mixer_over_noise()
    reply = reply_tone(1.0)
    pushed: list[float] = []

    async def body() -> None:
        await asyncio.sleep(0.5)
        for i in range(3):
            await asyncio.sleep(0.13 + 0.011 * i)  # a few phases against the source's clock
            pushed.append(time.monotonic())
            mixer.push_reply(f"r{i}", reply.tobytes())
            await asyncio.sleep(1.3)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    out = Output(heard)
    for t_push in pushed:
        onset = out.first_tone(t_push - 0.05)
        assert onset is not None, "the reply was never heard"
        delay = out.time_of(onset) - t_push
        assert delay < 0.04, f"the reply left the source {delay * 1000:.0f} ms after it was pushed"
    assert mixer.fills >= 3
    assert_bed_whole(heard, bed, pushed[0] - 0.3)
    assert not np.any(np.convolve(out.data[out.index_at(pushed[0]):] == 0, np.ones(24), "valid") == 24), \
        "hard silence in the output"


async def test_a_bursty_then_late_api_never_starves_the_track():
    """Reply chunks in bursts faster than real time, then gaps longer than the audio
    queued: the reply has holes (the API was late) but the track never runs dry, the
    bed goes on, and an adaptive jitter cushion grows to the hole."""
    mixer, bed = mixer_over_noise(MixerSettings(ambient_fade_in_ms=0, duck_db=0.0, reply_cushion_max_ms=60))
    reply = reply_tone(2.0)
    chunk = RATE // 25  # 40 ms

    async def body() -> None:
        await asyncio.sleep(0.4)
        pos = 0
        for burst, gap_s in ((8, 0.45), (3, 0.25), (1, 0.12), (20, 0.0)):
            for _ in range(burst):
                mixer.push_reply("r1", reply[pos:pos + chunk].tobytes())
                pos += chunk
            await asyncio.sleep(gap_s)
        await asyncio.sleep(1.2)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    out = Output(heard)
    since = out.index_at(heard[0][0] + 0.3)  # the bed is playing
    zeros = np.convolve(out.data[since:] == 0, np.ones(24), "valid") == 24
    assert mixer.core.counters.underruns == 0 and not zeros.any(), \
        f"the track ran dry {np.flatnonzero(zeros)[:1] / RATE} s in (fills {mixer.fills}, races {mixer.races}, " \
        f"misses {mixer.misses})"
    assert mixer.core.counters.reply_holes >= 2, "the API's lateness was not noticed"
    assert mixer.core.cushion_ms > 0
    assert_bed_whole(heard, bed, heard[0][0] + 0.5)


async def test_playback_events_and_wait_for_playout_follow_the_output():
    from mixer import ReplyAudioStopped, ReplyStartedPlaying

    mixer = Mixer(MixerSettings(ambient_fade_in_ms=0))
    mixer.start()
    mixer.set_bed("noise", (np.random.default_rng(7).standard_normal(RATE) * 0.05).astype(np.float32), volume=1.0)
    events: list[tuple[float, object]] = []
    mixer.add_listener(lambda ev: events.append((time.monotonic(), ev)))
    reply = reply_tone(0.5)
    done: list[float] = []

    async def body() -> None:
        await asyncio.sleep(0.4)
        mixer.push_reply("r1", reply.tobytes())
        result = await mixer.wait_for_playout("r1")
        done.append(time.monotonic())
        assert result.reply_id == "r1" and not result.interrupted and result.played_ms == pytest.approx(500, abs=1)
        await asyncio.sleep(0.3)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    out = Output(heard)
    onset = out.first_tone(0)
    started = [(t, e) for t, e in events if isinstance(e, ReplyStartedPlaying)]
    stopped = [(t, e) for t, e in events if isinstance(e, ReplyAudioStopped)]
    assert len(started) == 1 and len(stopped) == 1 and started[0][1].reply_id == "r1"
    assert abs(started[0][1].at - out.time_of(onset)) < 0.015, "ReplyStartedPlaying.at is not when it was heard"
    assert started[0][0] >= started[0][1].at - 0.002, "delivered before it was heard"
    last = out.index_at(out.time_of(onset) + 0.5)
    assert abs(stopped[0][1].at - out.time_of(last)) < 0.02 and not stopped[0][1].interrupted
    assert abs(done[0] - out.time_of(last)) < 0.03, "wait_for_playout did not return when the reply had played"


async def test_play_returns_a_handle_to_await_or_stop():
    mixer = Mixer(MixerSettings(ambient_fade_in_ms=0))
    mixer.start()
    try:
        ding = np.full(RATE // 10, 0.2, np.float32)
        t0 = time.monotonic()
        assert await mixer.play(ding, name="ding") is True
        assert time.monotonic() - t0 >= 0.1, "done before its 100 ms had played"
        loop_handle = mixer.play(ding, name="loop", loop=True)
        await asyncio.sleep(0.3)
        assert not loop_handle.done()
        loop_handle.stop()
        assert await loop_handle.wait_for_playout() is False
        assert await mixer.play_cue("cue", ding, 0.5) is True  # the old call still answers True/False
        assert mixer.core.voices == []
    finally:
        await mixer.aclose()


async def test_reply_starts_and_barge_ins_keep_the_bed_whole_while_the_main_thread_holds_the_gil():
    """The writer replaces the source's queue at every reply start and barge-in; it must
    know exactly how much of it has played, also when the completions it learns the
    source's clock from come late because it waited for the GIL (another task on the main
    thread parses JSON in bursts), or the bed skips or repeats a block there."""
    import json

    mixer, bed = mixer_over_noise()
    reply = reply_tone(0.5)
    doc = json.dumps([{"type": "transcript.partial", "text": "okay, let me check"}] * 6000)  # ~5 ms to parse
    started: list[float] = []
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            json.loads(doc)
            await asyncio.sleep(0.037)

    async def body() -> None:
        loader = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        started.append(time.monotonic())
        for i in range(8):
            await asyncio.sleep(0.07 + 0.013 * i)
            mixer.push_reply(f"r{i}", reply.tobytes())
            await asyncio.sleep(0.19 + 0.007 * i)
            mixer.interrupt(f"r{i}")
            await asyncio.sleep(0.2)
        done.set()
        await loader

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    assert mixer.fills >= 8 and mixer.flushes >= 8
    out = Output(heard)
    since = out.index_at(started[0])
    zeros = np.flatnonzero(np.convolve(out.data[since:] == 0, np.ones(24), "valid") == 24)
    assert not len(zeros), f"hard silence in the output {(zeros[0] + since) / RATE - (started[0] - out.t0):.3f} s " \
        f"in ({len(zeros)} samples; {mixer.snapshot()}, misses {mixer.misses})"
    assert_bed_whole(heard, bed, started[0])


async def test_a_cue_starts_at_once_over_a_queued_bed():
    mixer, bed = mixer_over_noise()
    ding = (0.2 * np.sin(2 * np.pi * REPLY_HZ * np.arange(RATE // 5) / RATE)).astype(np.float32)
    started: list[float] = []

    async def body() -> None:
        await asyncio.sleep(0.5)
        for i in range(3):
            await asyncio.sleep(0.11 + 0.013 * i)
            started.append(time.monotonic())
            assert await mixer.play(ding, name="ding") is True
            await asyncio.sleep(0.2)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    out = Output(heard)
    for t_start in started:
        onset = out.first_tone(t_start - 0.05)
        assert onset is not None, "the cue was never heard"
        delay = out.time_of(onset) - t_start
        assert delay < 0.04, f"the cue left the source {delay * 1000:.0f} ms after it was started"
    assert_bed_whole(heard, bed, started[0] - 0.3)


async def test_re_renders_never_leave_the_track_silent_while_another_thread_holds_the_gil():
    """A re-render empties the source's queue and queues the frames again. This SDK sends
    10 ms of silence at a tick that finds the queue empty, so nothing may come between the
    two: with the SDK's public calls a thread that takes the GIL in between (here one that
    spins for whole switch intervals) makes ticks play silence; the writer's direct calls
    (mixer._DirectSource) make both without letting go of the GIL. Under this pathological
    load one silent block is tolerated (bench/barge_in_bench.py: 0-2 in 120 re-renders with
    the direct calls, 20-74 through the public calls, which leave 2-13 in this test's 20)."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(20000):
                x += i

    mixer, bed = mixer_over_noise()
    assert mixer._direct is not None
    reply = reply_tone(1.0)
    spinner = threading.Thread(target=spin, daemon=True)

    async def body() -> None:
        await asyncio.sleep(0.5)
        spinner.start()
        for i in range(10):
            await asyncio.sleep(0.13 + 0.0037 * i)  # a few phases against the source's clock
            mixer.push_reply(f"r{i}", reply.tobytes())
            await asyncio.sleep(0.3 + 0.0013 * i)
            mixer.interrupt(f"r{i}")
            await asyncio.sleep(0.2)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        stop.set()
        await mixer.aclose()
    assert mixer.fills >= 5 and mixer.flushes >= 5
    since = heard[0][0] + 0.45
    silent = [round(t - since, 3) for t, chunk in heard if t >= since and not np.any(chunk)]
    assert len(silent) <= 1, f"{len(silent)} silent 10 ms blocks at {silent[:5]} s (fills {mixer.fills}, " \
                             f"flushes {mixer.flushes}, underruns {mixer.core.counters.underruns})"


async def test_a_barge_in_while_the_writer_re_mixes_is_not_left_for_its_next_batch():
    """A request (here a barge-in) that comes while the writer is busy with another (a
    reply's start) found no sleep to wake from: it must still be handled at once, not
    when the writer next wakes for a batch (up to 400 ms later)."""
    import threading

    mixer, bed = mixer_over_noise()
    reply = reply_tone(1.0)
    orig = mixer.core.rerender_split
    current: list[str] = []
    barging: list[threading.Thread] = []

    def rerender(frames: int, mode: str, split: int | None):  # on the writer's thread, under its lock
        out = orig(frames, mode, split)
        if mode == "fill" and not barging:
            # Blocks on the lock until the writer has mixed, then barges in while the
            # writer hands the re-mixed frames over.
            barging.append(threading.Thread(target=mixer.interrupt, args=(current[-1],)))
            barging[0].start()
        return out

    mixer.core.rerender_split = rerender
    try:
        await asyncio.sleep(0.5)
        for i, delay in enumerate((0.0, 0.137, 0.171)):
            barging.clear()
            current.append(f"r{i}")
            await asyncio.sleep(delay)
            mixer.push_reply(current[-1], reply.tobytes())
            await asyncio.sleep(0.6)
            assert barging, "the reply's start was not mixed into the queue"
            barging[0].join()
            st = mixer.reply_stats(current[-1])
            assert st is not None and st.interrupted_at is not None and st.silent_at is not None
            ms = (st.silent_at - st.interrupted_at) * 1000
            assert ms < 40, f"the barge-in was handled {ms:.0f} ms after it came"
    finally:
        await mixer.aclose()


async def test_a_reply_paced_in_real_time_is_mixed_in_without_holes_and_few_re_mixes():
    """An API like the stand-in (a reply's first 300 ms at once, then 40-120 ms chunks in
    real time): the reply is heard whole, from its start to its end, and its audio goes
    into the track as it is handed over, not by mixing the queue again at every chunk."""
    import random
    mixer, bed = mixer_over_noise()
    reply = reply_tone(3.0)
    rnd = random.Random(3)
    chunks = 0
    span: list[float] = []

    async def body() -> None:
        nonlocal chunks
        await asyncio.sleep(0.6)
        start = time.monotonic()
        span.append(start)
        sent = 0
        while sent < len(reply):
            k = rnd.randint(40, 120) * RATE // 1000
            mixer.push_reply("r1", reply[sent:sent + k].tobytes())
            sent += k
            chunks += 1
            await asyncio.sleep(max(0.0, start + sent / RATE - 0.3 - time.monotonic()))
        await asyncio.sleep(0.8)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    out = Output(heard)
    onset = out.first_tone(span[0] - 0.05)
    assert onset is not None, "the reply was never heard"
    w = RATE // 50  # 20 ms windows over the reply, but its first and last
    levels = [tone_amplitude(out.data[i:i + w], REPLY_HZ) for i in range(onset + w, onset + len(reply) - 2 * w, w)]
    assert min(levels) > 0.15, f"the reply dropped to {min(levels):.2f} at {np.argmin(levels) * 20 + 20} ms"
    assert mixer.core.counters.reply_holes == 0
    assert chunks >= 30 and mixer.fills <= 4, f"{mixer.fills} re-mixes for {chunks} chunks"
    assert_bed_whole(heard, bed, span[0] - 0.3)


async def test_long_batches_under_the_bed_alone_short_ones_while_a_cue_plays():
    """The bed alone is handed over 400 ms at a time (fewer crossings into the SDK); while
    a cue plays, 100 ms at a time, so that its stop is heard within 100-200 ms of queue."""
    mixer, bed = mixer_over_noise()
    ding = (0.2 * np.sin(2 * np.pi * REPLY_HZ * np.arange(RATE // 2) / RATE)).astype(np.float32)
    stops: list[float] = []
    counts: dict[str, int] = {}

    async def body() -> None:
        await asyncio.sleep(0.8)
        h0 = mixer.hand_overs
        await asyncio.sleep(2.0)
        counts["bed"] = mixer.hand_overs - h0
        for i in range(4):
            handle = mixer.play(ding, name="ding", loop=True)
            await asyncio.sleep(0.7 + 0.037 * i)  # stops at several phases of the hand-overs
            if i == 0:
                h0 = mixer.hand_overs
                await asyncio.sleep(0.5)
                counts["cue"] = mixer.hand_overs - h0
            stops.append(time.monotonic())
            handle.stop(fade_ms=20)
            assert await handle is False
            await asyncio.sleep(0.3)

    try:
        heard = await observe_mixer(mixer, body)
    finally:
        await mixer.aclose()
    assert counts["bed"] <= 7, f"{counts['bed']} hand-overs in 2 s of bed alone"
    assert counts["cue"] >= 4, f"{counts['cue']} hand-overs in 0.5 s with a cue"
    out = Output(heard)
    w = RATE // 100
    for t_stop in stops:
        i = out.index_at(t_stop)
        while i + w < len(out.data) and tone_amplitude(out.data[i:i + w], REPLY_HZ) > 0.02:
            i += w
        gone = out.time_of(i) - t_stop
        assert gone < 0.26, f"the cue went on {gone * 1000:.0f} ms after its stop"
