"""The worker process and its Voice Agent session, with the real room: bad keys end the
process with the right code, typed chat reaches the agent, API outages leave the room and
the ambient untouched."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness import ASSEMBLYAI_KEY, RoomUser, WorkerProcess, tone, wait_until, worker_env, write_wav
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

AMBIENT_HZ = 300.0


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.0, greeting_seconds=0.5,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


@pytest.mark.parametrize("form", ["http", "close1008", "error_frame"])
async def test_bad_api_key_exits_3_with_one_clear_line(livekit_server, standin, room_name, tmp_path, form):
    standin.options.auth_failure = form
    env = worker_env(livekit_server, standin.url, room_name, ASSEMBLYAI_API_KEY="not-the-right-key",
                     AMBIENT_SOUND="none")
    worker = WorkerProcess(env, tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        t0 = time.monotonic()
        code = await worker.wait_exit(timeout=10)
        assert time.monotonic() - t0 < 2.0 + 1.0  # the session starts when the user is in; 2 s from then
        assert code == 3, worker.output()
        errors = [line for line in worker.output().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "ASSEMBLYAI_API_KEY" in errors[0], worker.output()
        assert "Traceback" not in worker.output()
        assert "not-the-right-key" not in worker.output()
        assert standin.http_rejections + len(standin.sessions) <= 1, "retried a bad key"
    finally:
        worker.kill()
        await user.leave()


async def test_chat_text_becomes_a_turn(livekit_server, standin, room_name, tmp_path):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none",
                                      GREETING=""), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await user.room.local_participant.send_text("do you deliver on sundays?", topic="lk.chat")
        s = standin.sessions[0]
        await standin.wait_for(lambda: s.received_events("reply.create"), 10, "reply.create")
        assert s.received_events("conversation.message") == [
            {"type": "conversation.message", "role": "user", "content": "do you deliver on sundays?"}]
    finally:
        worker.kill()
        await user.leave()


async def test_api_outage_keeps_room_and_ambient_then_resumes(livekit_server, standin, room_name, tmp_path):
    bed = write_wav(tmp_path / "bed.wav", tone(AMBIENT_HZ, 1.0, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed),
                                      AMBIENT_VOLUME="0.5"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        heard = await user.wait_heard()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        session = standin.sessions[0]

        def bed_at_level() -> bool:  # faded in: the window checked below starts 0.5 s before the drop
            window = [a for _, a in heard.timeline(AMBIENT_HZ, since=time.monotonic() - 0.6)]
            return len(window) >= 20 and min(window) > 0.02
        await wait_until(bed_at_level, 10, "the ambient at its level")
        reply = await standin.trigger_reply(seconds=2.0)
        await standin.wait_for(lambda: reply.first_audio_at is not None, 5, "reply audio")
        t_drop = time.monotonic()
        await standin.drop(1011, "internal error")
        await standin.wait_for(lambda: session.resumes >= 1, 10, "the resume")
        # The user speaks after the resume and is heard by the same session.
        user.say(tone(450, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: any("450" in e["text"] for e in session.events("transcript.user")), 10,
                               "the user's turn after the resume")
        await asyncio.sleep(0.5)
        tl = [a for t, a in heard.timeline(AMBIENT_HZ) if t_drop - 0.5 <= t <= time.monotonic() - 0.2]
        assert tl and min(tl) > 0.02, "the ambient dropped out while the API connection was down"
        assert worker.alive and "voice-agent" in user.room.remote_participants
        assert len(standin.sessions) == 1
    finally:
        worker.kill()
        await user.leave()
