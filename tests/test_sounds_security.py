"""sounds.py against hostile files (issue 20): only the allowed demuxers ever see the bytes, no
protocol, socket or local file is ever opened, limits hold before and during decoding, memory
follows the allowed duration at 24 kHz mono, and decoding threads run at ordinary priority.
Nothing touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import sounds
from sound_samples import (
    AV_SEEDS,
    FileWatch,
    av_seeds,
    ffconcat,
    flac_bomb,
    hls,
    peak_rss_mb,
    reset_peak_rss,
    sdp,
    socket_inodes,
    thread_sched,
    udp_ports_of,
    wav_bytes,
    wav_seeds,
)
from sounds import SoundError

av = pytest.importorskip("av")

SDP_PORT = 47104  # not 5004: nothing else in the test namespace should be on it


def one_line_error(data: bytes, name: str = "upload-x", **kw) -> str:
    with pytest.raises(SoundError) as err:
        sounds.decode_bytes(data, name=name, **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: "), message
    return message


# --------------------------------------------------------------------------------------------
# The allow-list: recognised from the first bytes, one demuxer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return av_seeds()


@pytest.mark.parametrize("name", list(AV_SEEDS))
def test_every_allowed_container_is_recognised_and_decodes(seeds: dict[str, bytes], name: str) -> None:
    data = seeds[name]
    assert sounds.sniff_format(data) == AV_SEEDS[name][3]
    sound = sounds.decode_bytes(data, name=name)
    assert sound.duration_s == pytest.approx(0.25, abs=0.06)
    assert sound.source_rate == 48000
    peak_hz = np.argmax(np.abs(np.fft.rfft(sound.samples))) * sounds.SAMPLE_RATE / sound.samples.size
    assert abs(peak_hz - 1000) < 10


def test_wav_seeds_are_recognised_as_wav() -> None:
    for name, data in wav_seeds().items():
        assert sounds.sniff_format(data) == "wav", name
        assert sounds.decode_bytes(data, name=name).duration_s == pytest.approx(0.25, abs=0.01), name


def test_an_mp4_with_a_video_track_decodes_its_audio_only() -> None:
    import io

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        audio = c.add_stream("aac", rate=48000)
        video = c.add_stream("mpeg4", rate=25)
        video.width = video.height = 64
        x = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(12000) / 48000)).astype(np.float32)[None, :]
        for start in range(0, 12000, 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, start:start + 1024]), format="fltp",
                                           layout="mono")
            f.sample_rate, f.pts = 48000, start
            for p in audio.encode(f):
                c.mux(p)
        for i in range(6):
            vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            vf.pts = i
            for p in video.encode(vf):
                c.mux(p)
        for s in (audio, video):
            for p in s.encode(None):
                c.mux(p)
    assert sounds.decode_bytes(buf.getvalue()).duration_s == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("data", [
    sdp(SDP_PORT), ffconcat("a.wav"), hls("a.wav"), b"#EXTM3U\n", b"<?xml version='1.0'?><MPD/>",
    b"RTSP/1.0 200 OK\r\n", b"\x00" * 64, b"GIF89a....", b"just text\n" * 10,
], ids=["sdp", "ffconcat", "hls", "m3u", "dash", "rtsp", "zeros", "gif", "text"])
def test_anything_else_is_refused_before_ffmpeg_sees_it(data: bytes) -> None:
    assert sounds.sniff_format(data) is None
    message = one_line_error(data)
    assert "cannot decode" in message and "ffmpeg -i" in message


def test_the_refusal_does_not_depend_on_what_a_playlist_points_to(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "marker-exists.wav").write_bytes(wav_bytes())
    for make in (ffconcat, hls):
        there, missing = one_line_error(make("marker-exists.wav")), one_line_error(make("marker-absent.wav"))
        assert there == missing


# --------------------------------------------------------------------------------------------
# Defence in depth: even if FFmpeg were handed a playlist or SDP demuxer, it could open nothing
# --------------------------------------------------------------------------------------------


class SocketWatch:
    """Polls this process's sockets while something runs in another thread."""

    def __init__(self) -> None:
        self.before = socket_inodes()
        self.new: set[int] = set()
        self.udp_ports: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.new |= socket_inodes() - self.before
            self.udp_ports |= udp_ports_of()
            time.sleep(0.001)

    def __enter__(self) -> "SocketWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join()


