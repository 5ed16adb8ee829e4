"""Issue 16 with the Python SDK, the real livekit-server and the stand-in: what LiveKit's
frontends send and expect besides the microphone. The agent is `listening` to a user without
a microphone, who can type; typed text interrupts a reply; chat as legacy data packets; a
connector participant is a user; the session channel (lk.agent.session) answers; pre-connect
audio reaches the service ahead of the live microphone (and a corrupt one is ignored); a user
waiting on an unreachable service is told so; a session the service ends by itself is
replaced. The browser test (test_frontend.py) covers the same with components-react."""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest

from harness import ASSEMBLYAI_KEY, RoomUser, WorkerProcess, free_port, tone, tone_amplitude, wait_until, worker_env
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

RATE = 24000


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.5, greeting_seconds=0.6,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


def start_worker(server, url, room, tmp_path, **env: str) -> WorkerProcess:
    env.setdefault("AMBIENT_SOUND", "none")
    return WorkerProcess(worker_env(server, url, room, **env), tmp_path / "worker").start()


def reply_creates(standin: StandIn) -> list[str]:
    return [m.get("reply", m).get("instructions", "") or json.dumps(m)
            for s in standin.sessions for m in s.received_events("reply.create")]


async def test_listening_without_a_microphone_text_only_chat_and_captions_on_both_channels(
        livekit_server, standin, room_name, tmp_path):
    """A user with no microphone: the agent is listening at once, the session starts, typed text
    is answered; every agent caption comes as a transcription packet too (same segment, final)."""
    from livekit import rtc

    standin.options.model_echo = True
    worker = start_worker(livekit_server, standin.url, room_name, tmp_path, GREETING="Hello there.")
    user = RoomUser(livekit_server, room_name)
    packets: list[tuple[str, str, str, bool]] = []
    try:
        await user.join(publish=False)

        @user.room.on("transcription_received")
        def on_packet(segments: list, participant: rtc.Participant | None, publication: object) -> None:
            for seg in segments:
                packets.append((participant.identity if participant else "", seg.id, seg.text, seg.final))

        await wait_until(lambda: user.states and user.states[-1][1] == "listening", 15, "state listening")
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 10, "the session")
        typed = "what are your opening hours?"
        await user.room.local_participant.send_text(typed, topic="lk.chat")
        await standin.wait_for(lambda: any(typed in r for r in reply_creates(standin)), 10, "the typed turn")
        await wait_until(lambda: any(typed in c["text"] for c in user.captions if c["sender"] == "voice-agent"),
                         15, "the answer's caption")
        # Both channels: every agent text-stream segment also came as a final packet with its text.
        await wait_until(lambda: len([p for p in packets if p[0] == "voice-agent" and p[3]]) >= 2, 10,
                         "final transcription packets")
        finals = {seg: text for who, seg, text, final in packets if who == "voice-agent" and final}
        streams = {c["attributes"]["lk.segment_id"]: c["text"] for c in user.captions if c["sender"] == "voice-agent"
                   and c["attributes"].get("lk.transcription_final") == "true"}
        assert streams and set(streams) <= set(finals), (streams, finals)
        for seg, text in streams.items():
            assert finals[seg] == text
        assert "initializing" not in user.state_sequence()[1:], user.state_sequence()
    finally:
        await user.leave()
        worker.kill()


