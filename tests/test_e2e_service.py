"""The Voice Agent service's hard cases, with the real room and the worker as a user runs it: a
full service is waited out (never taken for a bad key), a start-up check gives up after
RECONNECT_GIVE_UP_S seconds, typed chat reaches the model (after the greeting when the user may
not interrupt), and reply chunks of odd length play without a hole."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from harness import ASSEMBLYAI_KEY, RoomUser, WorkerProcess, wait_until, worker_env
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

GREETING_HZ, REPLY_HZ = 650.0, 1000.0


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_freq_hz=REPLY_HZ, reply_seconds=1.0,
                               greeting_freq_hz=GREETING_HZ, greeting_seconds=1.0, default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


def error_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.output().splitlines() if line.startswith("error:")]


async def test_a_full_service_is_waited_out_and_the_call_starts_when_capacity_returns(
        livekit_server, standin, room_name, tmp_path):
    """At capacity the service refuses the handshake (session.error server_error, close 1008).
    The start-up key check and the call's session are retried with backoff; no exit 3."""
    standin.options.refuse_sessions_with = "server_error"
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none",
                                      STARTUP_CHECK="1", GREETING="Hello there"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.refused_sessions >= 4, 20, "refused handshakes")
        await asyncio.sleep(1.0)
        assert worker.alive, worker.output()[-3000:]
        standin.options.refuse_sessions_with = None  # capacity is back
        await standin.wait_for(lambda: any(s.replies and s.replies[0].kind == "greeting" and s.replies[0].done_at
                                           for s in standin.sessions), 30, "the call's greeting")
        heard = user.agent()
        await wait_until(lambda: any(a > 0.1 for _, a in heard.timeline(GREETING_HZ)), 10, "the greeting heard")
        await worker.wait_for_output(r"Voice Agent API key verified", 20)
        out = worker.output()
        assert worker.alive and error_lines(worker) == [], out[-3000:]
        assert "refused the session (server_error" in out or "session was refused (server_error" in out
        assert ASSEMBLYAI_KEY not in out
    finally:
        worker.kill()
        await user.leave()


async def test_the_start_up_check_gives_up_after_reconnect_give_up_s_seconds(livekit_server, standin, room_name,
                                                                              tmp_path):
    """RECONNECT_GIVE_UP_S is seconds of failure: 5 here gives up after 5 s, not after a count of
    attempts (the old loop stopped after 3 s here, and after 10-20 minutes at the default 120)."""
    standin.options.refuse_sessions_with = "server_error"
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none",
                                      STARTUP_CHECK="1", RECONNECT_GIVE_UP_S="5"), tmp_path / "w").start()
    try:
        await worker.wait_for_output(r"cannot verify the Voice Agent API yet", 15)
        first_failure = time.monotonic()
        code = await worker.wait_exit(timeout=15)
        elapsed = time.monotonic() - first_failure
        assert code == 5, worker.output()[-3000:]
        assert 4.5 <= elapsed <= 5 + 2.5, f"gave up {elapsed:.1f} s after the first failure, not 5 s"
        (line,) = error_lines(worker)
        assert "5 s" in line and "server_error" in line and "ASSEMBLYAI_API_KEY" in line
        assert standin.refused_sessions >= 4, "retried with backoff meanwhile"
    finally:
        worker.kill()


async def test_typed_chat_waits_for_the_greeting_and_reaches_the_model(livekit_server, standin, room_name, tmp_path):
    """With INTERRUPT_RESPONSE=0 (the user may not interrupt the agent; by default typed text
    interrupts it as the voice does: issue 16), text typed while the greeting plays is sent once
    the greeting is over (a reply.create would cut it off), in the instructions of a
    reply.create: the stand-in's model never sees conversation.message content and says what it
    was told, so the agent's caption in the room quotes the typed text."""
    standin.options.greeting_seconds = 2.5
    standin.options.model_echo = True
    typed = "do you deliver on sundays?"
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none", INTERRUPT_RESPONSE="0",
                                      GREETING="Welcome to the bakery, what can I get you?"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].replies
                               and standin.sessions[0].replies[0].first_audio_at, 20, "the greeting")
        session = standin.sessions[0]
        greeting = session.replies[0]
        await user.room.local_participant.send_text(typed, topic="lk.chat")
        await worker.wait_for_output(r"chat from user", 10)
        await standin.wait_for(lambda: any(r.kind == "create" and r.done_at for r in session.replies), 15,
                               "the answer to the typed text")
        sent_at = next(t for t, m in session.received if m.get("type") == "reply.create")
        assert greeting.status == "completed" and greeting.samples_sent == int(2.5 * 24000), "the greeting was cut"
        assert sent_at >= greeting.done_at, "reply.create sent while the greeting played"
        assert session.received_events("conversation.message") == [
            {"type": "conversation.message", "role": "user", "content": typed}]
        answer = next(r for r in session.replies if r.kind == "create")
        assert json.dumps(typed) in answer.text, f"the model was not told {typed!r}: {answer.text!r}"
        await wait_until(lambda: any(json.dumps(typed) in c["text"] for c in user.captions
                                     if c["sender"] == "voice-agent"), 10, "the agent's caption quoting the text")
    finally:
        worker.kill()
        await user.leave()


async def test_reply_chunks_of_odd_length_play_without_a_hole(livekit_server, standin, room_name, tmp_path):
    """Every other chunk ends half-way into a sample. Dropping such a chunk left a hole, and
    shifted every later sample by a byte (noise, not the tone)."""
    standin.options.odd_chunks = True
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none", GREETING=""),
                           tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 20, "the session")
        heard = await user.wait_heard(timeout=20)
        reply = await standin.trigger_reply(seconds=2.0, freq_hz=REPLY_HZ)
        await standin.wait_for(lambda: reply.done_at is not None, 10, "the reply")
        await asyncio.sleep(0.5)
        start = next(t for t, a in heard.timeline(REPLY_HZ) if a > 0.1)
        window = [a for t, a in heard.timeline(REPLY_HZ) if start + 0.1 <= t <= start + 1.8]
        assert len(window) >= 80
        holes = sum(a < 0.1 for a in window)
        assert holes == 0, f"{holes} of {len(window)} 20 ms windows without the reply's tone"
        assert "malformed frame" not in worker.output()
    finally:
        worker.kill()
        await user.leave()
