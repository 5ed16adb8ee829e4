"""Exact numeric tests of the pure mixing core: no threads, no room, no clock."""

from __future__ import annotations

import numpy as np
import pytest

from mixer import Limiter, MixerCore, MixerSettings, Ramp

RATE = 24000
FRAME = 240


def sine(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def run(core: MixerCore, frames: int) -> np.ndarray:
    return np.concatenate([core.next_frame() for _ in range(frames)]).astype(np.float32) / 32767


def core(**kw: object) -> MixerCore:
    return MixerCore(MixerSettings(**kw), clock=lambda: 0.0)


def test_each_frame_is_exactly_one_frame_of_int16():
    for ms in (10, 20):
        c = core(frame_ms=ms)
        f = c.next_frame()
        assert f.dtype == np.int16 and len(f) == RATE * ms // 1000
        assert not f.any(), "silence in, silence out"


def test_reply_passes_through_sample_exact():
    c = core(duck_db=0.0)
    x = sine(1000, 0.1)
    c.push_reply("r1", pcm(x))
    y = run(c, 10)
    assert np.max(np.abs(y - np.round(x * 32767) / 32767)) < 1.5 / 32767
    assert c.stats["r1"].played == len(x)


def test_reply_chunks_of_any_length_concatenate_seamlessly():
    c = core()
    x = sine(700, 0.2)
    i = 0
    for size in (1, 7, 333, 2, 1000, 4800):
        c.push_reply("r1", pcm(x[i:i + size]))
        i += size
    c.push_reply("r1", pcm(x[i:]))
    y = run(c, 20)
    assert np.max(np.abs(np.diff(y))) <= np.max(np.abs(np.diff(x))) + 2 / 32767


def test_bed_loops_from_memory_without_discontinuity():
    c = core(ambient_fade_in_ms=0)
    bed = sine(300, 1.0)  # 300 periods in 1 s: the loop is continuous by construction
    c.set_bed("tone", bed, volume=1.0, fade_ms=0)
    y = run(c, 300)  # 3 s: two wraps
    assert np.max(np.abs(np.diff(y))) <= np.max(np.abs(np.diff(bed))) + 2 / 32767


def test_bed_fades_in_monotonically_at_start():
    c = core()
    c.set_bed("dc", np.full(RATE, 0.5, np.float32), volume=0.8, fade_ms=200)
    y = run(c, 30)
    ramp = y[: RATE * 200 // 1000]
    assert np.all(np.diff(ramp) >= -1 / 32767), "the fade-in went down"
    assert ramp[0] < 0.01 and abs(y[-1] - 0.4) < 1e-3


def test_volume_change_is_a_monotone_ramp_without_steps():
    c = core()
    c.set_bed("dc", np.full(RATE, 0.5, np.float32), volume=1.0, fade_ms=0)
    run(c, 2)
    c.set_bed_volume(0.2, ramp_ms=100)
    y = run(c, 15)
    assert np.all(np.diff(y) <= 1 / 32767), "the ramp went up"
    steps = np.abs(np.diff(y[: RATE // 10]))
    assert steps.max() < 0.5 * 0.8 / (RATE // 10) * 2, "a step larger than a smooth ramp: zipper noise"
    assert abs(y[-1] - 0.1) < 1e-3


def test_barge_in_removes_reply_within_one_frame_and_leaves_the_bed_untouched():
    settings = dict(ambient_fade_in_ms=0, duck_db=0.0)
    with_reply, bed_only = core(**settings), core(**settings)
    bed = sine(300, 1.0, 0.3)
    for c in (with_reply, bed_only):
        c.set_bed("tone", bed, volume=1.0, fade_ms=0)
    with_reply.push_reply("r1", pcm(sine(1000, 2.0, 0.4)))
    before = run(with_reply, 20)
    run(bed_only, 20)
    with_reply.interrupt("r1")
    y = run(with_reply, 10)
    ref = run(bed_only, 10)
    diff = np.abs(y - ref)
    fade = int(MixerSettings().barge_in_fade_ms * RATE / 1000)
    assert diff[:fade].max() > 0, "no fade at all: the reply was cut with a click"
    assert diff[fade:].max() < 2 / 32767, "reply audio still present after the fade"
    natural = np.max(np.abs(np.diff(before)))
    junction = np.concatenate([before[-1:], y[: fade + 1]])
    assert np.max(np.abs(np.diff(junction))) <= natural + 1e-3, "the barge-in fade clicks"
    st = with_reply.stats["r1"]
    assert st.played == 20 * FRAME + fade
    assert with_reply.reply.queued == 0
    assert with_reply.counters.barge_ins == 1


def test_late_audio_of_an_interrupted_reply_is_not_played():
    c = core()
    c.push_reply("r1", pcm(sine(1000, 0.5)))
    run(c, 5)
    c.interrupt("r1")
    run(c, 2)
    c.push_reply("r1", pcm(sine(1000, 0.5)))
    assert not run(c, 5).any()


def test_reply_backlog_is_bounded_and_the_excess_counted():
    c = core(max_reply_backlog_s=1.0)
    for _ in range(30):  # 3 s of reply audio arriving at once
        c.push_reply("r1", pcm(sine(1000, 0.1)))
    assert c.reply.queued == RATE, "never more than max_reply_backlog_s held"
    assert c.counters.reply_samples_overflow == 2 * RATE
    assert c.stats["r1"].received == RATE
    run(c, 50)  # half of it played: room again for as much
    c.push_reply("r1", pcm(sine(1000, 0.5)))
    assert c.reply.queued == RATE and c.counters.reply_samples_overflow == 2 * RATE


def test_ducking_depth_and_timing():
    c = core(ambient_fade_in_ms=0, duck_db=-6.0, duck_attack_ms=50, duck_release_ms=500)
    c.set_bed("dc", np.full(RATE, 0.25, np.float32), volume=1.0, fade_ms=0)
    run(c, 5)
    c.push_reply("r1", pcm(np.zeros(RATE, np.float32)))  # silent speech: only the bed is heard
    c.reply.drop(None)
    speech = np.full(RATE // 2, 1e-4, np.float32)
    c.push_reply("r1", pcm(speech))
    y = run(c, 50)  # 0.5 s of "speech"
    assert abs(y[int(0.06 * RATE)] - 0.25 * 10 ** (-6 / 20)) < 2e-3, "not ducked 6 dB after the attack"
    assert abs(y[int(0.02 * RATE)] - 0.25 * 10 ** (-2.4 / 20)) < 5e-3, "attack is not a 50 ms ramp"
    y2 = run(c, 100)  # speech over; hold 250 ms, then 500 ms release
    assert abs(y2[int(0.2 * RATE)] - 0.25 * 10 ** (-6 / 20)) < 2e-3, "released during the hold"
    assert abs(y2[-1] - 0.25) < 2e-3, "not back to full level after release"
    assert np.all(np.diff(y2) >= -1 / 32767)


def test_limiter_never_exceeds_ceiling_and_is_transparent_below():
    lim = Limiter(ceiling=0.89)
    quiet = sine(440, 0.1, 0.5)
    assert np.array_equal(lim.process(quiet), quiet)
    loud = sine(440, 0.5, 3.0)
    y = np.concatenate([lim.process(loud[i:i + FRAME]) for i in range(0, len(loud), FRAME)])
    assert np.max(np.abs(y)) <= 0.89 + 1e-6


def test_sum_of_loud_sources_never_wraps():
    c = core(ambient_fade_in_ms=0, duck_db=0.0)
    c.set_bed("loud", np.ones(RATE, np.float32), volume=1.0, fade_ms=0)
    c.push_reply("r1", pcm(np.ones(RATE, np.float32)))
    y = np.concatenate([c.next_frame() for _ in range(100)])
    assert y.min() > -32768 * 0.9 and y.max() < 32767 * 0.9, "the limiter let the sum reach full scale"
    assert np.all(y >= 0), "wrapped around to negative values"


def test_replacing_the_bed_crossfades_with_equal_power():
    c = core(ambient_fade_in_ms=0, ambient_crossfade_ms=500)
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(RATE) * 0.1).astype(np.float32)
    b = (rng.standard_normal(RATE) * 0.1).astype(np.float32)
    c.set_bed("a", a, volume=1.0, fade_ms=0)
    run(c, 10)
    c.set_bed("b", b)
    y = run(c, 50)
    rms = [np.sqrt(np.mean(y[i:i + 1200] ** 2)) for i in range(0, len(y), 1200)]
    assert min(rms) > 0.1 * 0.8, f"the crossfade dips: {min(rms):.3f}"
    assert c.bed_name == "b" and len(c.beds) == 1


def test_stop_bed_fades_out_to_silence():
    c = core(ambient_fade_in_ms=0)
    c.set_bed("dc", np.full(RATE, 0.5, np.float32), volume=1.0, fade_ms=0)
    c.stop_bed(fade_ms=100)
    y = run(c, 12)
    assert np.all(np.diff(y) <= 1 / 32767) and y[-1] == 0
    assert c.beds == []


def test_thinking_cue_plays_until_the_first_reply_audio():
    c = core()
    c.start_thinking("tick", sine(2000, 0.3, 0.5), volume=0.5)
    y = run(c, 20)
    assert np.abs(y[-FRAME:]).max() > 0.2
    c.push_reply("r1", pcm(np.zeros(RATE // 2, np.float32)))
    run(c, 20)  # cue fades out (150 ms) once the reply plays
    assert c.thinking is None


def test_one_shot_cue_reports_completion():
    c = core()
    done = []
    c.play_cue("ding", sine(1500, 0.05), 1.0, done.append)
    run(c, 10)
    assert done == [True]


def test_ramp_render_reaches_target_exactly():
    r = Ramp(0.0)
    r.to(1.0, 100, "power")
    g = r.render(150)
    assert g[99] == pytest.approx(1.0) and g[-1] == 1.0 and not r.moving


async def test_async_iterator_source_is_downmixed_resampled_and_mixed():
    import asyncio

    from livekit import rtc

    from mixer import Mixer

    mixer = Mixer(MixerSettings(ambient_fade_in_ms=0))  # its writer thread is not started: we pull frames here
    rate, seconds = 48000, 0.5

    async def frames():
        t = np.arange(int(rate * seconds)) / rate
        stereo = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t)], axis=1) * 0.5
        pcm = (stereo * 32767).astype(np.int16)
        for i in range(0, len(pcm), 480):  # 10 ms stereo frames at 48 kHz
            chunk = pcm[i:i + 480]
            yield rtc.AudioFrame(chunk.tobytes(), rate, 2, len(chunk))
            await asyncio.sleep(0)

    out: list[np.ndarray] = []
    player = asyncio.create_task(mixer.play_stream(frames(), volume=1.0))
    while not player.done():
        with mixer._lock:
            out.append(mixer.core.next_frame())
        await asyncio.sleep(0.001)
    await player
    y = np.concatenate(out).astype(np.float32) / 32767
    active = np.flatnonzero(np.abs(y) > 0.05)
    duration = (active[-1] - active[0]) / RATE
    assert abs(duration - seconds) < 0.02, f"{duration:.3f} s of audio for {seconds} s in"
    segment = y[active[0]:active[-1]]
    peak_hz = np.argmax(np.abs(np.fft.rfft(segment))) * RATE / len(segment)
    assert abs(peak_hz - 1000) < 5
    assert mixer.core.streams == []


# -- mixing again what was handed over but not yet played (MixerCore.rerender) -----------------


def noise_bed(seconds: float = 1.0, amp: float = 0.05) -> np.ndarray:
    return (np.random.default_rng(3).standard_normal(int(seconds * RATE)) * amp).astype(np.float32)


def bed_core(**kw: object) -> MixerCore:
    c = core(ambient_fade_in_ms=0, **kw)
    c.set_bed("noise", noise_bed(), volume=1.0, fade_ms=0)
    return c


def test_a_reply_mixed_into_queued_frames_is_exactly_as_if_it_had_come_in_time():
    """The reply's start (fill): frames already handed over but not played are mixed again
    with the reply from their first sample. Bed, ducking, limiter and events come out
    sample for sample as if the reply had arrived before those frames were mixed."""
    reply = pcm(sine(1000, 0.5, 0.6))
    late, in_time = bed_core(), bed_core()
    run(late, 20)  # 200 ms: the last 12 frames sit in the output's queue
    late.push_reply("r1", reply)
    assert late.wants_fill()
    late.events.clear()
    again, changed = late.rerender(12, "fill")
    after = run(late, 30)
    run(in_time, 8)
    in_time.events.clear()
    in_time.push_reply("r1", reply)
    expected = run(in_time, 12 + 30)
    assert changed == 8 * FRAME
    assert np.array_equal(again.astype(np.float32) / 32767, expected[:12 * FRAME])
    assert np.array_equal(after, expected[12 * FRAME:])
    assert late.events == in_time.events and ("playing", "r1", 8 * FRAME) in late.events
    assert late.stats["r1"].played == in_time.stats["r1"].played
    assert not late.wants_fill()


@pytest.mark.parametrize("mode", ["fill", "drop"])
def test_a_re_mix_in_two_parts_is_the_re_mix_in_one(mode):
    """rerender_split (the writer hands the first part over before it mixes the rest) gives
    the same samples, events and state as rerender, to the sample."""
    def setup() -> MixerCore:
        c = MixerCore(MixerSettings(duck_db=-12.0, ambient_fade_in_ms=0), clock=lambda: 0.0, history_frames=60)
        c.set_bed("bed", sine(300, 1.0, 0.3), volume=1.0, fade_ms=0)
        run(c, 5)
        if mode == "drop":
            c.push_reply("r1", pcm(sine(1000, 1.0)))
        run(c, 40)  # queued, not yet played
        if mode == "drop":
            c.interrupt("r1")
        else:
            c.push_reply("r1", pcm(sine(1000, 0.6)))
        return c

    whole, split = setup(), setup()
    a, changed_a = whole.rerender(40, mode)
    first, changed_b, rest = split.rerender_split(40, mode, 10)
    assert rest is not None and len(first) == 10 * FRAME
    b = np.concatenate([first, rest()])
    assert changed_a == changed_b
    assert np.array_equal(a, b)
    assert whole.events == split.events
    assert np.array_equal(run(whole, 30), run(split, 30)), "the frames mixed after differ"
    _, _, none_left = setup().rerender_split(40, mode, 40)
    assert none_left is None


def test_reply_audio_that_comes_between_the_parts_of_a_re_mix_waits_for_its_place():
    """The reply ran dry in the first part of a split fill; audio pushed before the rest is
    mixed must not start at the rest's first frame (a hole in the reply) but right after
    the reply's last sample, by the next fill."""
    c = MixerCore(MixerSettings(duck_db=0.0, ambient_fade_in_ms=0), clock=lambda: 0.0, history_frames=60)
    run(c, 40)  # queued silence
    x = sine(1000, 0.3)
    c.push_reply("r1", pcm(x[:RATE // 20]))  # 50 ms
    first, _, rest = c.rerender_split(40, "fill", 10)
    c.push_reply("r1", pcm(x[RATE // 20:]))  # the rest of the reply, late for the first part
    later = rest()
    assert not later.any(), "the late audio was mixed in at the start of the rest"
    assert c.wants_fill()
    again, changed = c.rerender(40, "fill")
    assert changed == RATE // 20  # right after the reply's last sample
    y = again.astype(np.float32) / 32767
    got = y[:len(x)]
    assert np.max(np.abs(got - np.clip(x, -1, 1))) < 2e-4, "the reply is not whole and in place"



def test_barge_in_mixed_into_queued_frames_is_exactly_a_barge_in_in_time():
    """Barge-in (drop): the queued frames are mixed again without the reply, a 2 ms fade
    from the first of them; the same as interrupting before they were mixed."""
    reply = pcm(sine(1000, 2.0, 0.6))
    late, in_time = bed_core(), bed_core()
    for c in (late, in_time):
        c.push_reply("r1", reply)
    run(late, 30)
    late.interrupt("r1")
    again, changed = late.rerender(10, "drop")
    after = run(late, 20)
    run(in_time, 20)
    in_time.interrupt("r1")
    expected = run(in_time, 30)
    assert changed == 20 * FRAME
    assert np.array_equal(again.astype(np.float32) / 32767, expected[:10 * FRAME])
    assert np.array_equal(after, expected[10 * FRAME:])
    assert late.stats["r1"].played == in_time.stats["r1"].played == 20 * FRAME + int(0.002 * RATE)


def test_a_reply_that_ran_dry_continues_right_after_its_last_sample():
    c = bed_core(duck_db=0.0)
    x = sine(1000, 0.3, 0.5)
    first = int(0.045 * RATE)  # runs dry in the middle of a frame
    c.push_reply("r1", pcm(x[:first]))
    run(c, 10)
    c.push_reply("r1", pcm(x[first:]))
    assert c.wants_fill()
    again, changed = c.rerender(7, "fill")
    assert changed == first
    ref = bed_core(duck_db=0.0)
    ref.push_reply("r1", pcm(x))
    expected = run(ref, 10)
    assert np.array_equal(again.astype(np.float32) / 32767, expected[3 * FRAME:])
    assert c.counters.reply_holes == 0, "continued seamlessly: no hole"


def test_the_thinking_cue_fades_out_where_the_reply_is_mixed_in():
    c = core(cue_fade_ms=50)
    c.start_thinking("tick", np.full(RATE, 0.5, np.float32), volume=1.0)
    run(c, 20)
    c.push_reply("r1", pcm(np.zeros(RATE // 2, np.float32)))  # silent speech: only the cue is heard
    again, _ = c.rerender(10, "fill")
    y = again.astype(np.float32) / 32767
    assert y[0] > 0.49, "the cue was at full level where the reply starts"
    assert np.all(np.diff(y) <= 1 / 32767) and y[int(0.05 * RATE)] == 0.0, "no 50 ms fade-out from the reply's start"
    run(c, 2)
    assert c.thinking is None


def test_the_jitter_cushion_grows_with_a_late_api_and_holds_the_next_reply():
    c = core(reply_cushion_ms=0.0, reply_cushion_max_ms=60.0)
    c.push_reply("r1", pcm(sine(1000, 0.04)))
    run(c, 10)  # 40 ms played, then 60 ms with nothing to play
    c.push_reply("r1", pcm(sine(1000, 0.1)))
    run(c, 12)
    assert c.counters.reply_holes == 1 and c.counters.reply_hole_ms == pytest.approx(60, abs=0.1)
    assert c.cushion_ms == pytest.approx(60)
    now = [0.0]
    c.clock = lambda: now[0]
    c.push_reply("r2", pcm(sine(1000, 0.02)))  # a short first chunk: held up to the cushion
    assert not run(c, 3).any() and not c.wants_fill()
    assert c.hold_until() == pytest.approx(0.06)
    now[0] = 0.061
    assert c.wants_fill() and run(c, 1).any()
    assert c.cushion_ms == pytest.approx(50), "each reply takes 10 ms off the cushion"


def test_a_cue_started_after_frames_were_handed_over_is_mixed_into_them_as_if_in_time():
    cue = sine(1500, 0.3, 0.3)
    late, in_time = bed_core(), bed_core()
    run(late, 20)
    late.play_cue("ding", cue, 0.8)
    assert late.wants_voices()
    again, changed = late.rerender_voices(12)
    after = run(late, 30)
    run(in_time, 8)
    in_time.play_cue("ding", cue, 0.8)
    expected = run(in_time, 42)
    assert changed == 8 * FRAME and not late.wants_voices()
    assert np.array_equal(again.astype(np.float32) / 32767, expected[:12 * FRAME])
    assert np.array_equal(after, expected[12 * FRAME:])
    assert late.cues == [] and in_time.cues == []


def test_a_voice_mixed_once_is_not_mixed_again_into_earlier_frames():
    c = bed_core()
    run(c, 20)
    c.start_thinking("tick", sine(2000, 0.3, 0.5), volume=0.5)
    run(c, 1)  # it has a frame of its own now: mixing it into earlier ones would repeat it
    assert not c.wants_voices()
    data, _ = c.rerender_voices(10)
    assert len(data) == 0


def test_a_barge_in_cuts_the_reply_within_its_fade_and_without_a_click():
    """The reply is gone barge_in_fade_ms after the cut, and the fade leaves nothing a listener
    would hear as a click: the energy above 3 kHz around the cut stays 70 dB below the
    tone's (a hard cut: about -27 dB; a 5 ms quarter-cosine fade: about -67 dB)."""
    fade = int(MixerSettings().barge_in_fade_ms * RATE / 1000)
    ratios = []
    for f, offset in ((200, 0), (440, 97), (1000, 173)):
        c = core(duck_db=0.0)
        c.push_reply("r1", pcm(sine(f, 1.0)))
        before = run(c, 20 + offset // FRAME)[-FRAME:]
        c.interrupt("r1")
        after = run(c, 10)
        assert np.all(after[fade:] == 0), "the reply went on after its fade"
        assert np.abs(after[:fade]).max() > 0, "no fade at all: a hard cut"
        seg = np.concatenate([before, after[:FRAME]]) * np.hanning(2 * FRAME)
        power = np.abs(np.fft.rfft(seg)) ** 2
        freqs = np.fft.rfftfreq(2 * FRAME, 1 / RATE)
        ratios.append(power[freqs > 3000].sum() / power.sum())
    assert 10 * np.log10(max(ratios)) < -70, f"a click: {10 * np.log10(max(ratios)):.0f} dB above 3 kHz"


def _feed_completions(m, true_phase: float, late_s: float, n: int, t0: float) -> float:
    """n regular hand-overs whose captures complete late_s after the source's real tick (the
    tick the writer expects them at, by its own idea of the clock): a busy GIL."""
    from mixer import TICK_S

    high = (m.source_queue_ms + 10) / 1000
    t = t0
    for _ in range(n):
        t += 0.1
        expected = m._next_tick(t)
        real = true_phase + TICK_S * round((expected - true_phase) / TICK_S)
        m._handed_until = expected + high
        m._check_clock(expected - 0.003, real + late_s, expected)
    return t


def test_the_writers_idea_of_the_source_clock_stays_where_the_clock_started():
    """The source's clock starts when it is created and never drifts. Completions come late
    when other threads hold the GIL; learned from them alone, the writer's idea of where the
    ticks fall moves with them (and a re-render then replaces the queue a block off). Once
    on-time completions have agreed with the clock's start, it stays within 0.4 ms of it."""
    from mixer import Mixer, _wrap

    def run(anchored: bool) -> float:
        m = Mixer()
        m._phase = m._phase_prior = 0.004
        if not anchored:
            m._phase_prior = None
        t = _feed_completions(m, 0.004, 0.0001, 8, 100.0)  # on time: the start is confirmed
        assert m._prior_confirmed == anchored
        _feed_completions(m, 0.004, 0.0018, 40, t)  # then always 1.8 ms late
        return abs(_wrap(m._phase - 0.004))

    assert run(anchored=False) > 0.0012, "late completions no longer move the learned clock: test the anchor anew"
    assert run(anchored=True) <= 0.0004 + 1e-9


def test_a_clock_start_the_completions_disagree_with_is_dropped():
    from mixer import Mixer

    m = Mixer()
    m._phase, m._phase_prior = 0.004, 0.0075  # its start said 3.5 ms later than the ticks fall
    _feed_completions(m, 0.004, 0.0001, 8, 100.0)
    assert m._phase_prior is None and not m._prior_confirmed
    assert abs(m._phase - 0.004) < 0.0003