async def test_typed_text_interrupts_a_reply_and_legacy_chat_packets_are_read(
        livekit_server, standin, room_name, tmp_path):
    """Typed while the agent speaks, the text cuts the reply (the agent stops speaking at once) and
    is the next turn. A legacy `lk-chat-topic` data packet is a message too; its copy marked
    ignoreLegacy (what components-react >= 2.9 sends next to the stream) is not a second one."""
    worker = start_worker(livekit_server, standin.url, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await wait_until(lambda: user.states and user.states[-1][1] == "listening", 10, "state listening")
        reply = await standin.trigger_reply(seconds=8.0)
        await wait_until(lambda: user.states[-1][1] == "speaking", 10, "the agent speaking")
        typed_at = time.monotonic()
        await user.room.local_participant.send_text("stop, I have a question", topic="lk.chat")
        await wait_until(lambda: user.states[-1][1] != "speaking", 3, "the agent to stop speaking")
        assert user.states[-1][0] - typed_at < 1.5
        await standin.wait_for(lambda: any("I have a question" in r for r in reply_creates(standin)), 5,
                               "the typed turn")
        assert reply.done_at is None or reply.status == "interrupted" or reply.done_at > typed_at

        n = len(reply_creates(standin))
        legacy = {"id": "legacy-1", "timestamp": 0, "message": "a legacy hello"}
        await user.room.local_participant.publish_data(json.dumps(legacy), topic="lk-chat-topic")
        await standin.wait_for(lambda: any("a legacy hello" in r for r in reply_creates(standin)), 10,
                               "the legacy message")
        copy = {"id": "copy-1", "timestamp": 0, "message": "a copy", "ignoreLegacy": True}
        await user.room.local_participant.publish_data(json.dumps(copy), topic="lk-chat-topic")
        await asyncio.sleep(1.5)
        assert not any("a copy" in r for r in reply_creates(standin))
        assert len(reply_creates(standin)) == n + 1
    finally:
        await user.leave()
        worker.kill()


async def test_a_connector_participant_is_a_user_and_the_session_channel_answers(
        livekit_server, standin, room_name, tmp_path):
    """A CONNECTOR participant (telephony, messaging) starts the call as a SIP one does; the
    Playground's lk.agent.session requests (ping, RTC stats) are answered with the
    agent_session protobuf messages, and no line is logged per request."""
    from livekit import rtc
    from livekit.protocol.agent_pb import agent_session as pb

    worker = start_worker(livekit_server, standin.url, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name, identity="phone", kind="connector")
    responses: dict[str, object] = {}
    try:
        await user.join()
        assert user.room.local_participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_CONNECTOR
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await wait_until(lambda: user.states and user.states[-1][1] == "listening", 10, "state listening")

        async def read(reader: rtc.ByteStreamReader) -> None:
            data = b"".join([chunk async for chunk in reader])
            msg = pb.AgentSessionMessage()
            msg.ParseFromString(data)
            if msg.WhichOneof("message") == "response":
                responses[msg.response.request_id] = msg.response

        tasks = []
        user.room.register_byte_stream_handler("lk.agent.session",
                                               lambda reader, sender: tasks.append(asyncio.create_task(read(reader))))

        async def ask(request: pb.SessionRequest) -> None:
            writer = await user.room.local_participant.stream_bytes(
                name="req", topic="lk.agent.session", destination_identities=["voice-agent"])
            await writer.write(pb.AgentSessionMessage(request=request).SerializeToString())
            await writer.aclose()

        for i in range(3):
            await ask(pb.SessionRequest(request_id=f"ping-{i}", ping=pb.SessionRequest.Ping()))
            await ask(pb.SessionRequest(request_id=f"stats-{i}", get_rtc_stats=pb.SessionRequest.GetRTCStats()))
        await wait_until(lambda: len(responses) == 6, 10, "the answers")
        assert all(responses[f"ping-{i}"].WhichOneof("response") == "pong" for i in range(3))
        stats = responses["stats-2"]
        assert stats.WhichOneof("response") == "get_rtc_stats"
        assert len(stats.get_rtc_stats.publisher_stats) + len(stats.get_rtc_stats.subscriber_stats) > 0
        out = worker.output()
        assert "lk.agent.session" not in out and "ignoring byte stream" not in out
    finally:
        await user.leave()
        worker.kill()


def webm_opus(pcm24k: np.ndarray) -> bytes:
    """What livekit-client's pre-connect buffer sends (MediaRecorder: WebM/Opus), made with PyAV."""
    import av

    x = np.interp(np.arange(len(pcm24k) * 2) / 2, np.arange(len(pcm24k)), pcm24k).astype(np.int16)  # 48 kHz
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libopus", rate=48000)
        s.layout = "mono"
        for i in range(0, len(x), 960):
            block = x[i:i + 960]
            block = np.pad(block, (0, 960 - len(block)))
            f = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            f.sample_rate = 48000
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def tone_spans(pcm: np.ndarray, freq: float, block_s: float = 0.05) -> list[float]:
    """Start times (s) of the blocks where ``freq`` is loud."""
    n = int(block_s * RATE)
    return [i / RATE for i in range(0, len(pcm) - n, n) if tone_amplitude(pcm[i:i + n].astype(float), freq) > 2000]


async def test_pre_connect_audio_goes_ahead_of_the_live_microphone(livekit_server, standin, room_name, tmp_path):
    """The user speaks before the agent joins: the recording (a 440 Hz tone, WebM/Opus) reaches
    the service whole, before what the live microphone hears next (660 Hz), nothing in
    between lost, nothing twice. A corrupt recording costs one log line, and the call goes on."""
    from livekit import rtc

    user = RoomUser(livekit_server, room_name)
    worker = None
    try:
        await user.join()
        # Older clients say they record with this attribute (newer ones: the track's features).
        await user.room.local_participant.set_attributes({"lk.agent.pre-connect-audio": "true"})
        recording = webm_opus(tone(440, 1.5))
        worker = start_worker(livekit_server, standin.url, room_name, tmp_path, GREETING="")
        await wait_until(lambda: "voice-agent" in user.room.remote_participants, 20, "the agent")
        # As livekit-client does: the recording is sent once the agent subscribed to the microphone.
        # (The Python SDK reports no local_track_subscribed here: the worker's log says it.)
        await worker.wait_for_output("bridging the microphone of user", 10)

        async def send(room: rtc.Room, publication: rtc.LocalTrackPublication, data: bytes) -> None:
            writer = await room.local_participant.stream_bytes(
                name="preconnect", topic="lk.agent.pre-connect-audio-buffer", destination_identities=["voice-agent"],
                attributes={"trackId": publication.sid, "sampleRate": "48000", "channels": "1"},
                mime_type="audio/webm;codecs=opus", total_size=len(data))
            await writer.write(data)
            await writer.aclose()

        await send(user.room, user.publication, recording)
        user.say(tone(660, 1.0))
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await standin.wait_for(lambda: len(tone_spans(standin.input_pcm(), 660)) >= 18, 15, "the live words")
        await asyncio.sleep(0.5)
        pcm = standin.input_pcm()
        first, live = tone_spans(pcm, 440), tone_spans(pcm, 660)
        assert first, "the pre-connect recording never reached the service"
        assert 1.3 <= len(first) * 0.05 <= 1.6, f"{len(first) * 0.05:.2f} s of the 1.5 s recording"
        assert max(first) < min(live), "the recording must come before the live microphone"
        assert 0.8 <= len(live) * 0.05 <= 1.1, f"{len(live) * 0.05:.2f} s of the 1 s live tone"
        assert "pre-connect audio of user" in worker.output()
        # A corrupt recording (a WebM header, then garbage): one line, and the call goes on.
        await send(user.room, user.publication, b"\x1a\x45\xdf\xa3" + b"\x00garbage" * 200)
        await worker.wait_for_output("ignoring pre-connect audio from user", 10)
        heard = len(tone_spans(standin.input_pcm(), 550))
        user.say(tone(550, 0.5))
        await standin.wait_for(lambda: len(tone_spans(standin.input_pcm(), 550)) >= heard + 8, 10, "more live words")
        assert worker.output().count("ignoring pre-connect audio from user") == 1
        assert worker.alive
    finally:
        await user.leave()
        if worker is not None:
            worker.kill()


async def test_a_user_waiting_on_an_unreachable_service_is_told(livekit_server, room_name, tmp_path):
    """The Voice Agent API cannot be reached: the agent still listens (it takes the user's input),
    and after a few seconds the user is told, in the agent's captions, rather than left waiting."""
    url = f"ws://127.0.0.1:{free_port()}/v1/voice"
    worker = start_worker(livekit_server, url, room_name, tmp_path, GREETING="")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join(publish=False)
        await wait_until(lambda: user.states and user.states[-1][1] == "listening", 15, "state listening")
        await wait_until(lambda: any("can't reach" in c["text"] for c in user.captions
                                     if c["sender"] == "voice-agent"), 12, "the notice")
        assert user.states[-1][1] == "listening"
        assert worker.alive
    finally:
        await user.leave()
        worker.kill()


async def test_a_session_the_service_ends_by_itself_is_replaced(livekit_server, standin, room_name, tmp_path):
    """session.ended the worker did not ask for (the 3-hour limit): with the user still in the
    room a new session starts, without a second greeting, told the conversation so far."""
    standin.options.model_echo = True
    worker = start_worker(livekit_server, standin.url, room_name, tmp_path, GREETING="Welcome to the bakery.")
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await standin.wait_for(lambda: any(r.kind == "greeting" and r.done_at for r in standin.sessions[0].replies),
                               10, "the greeting")
        await user.room.local_participant.send_text("do you sell rye bread?", topic="lk.chat")
        await standin.wait_for(lambda: any("rye bread" in r for r in reply_creates(standin)), 10, "the typed turn")
        await asyncio.sleep(0.5)
        first = standin.sessions[0]
        await standin.send_event({"type": "session.ended", "session_duration_seconds": 10800.0,
                                  "audio_duration_seconds": 10.0}, first)
        first.ended = True
        await standin.drop(1000, "session ended")
        await standin.wait_for(lambda: len(standin.sessions) >= 2 and standin.sessions[1].ready_at, 15,
                               "the replacement session")
        second = standin.sessions[1]
        await asyncio.sleep(2.0)
        assert not [r for r in second.replies if r.kind == "greeting"], "greeted twice"
        assert "rye bread" in json.dumps(second.updates), "the conversation so far was not carried"
        await wait_until(lambda: user.states[-1][1] == "listening", 10, "listening again")
        assert "the Voice Agent service ended the session: starting a replacement" in worker.output()
    finally:
        await user.leave()
        worker.kill()
