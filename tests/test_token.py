"""`python worker.py token`: the user token is handed around (pasted into a browser, sent in a
chat), so it is short-lived and narrow: one hour by default (--ttl, bounded), a microphone and
chat only. Checked against the real server: the microphone publishes, a camera or a screen share
does not. The agent's own token keeps what the agent needs."""

from __future__ import annotations

import asyncio
import datetime
import re
import subprocess
import sys
import time

import jwt
import numpy as np
import pytest

import config
import tokens
from harness import API_KEY, API_SECRET, REPO

ENV = {"LIVEKIT_URL": "ws://127.0.0.1:7880", "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}


def token_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "worker.py"), "token", *args],
                          env={"PATH": "/usr/bin:/bin", **ENV, **(env or {})}, cwd=REPO / "tests",
                          capture_output=True, text=True, timeout=30)


def printed_token(out: str) -> str:
    m = re.search(r"^Token: +(\S+)$", out, re.M)
    assert m, out
    return m.group(1)


def claims(token: str) -> dict:
    return jwt.decode(token, API_SECRET, algorithms=["HS256"], options={"verify_aud": False})


@pytest.mark.parametrize("ttl, seconds", [(None, 3600), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("24h", 86400),
                                          ("1m", 60)])
def test_token_lives_as_long_as_documented(ttl, seconds):
    before = int(time.time())
    r = token_command(*(["--ttl", ttl] if ttl else []))
    after = int(time.time())
    assert r.returncode == 0, r.stderr
    c = claims(printed_token(r.stdout))
    assert c["exp"] - c["nbf"] == seconds
    assert before + seconds <= c["exp"] <= after + seconds + 1
    # The printed expiry is the token's.
    m = re.search(r"^Join by: +(\S+ \S+) UTC", r.stdout, re.M)
    shown = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    assert shown.timestamp() == c["exp"], (m.group(1), c["exp"])


@pytest.mark.parametrize("ttl, message", [("25h", "between 1 min and 24 h"), ("30s", "between 1 min and 24 h"),
                                          ("2", "a duration such as 30m"), ("soon", "a duration such as 30m")])
def test_ttl_out_of_bounds_is_one_line_exit_2(ttl, message):
    r = token_command("--ttl", ttl)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr


def test_user_token_grants_a_microphone_and_chat_only():
    c = claims(printed_token(token_command("--identity", "alice", env={"ROOM_NAME": "room-7"}).stdout))
    video = c["video"]
    assert c["sub"] == "alice" and video["room"] == "room-7" and video["roomJoin"] is True
    assert video["canPublishSources"] == ["microphone"]
    assert video["canPublish"] is True and video["canSubscribe"] is True and video["canPublishData"] is True
    assert not video.get("canUpdateOwnMetadata") and not video.get("roomAdmin") and "kind" not in c


def test_agent_token_keeps_what_the_agent_needs():
    cfg = config.load_config({**ENV, "ASSEMBLYAI_API_KEY": "x"})
    c = claims(tokens.mint_token(cfg, "voice-agent", kind="agent", name="Voice Agent"))
    video = c["video"]
    assert c["kind"] == "agent" and c["exp"] - c["nbf"] == 6 * 3600
    # lk.agent.state is an attribute of its own (can_update_own_metadata); captions and chat are data.
    assert video["canUpdateOwnMetadata"] is True and video["canPublishData"] is True and video["canPublish"] is True
    assert "canPublishSources" not in video


@pytest.mark.e2e
async def test_the_user_token_publishes_a_microphone_and_not_a_camera_or_screen(livekit_server, room_name):
    from livekit import api, rtc

    r = token_command(env={"LIVEKIT_URL": livekit_server.url, "ROOM_NAME": room_name})
    assert r.returncode == 0, r.stderr
    room = rtc.Room()
    mic = rtc.AudioSource(24000, 1)
    video = rtc.VideoSource(64, 64)
    try:
        await room.connect(livekit_server.url, printed_token(r.stdout))
        await room.local_participant.publish_track(rtc.LocalAudioTrack.create_audio_track("mic", mic),
                                                   rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))

        def refusals() -> int:
            return livekit_server.log_path.read_text(errors="replace").count("no permission to publish track")

        refusals_before = refusals()
        frame = rtc.VideoFrame(64, 64, rtc.VideoBufferType.RGBA, np.zeros(64 * 64 * 4, np.uint8).tobytes())
        video.capture_frame(frame)

        async def publish(name: str, source: int) -> str | None:
            track = rtc.LocalVideoTrack.create_video_track(name, video)
            try:
                await asyncio.wait_for(room.local_participant.publish_track(track, rtc.TrackPublishOptions(source=source)),
                                       30)
                return None
            except Exception as e:  # the server refuses (SDK 1.2.1: it gives up waiting after 10 s)
                return f"{type(e).__name__}: {str(e)[:80]}"

        refused = dict(zip(("camera", "screen"), await asyncio.gather(
            publish("camera", rtc.TrackSource.SOURCE_CAMERA), publish("screen", rtc.TrackSource.SOURCE_SCREENSHARE))))
        assert all(refused.values()), f"published with a microphone-only token: {refused}"
        # Refused by the server (not merely a slow publish): it logs each refusal.
        assert refusals() >= refusals_before + 2

        async def tracks() -> list[int]:
            async with api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET) as lk:
                res = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
            return [t.source for p in res.participants if p.identity == "user" for t in p.tracks]

        assert await tracks() == [rtc.TrackSource.SOURCE_MICROPHONE]
    finally:
        await room.disconnect()
        await mic.aclose()