def forced(monkeypatch, demuxer: str) -> None:
    """Pretend the sniffer recognised `demuxer` (it never does): the options must still hold."""
    monkeypatch.setattr(sounds, "_DEMUXERS", {**sounds._DEMUXERS, "forced": demuxer})


@pytest.mark.skipif(not os.environ.get("VOICE_AGENT_TEST_IP"),
                    reason="opens a UDP listener: only inside scripts/test's network namespace")
def test_the_socket_watch_sees_what_an_unrestricted_ffmpeg_opens_for_an_sdp() -> None:
    """The canary: FFmpeg as the worker used it (auto-detection, no whitelist) listens on UDP."""
    import io

    with SocketWatch() as watch:
        container = av.open(io.BytesIO(sdp(SDP_PORT)), mode="r", timeout=0.5)
        time.sleep(0.2)
        container.close()
    assert SDP_PORT in watch.udp_ports and watch.new


def test_a_forced_sdp_demuxer_opens_no_socket(monkeypatch) -> None:
    forced(monkeypatch, "sdp")
    with SocketWatch() as watch:
        with pytest.raises(SoundError, match="cannot decode"):
            sounds._decode_with_av(sdp(SDP_PORT), "upload-x", "forced", 600.0)
    assert not watch.new and SDP_PORT not in watch.udp_ports


@pytest.mark.parametrize("demuxer,make", [("concat", ffconcat), ("hls", hls)])
def test_a_forced_playlist_demuxer_reads_no_local_file(tmp_path: Path, monkeypatch, demuxer: str, make) -> None:
    forced(monkeypatch, demuxer)
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "marker-7f3a.wav").write_bytes(wav_bytes())
    monkeypatch.chdir(targets)
    watch = FileWatch(targets)
    try:
        messages = {}
        for prefix in ("", str(targets) + "/", "file:" + str(targets) + "/"):
            for marker in ("marker-7f3a.wav", "marker-0000.wav"):  # exists, does not
                with pytest.raises(SoundError) as err:
                    sounds._decode_with_av(make(prefix + marker), "upload-x", "forced", 600.0)
                messages.setdefault(prefix, set()).add(str(err.value))
        assert watch.events() == [], "FFmpeg opened a local file"
    finally:
        watch.close()
    for prefix, texts in messages.items():  # nothing says whether the file exists
        assert len(texts) == 1, (prefix, texts)


# --------------------------------------------------------------------------------------------
# Limits: from the headers before decoding, and inside the decode loop
# --------------------------------------------------------------------------------------------


def test_a_40_kb_flac_declaring_6_channels_at_655_khz_is_refused_from_its_header() -> None:
    bomb = flac_bomb(655350, "5.1", 20.0)
    assert len(bomb) < 40_000
    t0 = time.perf_counter()
    message = one_line_error(bomb)
    assert time.perf_counter() - t0 < 0.5
    assert "6 channels at 655350 Hz" in message and "ffmpeg -i" in message


def test_a_25_minute_flac_is_refused_from_its_header_under_the_callers_limit() -> None:
    bomb = flac_bomb(8000, "mono", 25 * 60)
    t0 = time.perf_counter()
    message = one_line_error(bomb, max_duration_s=600)
    assert time.perf_counter() - t0 < 0.5
    assert "25.0 min of audio is over the 10 min limit" in message and "-t 600" in message


def test_a_flac_hiding_its_length_is_stopped_at_the_limit_with_bounded_memory() -> None:
    bomb = flac_bomb(48000, "stereo", 25 * 60, hide_length=True)
    sounds.decode_bytes(flac_bomb(48000, "stereo", 1.0), name="warm-up")  # FFmpeg's own one-off allocations
    reset_peak_rss()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    message = one_line_error(bomb, max_duration_s=120)
    elapsed = time.perf_counter() - t0
    grew = peak_rss_mb() - base
    assert "longer than the 2 min limit" in message and "-t 120" in message
    # 120 s at 24 kHz mono is 11.5 MB; at the source's 48 kHz stereo in float it would be 46 MB.
    assert grew < 30, f"peak RSS grew {grew:.0f} MB"
    assert elapsed < 5.0


