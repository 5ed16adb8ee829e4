"""The Voice Agent client against the stand-in, with faults injected: drops, refused
resumes, bad keys in all three forms, hostile frames, pacing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import numpy as np
import pytest

import bridge
from bridge import ClientOptions, SessionSettings, ToolError, VoiceAgentClient, service_tool_timeout
from standin import StandIn, StandInOptions, tone

KEY = "client-test-key"
RATE = 24000


class Recorder:
    """A bridge.BridgeEvents that records every event (reply audio as counts and bytes)."""

    def __init__(self) -> None:
        self.events: list[bridge.BridgeEvent] = []
        self.audio: dict[str, int] = {}
        self.pcm: dict[str, bytearray] = {}
        self.audio_times: list[float] = []
        self.tool_calls: list[tuple[str, dict]] = []

    def on_event(self, event: bridge.BridgeEvent) -> None:
        if isinstance(event, bridge.ReplyAudio):
            self.audio[event.reply_id] = self.audio.get(event.reply_id, 0) + len(event.pcm) // 2
            self.pcm.setdefault(event.reply_id, bytearray()).extend(event.pcm)
            self.audio_times.append(time.monotonic())
        else:
            self.events.append(event)

    async def on_tool_call(self, name: str, arguments: dict[str, Any], call_id: str) -> Any:
        raise bridge.ToolError(f"no handler for tool {name!r} in this test")

    def names(self, kind: type) -> list[tuple]:
        return [dataclasses.astuple(e) for e in self.events if isinstance(e, kind)]


class ToolRecorder(Recorder):
    async def on_tool_call(self, name: str, arguments: dict[str, Any], call_id: str) -> Any:
        self.tool_calls.append((name, arguments))
        if name == "slow":
            await asyncio.sleep(10)
        if name == "boom":
            raise ToolError("order 42 does not exist")
        if name == "crash":
            raise OSError("secret.internal:5432 refused")
        return {"echo": arguments}


async def mic(client: VoiceAgentClient, pattern: list[tuple[float, float]]) -> None:
    """Feed 10 ms frames at real time: (seconds, tone amplitude) segments of 450 Hz / silence."""
    n = 0
    t0 = time.monotonic()
    for seconds, amp in pattern:
        for _ in range(int(seconds * 100)):
            t = (np.arange(240) + n) / RATE
            n += 240
            client.send_audio((amp * 32767 * np.sin(2 * np.pi * 450 * t)).astype("<i2").tobytes())
            delay = t0 + n / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=KEY, reply_seconds=1.5, greeting_seconds=0.5, default_min_silence_ms=300))
    await s.start()
    yield s
    await s.stop()


def make_client(standin: StandIn, events: Recorder | None = None, key: str = KEY,
                greeting: str | None = "Hi", **opts: Any) -> VoiceAgentClient:
    options = ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.5, **opts)
    return VoiceAgentClient(standin.url, key, SessionSettings(greeting=greeting), events or Recorder(), options)


async def running(client: VoiceAgentClient) -> asyncio.Task:
    task = asyncio.create_task(client.run())
    return task


async def finish(client: VoiceAgentClient, task: asyncio.Task) -> None:
    await client.end()
    await asyncio.wait_for(task, 5)


async def test_no_input_audio_before_session_ready(standin):
    client = make_client(standin)
    for _ in range(30):
        client.send_audio(b"\x00\x00" * 240)  # audio captured before the socket even exists
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await asyncio.sleep(0.5)
    s = standin.sessions[0]
    assert s.audio_before_ready == 0 and "invalid_audio" not in s.errors_sent
    first_audio = s.audio_arrivals[0][0]
    assert first_audio >= s.ready_at
    await finish(client, task)
    assert s.ended


async def test_the_client_does_not_offer_compression(standin):
    """The stand-in offers permessage-deflate, as a server may: the client does not ask for it
    (deflating base64 PCM costs CPU for little; see bridge.VoiceAgentClient)."""
    assert standin.options.compression == "deflate"
    client = make_client(standin)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await finish(client, task)
    assert standin.offered_extensions == [None]


async def test_input_pacing_stays_within_5_percent_of_real_time(standin):
    client = make_client(standin)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await mic(client, [(10.0, 0.0)])
    await asyncio.sleep(0.2)
    arrivals = standin.sessions[0].audio_arrivals
    audio_s = sum(n for _, n in arrivals) / RATE
    wall_s = arrivals[-1][0] - arrivals[0][0] + 0.05
    print(f"pacing: {audio_s:.3f} s of audio over {wall_s:.3f} s ({(audio_s / wall_s - 1) * 100:+.2f} %)")
    assert audio_s > 9.5
    assert abs(audio_s / wall_s - 1) < 0.05, f"{audio_s:.2f} s of audio sent over {wall_s:.2f} s"
    assert "audio_rate_violation" not in standin.sessions[0].errors_sent
    # And in any 1 s window never more than ~1 s of audio.
    times = np.array([t for t, _ in arrivals])
    counts = np.array([n for _, n in arrivals])
    worst = max(counts[(times >= t) & (times < t + 1.0)].sum() for t in times) / RATE
    assert worst <= 1.1
    await finish(client, task)


async def test_close_1011_mid_reply_resumes_and_audio_continues(standin):
    events = Recorder()
    client = make_client(standin, events)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    session = standin.sessions[0]
    reply = await standin.trigger_reply(seconds=3.0)
    await standin.wait_for(lambda: reply.first_audio_at is not None, 5, "reply audio")
    await asyncio.sleep(0.3)
    await standin.drop(1011, "internal error")
    await standin.wait_for(lambda: session.resumes == 1, 5, "the resume")
    assert len(standin.sessions) == 1, "a resume must not create a new session"
    # The stand-in counts the resume before its session.ready reaches the client: wait for that.
    await standin.wait_for(lambda: events.names(bridge.SessionReady)[-1:] == [(session.session_id, True)], 5,
                           "the resumed session.ready")
    # Input audio flows again into the same session, and a new reply is heard.
    before = len(session.audio_arrivals)
    feeder = asyncio.create_task(mic(client, [(1.0, 0.0)]))
    again = await standin.trigger_reply(seconds=0.5)
    await standin.wait_for(lambda: again.done_at is not None, 5, "the reply after resume")
    await feeder
    assert len(session.audio_arrivals) > before
    assert events.audio.get(again.reply_id, 0) > 0.4 * RATE
    await finish(client, task)
    assert client.counters["resumes"] == 1


async def test_abrupt_tcp_drop_resumes(standin):
    client = make_client(standin)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await standin.drop(None)
    await standin.wait_for(lambda: standin.sessions[0].resumes == 1, 5, "the resume")
    await finish(client, task)


async def test_refused_resume_starts_fresh_session_without_second_greeting(standin):
    events = Recorder()
    client = make_client(standin, events)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].replies
                           and standin.sessions[0].replies[0].done_at, 5, "the greeting")
    standin.options.fail_next_resume = "session_not_found"
    await standin.drop(1011)
    await standin.wait_for(lambda: len(standin.sessions) == 2 and standin.sessions[1].ready_at, 5, "a fresh session")
    await asyncio.sleep(0.5)
    fresh = standin.sessions[1]
    assert "greeting" not in fresh.config, "the user heard the greeting twice"
    assert not any(r.kind == "greeting" for r in fresh.replies)
    assert [code for _, _, code in standin.resume_failures] == ["session_not_found"]
    assert client.counters["fresh_sessions"] == 1
    await finish(client, task)


@pytest.mark.parametrize("form", ["http", "close1008", "error_frame"])
async def test_bad_key_is_fatal_in_every_form_within_2s(standin, form):
    standin.options.auth_failure = form
    client = make_client(standin, key="wrong-key")
    t0 = time.monotonic()
    with pytest.raises(bridge.KeyRejected) as e:
        await asyncio.wait_for(client.run(), 5)
    assert time.monotonic() - t0 < 2.0
    assert "ASSEMBLYAI_API_KEY" in str(e.value) and "wrong-key" not in str(e.value)
    assert len(standin.sessions) == 0 or not standin.sessions[0].ready_at


async def test_a_refusal_that_arrives_before_our_first_message_is_still_read(standin, monkeypatch):
    """The service may refuse (error frame, then close) before the session.update leaves: the
    failed send must not hide the frame that says why (here: a bad key, exit 3)."""
    original = VoiceAgentClient._send_all

    async def late_send(self, actions):
        await asyncio.sleep(0.3)
        await original(self, actions)

    monkeypatch.setattr(VoiceAgentClient, "_send_all", late_send)
    standin.options.auth_failure = "error_frame"
    standin.options.auth_close_reason = ""  # only the frame says it is the key
    with pytest.raises(bridge.KeyRejected):
        await asyncio.wait_for(make_client(standin, key="wrong-key").run(), 5)


async def test_uppercase_error_codes_are_understood(standin):
    standin.options.auth_failure = "error_frame"
    standin.options.uppercase_codes = True
    with pytest.raises(bridge.KeyRejected):
        await asyncio.wait_for(make_client(standin, key="nope").run(), 5)


async def test_invalid_first_update_is_a_fatal_config_error(standin):
    client = VoiceAgentClient(standin.url, KEY, SessionSettings(turn_detection={"min_silence": 5000, "max_silence": 100}),
                              Recorder(), ClientOptions())
    with pytest.raises(bridge.ConfigRejected) as e:
        await asyncio.wait_for(client.run(), 5)
    assert "min_silence" in str(e.value) or "max_silence" in str(e.value)


async def test_burst_of_malformed_frames_is_counted_and_survived(standin):
    client = make_client(standin, max_message_bytes=64 * 1024)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    bad = [
        b"\x00binary",
        "{not json",
        "[]",
        json.dumps({"type": None}),
        json.dumps({"type": "reply.audio", "data": "%%%"}),
        json.dumps({"type": "reply.audio", "data": ["x"]}),
        json.dumps({"type": "transcript.user", "text": 5}),
        json.dumps({"type": "session.error", "code": 7}),
        json.dumps({"type": "reply.done", "reply_id": {"a": 1}}),
        json.dumps({"type": "tool.call", "call_id": 1, "name": "x"}),
        json.dumps({"type": "transcript.user", "text": "x" * 100_000}),  # over the 64 KiB limit
    ]
    for _ in range(10):
        for frame in bad:
            await standin.send_raw(frame)
    for _ in range(5):
        await standin.send_raw(json.dumps({"type": "future.event", "n": 1}))
    reply = await standin.trigger_reply(seconds=0.3)
    await standin.wait_for(lambda: reply.done_at is not None, 5, "a reply after the garbage")
    await standin.wait_for(lambda: client.counters["malformed_frames"] >= 10 * len(bad), 5, "the garbage counted")
    assert client.counters["malformed_frames"] == 10 * len(bad)
    assert client.counters["unknown_events"] == 5
    assert client.protocol.ready and not task.done()
    await finish(client, task)


async def test_tool_call_without_handler_gets_an_error_result(standin):
    client = make_client(standin)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    result = await standin.call_tool("get_weather", {"city": "Paris"})
    assert result["is_error"] is True
    assert "no handler" in json.loads(result["result"])["error"]
    await finish(client, task)


async def test_tool_results_error_and_timeout(standin):
    events = ToolRecorder()
    client = make_client(standin, events, tool_timeout_s=0.5)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    ok = await standin.call_tool("lookup", {"id": 7})
    assert json.loads(ok["result"]) == {"echo": {"id": 7}} and not ok.get("is_error")
    boom = await standin.call_tool("boom", {})
    assert boom["is_error"] and "order 42 does not exist" in json.loads(boom["result"])["error"]
    slow = await standin.call_tool("slow", {})
    assert slow["is_error"] and "timed out" in json.loads(slow["result"])["error"]
    crash = await standin.call_tool("crash", {})
    assert crash["is_error"] and "secret.internal" not in crash["result"] and "failed" in crash["result"]
    await finish(client, task)


async def test_gives_up_after_the_configured_time(standin):
    url = standin.url
    await standin.stop()
    client = VoiceAgentClient(url, KEY, SessionSettings(), Recorder(),
                              ClientOptions(give_up_after_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2))
    t0 = time.monotonic()
    with pytest.raises(bridge.GaveUp):
        await asyncio.wait_for(client.run(), 10)
    assert 1.0 <= time.monotonic() - t0 < 3.0
    await standin.start()


async def test_typed_text_reaches_the_model(standin):
    """The stand-in's model, like the real one, never sees conversation.message content: the
    typed text must come through reply.create instructions, and its reply says so."""
    standin.options.model_echo = True
    events = Recorder()
    client = make_client(standin, events, greeting=None)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await client.send_text("what are your opening hours?")
    s = standin.sessions[0]
    await standin.wait_for(lambda: any(r.kind == "create" and r.done_at for r in s.replies), 5, "the reply")
    (msg,) = s.received_events("conversation.message")
    assert msg == {"type": "conversation.message", "role": "user", "content": "what are your opening hours?"}
    # The stand-in marks the reply done as it sends the transcript: wait for it to arrive here.
    await standin.wait_for(lambda: events.names(bridge.AgentTranscript), 5, "the agent's transcript")
    (said,) = [args[1] for args in events.names(bridge.AgentTranscript)]
    assert '"what are your opening hours?"' in said, f"the model was not told the typed text: {said!r}"
    await finish(client, task)


async def test_chat_typed_during_the_greeting_waits_for_it_and_the_greeting_is_heard_whole(standin):
    standin.options.greeting_seconds = 1.5
    standin.options.model_echo = True
    events = Recorder()
    client = make_client(standin, events, greeting="Welcome to the bicycle shop, how can I help?")
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].replies
                           and standin.sessions[0].replies[0].first_audio_at, 5, "the greeting")
    s = standin.sessions[0]
    greeting = s.replies[0]
    await client.send_text("do you repair tyres?")
    await asyncio.sleep(0.3)
    assert not s.received_events("reply.create"), "sent while the greeting plays: it would replace the greeting"
    await standin.wait_for(lambda: any(r.kind == "create" and r.done_at for r in s.replies), 6, "the answer")
    sent_at = next(t for t, m in s.received if m.get("type") == "reply.create")
    assert greeting.status == "completed" and greeting.samples_sent == int(1.5 * RATE)
    assert sent_at >= greeting.done_at
    assert events.audio[greeting.reply_id] == int(1.5 * RATE)
    assert '"do you repair tyres?"' in s.replies[1].text
    await finish(client, task)


@pytest.mark.parametrize("code", ["server_error", "at_capacity", "concurrency_exceeded", "agent_init_failed",
                                  "agent_timeout"])
async def test_a_full_service_is_retried_with_backoff_until_capacity_returns(standin, code):
    standin.options.refuse_sessions_with = code
    events = Recorder()
    client = make_client(standin, events)
    task = await running(client)
    await standin.wait_for(lambda: standin.refused_sessions >= 3, 5, "retries")
    assert not task.done(), "a busy service is not a bad key"
    standin.options.refuse_sessions_with = None
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "the session")
    await standin.wait_for(lambda: standin.sessions[0].replies and standin.sessions[0].replies[0].done_at, 5,
                           "the greeting")
    assert events.names(bridge.SessionReady) == [(standin.sessions[0].session_id, False)]
    await finish(client, task)


async def test_a_service_full_for_longer_than_the_give_up_time_exits_5_naming_why(standin):
    standin.options.refuse_sessions_with = "server_error"
    client = make_client(standin, give_up_after_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(bridge.GaveUp) as e:
        await asyncio.wait_for(client.run(), 10)
    assert 1.5 <= time.monotonic() - t0 < 3.0
    assert "server_error" in str(e.value)
    assert standin.refused_sessions >= 3


async def test_a_close_1000_without_session_ended_is_resumed(standin):
    client = make_client(standin)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await standin.drop(1000, "")
    await standin.wait_for(lambda: standin.sessions[0].resumes == 1, 5, "the resume")
    assert len(standin.sessions) == 1
    await finish(client, task)


async def test_the_conversation_reaches_the_model_of_a_replacement_session(standin):
    """After a lost session, the fresh one's system prompt carries the conversation so far: its
    model knows what the caller said and typed (model_echo says it)."""
    standin.options.model_echo = True
    events = Recorder()
    client = make_client(standin, events, greeting=None)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await client.send_text("my order number is A1001")
    first = standin.sessions[0]
    await standin.wait_for(lambda: any(r.done_at for r in first.replies), 5, "the answer")
    standin.options.resume_forgets = True
    await standin.drop(1011)
    await standin.wait_for(lambda: len(standin.sessions) == 2 and standin.sessions[1].ready_at, 5, "a fresh session")
    reply = await standin.trigger_reply(seconds=0.3)
    await standin.wait_for(lambda: reply.done_at is not None, 5, "a reply in the fresh session")
    assert "A1001" in reply.text and "A1001" in reply.prompt
    assert not standin.sessions[1].received_events("conversation.message")
    await finish(client, task)


async def test_odd_length_reply_chunks_arrive_whole(standin):
    standin.options.odd_chunks = True
    events = Recorder()
    client = make_client(standin, events, greeting=None)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    reply = await standin.trigger_reply(seconds=1.0, freq_hz=700)
    await standin.wait_for(lambda: reply.done_at is not None, 5, "the reply")
    assert bytes(events.pcm[reply.reply_id]) == tone(700, 1.0).astype("<i2").tobytes()
    assert client.counters["odd_chunks"] >= 5 and client.counters["malformed_frames"] == 0
    await finish(client, task)


async def test_tools_carry_a_service_timeout_longer_than_ours(standin):
    """timeout_seconds tells the service how long to wait; ours answers first with an error."""
    tools = [{"type": "function", "name": "slow", "description": "takes long", "parameters": {"type": "object"}}]
    settings = SessionSettings(tools=tools, tool_timeout_seconds=service_tool_timeout(0.5))
    client = VoiceAgentClient(standin.url, KEY, settings, ToolRecorder(),
                              ClientOptions(tool_timeout_s=0.5, backoff_initial_s=0.05))
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    assert standin.sessions[0].config["tools"][0]["timeout_seconds"] == 6
    result = await standin.call_tool("slow", {})
    assert result is not None and "timed out" in json.loads(result["result"])["error"]
    assert standin.sessions[0].tool_timeouts == []
    await finish(client, task)


async def test_tool_calls_beyond_the_concurrency_cap_are_answered_at_once(standin):
    client = make_client(standin, ToolRecorder(), tool_timeout_s=1.0, max_concurrent_tools=2)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    first = [asyncio.create_task(standin.call_tool("slow", {})) for _ in range(2)]
    await standin.wait_for(lambda: client.tools_running == 2, 5, "the two slow tools running")
    t0 = time.monotonic()
    third = await standin.call_tool("lookup", {"id": 1})
    assert third["is_error"] is True and "already running" in json.loads(third["result"])["error"]
    assert time.monotonic() - t0 < 0.9, "refused at once, not after the running calls"
    for done in await asyncio.gather(*first):
        assert "timed out" in json.loads(done["result"])["error"]
    assert client.counters["tool_calls_refused"] == 1
    await finish(client, task)


async def test_a_service_that_drops_every_session_after_ready_is_retried_ever_more_slowly(standin):
    """Each socket gets ready, then the session is closed at once (1008). That is not a
    healthy session: the backoff keeps growing instead of restarting at its minimum."""
    standin.options.max_session_s = 0.05
    client = VoiceAgentClient(standin.url, KEY, SessionSettings(), Recorder(),
                              ClientOptions(backoff_initial_s=0.25, backoff_max_s=10.0, give_up_after_s=60))
    task = await running(client)
    await asyncio.sleep(6.0)
    ready = sum(1 for s in standin.sessions if s.ready_at)
    assert ready >= 3, "it keeps trying"
    assert client.connects <= 9, f"{client.connects} connections in 6 s: the backoff did not grow"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_stored_agent_session_sends_its_id_alone_and_chat_waits_for_its_greeting(standin):
    """AGENT_ID: the first update is {agent_id} alone; the stored agent greets (we cannot know
    whether it will), so typed chat waits for its first reply to end."""
    standin.options.greeting_seconds = 1.0
    events = Recorder()
    client = VoiceAgentClient(standin.url, KEY, SessionSettings(agent_id="agent_standin", system_prompt="ignored"),
                              events, ClientOptions(backoff_initial_s=0.05))
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].replies
                           and standin.sessions[0].replies[0].first_audio_at, 5, "the stored agent's greeting")
    s = standin.sessions[0]
    assert s.updates == [{"agent_id": "agent_standin"}]
    await client.send_text("hello?")
    await standin.wait_for(lambda: any(r.kind == "create" and r.done_at for r in s.replies), 5, "the answer")
    assert s.replies[0].status == "completed" and s.replies[0].text == "Hello from the stored agent."
    await finish(client, task)
