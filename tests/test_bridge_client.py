"""The Voice Agent client against the stand-in, with faults injected: drops, refused
resumes, bad keys in all three forms, hostile frames, pacing."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import pytest

import bridge
from bridge import ClientOptions, FatalError, SessionSettings, ToolError, VoiceAgentClient
from standin import StandIn, StandInOptions

KEY = "client-test-key"
RATE = 24000


class Recorder(bridge.BridgeEvents):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.audio: dict[str, int] = {}
        self.audio_times: list[float] = []
        self.tool_calls: list[tuple[str, dict]] = []

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name.startswith("on_") and name not in ("on_reply_audio", "on_tool_call"):
            def record(*args: Any) -> Any:
                object.__getattribute__(self, "calls").append((name, args))
                return attr(*args)
            return record
        return attr

    def on_reply_audio(self, reply_id: str, pcm: bytes) -> None:
        self.audio[reply_id] = self.audio.get(reply_id, 0) + len(pcm) // 2
        self.audio_times.append(time.monotonic())

    def names(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]


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


def make_client(standin: StandIn, events: bridge.BridgeEvents | None = None, key: str = KEY,
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
    assert events.names("on_session_ready")[-1] == (session.session_id, True)
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
    with pytest.raises(FatalError) as e:
        await asyncio.wait_for(client.run(), 5)
    assert time.monotonic() - t0 < 2.0
    assert e.value.exit_code == bridge.EXIT_API_AUTH
    assert "ASSEMBLYAI_API_KEY" in str(e.value) and "wrong-key" not in str(e.value)
    assert len(standin.sessions) == 0 or not standin.sessions[0].ready_at


async def test_uppercase_error_codes_are_understood(standin):
    standin.options.auth_failure = "error_frame"
    standin.options.uppercase_codes = True
    with pytest.raises(FatalError) as e:
        await asyncio.wait_for(make_client(standin, key="nope").run(), 5)
    assert e.value.exit_code == bridge.EXIT_API_AUTH


async def test_invalid_first_update_is_a_fatal_config_error(standin):
    client = VoiceAgentClient(standin.url, KEY, SessionSettings(turn_detection={"min_silence": 5000, "max_silence": 100}),
                              Recorder(), ClientOptions())
    with pytest.raises(FatalError) as e:
        await asyncio.wait_for(client.run(), 5)
    assert e.value.exit_code == bridge.EXIT_API_CONFIG
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
        json.dumps({"type": "reply.audio", "data": base64.b64encode(b"\x01\x02\x03").decode()}),
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
    await asyncio.sleep(0.2)
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
    with pytest.raises(FatalError) as e:
        await asyncio.wait_for(client.run(), 10)
    assert e.value.exit_code == bridge.EXIT_API_GAVE_UP
    assert 1.0 <= time.monotonic() - t0 < 3.0
    await standin.start()


async def test_text_message_becomes_conversation_message_and_reply(standin):
    client = make_client(standin, greeting=None)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    await client.send_text("what are your opening hours?")
    s = standin.sessions[0]
    await standin.wait_for(lambda: s.received_events("reply.create"), 5, "reply.create")
    (msg,) = s.received_events("conversation.message")
    assert msg == {"type": "conversation.message", "role": "user", "content": "what are your opening hours?"}
    await standin.wait_for(lambda: any(r.kind == "create" and r.done_at for r in s.replies), 5, "the reply")
    await finish(client, task)


async def test_tool_calls_beyond_the_concurrency_cap_are_answered_at_once(standin):
    client = make_client(standin, ToolRecorder(), tool_timeout_s=1.0, max_concurrent_tools=2)
    task = await running(client)
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 5, "ready")
    first = [asyncio.create_task(standin.call_tool("slow", {})) for _ in range(2)]
    await asyncio.sleep(0.2)
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
