"""Tests of the Voice Agent API stand-in itself, driven by a bare websockets client (no bridge)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from standin import VOICES, StandIn, StandInOptions, TurnDetector, dominant_frequency, tone

RATE = 24_000
KEY = "standin"
FAST = dict(reply_seconds=0.5, greeting_seconds=0.3, think_ms=50)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def pcm_of(event: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(event["data"]), dtype="<i2")


def heard_hz(text: str) -> float:
    match = re.search(r"(\d+) Hz", text)
    assert match, f"no frequency in user transcript {text!r}"
    return float(match.group(1))


class Client:
    """A plain websockets client that files every server event with its arrival time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict]] = []
        self._cursor: dict[str, int] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                self.events.append((time.monotonic(), json.loads(frame)))

    @property
    def closed(self) -> bool:
        return self._reader.done()

    def of(self, type: str) -> list[dict]:
        return [e for _, e in self.events if e.get("type") == type]

    def types(self) -> list[str]:
        return [e.get("type") for _, e in self.events]

    async def send(self, **event: object) -> None:
        await self.ws.send(json.dumps(event))

    async def expect(self, type: str, timeout: float = 5.0) -> dict:
        """The next event of this type that no earlier expect() returned."""
        deadline = time.monotonic() + timeout
        while True:
            start = self._cursor.get(type, 0)
            for i in range(start, len(self.events)):
                if self.events[i][1].get("type") == type:
                    self._cursor[type] = i + 1
                    return self.events[i][1]
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"no {type} within {timeout} s; got {self.types()}"
                                     + (f"; closed {self.ws.close_code}" if self.closed else ""))
            await asyncio.sleep(0.005)

    async def expect_none(self, type: str, within: float) -> None:
        await asyncio.sleep(within)
        assert not self.of(type)[self._cursor.get(type, 0):], f"unexpected {type}: {self.of(type)}"

    async def ready(self, **session: object) -> dict:
        await self.send(type="session.update", session=session)
        return await self.expect("session.ready")

    async def stream(self, pcm: np.ndarray, chunk_ms: int = 50, speed: float = 1.0) -> None:
        """Send audio as input.audio messages at `speed` times real time."""
        step = RATE * chunk_ms // 1000
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), step)):
            delay = t0 + i * chunk_ms / 1000 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.send(type="input.audio", audio=b64(pcm[start:start + step]))

    async def closing(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.ws.close_code, self.ws.close_reason


@contextlib.asynccontextmanager
async def client(agent: StandIn, key: str | None = KEY) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with connect(agent.url, additional_headers=headers) as ws:
        c = Client(ws)
        try:
            yield c
        finally:
            c._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await c._reader


@pytest.fixture
async def agent() -> AsyncIterator[StandIn]:
    async with StandIn(StandInOptions(**FAST)) as standin:
        yield standin


# -- pure pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [220.0, 440.0, 1234.5])
def test_dominant_frequency_of_a_short_tone_is_within_a_hertz(freq: float) -> None:
    assert dominant_frequency(tone(freq, 0.3)) == pytest.approx(freq, abs=1.0)


def test_turn_detector_reports_start_progress_and_stop_in_audio_time() -> None:
    detector = TurnDetector(min_silence_ms=300, start_ms=60, progress_ms=400)
    events = detector.feed(np.concatenate([silence(0.2), tone(500, 1.0), silence(0.1)]))
    assert [e.kind for e in events] == ["started", "progress", "progress"]
    assert detector.in_speech and detector.voiced_since_start_ms == 940
    (stop,) = detector.feed(silence(0.3))
    assert stop.kind == "stopped" and not detector.in_speech
    assert len(stop.audio) == RATE  # the voiced span, trailing silence trimmed
    assert detector.feed(silence(1.0)) == []


def test_turn_detector_ignores_blips_shorter_than_speech_start() -> None:
    detector = TurnDetector(start_ms=60)
    assert detector.feed(np.concatenate([silence(0.1), tone(500, 0.04), silence(0.5)])) == []


# -- auth and HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "standin", "Bearer wrong", "bearer standin"])
async def test_a_bad_key_is_refused_with_http_401(agent: StandIn, header: str | None) -> None:
    agent.options.auth_failure = "http"
    headers = {"Authorization": header} if header is not None else {}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(agent.url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 401
    assert agent.http_rejections == 1 and agent.sessions == []


async def test_an_unknown_path_is_404(agent: StandIn) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(agent.url.replace("/v1/ws", "/v2/ws"),
                           additional_headers={"Authorization": f"Bearer {KEY}"}):
            pass
    assert refused.value.response.status_code == 404


async def test_a_bad_key_can_be_refused_by_close_1008(agent: StandIn) -> None:
    agent.options.auth_failure = "close1008"
    async with client(agent, key="wrong") as c:
        assert await c.closing() == (1008, "UNAUTHORIZED")
        assert c.events == []
    assert agent.http_rejections == 0 and agent.auth_failures == 1


@pytest.mark.parametrize("uppercase, reason", [(False, "UNAUTHORIZED"), (True, "")])
async def test_a_bad_key_is_refused_by_an_error_frame_then_1008_as_observed_live(agent: StandIn,
                                                                                uppercase: bool, reason: str) -> None:
    assert agent.options.auth_failure == "error_frame", "the default is what the live service does"
    agent.options.uppercase_codes = uppercase
    agent.options.auth_close_reason = reason
    async with client(agent, key=None) as c:
        error = await c.expect("session.error")
        assert error["code"] == ("UNAUTHORIZED" if uppercase else "unauthorized")
        assert await c.closing() == (1008, reason)


# -- session setup and validation -------------------------------------------------------------


async def test_audio_is_refused_until_session_ready(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.send(type="input.audio", audio=b64(tone(440, 0.05)))
        error = await c.expect("session.error")
        assert (error["code"], error["message"]) == ("invalid_audio", "audio before session.ready")
        ready = await c.ready(system_prompt="be brief")
        assert ready["session_id"] == agent.sessions[0].session_id
        assert ready["config"] == {"system_prompt": "be brief"} and ready["expires_at"].endswith("Z")
        await c.send(type="input.audio", audio=b64(tone(440, 0.05)))
        await agent.wait_for(lambda: len(agent.input_pcm()) == 1200, what="audio accepted after ready")
    assert agent.sessions[0].audio_before_ready == 1


async def test_an_invalid_first_update_leaves_the_session_unready_until_corrected(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.send(type="session.update",
                     session={"input": {"turn_detection": {"min_silence": 800, "max_silence": 500}}})
        error = await c.expect("session.error")
        assert (error["code"], error["param"]) == ("invalid_value", "input.turn_detection.min_silence")
        await c.send(type="input.audio", audio=b64(silence(0.05)))
        assert (await c.expect("session.error"))["code"] == "invalid_audio"
        assert not c.of("session.ready")
        await c.ready(input={"turn_detection": {"min_silence": 300, "max_silence": 500}})
    assert len(agent.sessions[0].updates) == 2


@pytest.mark.parametrize("session, code, param", [
    ({"agent_id": "agent_standin", "system_prompt": "hi"}, "invalid_config", "agent_id"),
    ({"agent_id": "agent_nobody"}, "agent_not_found", "agent_id"),
    ({"temperature": 0.2}, "invalid_config", "session.temperature"),
    ({"output": {"volume": 101}}, "invalid_value", "output.volume"),
    ({"output": {"volume": -1}}, "invalid_value", "output.volume"),
    ({"input": {"format": {"encoding": "audio/pcm", "sample_rate": 16000}}}, "invalid_value",
     "input.format.sample_rate"),
    ({"input": {"format": {"encoding": "audio/wav"}}}, "invalid_value", "input.format.encoding"),
    ({"input": {"keyterms": ["x"] * 101}}, "invalid_value", "input.keyterms"),
    ({"input": {"turn_detection": {"vad_threshold": 1.5}}}, "invalid_value", "input.turn_detection.vad_threshold"),
    ({"input": {"turn_detection": {"interrupt_response": "no"}}}, "invalid_value",
     "input.turn_detection.interrupt_response"),
    ({"input": {"turn_detection": {"interruption_delay": 2000}}}, "invalid_value",
     "input.turn_detection.interruption_delay"),
    ({"input": {"turn_detection": {"interruption_delay": -1}}}, "invalid_value",
     "input.turn_detection.interruption_delay"),
    ({"input": {"transcription_mode": "fastest"}}, "invalid_value", "input.transcription_mode"),
    ({"input": {"transcription_prompt": "x" * 1751}}, "invalid_value", "input.transcription_prompt"),
    ({"input": {"language_codes": "en"}}, "invalid_value", "input.language_codes"),
    ({"input": {"language_codes": ["en", "English"]}}, "invalid_value", "input.language_codes"),
    ({"input": {"voice_focus": "medium"}}, "invalid_value", "input.voice_focus"),
    ({"input": {"voice_focus_threshold": 2}}, "invalid_value", "input.voice_focus_threshold"),
    ({"input": {"continuous_partials": "yes"}}, "invalid_value", "input.continuous_partials"),
    ({"input": {"noise": True}}, "invalid_config", "input.noise"),
    ({"tools": [{"type": "function", "name": "x", "description": "", "parameters": {}, "execution_mode": "async"}]},
     "invalid_value", "tools[0].execution_mode"),
    ({"tools": [{"type": "function", "name": "x", "description": "", "parameters": {}, "timeout_seconds": 301}]},
     "invalid_value", "tools[0].timeout_seconds"),
    ({"tools": [{"type": "function", "name": "x", "description": "", "parameters": {}, "timeout_seconds": 0.5}]},
     "invalid_value", "tools[0].timeout_seconds"),
    ({"tools": [{"type": "function", "name": "x"}]}, "invalid_config", "tools[0].description"),
    ({"tools": [{"type": "function", "name": "x", "description": "", "parameters": []}]}, "invalid_config",
     "tools[0].parameters"),
    ({"greeting": 5}, "invalid_value", "greeting"),
])
async def test_invalid_config_is_rejected_with_code_and_param(agent: StandIn, session: dict, code: str,
                                                              param: str) -> None:
    async with client(agent) as c:
        await c.send(type="session.update", session=session)
        error = await c.expect("session.error")
        assert (error["code"], error.get("param")) == (code, param), error["message"]
        assert not c.of("session.ready")


async def test_a_stored_agent_alone_is_accepted_and_brings_its_prompt_and_greeting(agent: StandIn) -> None:
    async with client(agent) as c:
        config = (await c.ready(agent_id="agent_standin"))["config"]
        assert config["agent_id"] == "agent_standin" and config["system_prompt"].startswith("You are the stand-in")
        greeting = await c.expect("transcript.agent")
        assert greeting["text"] == "Hello from the stored agent."
        await c.send(type="session.update", session={"input": {"keyterms": ["LiveKit"]}})
        assert (await c.expect("session.updated"))["config"]["input"] == {"keyterms": ["LiveKit"]}


async def test_every_documented_setting_is_accepted() -> None:
    """What the real service accepts, the stand-in accepts: turn detection with its
    interruption_delay, the transcription options, voice focus, continuous partials, volume,
    and tools with execution_mode and timeout_seconds."""
    session = {
        "system_prompt": "Be brief.", "greeting": "Hi",
        "input": {"format": {"encoding": "audio/pcm", "sample_rate": 24000}, "keyterms": ["LiveKit"],
                  "turn_detection": {"vad_threshold": 0.4, "min_silence": 300, "max_silence": 1200,
                                     "interrupt_response": True, "interruption_delay": 0},
                  "transcription_mode": "min_latency", "transcription_prompt": "x" * 1750,
                  "language_codes": ["en", "es", "pt-BR"], "voice_focus": "far-field", "voice_focus_threshold": 0.5,
                  "continuous_partials": True},
        "output": {"voice": "james", "format": {"encoding": "audio/pcm"}, "volume": 0},
        "tools": [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"},
                   "execution_mode": "hold", "timeout_seconds": 300},
                  {"type": "function", "name": "quick", "description": "d", "parameters": {"type": "object"},
                   "execution_mode": "interactive", "timeout_seconds": 1}],
    }
    async with StandIn(StandInOptions(**FAST)) as agent, client(agent) as c:
        await c.ready(**session)
        await c.send(type="session.update", session={"output": {"volume": None}, "input": {"transcription_mode": "balanced"}})
        await c.expect("session.updated")
    assert agent.sessions[0].errors_sent == []


@pytest.mark.parametrize("voice", ["ivy", "claire", "dawn", "nobody"])
@pytest.mark.parametrize("error_frame", [True, False])
async def test_an_invalid_voice_in_the_first_update_closes_the_socket_1008(agent: StandIn, voice: str,
                                                                           error_frame: bool) -> None:
    """Observed live [3p]: ivy, claire and dawn were invalid, and the first update with an
    invalid voice closed the socket with 1008."""
    agent.options.invalid_voice_error_frame = error_frame
    async with client(agent) as c:
        await c.send(type="session.update", session={"output": {"voice": voice}})
        assert (await c.closing())[0] == 1008
    assert [e.get("param") for e in c.of("session.error")] == (["output.voice"] if error_frame else [])
    assert not c.of("session.ready")


def test_the_voice_list_is_the_documented_one_without_those_found_invalid() -> None:
    assert "james" in VOICES and "pierre" in VOICES and len(VOICES) == len(set(VOICES))
    assert not {"ivy", "claire", "dawn"} & set(VOICES)


async def test_a_full_service_refuses_the_handshake_with_server_error_then_1008(agent: StandIn) -> None:
    agent.options.refuse_sessions_with = "server_error"
    for _ in range(2):
        async with client(agent) as c:
            await c.send(type="session.update", session={})
            error = await c.expect("session.error")
            assert await c.closing() == (1008, "")
        assert (error["code"], error["message"]) == ("server_error", "at capacity, try again later")
    assert agent.refused_sessions == 2 and agent.sessions == []
    agent.options.refuse_sessions_with = None  # capacity is back
    async with client(agent) as c:
        await c.ready()


async def test_immutable_fields_cannot_change_after_ready_but_the_session_stays_open(agent: StandIn) -> None:
    tools = [{"type": "function", "name": "get_time", "description": "now", "parameters": {"type": "object"}}]
    async with client(agent) as c:
        await c.ready(output={"voice": "james"})
        for change, param in [({"output": {"voice": "tyler"}}, "output.voice"),
                              ({"greeting": "hello"}, "greeting"),
                              ({"output": {"format": {"encoding": "audio/pcmu"}}}, "output.format")]:
            await c.send(type="session.update", session=change)
            error = await c.expect("session.error")
            assert (error["code"], error["param"]) == ("immutable_field", param)
        await c.send(type="session.update", session={"output": {"voice": "nobody"}})
        assert (await c.expect("session.error"))["param"] == "output.voice", "later: an error, the socket stays"
        # Repeating the same voice is no change; mutable fields are acknowledged.
        await c.send(type="session.update", session={"output": {"voice": "james", "volume": 40}, "tools": tools,
                                                      "input": {"keyterms": ["LiveKit"]}})
        updated = await c.expect("session.updated")
        assert updated["config"]["output"] == {"voice": "james", "volume": 40}
        await c.send(type="session.update", session={"agent_id": "agent_standin"})
        assert (await c.expect("session.error"))["code"] == "agent_id_not_first"
        assert not c.closed


async def test_malformed_messages_get_invalid_format_and_the_session_stays_open(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        await c.ws.send("{not json")
        await c.ws.send(b"\x00\x01")
        await c.send(type="input.video")
        await c.send(kind="input.audio")
        await c.ws.send("[1, 2]")
        for _ in range(5):
            assert (await c.expect("session.error"))["code"] == "invalid_format"
        await c.send(type="input.audio", audio="%%%")
        await c.send(type="input.audio", audio=base64.b64encode(b"\x00\x01\x02").decode())
        for _ in range(2):
            assert (await c.expect("session.error"))["code"] == "invalid_audio"
        await c.send(type="session.update", session={"system_prompt": "still here"})
        await c.expect("session.updated")


async def test_a_message_over_the_size_limit_closes_1009(agent: StandIn) -> None:
    agent.options.max_message_bytes = 10_000
    async with client(agent) as c:
        await c.ready()
        await c.send(type="input.audio", audio=b64(silence(0.2)))  # 9 600 bytes of PCM, 12 800 of base64
        assert (await c.closing())[0] == 1009


async def test_a_spurious_session_updated_may_precede_session_ready(agent: StandIn) -> None:
    agent.options.extra_updated_before_ready = True
    async with client(agent) as c:
        await c.ready()
        assert c.types()[:2] == ["session.updated", "session.ready"]


# -- turns and replies ------------------------------------------------------------------------


async def test_a_tone_burst_is_a_user_turn_and_gets_a_paced_reply(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        await c.stream(np.concatenate([silence(0.1), tone(440, 0.9), silence(0.7)]))
        await c.expect("input.speech.started")
        delta = await c.expect("transcript.user.delta")
        assert heard_hz(delta["text"]) == pytest.approx(440, abs=5)
        await c.expect("input.speech.stopped")
        final = await c.expect("transcript.user")
        assert final["item_id"] == delta["item_id"]
        assert heard_hz(final["text"]) == pytest.approx(440, abs=5) and final["text"].endswith("0.9 s")
        started = await c.expect("reply.started")
        done = await c.expect("reply.done", timeout=3)
    assert done == {"type": "reply.done", "status": "completed", "reply_id": started["reply_id"]}
    types = c.types()
    order = [types.index(t) for t in ("input.speech.started", "transcript.user.delta", "input.speech.stopped",
                                      "transcript.user", "reply.started", "reply.audio", "transcript.agent",
                                      "reply.done")]
    assert order == sorted(order), types
    reply = np.concatenate([pcm_of(e) for e in c.of("reply.audio")])
    assert len(reply) == RATE // 2 and dominant_frequency(reply) == pytest.approx(1000, abs=2)
    assert np.abs(reply).max() == pytest.approx(0.5 * 32767, rel=0.01)
    text = c.of("transcript.agent")[0]
    assert text["text"] == "This is reply number 1." and text["interrupted"] is False
    assert "".join(d["delta"] for d in c.of("transcript.agent.delta")) == text["text"]
    record = agent.sessions[0]
    assert record.replies[0].kind == "turn" and record.replies[0].status == "completed"
    assert record.errors_sent == []


async def test_reply_audio_is_paced_in_real_time_with_a_bounded_lead_and_varied_chunks(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        reply = await agent.trigger_reply(seconds=1.2, freq_hz=700)
        await c.expect("reply.done", timeout=4)
    arrivals = [(t, len(pcm_of(e))) for t, e in c.events if e["type"] == "reply.audio"]
    t0 = arrivals[0][0]
    sent = np.cumsum([n for _, n in arrivals]) / RATE
    for (t, _), total in zip(arrivals, sent):
        assert total <= (t - t0) + 0.3 + 0.12 + 0.02, f"{total:.2f} s of audio only {t - t0:.2f} s in"
    assert arrivals[-1][0] - t0 >= 1.2 - 0.3 - 0.12 - 0.05
    done_at = next(t for t, e in c.events if e["type"] == "reply.done")
    assert done_at - t0 == pytest.approx(1.2, abs=0.1), "reply.done comes when the audio has played"
    sizes_ms = [1000 * n / RATE for _, n in arrivals]
    assert len(set(sizes_ms)) > 3 and all(40 <= s <= 120 for s in sizes_ms[:-1])
    assert reply.kind == "create" and reply.samples_sent == int(1.2 * RATE)


@pytest.mark.parametrize("order", ["transcript_first", "done_first"])
async def test_barge_in_interrupts_the_reply_and_becomes_a_turn(agent: StandIn, order: str) -> None:
    agent.options.barge_in_order = order
    agent.options.late_audio_after_interrupt = 2
    async with client(agent) as c:
        await c.ready()
        reply = await agent.trigger_reply(seconds=2.0)
        await c.expect("reply.started")
        await asyncio.sleep(0.3)
        await c.stream(np.concatenate([tone(300, 0.5), silence(0.7)]))
        await c.expect("input.speech.started")
        cut = await c.expect("transcript.agent")
        done = await c.expect("reply.done")
        user = await c.expect("transcript.user")
        next_reply = await c.expect("reply.started")
    assert cut["interrupted"] is True and done["status"] == "interrupted"
    assert cut["reply_id"] == done["reply_id"] == reply.reply_id != next_reply["reply_id"]
    full = "This is reply number 1."
    assert full.startswith(cut["text"]) and 0 < len(cut["text"]) < len(full)
    types = c.types()
    first, second = ("reply.done", "transcript.agent") if order == "done_first" else ("transcript.agent", "reply.done")
    assert types.index(first) < types.index(second)
    late = [e for e in c.of("reply.audio")[types[:types.index(second)].count("reply.audio"):]
            if e["reply_id"] == reply.reply_id]
    assert len(late) == 2, "the late chunks of the interrupted reply follow the interruption events"
    assert heard_hz(user["text"]) == pytest.approx(300, abs=5)
    assert reply.status == "interrupted" and reply.late_chunks == 2
    assert reply.interrupted_at - reply.first_audio_at < 1.0
    assert agent.sessions[0].replies[1].kind == "turn"


@pytest.mark.parametrize("announce", [True, False])
async def test_a_backchannel_shorter_than_the_interruption_delay_does_not_interrupt(
        agent: StandIn, announce: bool) -> None:
    agent.options.speech_started_on_backchannel = announce
    async with client(agent) as c:
        await c.ready(input={"turn_detection": {"interruption_delay": 400}})
        await agent.trigger_reply(seconds=1.5)
        await c.expect("reply.audio")
        await c.stream(np.concatenate([tone(300, 0.2), silence(0.7)]))
        done = await c.expect("reply.done", timeout=3)
        await asyncio.sleep(0.3)
    assert done["status"] == "completed"
    assert len(c.of("input.speech.started")) == (1 if announce else 0)
    assert len(c.of("transcript.user")) == (1 if announce else 0)
    assert len(c.of("reply.started")) == 1, "a turn that ends during a reply gets no reply of its own"


@pytest.mark.parametrize("wrap", [True, False])
async def test_the_greeting_is_spoken_at_start_wrapped_or_bare(agent: StandIn, wrap: bool) -> None:
    agent.options.wrap_greeting = wrap
    async with client(agent) as c:
        await c.ready(greeting="Hello there")
        transcript = await c.expect("transcript.agent")
        await asyncio.sleep(0.1)
    assert transcript["text"] == "Hello there"
    audio = np.concatenate([pcm_of(e) for e in c.of("reply.audio")])
    assert dominant_frequency(audio) == pytest.approx(660, abs=2)
    wrapped = [t for t in c.types() if t in ("reply.started", "reply.done")]
    assert wrapped == (["reply.started", "reply.done"] if wrap else [])


async def test_docs_only_shape_leaves_out_sdk_fields_and_done_status(agent: StandIn) -> None:
    agent.options.sdk_fields = False
    agent.options.omit_done_status = True
    agent.options.unknown_events = True
    async with client(agent) as c:
        ready = await c.ready()
        await agent.trigger_reply(seconds=0.2)
        done = await c.expect("reply.done")
    assert set(ready) == {"type", "session_id"}
    assert done == {"type": "reply.done"}
    assert all(set(e) == {"type", "data"} for e in c.of("reply.audio"))
    assert c.of("standin.unknown_event")


async def test_conversation_message_is_recorded_without_reply_and_reply_create_replies(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        await c.send(type="conversation.message", role="system", content="The user is in Paris.")
        await c.expect_none("reply.started", within=0.3)
        await c.send(type="conversation.message", role="agent", content="x")
        assert (await c.expect("session.error"))["param"] == "role"
        await c.send(type="reply.create", instructions="Say hi")
        await c.expect("reply.done", timeout=3)
    record = agent.sessions[0]
    assert record.received_events("conversation.message")[0]["content"] == "The user is in Paris."
    assert [r.kind for r in record.replies] == ["create"]


async def test_echo_mode_plays_the_users_turn_back_after_a_chime(agent: StandIn) -> None:
    agent.options.reply_mode = "echo"
    async with client(agent) as c:
        await c.ready(greeting="Hi")
        await c.expect("reply.done", timeout=3)
        chime = np.concatenate([pcm_of(e) for e in c.of("reply.audio")])
        await c.stream(np.concatenate([tone(523, 0.5), silence(0.7)]))
        await c.expect("reply.done", timeout=3)
        echoed = np.concatenate([pcm_of(e) for e in c.of("reply.audio")])[len(chime):]
    assert dominant_frequency(chime[:RATE // 5]) == pytest.approx(660, abs=5)
    assert dominant_frequency(echoed) == pytest.approx(523, abs=2) and len(echoed) == RATE // 2
    assert c.of("transcript.agent")[1]["text"] == "You said: tone 523 Hz 0.5 s."


async def test_the_demo_describes_speech_not_tones(agent: StandIn) -> None:
    """`python worker.py demo` runs it with describe="speech": captions a person can read."""
    agent.options.reply_mode, agent.options.describe = "echo", "speech"
    async with client(agent) as c:
        await c.ready(greeting="Hi")
        await c.expect("reply.done", timeout=3)
        await c.stream(np.concatenate([tone(523, 0.5), silence(0.7)]))
        await c.expect("reply.done", timeout=3)
    assert c.of("transcript.user")[0]["text"] == "(0.5 s of speech)"
    assert c.of("transcript.agent")[1]["text"] == "Here is what you said, played back (0.5 s)."


async def test_g711_mu_law_in_and_out_at_8_khz(agent: StandIn) -> None:
    from standin import decode_audio, encode_audio

    pcmu = {"encoding": "audio/pcmu"}
    async with client(agent) as c:
        await c.ready(input={"format": pcmu}, output={"format": pcmu})
        audio = np.concatenate([silence(0.1), tone(440, 0.6), silence(0.7)])[::3]  # 8 kHz
        for start in range(0, len(audio), 400):
            await c.send(type="input.audio", audio=base64.b64encode(encode_audio(audio[start:start + 400],
                                                                                  "audio/pcmu")).decode())
            await asyncio.sleep(0.05)
        user = await c.expect("transcript.user", timeout=3)
        await c.expect("reply.done", timeout=3)
    assert heard_hz(user["text"]) == pytest.approx(440, abs=5)
    reply = np.concatenate([decode_audio(base64.b64decode(e["data"]), "audio/pcmu") for e in c.of("reply.audio")])
    assert len(reply) == 4000 and dominant_frequency(reply, 8000) == pytest.approx(1000, abs=5)
    assert agent.input_pcm().dtype == np.int16 and len(agent.input_pcm()) == len(audio)


async def test_input_format_may_change_after_ready(agent: StandIn) -> None:
    """AssemblyAI's notes list input.format as mutable (output.format is not)."""
    from standin import encode_audio

    async with client(agent) as c:
        await c.ready()
        await c.send(type="session.update", session={"input": {"format": {"encoding": "audio/pcmu"}}})
        await c.expect("session.updated")
        audio = np.concatenate([silence(0.1), tone(440, 0.6), silence(0.7)])[::3]  # 8 kHz
        for start in range(0, len(audio), 400):
            await c.send(type="input.audio", audio=base64.b64encode(encode_audio(audio[start:start + 400],
                                                                                  "audio/pcmu")).decode())
            await asyncio.sleep(0.05)
        user = await c.expect("transcript.user", timeout=3)
    assert heard_hz(user["text"]) == pytest.approx(440, abs=5)


async def test_the_model_sees_instructions_and_the_system_prompt_never_conversation_messages(agent: StandIn) -> None:
    """[sdk] and [3p]: conversation.message content does not reach the model; reply.create
    instructions and the system prompt do. With model_echo the reply says what it was told."""
    agent.options.model_echo = True
    async with client(agent) as c:
        await c.ready(system_prompt="You sell bicycles.")
        await c.send(type="conversation.message", role="user", content="my name is Zanzibar")
        await c.send(type="reply.create")
        first = await c.expect("transcript.agent", timeout=3)
        await c.send(type="reply.create", instructions="Tell the caller the shop opens at nine.")
        second = await c.expect("transcript.agent", timeout=3)
    assert "Zanzibar" not in first["text"] and "You sell bicycles." in first["text"]
    assert "the shop opens at nine" in second["text"]
    record = agent.sessions[0]
    assert [r.instructions for r in record.replies] == [None, "Tell the caller the shop opens at nine."]
    assert record.replies[0].prompt == "You sell bicycles."


async def test_a_reply_create_while_the_greeting_plays_replaces_the_greeting(agent: StandIn) -> None:
    """[sdk]: one sent while the greeting plays replaces the greeting."""
    agent.options.greeting_seconds = 1.5
    async with client(agent) as c:
        await c.ready(greeting="Welcome to the shop, how can I help you today?")
        await c.expect("reply.audio")
        await c.send(type="reply.create", instructions="Answer the chat.")
        cut = await c.expect("transcript.agent", timeout=3)
        done = await c.expect("reply.done", timeout=3)
        await c.expect("reply.started", timeout=3)
        await c.expect("reply.done", timeout=3)
    greeting, answer = agent.sessions[0].replies
    assert (greeting.kind, greeting.status, cut["interrupted"], done["status"]) == (
        "greeting", "interrupted", True, "interrupted")
    assert greeting.samples_sent < 1.0 * RATE and answer.kind == "create" and answer.status == "completed"


async def test_a_tool_call_is_given_up_after_its_timeout_seconds(agent: StandIn) -> None:
    tools = [{"type": "function", "name": "slow", "description": "d", "parameters": {"type": "object"},
              "timeout_seconds": 1}]
    async with client(agent) as c:
        await c.ready(tools=tools)
        t0 = time.monotonic()
        assert await agent.call_tool("slow", {}, timeout=5) is None, "the service gave up first"
        gave_up = time.monotonic() - t0
        call = c.of("tool.call")[0]
        apology = await c.expect("transcript.agent", timeout=3)
        await c.send(type="tool.result", call_id=call["call_id"], result="{}")
        late = await c.expect("session.error")
        assert not c.closed, "the session goes on"
    assert 1.0 <= gave_up < 1.6
    assert "did not answer in time" in apology["text"] and late["param"] == "call_id"
    record = agent.sessions[0]
    assert record.tool_timeouts == [call["call_id"]] and record.tool_results == []


async def test_a_tool_without_timeout_seconds_gets_the_default_120(agent: StandIn) -> None:
    from standin import DEFAULT_TOOL_TIMEOUT_S

    assert DEFAULT_TOOL_TIMEOUT_S == 120
    async with client(agent) as c:
        await c.ready(tools=[{"type": "function", "name": "t", "description": "d", "parameters": {}}])
        call = asyncio.create_task(agent.call_tool("t", {}))
        request = await c.expect("tool.call")
        await asyncio.sleep(1.2)
        await c.send(type="tool.result", call_id=request["call_id"], result="{}")
        assert (await call)["call_id"] == request["call_id"]


async def test_odd_chunks_split_samples_across_chunks_and_lose_nothing(agent: StandIn) -> None:
    agent.options.odd_chunks = True
    async with client(agent) as c:
        await c.ready()
        await agent.trigger_reply(seconds=0.8, freq_hz=700)
        await c.expect("reply.done", timeout=3)
    raw = [base64.b64decode(e["data"]) for e in c.of("reply.audio")]
    assert sum(len(r) % 2 for r in raw) >= len(raw) - 1, "every chunk but perhaps the last is odd"
    joined = np.frombuffer(b"".join(raw), dtype="<i2")
    assert np.array_equal(joined, tone(700, 0.8))


# -- rate limit -------------------------------------------------------------------------------


async def test_audio_sent_three_times_faster_than_real_time_is_dropped_with_an_error(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        await c.stream(silence(3.0), speed=3.0)
        await c.expect("session.error")
        await asyncio.sleep(0.1)
    record = agent.sessions[0]
    assert set(record.errors_sent) == {"audio_rate_violation"}
    assert 1 <= len(record.errors_sent) <= 2, "at most one rate error per second"
    accepted = len(record.audio) / 2 / RATE
    assert 1.1 <= accepted < 2.5, f"{accepted:.2f} s accepted of 3 s sent in 1 s"


# -- resume and end ---------------------------------------------------------------------------


async def test_resume_within_the_window_continues_the_session(agent: StandIn) -> None:
    async with client(agent) as c:
        session_id = (await c.ready())["session_id"]
        await agent.drop(1011)
        assert (await c.closing())[0] == 1011
    async with client(agent) as c:
        await c.send(type="session.resume", session_id=session_id)
        assert (await c.expect("session.ready"))["session_id"] == session_id
        await c.send(type="reply.create")
        await c.expect("reply.done", timeout=3)
    record = agent.sessions[0]
    assert len(agent.sessions) == 1 and record.resumes == 1 and record.sockets == 2


@pytest.mark.parametrize("how", ["forced", "unknown id", "after end", "window passed", "forgets"])
async def test_a_failed_resume_gets_an_error_then_1008(agent: StandIn, how: str) -> None:
    agent.options.resume_window_s = 0.2
    async with client(agent) as c:
        session_id = (await c.ready())["session_id"]
        if how == "after end":
            await c.send(type="session.end")
            await c.closing()
    if how != "after end":
        await agent.drop(None)  # no close frame
    if how == "window passed":
        await asyncio.sleep(0.3)
    agent.options.fail_next_resume = "session_not_found" if how == "forced" else None
    agent.options.resume_forgets = how == "forgets"
    async with client(agent) as c:
        await c.send(type="session.resume", session_id="sess_nope" if how == "unknown id" else session_id)
        error = await c.expect("session.error")
        assert (await c.closing())[0] == 1008
    assert error["code"] == ("session_expired" if how == "window passed" else "session_not_found")
    assert agent.options.fail_next_resume is None, "fail_next_resume is one-shot"


async def test_session_end_answers_session_ended_then_closes_cleanly(agent: StandIn) -> None:
    async with client(agent) as c:
        await c.ready()
        await c.stream(silence(0.5))
        await c.send(type="session.end")
        ended = await c.expect("session.ended")
        assert await c.closing() == (1000, "session ended")
    assert ended["audio_duration_seconds"] == pytest.approx(0.5, abs=0.01)
    assert ended["session_duration_seconds"] >= 0.45  # the last 50 ms chunk leaves at 0.45 s
    assert agent.sessions[0].ended


async def test_the_clean_close_code_is_configurable(agent: StandIn) -> None:
    agent.options.clean_close_code = 4000
    async with client(agent) as c:
        await c.ready()
        await c.send(type="session.end")
        assert (await c.closing())[0] == 4000


async def test_a_session_past_its_maximum_length_is_closed_1008(agent: StandIn) -> None:
    agent.options.max_session_s = 0.3
    async with client(agent) as c:
        await c.ready()
        assert await c.closing() == (1008, "session_expired")
    assert agent.sessions[0].expired


# -- tools ------------------------------------------------------------------------------------


async def test_a_tool_call_round_trip(agent: StandIn) -> None:
    tools = [{"type": "function", "name": "get_weather", "description": "weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    async with client(agent) as c:
        await c.ready(tools=tools)
        call = asyncio.create_task(agent.call_tool("get_weather", {"city": "Paris"}))
        started = await c.expect("reply.started")
        request = await c.expect("tool.call")
        await c.expect("reply.done")
        assert request["name"] == "get_weather" and request["arguments"] == {"city": "Paris"}
        await c.send(type="tool.result", call_id="call_unknown", result="{}")
        await c.send(type="tool.result", call_id=request["call_id"], result={"weather": "sunny"})
        await c.send(type="tool.result", call_id=request["call_id"], result="sunny")
        for _ in range(3):
            assert (await c.expect("session.error"))["code"] == "invalid_value"
        answer = json.dumps({"weather": "sunny"})
        await c.send(type="tool.result", call_id=request["call_id"], result=answer)
        result = await asyncio.wait_for(call, 3)
        spoken = await c.expect("transcript.agent", timeout=3)
        await c.expect("reply.done", timeout=3)
    assert result["result"] == answer and agent.sessions[0].tool_results == [result]
    assert "sunny" in spoken["text"] and spoken["reply_id"] != started["reply_id"]
    assert [r.kind for r in agent.sessions[0].replies] == ["tool", "tool"]


async def test_a_user_turn_can_trigger_a_tool_call(agent: StandIn) -> None:
    agent.options.tool_call_on_turn = ("lookup", {"q": "x"})
    async with client(agent) as c:
        await c.ready()
        await c.stream(np.concatenate([tone(440, 0.3), silence(0.65)]))
        call = await c.expect("tool.call", timeout=3)
    assert (call["name"], call["arguments"]) == ("lookup", {"q": "x"})
    assert not c.of("reply.audio") and agent.options.tool_call_on_turn is None


# -- housekeeping -----------------------------------------------------------------------------


async def test_stopping_mid_reply_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    standin = StandIn(StandInOptions(**FAST))
    await standin.start()
    async with client(standin) as c:
        await c.ready(greeting="hi")
        await c.expect("reply.audio")
        await standin.stop()
        assert (await c.closing())[0] == 1001
    leftover = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert leftover == []
    assert standin.sessions[0].replies[0].status == "abandoned"


def test_the_command_line_serves_without_logging_the_key() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "sk-very-secret-123"
    script = Path(__file__).resolve().parent.parent / "standin.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--api-key", secret, "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def talk() -> str:
            url = f"ws://127.0.0.1:{port}/v1/ws"
            for _ in range(100):
                try:
                    ws = await connect(url, additional_headers={"Authorization": f"Bearer {secret}"})
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            async with ws:
                await ws.send(json.dumps({"type": "session.update", "session": {}}))
                return json.loads(await ws.recv())["type"]

        assert asyncio.run(talk()) == "session.ready"
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert "session.ready" in output and secret not in output


def test_the_command_line_as_the_readme_runs_it_by_hand() -> None:
    """README (*The demo in detail*): `standin.py --port N` alone, and the worker pointed at it
    with ASSEMBLYAI_API_KEY=standin: its default key; a wrong one is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parent.parent / "standin.py"
    env = {k: v for k, v in os.environ.items() if k != "STANDIN_API_KEY"}
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def talk(key: str) -> str:
            url = f"ws://127.0.0.1:{port}/v1/ws"
            for _ in range(100):
                try:
                    ws = await connect(url, additional_headers={"Authorization": f"Bearer {key}"})
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            async with ws:
                if key == "standin":
                    await ws.send(json.dumps({"type": "session.update", "session": {}}))
                return json.loads(await ws.recv())["type"]  # a wrong key: refused at once

        assert asyncio.run(talk("standin")) == "session.ready"
        assert asyncio.run(talk("not-the-key")) == "session.error"  # as the service refuses a key
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
