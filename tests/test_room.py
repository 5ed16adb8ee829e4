"""Room behaviour that LiveKit agent frontends rely on, with the real server: the agent's
kind and state, captions, which user is bridged, users coming and going, mixing, and the
ways the worker can be thrown out of the room."""

from __future__ import annotations

import asyncio

import pytest

from harness import ASSEMBLYAI_KEY, API_KEY, API_SECRET, RoomUser, WorkerProcess, tone, wait_until, worker_env
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.5, greeting_seconds=0.6,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


def start_worker(server, standin, room, tmp_path, **env: str) -> WorkerProcess:
    env.setdefault("AMBIENT_SOUND", "none")
    return WorkerProcess(worker_env(server, standin.url, room, **env), tmp_path / "worker").start()


def turns_heard(standin: StandIn, freq: int) -> int:
    return sum(f"{freq} Hz" in e["text"] for s in standin.sessions for e in s.events("transcript.user"))


async def test_agent_kind_state_sequence_and_captions(livekit_server, standin, room_name, tmp_path):
    from livekit import rtc

    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await wait_until(lambda: "voice-agent" in user.room.remote_participants, 15, "the agent")
        agent = user.room.remote_participants["voice-agent"]
        assert agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        assert "lk.publish_on_behalf" not in agent.attributes
        await wait_until(lambda: user.states and user.states[-1][1] == "listening", 15, "state listening")

        # One turn: the user speaks, the agent thinks, speaks, and listens again.
        user.say(tone(450, 1.0, amplitude=0.6))
        session = standin.sessions[0]
        await standin.wait_for(lambda: any(r.kind == "turn" and r.done_at for r in session.replies), 15, "the reply")
        reply = next(r for r in session.replies if r.kind == "turn")
        await wait_until(lambda: user.states[-1][1] == "listening" and user.states[-1][0] > reply.done_at, 10,
                         "listening after the reply")
        seq = user.state_sequence()
        assert seq[-4:] == ["listening", "thinking", "speaking", "listening"], seq
        # "speaking" means the reply is audible, not merely received.
        speaking_at = next(t for t, s in user.states if s == "speaking")
        heard = user.agent().timeline(1000)
        first_heard = next(t for t, a in heard if a > 0.1)
        assert abs(speaking_at - first_heard) < 0.5, "speaking was announced long before or after the audio"

        # Captions: the user's with the user's identity and mic track; the agent's with ours.
        await wait_until(lambda: any(c["sender"] == "voice-agent" for c in user.captions), 10, "agent caption")
        mine = [c for c in user.captions if c["sender"] == "user"]
        assert mine, "no user caption"
        final = [c for c in mine if c["attributes"]["lk.transcription_final"] == "true"]
        assert len(final) == 1 and "450 Hz" in final[0]["text"]
        assert all(c["attributes"]["lk.transcribed_track_id"] == user.publication.sid for c in mine)
        assert len({c["attributes"]["lk.segment_id"] for c in mine}) == 1, "interim and final must share a segment"
        interim = [c for c in mine if c["attributes"]["lk.transcription_final"] == "false"]
        assert interim, "no interim user caption"
        # One segment: the paced stream, then (issue 16) its whole text restated in a stream
        # whose header says final, which components-js shows as final at once.
        await wait_until(lambda: len([c for c in user.captions if c["sender"] == "voice-agent"]) >= 2, 5,
                         "the final restatement")
        agent_caps = [c for c in user.captions if c["sender"] == "voice-agent"]
        cap, restated = agent_caps
        assert restated["attributes"]["lk.segment_id"] == cap["attributes"]["lk.segment_id"]
        assert restated["text"] == reply.text and restated["attributes"]["lk.transcription_final"] == "true"
        assert cap["text"] == reply.text
        assert cap["attributes"]["lk.transcription_final"] == "true"
        assert cap["attributes"]["lk.transcribed_track_id"] == next(iter(agent.track_publications))
        assert cap["attributes"]["lk.segment_id"].startswith("SG_")
        # Paced with playback: the caption stream lasted about as long as the audio.
        assert cap["closed"] - cap["opened"] > 0.8 * reply.duration_s
    finally:
        worker.kill()
        await user.leave()


