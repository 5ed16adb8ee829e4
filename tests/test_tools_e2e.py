"""Tools with the real room and the stand-in issuing tool.calls: end_call hangs up only after
the goodbye has been heard, user tools are declared exactly as their hints say, slow and
failing tools answer with errors, results of interrupted replies are dropped."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time

import pytest

from harness import ASSEMBLYAI_KEY, REPO, RoomUser, WorkerProcess, tone, wait_until, worker_env, write_wav
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

REPLY_HZ, THINK_HZ = 1000.0, 900.0

SLOW_TOOLS = textwrap.dedent('''
    import asyncio
    from typing import Literal, Optional


    async def slow_lookup(seconds: float) -> dict:
        """Wait, then answer.

        Args:
            seconds: How long to wait.
        """
        await asyncio.sleep(seconds)
        return {"waited": seconds}


    from tools import ToolFailed


    async def broken(order_id: str) -> dict:
        """Always fails, with a message meant for the agent."""
        raise ToolFailed(f"order {order_id} is not in the database")


    async def crashes(order_id: str) -> dict:
        """Fails like a bug or an outage does."""
        raise ConnectionError(f"db.internal:5432 refused user=shop password=hunter2 for {order_id}")


    async def pick(colour: Literal["red", "green"], sizes: list[int], note: Optional[str] = None) -> str:
        """Choose a colour."""
        return colour
''')


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.0, reply_freq_hz=REPLY_HZ,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


async def ready_session(standin: StandIn, user: RoomUser):
    await user.join()
    await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
    return standin.sessions[0]


async def test_end_call_waits_for_the_goodbye_then_the_room_is_gone(livekit_server, standin, room_name, tmp_path):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, GREETING="", AMBIENT_SOUND="none"),
                           tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    disconnected: list[float] = []
    try:
        session = await ready_session(standin, user)
        user.room.on("disconnected", lambda *_: disconnected.append(time.monotonic()))
        tools = session.config.get("tools", [])
        end_call = next(t for t in tools if t["name"] == "end_call")
        assert "goodbye" in end_call["description"].lower()
        standin.options.reply_seconds = 2.0  # the goodbye, spoken after the tool's result
        result = await standin.call_tool("end_call", {})
        assert not result.get("is_error") and json.loads(result["result"])["ok"] is True
        def spoken_answer():
            return next((r for r in session.replies if r.kind == "tool" and r.call_id == result["call_id"]
                         and r.samples_sent), None)

        await standin.wait_for(lambda: spoken_answer() is not None, 10, "the goodbye after the tool result")
        goodbye = spoken_answer()
        await wait_until(lambda: disconnected, 20, "the room to end")
        heard = user.agent().timeline(REPLY_HZ)
        start = goodbye.first_audio_at
        played = [a for t, a in heard if start + 0.3 <= t <= start + goodbye.duration_s - 0.1]
        assert played and min(played) > 0.1, "the goodbye was cut short"
        assert disconnected[0] > start + goodbye.duration_s, "the room ended before the goodbye had played"
        assert session.ended, "session.end was not sent before hanging up"
        from livekit import api
        from harness import API_KEY, API_SECRET

        async with api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET) as lk:
            rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
            participants = [p.identity for r in rooms.rooms for p in
                            (await lk.room.list_participants(api.ListParticipantsRequest(room=r.name))).participants]
        assert "user" not in participants, "the user is still in the call"
        # The worker stays up and comes back for the next call.
        await worker.wait_for_output("rejoining .* for the next one", 15)
        assert worker.alive
    finally:
        worker.kill()
        await user.leave()


async def test_user_tools_schema_timeout_errors_and_thinking(livekit_server, standin, room_name, tmp_path):
    module = tmp_path / "mytools.py"
    module.write_text(SLOW_TOOLS)
    think = write_wav(tmp_path / "think.wav", tone(THINK_HZ, 0.5, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, GREETING="", AMBIENT_SOUND="none",
                                      TOOLS_MODULE=str(module), TOOL_TIMEOUT_S="1.5", THINKING_SOUND=str(think),
                                      THINKING_VOLUME="0.8", CUE_TARGET_LUFS="-12"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        session = await ready_session(standin, user)
        tools = {t["name"]: t for t in session.config["tools"]}
        assert set(tools) == {"slow_lookup", "broken", "crashes", "pick", "end_call"}
        assert tools["pick"] == {
            "type": "function", "name": "pick", "description": "Choose a colour.",
            "parameters": {"type": "object", "properties": {
                "colour": {"type": "string", "enum": ["red", "green"]},
                "sizes": {"type": "array", "items": {"type": "integer"}},
                "note": {"type": ["string", "null"], "default": None}},
                "required": ["colour", "sizes"], "additionalProperties": False}}
        assert tools["slow_lookup"]["parameters"]["properties"]["seconds"] == {
            "type": "number", "description": "How long to wait."}

        # A tool that is slow but in time: the agent is "thinking" and the thinking cue plays.
        t0 = time.monotonic()
        ok = await standin.call_tool("slow_lookup", {"seconds": 1.0})
        assert json.loads(ok["result"]) == {"waited": 1.0} and not ok.get("is_error")
        assert any(s == "thinking" and t > t0 for t, s in user.states), user.states
        cue = [a for t, a in user.agent().timeline(THINK_HZ) if t0 + 0.3 < t < t0 + 0.9]
        assert cue and max(cue) > 0.05, "no thinking cue while the tool ran"

        slow = await standin.call_tool("slow_lookup", {"seconds": 5})
        assert slow["is_error"] is True and "timed out" in json.loads(slow["result"])["error"]
        broken = await standin.call_tool("broken", {"order_id": "A7"})
        assert broken["is_error"] is True and "order A7 is not in the database" in json.loads(broken["result"])["error"]
        crashed = await standin.call_tool("crashes", {"order_id": "A8"})
        error = json.loads(crashed["result"])["error"]
        assert crashed["is_error"] is True and "failed" in error
        assert "hunter2" not in error and "5432" not in error, f"an exception's text reached the agent: {error}"
        await worker.wait_for_output("tool crashes .* raised ConnectionError", 5)  # ...but the log has it
        wrong = await standin.call_tool("pick", {"colour": "blue", "sizes": [1]})
        assert wrong["is_error"] is True and "colour" in json.loads(wrong["result"])["error"]
        assert worker.alive
    finally:
        worker.kill()
        await user.leave()


async def test_result_of_an_interrupted_reply_is_discarded(livekit_server, standin, room_name, tmp_path):
    module = tmp_path / "mytools.py"
    module.write_text(SLOW_TOOLS)
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, GREETING="", AMBIENT_SOUND="none",
                                      TOOLS_MODULE=str(module)), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        session = await ready_session(standin, user)
        # The agent calls a slow tool; the user interrupts that reply before the result is back.
        await standin.send_event({"type": "reply.started", "reply_id": "r-int"})
        await standin.send_event({"type": "tool.call", "call_id": "c-int", "name": "slow_lookup",
                                  "arguments": {"seconds": 1.0}})
        await standin.send_event({"type": "reply.done", "reply_id": "r-int", "status": "interrupted"})
        await worker.wait_for_output("discarding the result of tool call c-int", 10)
        await asyncio.sleep(0.3)
        assert not [r for r in session.received_events("tool.result") if r.get("call_id") == "c-int"]
    finally:
        worker.kill()
        await user.leave()


def test_a_tools_module_that_fails_to_import_stops_startup(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "badtools.py"
    bad.write_text("async def f(x: int) -> int:\n    \"\"\"Doc.\"\"\"\n    return x +\n")
    env = {"PATH": "/usr/bin:/bin", "LIVEKIT_URL": "ws://127.0.0.1:9", "LIVEKIT_API_KEY": "k",
           "LIVEKIT_API_SECRET": "secret-secret", "ASSEMBLYAI_API_KEY": "key-key-key", "TOOLS_MODULE": str(bad),
           "AMBIENT_SOUND": "none"}
    r = subprocess.run([sys.executable, str(REPO / "worker.py")], env=env, capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TOOLS_MODULE:") and "badtools.py" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
