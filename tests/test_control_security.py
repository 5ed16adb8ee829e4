"""control.py against hostile callers and files (issue 20). Unit tests with a fake room and
reader: uploads are checked before they are read, read with a cap, closed when refused, and an
aborted stream or a failing decode ends in an error result, never in a crashed task; the state
file is validated; refusals are logged at a bounded rate. Then the same with the real server
and the worker as a subprocess (marked e2e)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import control
import sounds
from harness import ASSEMBLYAI_KEY, RoomUser, WorkerProcess, tone, wait_until, worker_env, write_wav
from sound_samples import (
    FileWatch,
    ffconcat,
    flac_bomb,
    hls,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    sdp,
    thread_sched,
    threads_sched,
    truncated_rf64,
    udp_ports_of,
    udp_sockets,
    wav_bytes,
)
from standin import StandIn, StandInOptions

# --------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------


class FakeMixer:
    def __init__(self) -> None:
        self.bed: str | None = "builtin:office"
        self.volume = 0.3
        self.calls: list[tuple] = []

    def set_bed(self, name: str, samples: np.ndarray, volume: float, fade_ms: int = 0) -> None:
        self.bed, self.volume = name, volume
        self.calls.append(("set_bed", name, volume))

    def set_bed_volume(self, volume: float, ramp_ms: int | None = None) -> None:
        self.volume = volume
        self.calls.append(("set_bed_volume", volume))

    def stop_bed(self, fade_ms: int = 0) -> None:
        self.bed = None
        self.calls.append(("stop_bed",))

    async def play_cue(self, name: str, samples: np.ndarray, volume: float) -> bool:
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"bed": self.bed, "bed_volume": self.volume, "underruns": 0, "barge_ins": 0, "frames": 0}


class FakeInfo:
    def __init__(self, size: int | None, attributes: dict[str, str]) -> None:
        self.size, self.attributes = size, attributes


class FakeReader:
    """A byte-stream reader: yields `chunks`, then ends, or raises `error` (the SDK's
    rtc.StreamError when the sender aborts or the room drops)."""

    def __init__(self, chunks: list[bytes], *, size: int | None = None, attributes: dict[str, str] | None = None,
                 error: BaseException | None = None) -> None:
        self.info = FakeInfo(sum(map(len, chunks)) if size is None else size, attributes or {})
        self._chunks, self._error = list(chunks), error
        self.read = 0
        self.closed = False

    def __aiter__(self) -> "FakeReader":
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            raise StopAsyncIteration
        if self._chunks:
            self.read += 1
            return self._chunks.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def close(self) -> None:
        self.closed = True


class FakeParticipant:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, str, list[str]]] = []

    async def send_text(self, text: str, *, topic: str, destination_identities: list[str]) -> None:
        self.sent.append((json.loads(text), topic, destination_identities))


class FakeRoom:
    def __init__(self) -> None:
        self.local_participant = FakeParticipant()


def controller(tmp_path: Path, **overrides: Any) -> control.Controller:
    settings = control.ControlSettings(identities=frozenset({"operator"}), state_dir=tmp_path / "state",
                                       max_upload_bytes=200_000, max_audio_s=5.0, **overrides)
    return control.Controller(settings, FakeMixer(), "room-1")


async def upload(c: control.Controller, reader: FakeReader, caller: str = "operator") -> dict:
    room = FakeRoom()
    await c._on_upload(room, reader, caller)  # must never raise
    (result, topic, to), = room.local_participant.sent
    assert topic == control.TOPIC_RESULT and to == [caller]
    return result


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------


async def test_an_upload_plays(tmp_path: Path) -> None:
    c = controller(tmp_path)
    result = await upload(c, FakeReader([wav_bytes(1.0)], attributes={"volume": "0.4"}))
    assert result["ok"] and result["volume"] == 0.4
    assert c.mixer.calls[-1][0] == "set_bed"


async def test_a_stranger_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    c = controller(tmp_path)
    reader = FakeReader([wav_bytes(1.0)])
    result = await upload(c, reader, "mallory")
    assert result == {"ok": False, "code": control.ERR_FORBIDDEN, "error": "mallory may not control this agent"}
    assert reader.read == 0 and reader.closed


async def test_a_declared_size_over_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    c = controller(tmp_path)
    reader = FakeReader([b"x" * 10], size=10_000_000)
    result = await upload(c, reader)
    assert not result["ok"] and "10000000 bytes is larger than the limit" in result["error"]
    assert reader.read == 0 and reader.closed


async def test_a_stream_larger_than_it_declared_is_cut_at_the_limit(tmp_path: Path) -> None:
    c = controller(tmp_path)
    reader = FakeReader([b"x" * 50_000] * 100, size=1000)
    result = await upload(c, reader)
    assert not result["ok"] and "larger than the limit of 200000 bytes" in result["error"]
    assert reader.read == 5 and reader.closed


async def test_an_aborted_stream_is_an_error_result_not_a_crash(tmp_path: Path) -> None:
    from livekit import rtc

    c = controller(tmp_path)
    data = wav_bytes(1.0)
    reader = FakeReader([data[:5000]], error=rtc.StreamError("stream aborted by the sender"))
    result = await upload(c, reader)
    assert result == {"ok": False, "code": control.ERR_INVALID, "error": "the upload was aborted before it ended"}
    assert reader.closed and c.mixer.calls == []


@pytest.mark.parametrize("data,expect", [
    (truncated_rf64(), "ds64"),
    (sdp(47104), "cannot decode"),
    (ffconcat("x.wav"), "cannot decode"),
    (b"RIFF\x00\x00\x00\x00WAVE", "fmt"),
])
async def test_undecodable_uploads_are_one_line_error_results(tmp_path: Path, data: bytes, expect: str) -> None:
    c = controller(tmp_path)
    result = await upload(c, FakeReader([data]))
    assert not result["ok"] and result["code"] == control.ERR_INVALID
    assert expect in result["error"] and "\n" not in result["error"] and result["error"].startswith("upload-")


async def test_the_duration_limit_is_enforced_while_decoding(tmp_path: Path, monkeypatch) -> None:
    c = controller(tmp_path)  # max_audio_s=5
    bomb = flac_bomb(48000, "stereo", 600, hide_length=True)
    seen: list[float | None] = []
    real = sounds.decode_bytes

    def spy(data: bytes, **kw: Any) -> sounds.Sound:
        seen.append(kw.get("max_duration_s"))
        return real(data, **kw)

    monkeypatch.setattr(sounds, "decode_bytes", spy)
    t0 = time.perf_counter()
    result = await upload(c, FakeReader([bomb]))
    assert seen == [5.0]
    assert not result["ok"] and "longer than the 5 s limit" in result["error"] and "-t 5" in result["error"]
    assert time.perf_counter() - t0 < 2.0


async def test_an_unexpected_decoder_failure_is_an_error_result(tmp_path: Path, monkeypatch) -> None:
    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(sounds, "decode_bytes", broken)
    c = controller(tmp_path)
    result = await upload(c, FakeReader([wav_bytes(0.5)]))
    assert result == {"ok": False, "code": control.ERR_INVALID, "error": "cannot use this audio: it could not be decoded"}


async def test_an_unexpected_reader_failure_is_an_error_result(tmp_path: Path) -> None:
    c = controller(tmp_path)
    result = await upload(c, FakeReader([b"RIFF"], error=OSError("ffi went away")))
    assert result == {"ok": False, "code": control.ERR_INVALID, "error": "the upload failed"}


async def test_decoding_runs_in_the_ordinary_priority_decode_thread(tmp_path: Path, monkeypatch) -> None:
    seen = []
    real = sounds.decode_bytes

    def spy(data: bytes, **kw: Any) -> sounds.Sound:
        import threading

        tid = threading.get_native_id()
        seen.append((thread_sched(os.getpid(), tid), os.sched_getscheduler(tid)))
        return real(data, **kw)

    monkeypatch.setattr(sounds, "decode_bytes", spy)
    c = controller(tmp_path)
    assert (await upload(c, FakeReader([wav_bytes(0.5)])))["ok"]
    ((comm, policy, nice), sched), = seen
    assert comm == "sound-decode" and policy == 0 and sched == os.SCHED_OTHER and nice >= 10


# --------------------------------------------------------------------------------------------
# The state file
# --------------------------------------------------------------------------------------------


def hostile_states() -> dict[str, tuple[str | bytes, str]]:
    return {
        "nan-volume": ('{"source": "builtin:cafe", "volume": NaN, "name": "x"}', "volume"),
        "infinite-volume": ('{"source": "configured", "volume": 1e999}', "volume"),
        "volume-2": ('{"source": "configured", "volume": 2}', "volume"),
        "volume-true": ('{"source": "configured", "volume": true}', "volume"),
        "volume-text": ('{"source": "configured", "volume": "0.5"}', "volume"),
        "deep": ("[" * 2000 + "]" * 2000, "nested too deep"),
        "deep-object": ('{"source": "configured", "volume": 0.5, "name": {"a": {"b": 1}}}', "nested too deep"),
        "huge": ('{"source": "configured", "volume": 0.5, "name": "' + "x" * 10_000 + '"}', "larger than"),
        "list": ("[1, 2]", "not a JSON object"),
        "unknown-kind": ('{"source": "http://example.com/a.mp3", "volume": 0.5}', "unknown source"),
        "clip-path": ('{"source": "clip:../../etc/passwd", "volume": 0.5}', "unknown source"),
        "no-such-builtin": ('{"source": "builtin:disco", "volume": 0.5}', "unknown source"),
        "upload-no-audio": ('{"source": "upload:abcdef0123456789", "volume": 0.5}', "missing"),
        "not-utf8": (b'{"source": "\xff\xfe"}', "codec"),
        "not-json": ("{half a fi", "Expecting"),
    }


@pytest.mark.parametrize("case", list(hostile_states()))
def test_a_hostile_state_file_is_ignored_with_one_warning(tmp_path: Path, caplog, case: str) -> None:
    text, reason = hostile_states()[case]
    store = control.BedStore(tmp_path, "room-1")
    (store.json_path.write_bytes if isinstance(text, bytes) else store.json_path.write_text)(text)
    with caplog.at_level(logging.WARNING, logger="control"):
        assert store.load() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ignoring the control state" in warnings[0], warnings
    assert reason.lower() in warnings[0].lower() and "\n" not in warnings[0]


def test_oversized_saved_audio_and_non_regular_files_are_ignored(tmp_path: Path, caplog) -> None:
    store = control.BedStore(tmp_path, "room-1", max_audio_bytes=1000)
    store.save(control.Bed("upload:abcdef0123456789", 0.4, "upload-x", b"x" * 1001))
    with caplog.at_level(logging.WARNING, logger="control"):
        assert store.load() is None
        store.json_path.unlink()
        os.mkfifo(store.json_path)  # would block a plain open() forever
        assert store.load() is None
        store.json_path.unlink()
        store.json_path.symlink_to("/dev/zero")
        assert store.load() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "larger than the upload limit" in messages[0] and "not a regular file" in messages[1]


def test_a_good_state_file_still_loads(tmp_path: Path) -> None:
    store = control.BedStore(tmp_path, "room-1")
    for bed in (control.Bed("builtin:cafe", 0.2, "builtin:cafe"), control.Bed("clip:lobby.wav", 1, "lobby.wav"),
                control.Bed("configured", 0.0, "x"), control.Bed("stopped", 0.0, "none"),
                control.Bed("upload:abcdef0123456789", 0.5, "upload-abcdef0123456789", b"RIFF")):
        store.save(bed)
        loaded = store.load()
        assert (loaded.source, loaded.volume, loaded.audio) == (bed.source, bed.volume, bed.audio)


async def test_restore_never_fails_start_up(tmp_path: Path, monkeypatch, caplog) -> None:
    c = controller(tmp_path)
    c.store.save(control.Bed("upload:abcdef0123456789", 0.5, "x", truncated_rf64()))
    with caplog.at_level(logging.WARNING, logger="control"):
        assert await c.restore() is False  # the saved audio does not decode
    assert "could not restore" in caplog.text and not c.store.json_path.exists()

    def broken(*a: Any, **k: Any) -> Any:
        raise MemoryError("out of memory")

    c.store.save(control.Bed("upload:abcdef0123456789", 0.5, "x", wav_bytes(0.5)))
    monkeypatch.setattr(sounds, "decode_bytes", broken)
    assert await c.restore() is False


# --------------------------------------------------------------------------------------------
# Refusals are logged at a bounded rate
# --------------------------------------------------------------------------------------------


def test_the_log_limiter_per_caller_and_in_all() -> None:
    lim = control.LogLimiter(first=3, per_minute=20)
    t = 1000.0
    assert [lim.allow("m", t + i * 0.01)[0] for i in range(10)] == [True] * 3 + [False] * 7
    assert lim.allow("m", t + 30) == (False, 0)
    assert lim.allow("m", t + 61) == (True, 8)  # once a minute, with the count since the last line
    assert lim.allow("m", t + 62) == (False, 0)
    # Many callers: at most 20 lines a minute in all.
    lim = control.LogLimiter(first=3, per_minute=20)
    logged = sum(lim.allow(f"caller-{i}", t + i * 0.001)[0] for i in range(500))
    assert logged == 20


async def test_denied_calls_log_a_bounded_number_of_lines(tmp_path: Path, caplog) -> None:
    c = controller(tmp_path)
    with caplog.at_level(logging.WARNING, logger="control"):
        for _ in range(200):
            with pytest.raises(control.ControlError):
                await c.handle("mix_audio", "mallory", "{}")
        for i in range(50):
            await upload(c, FakeReader([b"x"]), f"bot-{i}\n")
    lines = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert len(lines) == 20, lines  # 3 for mallory, then the 17 first bots; the rest counted
    assert c.counters["denied"] == 250
    assert all("\n" not in line for line in lines)


# --------------------------------------------------------------------------------------------
# End to end: the real server, the worker as a subprocess
# --------------------------------------------------------------------------------------------

BED_HZ, REPLY_HZ, USER_HZ = 300.0, 1000.0, 450.0
SDP_PORT = 47204


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_mode="tone", reply_freq_hz=REPLY_HZ, reply_seconds=1.5,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


class Uploader:
    """A room participant that uploads files to the agent as byte streams, the way
    `worker.py control --file` does, and collects the results on mix_audio.result."""

    def __init__(self, user: RoomUser) -> None:
        self.user = user
        self.results: asyncio.Queue[dict] = asyncio.Queue()

        def on_result(reader: Any, sender: str) -> None:
            async def read() -> None:
                self.results.put_nowait(json.loads(await reader.read_all()))
            asyncio.ensure_future(read())

        user.room.register_text_stream_handler(control.TOPIC_RESULT, on_result)

    async def send(self, data: bytes, *, abort_after: int | None = None, timeout: float = 30.0,
                   **attributes: str) -> dict:
        writer = await self.user.room.local_participant.stream_bytes(
            name="bed.bin", topic=control.TOPIC_UPLOAD, attributes={"volume": "0.5", **attributes},
            destination_identities=["voice-agent"], total_size=len(data))
        end = len(data) if abort_after is None else abort_after
        for i in range(0, end, 15000):
            await writer.write(data[i:min(i + 15000, end)])
        if abort_after is None:
            await writer.aclose()
        else:
            await writer.aclose(reason="the uploader gave up")  # a close with a reason is an abort
        return await asyncio.wait_for(self.results.get(), timeout)


def heard(user: RoomUser, freq: float, since: float) -> float:
    values = [a for t, a in user.agent().timeline(freq) if t >= since]
    return float(np.percentile(values, 90)) if values else 0.0


@pytest.mark.e2e
async def test_hostile_uploads_are_refused_and_the_call_goes_on(livekit_server, standin, room_name, tmp_path):
    workdir = tmp_path / "w"
    targets = workdir / "secrets"
    targets.mkdir(parents=True)
    (targets / "marker-5d1e9b.wav").write_bytes(wav_bytes(0.5))  # what an ffconcat upload would read
    bed = write_wav(tmp_path / "bed.wav", tone(BED_HZ, 1.0, amplitude=0.5, fade_ms=0))
    env = worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed), AMBIENT_VOLUME="0.5",
                     STATE_DIR=str(tmp_path / "state"), CONTROL_IDENTITIES="operator", GREETING="",
                     CONTROL_RATE_PER_MIN="600", CONTROL_MAX_AUDIO_S="600")
    worker = WorkerProcess(env, workdir).start()
    user, operator = RoomUser(livekit_server, room_name), RoomUser(livekit_server, room_name, "operator")
    watch = FileWatch(targets)
    try:
        await user.join()
        await user.wait_heard()
        await operator.join(publish=False)
        pid = worker.proc.pid
        up = Uploader(operator)
        ok = await up.send(wav_bytes(20.0, 16000))  # a normal upload first: the decoder is warm
        assert ok["ok"], ok
        ports_before = udp_ports_of(pid)

        # --- SDP: refused, and no UDP socket on its ports, at any moment while it was handled --
        seen_ports: set[int] = set()
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                seen_ports.update(udp_ports_of(pid))
                await asyncio.sleep(0.005)

        poller = asyncio.ensure_future(poll())
        result = await up.send(sdp(SDP_PORT))
        await asyncio.sleep(0.5)
        stop.set()
        await poller
        assert not result["ok"] and "cannot decode" in result["error"], result
        assert not {SDP_PORT, SDP_PORT + 1} & seen_ports, f"the worker opened UDP {seen_ports - ports_before}"
        assert not {SDP_PORT, SDP_PORT + 1} & namespace_udp_ports(pid)

        # --- ffconcat / HLS: refused, nothing read, the same text for a file that exists or not --
        texts = {}
        for make in (ffconcat, hls):
            for target in ("secrets/marker-5d1e9b.wav", "secrets/marker-000000.wav",
                           str(targets / "marker-5d1e9b.wav"), str(targets / "marker-000000.wav")):
                r = await up.send(make(target))
                assert not r["ok"]
                texts.setdefault((make.__name__, os.path.isabs(target)), set()).add(
                    re.sub(r"upload-[0-9a-f]{16}", "upload-<digest>", r["error"]))
        assert all(len(v) == 1 for v in texts.values()), texts
        assert watch.events() == [], "the worker opened a file the playlist named"

        # --- the 24-byte RF64, an aborted upload ---------------------------------------------
        r = await up.send(truncated_rf64())
        assert not r["ok"] and "ds64" in r["error"] and "\n" not in r["error"], r
        r = await up.send(wav_bytes(10.0, 16000), abort_after=60_000)
        assert r == {"ok": False, "code": control.ERR_INVALID, "error": "the upload was aborted before it ended"}, r
        assert worker.alive

        # --- decompression bombs: refused fast, before they cost memory ------------------------
        bombs = {
            "655 kHz x 6 ch, 60 s": flac_bomb(655350, "5.1", 60.0),
            "25 min, 48 kHz stereo": flac_bomb(48000, "stereo", 25 * 60),
            "25 min, length hidden": flac_bomb(48000, "stereo", 25 * 60, hide_length=True),
        }
        assert reset_peak_rss(pid)
        base = rss_mb(pid)
        for label, bomb in bombs.items():
            t0 = time.monotonic()
            r = await up.send(bomb, timeout=60)
            took = time.monotonic() - t0
            print(f"{label}: {len(bomb) / 1e3:.0f} KB refused in {took:.2f} s: {r['error']}")
            assert not r["ok"] and ("limit" in r["error"] or "channels at" in r["error"]), r
            assert took < 10, f"{label} took {took:.1f} s to refuse"
        grew = peak_rss_mb(pid) - base
        print(f"worker peak RSS over the bombs: +{grew:.0f} MB (from {base:.0f} MB)")
        assert grew < 150, f"the worker's peak RSS grew {grew:.0f} MB"

        # --- the decode thread ran at ordinary priority, below the real-time main thread --------
        threads = threads_sched(pid)
        decode = [s for s in threads.values() if s[0] == "sound-decode"]
        assert decode and all(policy == 0 and nice >= 10 for _, policy, nice in decode), threads
        if thread_sched(pid, pid)[1] == 0:
            print("note: the worker could not go real-time here; the decode thread check is weaker")

        # --- and the call goes on: the user speaks and hears a reply ---------------------------
        assert worker.alive
        session = standin.sessions[-1]
        turns = len(session.events("transcript.user"))
        user.say(tone(USER_HZ, 1.0, amplitude=0.6))
        await standin.wait_for(lambda: len(session.events("transcript.user")) > turns, 15, "the user's turn")
        reply = await wait_reply(standin, session)
        await asyncio.sleep(1.0)
        assert heard(user, REPLY_HZ, reply.first_audio_at + 0.3) > 0.1, "the user did not hear the reply"
        assert worker.alive
        out = worker.output()
        assert "Traceback" not in out and "crashed" not in out
    finally:
        watch.close()
        worker.kill()
        await user.leave()
        await operator.leave()


def namespace_udp_ports(pid: int) -> set[int]:
    """Every UDP port open in the worker's network namespace (any process)."""
    return set(udp_sockets(pid).values())