def test_header_rate_and_channel_limits() -> None:
    assert "sample rate 2000 Hz" in one_line_error(flac_bomb(2000, "mono", 0.5))
    sounds.decode_bytes(flac_bomb(192000, "stereo", 0.5), name="hi-res")  # 384 000 samples/s: fine
    assert "8 channels at 192000 Hz" in one_line_error(flac_bomb(192000, "7.1", 0.5))


def test_duration_limit_for_wav_is_checked_before_converting() -> None:
    message = one_line_error(wav_bytes(3.0), max_duration_s=2)
    assert "over the 2 s limit" in message and "-t 2" in message
    assert sounds.decode_bytes(wav_bytes(1.5), max_duration_s=2).duration_s == pytest.approx(1.5)


def test_the_global_limit_still_applies_when_the_caller_allows_more(monkeypatch) -> None:
    monkeypatch.setattr(sounds, "MAX_DURATION_S", 1)
    assert "-t 1" in one_line_error(wav_bytes(2.0), max_duration_s=600)


def test_a_multichannel_wav_is_downmixed_without_a_float_copy_of_every_channel() -> None:
    rate, seconds, channels = 48000, 60, 8
    frames = rate * seconds
    raw = np.zeros((frames, channels), "<i2")
    raw[:, 0] = (0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(frames) / rate)).astype("<i2")
    from sound_samples import riff
    import struct

    data = riff(b"WAVE", [(b"fmt ", struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels,
                                                16)), (b"data", raw.tobytes())])
    del raw
    sounds.decode_bytes(wav_bytes(0.5, 48000))
    reset_peak_rss()
    base = peak_rss_mb()
    sound = sounds.decode_bytes(data)
    grew = peak_rss_mb() - base
    assert sound.duration_s == pytest.approx(60.0)
    # The file is 46 MB; all channels as float32 would be 92 MB on top. Mono at 48 kHz is 11.5 MB.
    assert grew < 60, f"peak RSS grew {grew:.0f} MB decoding a {len(data) / 1e6:.0f} MB WAV"


# --------------------------------------------------------------------------------------------
# Decoding threads run at ordinary priority
# --------------------------------------------------------------------------------------------


def run_in_realtime_thread(fn):
    """Run fn in a new SCHED_RR thread (skip if this process may not)."""
    box: dict = {}

    def body() -> None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_RR, os.sched_param(5))
        except (OSError, AttributeError) as e:
            box["skip"] = str(e)
            return
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "skip" in box:
        pytest.skip(f"cannot make a real-time thread here: {box['skip']}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def my_scheduling() -> tuple[int, int, tuple[str, int, int]]:
    tid = threading.get_native_id()
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid), thread_sched(os.getpid(), tid)


def test_run_in_background_takes_a_realtime_thread_down_to_ordinary_priority() -> None:
    def check():
        before = os.sched_getscheduler(threading.get_native_id())
        return before, sounds.run_in_background(my_scheduling)

    before, (policy, nice, (_, proc_policy, proc_nice)) = run_in_realtime_thread(check)
    assert before == os.SCHED_RR
    assert policy == os.SCHED_OTHER and proc_policy == 0
    assert nice >= 10 and proc_nice >= 10


def test_the_decode_thread_is_ordinary_even_when_created_by_a_realtime_thread(monkeypatch) -> None:
    monkeypatch.setattr(sounds, "_executor", None)  # a fresh one, created below by a real-time thread

    def check():
        return sounds.decode_executor().submit(my_scheduling).result(5)

    policy, nice, (comm, proc_policy, proc_nice) = run_in_realtime_thread(check)
    assert comm == "sound-decode"
    assert policy == os.SCHED_OTHER and proc_policy == 0 and nice >= 10 and proc_nice >= 10
    sounds.decode_executor().shutdown()


def test_decoding_in_a_subprocess_opens_no_socket_at_all() -> None:
    """Belt and braces, in a clean process: every hostile sample through decode_bytes, then
    count the sockets it ever held (the SDP demuxer's listeners would stay open)."""
    code = """
import sys, os
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), 'tests')]
import sounds, sound_samples as s
for data in (s.sdp(47104), s.ffconcat('x.wav'), s.hls('x.wav'), s.truncated_rf64()):
    try:
        sounds.decode_bytes(data)
    except sounds.SoundError:
        pass
print(len(s.socket_inodes()), sorted(s.udp_ports_of()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(sounds.__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "[]"]