async def test_agent_caption_ends_where_the_interruption_cut_the_audio(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        standin.options.reply_seconds = 4.0
        reply = await standin.trigger_reply(seconds=4.0)
        await standin.wait_for(lambda: reply.first_audio_at is not None, 10, "the reply")
        await asyncio.sleep(1.6)
        user.say(tone(450, 0.6, amplitude=0.6))
        await standin.wait_for(lambda: reply.interrupted_at is not None, 10, "the interruption")
        await wait_until(lambda: any(c["sender"] == "voice-agent" for c in user.captions), 10, "agent caption")
        cap = next(c for c in user.captions if c["sender"] == "voice-agent")
        session = standin.sessions[0]
        full = f"This is reply number {session.replies.index(reply) + 1}."
        assert cap["text"].strip(), "nothing was shown before the interruption"
        assert len(cap["text"]) < len(full), f"caption {cap['text']!r} was not cut (full text {full!r})"
        assert full.startswith(cap["text"]), f"caption {cap['text']!r} is not the start of {full!r}"
        assert cap["attributes"]["lk.transcription_final"] == "true"
    finally:
        worker.kill()
        await user.leave()


async def test_user_leaves_and_rejoins_five_times(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="", IDLE_TIMEOUT_S="1")
    max_open = 0

    async def watch() -> None:
        nonlocal max_open
        while True:
            max_open = max(max_open, standin.connections)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        for i in range(5):
            user = RoomUser(livekit_server, room_name)
            await user.join()
            try:
                # Speak once the worker has picked us up (a session is open), like a person
                # who waits for the agent to be there.
                await standin.wait_for(lambda: standin.connections == 1 and standin.sessions and standin.sessions[-1].ready_at, 15,
                                       "an open session")
                await asyncio.sleep(0.5)
                user.say(tone(450, 0.8, amplitude=0.6))
                await standin.wait_for(lambda: turns_heard(standin, 450) >= i + 1, 20, f"the user's turn #{i + 1}")
            finally:
                await user.leave()
            if i == 2:
                await asyncio.sleep(2.0)  # past IDLE_TIMEOUT_S: that session ends, the next user starts a new one
        assert max_open == 1, f"{max_open} API sessions were open at once"
        assert len(standin.sessions) >= 2
        ended_before_next = all(s.ended for s in standin.sessions[:-1])
        assert ended_before_next, "a session was left open (billed) after the user left"
        assert worker.alive
    finally:
        watcher.cancel()
        worker.kill()


async def test_second_user_is_ignored_unless_mixing(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="")
    first, second = RoomUser(livekit_server, room_name, "alice"), RoomUser(livekit_server, room_name, "bob")
    try:
        await first.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await second.join()
        second.say(tone(650, 0.8, amplitude=0.6))
        first.say(tone(450, 0.8, amplitude=0.01))  # alice stays quiet meanwhile
        await asyncio.sleep(3.0)
        assert turns_heard(standin, 650) == 0, "bob was heard although alice is the user"
        first.say(tone(450, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: turns_heard(standin, 450) == 1, 15, "alice's turn")
    finally:
        worker.kill()
        await first.leave()
        await second.leave()


async def test_mixing_hears_every_user(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="", MIX_PARTICIPANTS="1")
    first, second = RoomUser(livekit_server, room_name, "alice"), RoomUser(livekit_server, room_name, "bob")
    try:
        await first.join()
        await second.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await asyncio.sleep(1.0)
        second.say(tone(650, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: turns_heard(standin, 650) == 1, 15, "bob's turn")
        await standin.wait_for(lambda: not any(r.done_at is None for r in standin.sessions[0].replies), 10, "quiet")
        first.say(tone(450, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: turns_heard(standin, 450) == 1, 15, "alice's turn")
        assert len(standin.sessions) == 1
    finally:
        worker.kill()
        await first.leave()
        await second.leave()


async def test_muted_microphone_still_lets_the_turn_end(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        user.say(tone(450, 0.8, amplitude=0.6))
        await asyncio.sleep(0.6)
        user.publication.track.mute()  # mid-utterance: the microphone stops delivering
        await standin.wait_for(lambda: turns_heard(standin, 450) == 1, 15, "the turn to end while muted")
        user.publication.track.unmute()
        await asyncio.sleep(1.0)
        user.say(tone(450, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: turns_heard(standin, 450) == 2, 15, "a turn after unmuting")
    finally:
        worker.kill()
        await user.leave()


async def test_duplicate_identity_ends_the_worker_with_code_8(livekit_server, standin, room_name, tmp_path):
    worker = start_worker(livekit_server, standin, room_name, tmp_path)
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join(publish=False)
        await wait_until(lambda: "voice-agent" in user.room.remote_participants, 15, "the agent")
        impostor = RoomUser(livekit_server, room_name, "voice-agent", kind="agent")
        await impostor.join(publish=False)
        code = await worker.wait_exit(timeout=10)
        assert code == 8, worker.output()
        errors = [line for line in worker.output().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "duplicate identity" in errors[0]
        await impostor.leave()
    finally:
        worker.kill()
        await user.leave()


async def test_room_deleted_ends_the_worker_with_code_9(livekit_server, standin, room_name, tmp_path):
    from livekit import api

    worker = start_worker(livekit_server, standin, room_name, tmp_path)
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join(publish=False)
        await wait_until(lambda: "voice-agent" in user.room.remote_participants, 15, "the agent")
        async with api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET) as lk:
            await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
        code = await worker.wait_exit(timeout=10)
        assert code == 9, worker.output()
        assert "removed from room" in worker.output()
    finally:
        worker.kill()
        await user.leave()


async def test_an_idle_room_closed_by_the_server_is_logged_as_what_it_is(livekit_server, standin, room_name, tmp_path):
    """livekit-server closes a room that only the agent is in (its empty timeout, 5 min by
    default; 1 s here): the worker rejoins, and says so at INFO. A WARNING every 5 minutes
    of an idle worker looks like a fault and pages someone."""
    from livekit import api

    lk = api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET)
    try:
        await lk.room.create_room(api.CreateRoomRequest(name=room_name, empty_timeout=1, departure_timeout=1))
    finally:
        await lk.aclose()
    # Someone holds the room open until the agent is in it; then the agent is alone.
    holder = await RoomUser(livekit_server, room_name, "holder").join(publish=False)
    worker = start_worker(livekit_server, standin, room_name, tmp_path)
    try:
        await worker.wait_for_output(r"joined room", 20)
        await holder.leave()
        line = (await worker.wait_for_output(r".*\bROOM_CLOSED\b.*", 40)).group(0)
        assert " WARNING " not in line and " INFO " in line, f"an idle room's closing was logged as a fault: {line}"
        await worker.wait_for_output(r"(?s)ROOM_CLOSED.*joined room", 20)
        assert worker.alive
    finally:
        worker.kill()
        await holder.leave()