async def wait_reply(standin: StandIn, session: Any) -> Any:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for r in reversed(session.replies):
            if r.kind == "turn" and r.first_audio_at is not None:
                return r
        await asyncio.sleep(0.05)
    raise AssertionError("no reply to the user's turn")


@pytest.mark.e2e
@pytest.mark.parametrize("content", ["rf64", "sdp", "ffconcat"])
async def test_a_hostile_ambient_sound_is_a_one_line_configuration_error(livekit_server, room_name, tmp_path,
                                                                        content):
    data = {"rf64": truncated_rf64(), "sdp": sdp(SDP_PORT), "ffconcat": ffconcat("bed.wav")}[content]
    path = tmp_path / "bed-hostile.wav"
    path.write_bytes(data)
    worker = WorkerProcess(worker_env(livekit_server, "ws://127.0.0.1:9/v1/ws", room_name,
                                      AMBIENT_SOUND=str(path)), tmp_path / "w").start()
    code = await worker.wait_exit(20)
    out = worker.output()
    assert code == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if str(path) in line]
    assert errors and all("AMBIENT_SOUND" in line and "ffmpeg -i" in line for line in errors), out


@pytest.mark.e2e
async def test_a_hostile_state_file_is_ignored_and_the_worker_starts(livekit_server, standin, room_name, tmp_path):
    state = tmp_path / "state"
    store = control.BedStore(state, room_name)
    state.mkdir()
    store.json_path.write_text('{"source": "configured", "volume": NaN, "name": "' + "[" * 3000 + '"}')
    bed = write_wav(tmp_path / "bed.wav", tone(BED_HZ, 1.0, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed),
                                      AMBIENT_VOLUME="0.5", STATE_DIR=str(state), GREETING=""),
                           tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await worker.wait_for_output(r"joined room", 20)
        await user.join()
        await user.wait_heard()
        t0 = time.monotonic()
        await wait_until(lambda: heard(user, BED_HZ, t0) > 0.05, 10, "the configured bed")
        out = worker.output()
        assert out.count("ignoring the control state") == 1, out
        assert worker.alive
    finally:
        worker.kill()
        await user.leave()


@pytest.mark.e2e
async def test_the_configured_sounds_are_decoded_at_ordinary_priority(livekit_server, standin, room_name, tmp_path):
    """AMBIENT_SOUND and THINKING_SOUND are files like any upload: decoded at start on the
    decoding thread (SCHED_OTHER, nice >= 10), never on the event loop's thread, which is
    real-time when the worker may (a huge file must not hold a core at real-time priority)."""
    bed = write_wav(tmp_path / "bed.wav", tone(BED_HZ, 1.0, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed),
                                      THINKING_SOUND=str(bed), GREETING=""), tmp_path / "w").start()
    try:
        await worker.wait_for_output(r"joined room", 20)
        pid = worker.proc.pid
        threads = list(threads_sched(pid).values())
        decode = [t for t in threads if t[0] == "sound-decode"]
        assert decode, f"no decoding thread: the sounds were decoded elsewhere ({sorted(t[0] for t in threads)})"
        (_, policy, nice), = decode
        assert policy == os.SCHED_OTHER and nice >= 10, decode
    finally:
        worker.kill()
