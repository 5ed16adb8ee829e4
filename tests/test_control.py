"""Runtime control of the bed (mix_audio semantics) with the real server: an operator
changes the scene, the user hears each change; strangers and garbage are refused while the
audio goes on; the bed survives kill -9; a normal end forgets it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

import control
from harness import ASSEMBLYAI_KEY, REPO, RoomUser, WorkerProcess, tone, wait_until, worker_env, write_wav
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

BED_HZ, UPLOAD_HZ, CLIP_HZ, BIG_HZ = 300.0, 550.0, 700.0, 850.0


def wav_bytes(freq: float, seconds: float, rate: int = 16000, channels: int = 1, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (amplitude * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    if channels > 1:
        x = np.repeat(x[:, None], channels, axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return buf.getvalue()


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.0, default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def scene(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "lobby.wav").write_bytes(wav_bytes(CLIP_HZ, 1.3))
    bed = write_wav(tmp_path / "bed.wav", tone(BED_HZ, 1.0, amplitude=0.5, fade_ms=0))
    return {"AMBIENT_SOUND": str(bed), "AMBIENT_VOLUME": "0.5", "AMBIENT_DIR": str(clips),
            "STATE_DIR": str(tmp_path / "state"), "CONTROL_IDENTITIES": "operator,ops2", "GREETING": "",
            "AMBIENT_DUCK_DB": "0"}


async def rpc(user: RoomUser, method: str, payload: dict | str) -> dict:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return json.loads(await user.room.local_participant.perform_rpc(
        destination_identity="voice-agent", method=method, payload=text, response_timeout=20))


async def rpc_error(user: RoomUser, method: str, payload: dict | str):
    from livekit import rtc

    with pytest.raises(rtc.RpcError) as e:
        await rpc(user, method, payload)
    return e.value


def level(user: RoomUser, freq: float, seconds: float = 0.6) -> float:
    """Median amplitude of ``freq`` the user heard over the last ``seconds``."""
    now = time.monotonic()
    values = [a for t, a in user.agent().timeline(freq) if now - seconds <= t <= now]
    return float(np.median(values)) if values else 0.0


async def settle(seconds: float = 1.6) -> None:
    await asyncio.sleep(seconds)  # crossfades and ramps are under a second


async def test_operator_starts_replaces_relevels_and_stops_the_bed(livekit_server, standin, room_name, tmp_path,
                                                                   scene):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, **scene), tmp_path / "w").start()
    user, operator = RoomUser(livekit_server, room_name), RoomUser(livekit_server, room_name, "operator")
    try:
        await user.join()
        await user.wait_heard()
        await operator.join(publish=False)
        await settle()
        assert level(user, BED_HZ) > 0.05, "the configured bed is not heard"

        # Replace it with an uploaded WAV (the mix_audio convention: 16 kHz 16-bit mono, base64).
        audio = base64.b64encode(wav_bytes(UPLOAD_HZ, 0.3)).decode()
        answer = await rpc(operator, "mix_audio", {"audio": audio, "volume": 0.5})
        assert answer["ok"] and answer["volume"] == 0.5
        await settle()
        loud = level(user, UPLOAD_HZ)
        assert loud > 0.05 and level(user, BED_HZ) < 0.01, "the new bed did not replace the old one"

        # Re-level: volume 0.1 is a fifth of 0.5.
        await rpc(operator, "mix_audio", {"volume": 0.1})
        await settle()
        ratio = level(user, UPLOAD_HZ) / loud
        assert 0.15 < ratio < 0.25, f"volume 0.5 -> 0.1 changed the level by {ratio:.2f}, expected 0.2"

        # A clip from AMBIENT_DIR, then a built-in, then stop.
        await rpc(operator, "mix_audio", {"clip": "lobby.wav", "volume": 0.5})
        await settle()
        assert level(user, CLIP_HZ) > 0.05 and level(user, UPLOAD_HZ) < 0.01
        state = await rpc(operator, "state", {})
        assert state["bed"].endswith("lobby.wav") and state["bed_volume"] == 0.5 and state["runtime"] is True
        assert (await rpc(operator, "mix_audio", {"stop": True}))["bed"] is None
        await settle()
        assert level(user, CLIP_HZ) < 0.005, "the bed kept playing after stop"
        assert (await rpc(operator, "state", {}))["bed"] is None

        # A one-shot cue answers when it has played.
        t0 = time.monotonic()
        played = await rpc(operator, "play", {"clip": "lobby.wav", "volume": 0.5})
        assert played["completed"] is True and time.monotonic() - t0 >= 1.2
    finally:
        worker.kill()
        await user.leave()
        await operator.leave()


async def test_strangers_and_garbage_are_refused_while_audio_goes_on(livekit_server, standin, room_name, tmp_path,
                                                                     scene):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, **{**scene, "CONTROL_RATE_PER_MIN": "6000"}),
                           tmp_path / "w").start()
    user, operator = RoomUser(livekit_server, room_name), RoomUser(livekit_server, room_name, "operator")
    stranger = RoomUser(livekit_server, room_name, "mallory")
    try:
        await user.join()
        await user.wait_heard()
        await operator.join(publish=False)
        await stranger.join(publish=False)
        await settle()
        before = level(user, BED_HZ)
        e = await rpc_error(stranger, "mix_audio", {"stop": True})
        assert e.code == control.ERR_FORBIDDEN and "may not control" in e.message
        bad = [
            ("{not json", "not JSON"),
            ("[1]", "JSON object"),
            ({"volume": 2}, "volume"),
            ({"volume": "loud"}, "volume"),
            ({"audio": "%%%"}, "base64"),
            ({"audio": base64.b64encode(b"RIFF....not a wav at all").decode()}, ""),
            ({"clip": "../../etc/passwd"}, "not a path"),
            ({"clip": "nope.wav"}, "no clip named"),
            ({"clip": "builtin:disco"}, "no built-in"),
            ({"stop": True, "volume": 1}, "stop"),
            ({"colour": "blue"}, "unknown field"),
            ({}, "give"),
        ]
        for payload, expect in bad:
            # 13 calls against a burst of 10 refilled at 100 a second (CONTROL_RATE_PER_MIN's
            # most): paced, so that a fast round trip never meets the rate limit instead.
            await asyncio.sleep(0.015)
            e = await rpc_error(operator, "mix_audio", payload)
            assert e.code == control.ERR_INVALID and expect in e.message, (payload, e.message)
        await asyncio.sleep(0.015)
        e = await rpc_error(operator, "play", {"clip": "lobby.wav", "audio": "AAAA"})
        assert e.code == control.ERR_INVALID
        await asyncio.sleep(0.5)
        after = level(user, BED_HZ)
        assert after > 0.5 * before, "the bed suffered from the refused calls"
        assert "mix_audio denied for mallory" in worker.output()
        assert worker.alive
    finally:
        worker.kill()
        await user.leave()
        await operator.leave()
        await stranger.leave()


async def test_a_flood_of_calls_is_rate_limited_and_the_bed_plays_on(livekit_server, standin, room_name, tmp_path,
                                                                     scene):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, **scene), tmp_path / "w").start()
    user, operator = RoomUser(livekit_server, room_name), RoomUser(livekit_server, room_name, "ops2")
    try:
        await user.join()
        await user.wait_heard()
        await operator.join(publish=False)
        await settle()
        before = level(user, BED_HZ)
        audio = base64.b64encode(wav_bytes(UPLOAD_HZ, 0.3)).decode()

        async def call() -> int:
            try:
                await rpc(operator, "mix_audio", {"audio": audio, "volume": 0.5})
                return 0
            except Exception as ex:  # noqa: BLE001
                return getattr(ex, "code", -1)

        codes = await asyncio.gather(*(call() for _ in range(30)))
        assert codes.count(0) <= 11 and codes.count(control.ERR_RATE) >= 19, codes
        await settle()
        gaps = [a for t, a in user.agent().timeline(UPLOAD_HZ) if time.monotonic() - 1.0 < t]
        assert worker.alive and min(gaps) > 0.02, "the audio suffered from the flood"
        del before
    finally:
        worker.kill()
        await user.leave()
        await operator.leave()


async def test_large_upload_goes_as_a_byte_stream(livekit_server, standin, room_name, tmp_path, scene):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, **scene), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    big = tmp_path / "hold-music.wav"
    big.write_bytes(wav_bytes(BIG_HZ, 6.0, rate=44100, channels=2))  # ~1 MB: far over the RPC limit
    try:
        await user.join()
        await user.wait_heard()
        env = {**{k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ},
               **worker_env(livekit_server, standin.url, room_name)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "worker.py"), "control", "mix_audio", '{"volume": 0.5}', "--file", str(big),
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["ok"] is True
        await settle()
        assert level(user, BIG_HZ) > 0.05 and level(user, BED_HZ) < 0.01
    finally:
        worker.kill()
        await user.leave()


async def test_the_caller_is_told_when_the_bed_cannot_be_kept_and_a_refusal_is_whole(livekit_server, standin,
                                                                                     room_name, tmp_path, scene):
    """A bed that could not be written to STATE_DIR (the disk, the folder replaced) plays, but
    a restart would lose it: the caller gets ok false and why, not ok true. And the CLI's
    refusal of a file that does not decode is not cut in the middle of its ffmpeg command."""
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, **scene), tmp_path / "w").start()
    operator = RoomUser(livekit_server, room_name, "operator")
    state_dir = tmp_path / "state"
    try:
        await worker.wait_for_output("joined room", 20)
        await operator.join(publish=False)
        assert (await rpc(operator, "mix_audio", {"clip": "lobby.wav"}))["ok"] is True
        for f in state_dir.iterdir():
            f.unlink()
        state_dir.rmdir()
        state_dir.write_text("not a folder any more")
        answer = await rpc(operator, "mix_audio", {"clip": "builtin:cafe"})
        assert answer["ok"] is False and "could not be kept in STATE_DIR" in answer["error"], (
            f"the caller was told {answer} although the bed was not saved")
        garbage = tmp_path / "notes.wav"
        garbage.write_bytes(b"\x00\x01\x02\x03" * 500)  # 2 kB: small enough to go as an RPC
        env = {**{k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ},
               **worker_env(livekit_server, standin.url, room_name)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "worker.py"), "control", "mix_audio", "--file", str(garbage),
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        line = err.decode().strip()
        assert proc.returncode == 1 and len(line.splitlines()) == 1 and "cannot decode" in line, line
        assert re.search(r"ffmpeg -i \S+ -ac 1 -ar 24000 \S+\.wav \(code", line) or "(more in the worker's log)" in line, (
            f"the refusal was cut short: {line}")
    finally:
        worker.kill()
        await operator.leave()


async def test_bed_survives_kill_9_and_normal_end_removes_it(livekit_server, standin, room_name, tmp_path, scene):
    env = worker_env(livekit_server, standin.url, room_name, IDLE_TIMEOUT_S="2", **scene)
    state_dir = tmp_path / "state"
    first = WorkerProcess(env, tmp_path / "w1").start()
    user, operator = RoomUser(livekit_server, room_name), RoomUser(livekit_server, room_name, "operator")
    second = None
    try:
        await user.join()
        await user.wait_heard()
        await operator.join(publish=False)
        audio = base64.b64encode(wav_bytes(UPLOAD_HZ, 0.3)).decode()
        await rpc(operator, "mix_audio", {"audio": audio, "volume": 0.4})
        await settle()
        assert level(user, UPLOAD_HZ) > 0.05
        assert list(state_dir.glob("*.json")), "the bed was not persisted"

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        second = WorkerProcess(env, tmp_path / "w2").start()
        joined = await second.wait_for_output(r"joined room", 20)
        t_join = time.monotonic()
        await wait_until(lambda: any(t > t_join and a > 0.05 for t, a in user.agent().timeline(UPLOAD_HZ)), 10,
                         "the restored bed")
        heard_at = next(t for t, a in user.agent().timeline(UPLOAD_HZ) if t > t_join and a > 0.05)
        assert heard_at - t_join < 1.5, f"the bed came back {heard_at - t_join:.2f} s after rejoining"
        assert "restored the call's bed" in second.output()
        assert level(user, BED_HZ) < 0.01, "the configured bed came back instead of the call's bed"
        del joined

        # The call ends normally (the user leaves, IDLE_TIMEOUT_S passes): the state goes.
        await user.leave()
        await wait_until(lambda: not list(state_dir.glob("*.json")), 15, "the state file to be removed")
        assert "Voice Agent session ended" in second.output() or standin.sessions[-1].ended
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await user.leave()
        await operator.leave()


def test_state_file_is_written_atomically(tmp_path):
    store = control.BedStore(tmp_path, "room/with odd:chars")
    store.save(control.Bed("upload:abc", 0.4, "upload-abc", b"RIFFdata"))
    assert store.load().audio == b"RIFFdata"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    store.save(control.Bed("builtin:cafe", 0.2, "builtin:cafe"))
    loaded = store.load()
    assert loaded.source == "builtin:cafe" and loaded.audio is None and not store.audio_path.exists()
    store.json_path.write_text("{half a fi")
    assert store.load() is None  # a damaged file is ignored, with a warning
    store.clear()
    assert not list(tmp_path.iterdir())


def test_rate_limiter_allows_bursts_then_the_rate():
    limiter = control.RateLimiter(per_minute=60, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0), "callers are limited separately"
    assert limiter.allow("a", 1.01) and not limiter.allow("a", 1.02)
