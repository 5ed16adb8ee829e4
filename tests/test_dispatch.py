"""Agent dispatch against the real livekit-server v1.13.5: ``python worker.py serve`` registers
as an agent worker and runs one call process per job. Users are Python-SDK participants who
create rooms by joining them, as a browser with agent-starter-react does.

Two kinds of call process:

* the real one, ``python worker.py job`` with the Voice Agent API stand-in: every test where
  the issue asks for a real call (a conversation in a dispatched room, explicit dispatch and
  the job's metadata reaching a tool, a fleet, SIGKILL, drain, MAX_CALLS, server restarts);
* ``tests/fake_agent_child.py`` (joins with the job's token and plays a tone; knobs to crash,
  hang or fail), for what exercises the dispatcher alone: a crashing call, a call failing as
  every call would, the drain timeout, the CPU gate, a dropped /agent connection, sd_notify
  and the health endpoint.

Frequencies as in test_e2e.py: ambient 300 Hz, greeting 650 Hz, reply 1000 Hz, the user 450 Hz.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dispatch
import mixer
from harness import (API_KEY, API_SECRET, ASSEMBLYAI_KEY, REPO, LiveKitServer, RoomUser, WorkerProcess,
                     find_server_binary, free_port, tone, wait_until, write_wav)
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

FAKE_CHILD = REPO / "tests" / "fake_agent_child.py"
AGENT = "voice-agent"
JOIN_BOUND_S = 15.0  # room created -> the agent in it (typically 1-2 s; a loaded 2-core host)
AMBIENT_HZ, GREETING_HZ, REPLY_HZ, USER_HZ = 300.0, 650.0, 1000.0, 450.0
TAG_VARIABLE = "VOICE_AGENT_TEST_TAG"  # inherited by a serve process's call processes: finds them


class ServeProcess(WorkerProcess):
    """``python worker.py serve`` as a user (or systemd) starts it: configured through env vars."""

    def start(self, *args: str) -> "ServeProcess":
        return super().start("serve", *args)  # type: ignore[return-value]

    @property
    def output_path(self) -> Path:
        return self.workdir / "serve.log"

    async def registered(self, times: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(r"registered (with|again with) LiveKit", self.output())) < times:
            assert self.alive, f"serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"not registered {times}x:\n{self.output()[-4000:]}"
            await asyncio.sleep(0.05)

    def accepted(self, room: str | None = None) -> int:
        where = re.escape(room) if room else r"\S+"
        return len(re.findall(rf"accepted job AJ_\w+ for room {where}( |$)", self.output(), re.M))


def serve_env(server: LiveKitServer, tag: str, standin_url: str | None = None, tone_hz: float = 440.0,
              **extra: str) -> dict[str, str]:
    """The real call process with ``standin_url``, else the fake one."""
    env = {
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY,
        "VOICE_AGENT_URL": standin_url or "ws://127.0.0.1:9/v1/ws",
        "STARTUP_CHECK": "0",
        "MAX_CALLS": "4",
        # The test host is shared and busy: only MAX_CALLS limits here (the CPU gate has a test of its own).
        "LOAD_THRESHOLD": "1",
        "DRAIN_TIMEOUT_S": "60",
        "LOG_LEVEL": "debug",
        TAG_VARIABLE: tag,
    }
    if standin_url is None:
        env.update({"SERVE_JOB_COMMAND": json.dumps([sys.executable, str(FAKE_CHILD), "--tag", tag,
                                                     "--tone", str(tone_hz)]),
                    "SHUTDOWN_TIMEOUT_S": "1", "JOB_STOP_TIMEOUT_S": "5", "AMBIENT_SOUND": "none"})
    else:
        env.update({"GREETING": "Hello there", "AMBIENT_VOLUME": "0.5", "AMBIENT_TARGET_LUFS": "-12",
                    "IDLE_TIMEOUT_S": "2"})
    env.update(extra)
    return env


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_mode="tone", reply_freq_hz=REPLY_HZ,
                               reply_seconds=1.5, greeting_freq_hz=GREETING_HZ, greeting_seconds=1.0,
                               default_min_silence_ms=500, lead_ms=400))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def ambient_wav(tmp_path):
    return write_wav(tmp_path / "ambient.wav", tone(AMBIENT_HZ, 2.37, amplitude=0.5, fade_ms=0))


@pytest.fixture
def serves(livekit_server, tmp_path):
    """Start serve processes; every one is stopped (and its call processes checked gone) at
    the end, and no log holds a secret or a token."""
    started: list[tuple[ServeProcess, str]] = []

    def start(tag: str, server: LiveKitServer | None = None, standin: StandIn | None = None, **env: str) -> ServeProcess:
        s = ServeProcess(serve_env(server or livekit_server, tag, standin.url if standin else None, **env),
                         tmp_path / tag).start()
        started.append((s, tag))
        return s

    yield start
    # SIGTERM twice: drain, then end the calls now. Apart: two signals sent back to back can
    # reach a process as one.
    for s, tag in started:
        s.signal(signal.SIGTERM)
    time.sleep(dispatch.URGENT_SIGNAL_AFTER_S + 0.1)
    for s, tag in started:
        s.signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(s.alive for s, _ in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    for s, tag in started:
        s.kill()
    for s, tag in started:
        out = s.output()
        assert API_SECRET not in out and ASSEMBLYAI_KEY not in out, "a secret is in the serve log"
        assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.", out), "a token is in the serve log"
        assert "Traceback" not in out, f"a traceback in the log of {tag}"
    deadline = time.monotonic() + 15
    while any(children_of(tag) for _, tag in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(children_of(tag) for _, tag in started), "a call process outlived its serve process"


def children_of(tag: str) -> list[int]:
    """Live call processes (``worker.py job`` or the fake) of the serve process tagged ``tag``:
    found by the tag they inherited, so they are found after the serve process is gone too."""
    pids = []
    marker = f"{TAG_VARIABLE}={tag}".encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().split(") ")[1][0]
            if state == "Z" or not (b"job" in argv or str(FAKE_CHILD).encode() in argv):
                continue
            if marker in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


async def join(server: LiveKitServer, room: str, identity: str = "user", publish: bool = False,
               room_config=None) -> RoomUser:
    return await RoomUser(server, room, identity, room_config=room_config).join(publish=publish)


async def agent_of(user: RoomUser, timeout: float = JOIN_BOUND_S):
    await wait_until(lambda: AGENT in user.room.remote_participants, timeout, f"the agent in {user.room_name}")
    return user.room.remote_participants[AGENT]


async def served_by(user: RoomUser, workers: list[ServeProcess], timeout: float = JOIN_BOUND_S) -> ServeProcess:
    """The agent is in the user's room; which serve process took the job."""
    await agent_of(user, timeout)
    takers = [w for w in workers if w.accepted(user.room_name)]
    assert len(takers) == 1, f"room {user.room_name} accepted by {len(takers)} workers"
    return takers[0]


def rescued_by(serve: ServeProcess, room: str) -> bool:
    return f"rescuing room {room} " in serve.output()


def agents_in(user: RoomUser) -> int:
    from livekit import rtc

    return sum(1 for p in user.room.remote_participants.values()
               if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)


async def leave_all(users: list[RoomUser]) -> None:
    await asyncio.gather(*(u.leave() for u in users), return_exceptions=True)


def present(timeline: list[tuple[float, float]], since: float, until: float, level: float) -> float:
    """Fraction of 20 ms windows in [since, until] where the tone is above ``level``."""
    sel = [a for t, a in timeline if since <= t <= until]
    return sum(a > level for a in sel) / max(1, len(sel))


def session_of(standin: StandIn, n: int):
    """The stand-in's n-th session that is a call (not a start-up key check: those end at once)."""
    calls = [s for s in standin.sessions if s.audio_arrivals]
    return calls[n] if len(calls) > n else None


# --- a real call in a dispatched room --------------------------------------------------------


async def test_automatic_dispatch_a_real_call_in_a_room_that_did_not_exist(livekit_server, standin, serves,
                                                                           room_name, ambient_wav):
    """The Playground's default flow: a user joins a new room; the agent comes within a bound,
    the user hears the greeting and the bed, a turn is answered, captions and the agent's
    state arrive. The key was proven once, by the serve process. Then SIGTERM twice (stop
    now): the call is handed over (it leaves, its session left resumable for the host that
    takes it on: test_fleet.py), the serve process exits 0."""
    from livekit import rtc

    a = serves("auto", standin=standin, AMBIENT_SOUND=str(ambient_wav), STARTUP_CHECK="1")
    await a.registered()
    assert a.output().count("Voice Agent API key verified") == 1 and len(standin.sessions) == 1
    user = RoomUser(livekit_server, room_name)
    t0 = time.monotonic()
    await user.join()  # the room does not exist until this join
    try:
        p = await agent_of(user)
        joined_s = time.monotonic() - t0
        assert p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and p.name == "Voice Agent"
        assert p.attributes.get("lk.agent_name") == ""  # set by the server on the job's token
        heard = await user.wait_heard(AGENT, 15)
        heard_s = time.monotonic() - t0
        assert user.track_sources[AGENT] == rtc.TrackSource.SOURCE_MICROPHONE
        await standin.wait_for(lambda: session_of(standin, 0) is not None, 10, "the call's session")
        session = session_of(standin, 0)
        await standin.wait_for(lambda: session.replies and session.replies[0].done_at, 10, "the greeting")
        greeting = session.replies[0]
        await asyncio.sleep(0.5)
        assert present(heard.timeline(GREETING_HZ), greeting.first_audio_at + 0.3, greeting.first_audio_at + 0.8,
                       0.1) > 0.9, "the greeting was not heard"
        # A turn: the user speaks, the agent answers, the user hears it.
        user.say(tone(USER_HZ, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: len(session.replies) >= 2 and session.replies[1].done_at, 15, "the reply")
        reply = session.replies[1]
        await asyncio.sleep(0.5)
        assert present(heard.timeline(REPLY_HZ), reply.first_audio_at + 0.3, reply.first_audio_at + 1.0, 0.1) > 0.9
        # The bed fades in over its first 1.5 s, from the call's start: the greeting now starts
        # then too (the session opens as soon as the user is in the room), so look after it.
        bed_in = mixer.MixerSettings().ambient_fade_in_ms / 1000
        assert present(heard.timeline(AMBIENT_HZ), greeting.first_audio_at + bed_in, time.monotonic() - 0.3,
                       0.03) > 0.95, \
            "the bed was not heard through the call"
        states = user.state_sequence()
        assert "listening" in states and "speaking" in states and "thinking" in states, states
        await wait_until(lambda: any(c["sender"] == AGENT for c in user.captions)
                         and any(c["sender"] == "user" for c in user.captions), 10, "captions of both sides")
        print(f"room created -> agent in the room {joined_s:.2f} s, first audio {heard_s:.2f} s")
        assert len(standin.sessions) == 2, "the call processes must not prove the key again"
        await a.wait_for_output(r"job AJ_\w+: the call is in room", 5)
        # Stop now: the call is handed over, the job is reported as a success.
        a.signal(signal.SIGTERM)
        await a.wait_for_output("draining", 5)
        await asyncio.sleep(dispatch.URGENT_SIGNAL_AFTER_S)  # a second signal, not the first delivered twice
        a.signal(signal.SIGTERM)
        assert await a.wait_exit(15) == 0
        await standin.wait_for(lambda: session.dropped_at is not None, 5, "the call's socket to close")
        assert not session.ended, "the call ended its session instead of handing it over"
        await wait_until(lambda: AGENT not in user.room.remote_participants, 5, "the agent to leave")
        assert re.search(r"job AJ_\w+ for room \S+ ended", a.output())
        assert not re.search(r"job AJ_\w+ for room \S+ failed", a.output())
        assert not children_of("auto")
    finally:
        await user.leave()


TOOLS = textwrap.dedent('''
    import json


    async def customer_record(ctx) -> dict:
        """Look up the caller's record."""
        return {"metadata": ctx.job_metadata, "room": ctx.room_name}
''')


async def test_explicit_dispatch_by_token_and_by_api_metadata_reaches_a_tool(livekit_server, standin, serves,
                                                                             room_name, tmp_path):
    """AGENT_NAME set: only rooms that ask for that agent get it, through the user token's room
    configuration or the AgentDispatch API; a worker with another name gets nothing; the
    dispatch's metadata reaches the call's tools (ToolContext.job_metadata)."""
    from livekit import api

    module = tmp_path / "crm_tools.py"
    module.write_text(TOOLS)
    common = {"TOOLS_MODULE": str(module), "AMBIENT_SOUND": "none", "GREETING": ""}
    alpha = serves("alpha", standin=standin, AGENT_NAME="alpha", **common)
    beta = serves("beta", standin=standin, AGENT_NAME="beta", **common)
    await asyncio.gather(alpha.registered(), beta.registered())
    meta = json.dumps({"customer": "c-42"})
    cfg = api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name="alpha", metadata=meta)])
    u1 = await join(livekit_server, f"{room_name}-1", publish=True, room_config=cfg)
    users = [u1]
    lk = api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET)
    try:
        assert await served_by(u1, [alpha, beta]) is alpha
        assert u1.room.remote_participants[AGENT].attributes["lk.agent_name"] == "alpha"
        await standin.wait_for(lambda: session_of(standin, 0) is not None, 15, "the call's session")
        result = await standin.call_tool("customer_record", {}, session=session_of(standin, 0))
        assert json.loads(result["result"]) == {"metadata": meta, "room": u1.room_name}
        # A room nobody asks an agent for: automatic dispatch, and no worker without a name.
        u2 = await join(livekit_server, f"{room_name}-2", publish=True)
        users.append(u2)
        await asyncio.sleep(3.0)
        assert AGENT not in u2.room.remote_participants and alpha.accepted() + beta.accepted() == 1
        # The API brings beta, with its metadata.
        d = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="beta", room=u2.room_name, metadata="from the API"))
        assert await served_by(u2, [alpha, beta]) is beta
        await standin.wait_for(lambda: session_of(standin, 1) is not None, 15, "the second call's session")
        result = await standin.call_tool("customer_record", {}, session=session_of(standin, 1))
        assert json.loads(result["result"])["metadata"] == "from the API"
        await asyncio.sleep(0.5)
        assert agents_in(u1) == 1 and agents_in(u2) == 1
        assert alpha.accepted() == 1 and beta.accepted() == 1
        # Deleting the dispatch ends its job: the call ends cleanly, the worker stays.
        await lk.agent_dispatch.delete_dispatch(d.id, u2.room_name)
        await wait_until(lambda: AGENT not in u2.room.remote_participants, 10, "the agent to leave")
        await beta.wait_for_output(r"terminated by the server: ending the call", 5)
        await beta.wait_for_output(r"job AJ_\w+ for room \S+ ended", 10)
        await standin.wait_for(lambda: session_of(standin, 1).ended, 5, "session.end")
        assert beta.alive and alpha.alive
    finally:
        await lk.aclose()
        await leave_all(users)


# --- a fleet -------------------------------------------------------------------------------------


async def test_two_workers_six_rooms_one_agent_each_and_both_get_calls(livekit_server, standin, serves, room_name):
    a, b = serves("fleet-a", standin=standin), serves("fleet-b", standin=standin)
    await asyncio.gather(a.registered(), b.registered())
    users = []
    try:
        for i in range(6):
            users.append(await join(livekit_server, f"{room_name}-{i}"))
        takers = [await served_by(u, [a, b], 30) for u in users]
        await asyncio.sleep(2.0)  # a second agent would have arrived by now
        assert [agents_in(u) for u in users] == [1] * 6
        # MAX_CALLS=4 each: six rooms cannot all go to one worker.
        assert {t.workdir.name for t in takers} == {"fleet-a", "fleet-b"}
        assert a.accepted() + b.accepted() == 6
        assert len(children_of("fleet-a")) + len(children_of("fleet-b")) == 6
        print("rooms per worker:", {"a": sum(t is a for t in takers), "b": sum(t is b for t in takers)})
    finally:
        await leave_all(users)


async def test_sigkill_of_a_worker_hands_its_calls_over_and_new_rooms_go_to_the_survivor(
        livekit_server, standin, serves, room_name):
    victim = serves("victim", standin=standin)
    await victim.registered()
    u1 = await join(livekit_server, f"{room_name}-1", publish=True)
    users = [u1]
    try:
        assert await served_by(u1, [victim]) is victim
        await u1.wait_heard(AGENT)
        await standin.wait_for(lambda: session_of(standin, 0) is not None, 15, "the call's session")
        survivor = serves("survivor", standin=standin)
        await survivor.registered()
        assert children_of("victim")
        victim.kill()  # SIGKILL: no clean-up of its own
        t0 = time.monotonic()
        await wait_until(lambda: not children_of("victim"), 10, "the call process to exit")
        print(f"SIGKILL -> the orphaned call exited after {time.monotonic() - t0:.2f} s")
        # Handed over (the kernel's hand-over signal on its parent's death): its session left
        # for the survivor, which takes the room back (test_fleet.py has the whole story).
        assert not session_of(standin, 0).ended, "the orphaned call ended its session"
        await wait_until(lambda: rescued_by(survivor, f"{room_name}-1"), 10, "the survivor to take the call over")
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        assert await served_by(u2, [victim, survivor]) is survivor
    finally:
        await leave_all(users)


async def test_sigterm_drains_the_call_goes_on_new_rooms_go_elsewhere_exit_0(livekit_server, standin, serves,
                                                                              room_name, ambient_wav):
    drained = serves("drained", standin=standin, HEALTH_PORT=str(free_port()), AMBIENT_SOUND=str(ambient_wav))
    await drained.registered()
    port = int(drained.env["HEALTH_PORT"])
    u1 = await join(livekit_server, f"{room_name}-1", publish=True)
    users = [u1]
    try:
        assert await served_by(u1, [drained]) is drained
        heard = await u1.wait_heard(AGENT)
        other = serves("other", standin=standin)
        await other.registered()
        assert http_get(port, "/readyz")[0] == 200
        drained.signal(signal.SIGTERM)
        t_term = time.monotonic()
        await drained.wait_for_output("draining: no new calls", 5)
        assert http_get(port, "/readyz")[0] == 503 and http_get(port, "/healthz")[0] == 200
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        assert await served_by(u2, [drained, other]) is other
        # The call in progress goes on: still there, the bed still playing, a turn answered.
        await standin.wait_for(lambda: session_of(standin, 0) is not None, 10, "the call's session")
        session = session_of(standin, 0)
        turns = len(session.replies)
        u1.say(tone(USER_HZ, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: len(session.replies) > turns and session.replies[-1].done_at, 15, "a reply")
        assert drained.alive and AGENT in u1.room.remote_participants
        assert present(heard.timeline(AMBIENT_HZ), t_term + 0.5, time.monotonic() - 0.3, 0.03) > 0.95
        # The server answers our pings (WorkerPing -> WorkerPong), also while we drain.
        await wait_until(lambda: json.loads(http_get(port, "/status")[1])["rtt_ms"] is not None, 8, "a pong")
        # It ends when its user leaves (IDLE_TIMEOUT_S=2); then the drained worker exits 0.
        await u1.leave()
        t_left = time.monotonic()
        assert await drained.wait_exit(20) == 0
        assert time.monotonic() - t_left > 1.5  # exited after the call ended, not at SIGTERM
        assert session.ended and not children_of("drained")
        assert re.search(r"job AJ_\w+ for room \S+ ended", drained.output())
        assert other.accepted() == 1
    finally:
        await leave_all(users)


async def test_max_calls_one_second_room_goes_to_another_worker_or_waits(livekit_server, standin, serves, room_name):
    # The server's placement alone (RESCUE_INTERVAL_S=0): test_fleet.py has the waiting room served later.
    one = serves("one", standin=standin, MAX_CALLS="1", RESCUE_INTERVAL_S="0")
    await one.registered()
    u1 = await join(livekit_server, f"{room_name}-1")
    users = [u1]
    try:
        assert await served_by(u1, [one]) is one
        await one.wait_for_output("not taking calls: full: 1 of MAX_CALLS=1", 5)
        # Full, and nobody else: v1.13.5 leaves the room without an agent (no retry of its own).
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        await asyncio.sleep(4.0)
        assert AGENT not in u2.room.remote_participants and one.alive and one.accepted() == 1
        two = serves("two", standin=standin, MAX_CALLS="1", RESCUE_INTERVAL_S="0")
        await two.registered()
        u3 = await join(livekit_server, f"{room_name}-3")
        users.append(u3)
        assert await served_by(u3, [one, two]) is two
        assert one.alive and two.alive and AGENT in u1.room.remote_participants
    finally:
        await leave_all(users)


# --- the server restarts -------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path):
    binary = find_server_binary()
    assert binary, "livekit-server not found: run ./scripts/test"
    s = LiveKitServer(binary, tmp_path / "own-livekit")
    s.start()
    yield s
    s.stop()


async def test_livekit_server_restarts_the_worker_registers_again_and_no_room_gets_two_agents(
        own_server, standin, serves, room_name):
    """A clean restart (SIGTERM): the call is told the server is shutting down and ends; its
    process does not rejoin. A crash (SIGKILL): the SDK of the call and of the user resume in
    the recreated room; our code never rejoins, so the room never holds two agents with the
    same identity kicking each other out. Either way the worker registers again and serves."""
    w = serves("restart", server=own_server, standin=standin)
    await w.registered()
    u1 = await join(own_server, f"{room_name}-1", publish=True)
    try:
        assert await served_by(u1, [w]) is w
        await u1.wait_heard(AGENT)
    finally:
        await u1.leave()
    u2 = await join(own_server, f"{room_name}-2", publish=True)
    assert await served_by(u2, [w]) is w
    await u2.wait_heard(AGENT)
    own_server.stop()  # clean: every participant is told, then the server exits
    await u2.leave()
    await w.wait_for_output(r"out of room \S+ \(server_shutdown\): the call is over", 10)
    await wait_until(lambda: not children_of("restart"), 10, "the call process to exit")
    own_server.start()
    await w.registered(times=2, timeout=30)
    u3 = await join(own_server, f"{room_name}-3", publish=True)
    try:
        assert await served_by(u3, [w]) is w
        await u3.wait_heard(AGENT)
        heard = u3.agent()
        own_server.proc.kill()  # a crash: nobody is told
        own_server.proc.wait()
        t_crash = time.monotonic()
        own_server.start()
        await w.registered(times=3, timeout=30)
        # The SDKs of the call and of the user come back into the recreated room (if the worker
        # registered before that, the room's new dispatch sends a fresh agent, which takes over
        # the identity once: the old call ends and never rejoins). One agent, and it is heard.
        await wait_until(lambda: u3.room.isconnected() and AGENT in u3.room.remote_participants, 20,
                         "the user and an agent back in the room")
        t_back = time.monotonic()
        for _ in range(10):
            assert agents_in(u3) <= 1
            await asyncio.sleep(0.5)
        assert agents_in(u3) == 1 and len(children_of("restart")) == 1
        assert any(t > max(t_back, t_crash + 1) for t, _ in heard.chunks), "the agent is not heard after the crash"
        assert w.output().count("duplicate identity") <= 1 and "rejoining" not in w.output()
        u4 = await join(own_server, f"{room_name}-4")
        try:
            assert await served_by(u4, [w]) is w
        finally:
            await u4.leave()
        assert w.alive
    finally:
        await u3.leave()


# --- the dispatcher alone, with the fake call process ----------------------------------------------


async def test_a_crashed_call_is_reported_failed_and_the_worker_carries_on(livekit_server, serves, room_name):
    from livekit import api

    alpha = serves("crash", AGENT_NAME="crashy")
    await alpha.registered()
    user = await join(livekit_server, room_name)
    lk = api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET)
    try:
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="crashy", room=room_name, metadata=json.dumps({"fake": {"crash_after_s": 0.5}})))
        await agent_of(user)
        await alpha.wait_for_output(r"job AJ_\w+ for room \S+ failed: call process exited with code 1", 15)
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="crashy", room=room_name))
        await alpha.wait_for_output(r"(?s)failed: call process exited with code 1.*the call is in room", 20)
        assert alpha.alive
    finally:
        await lk.aclose()
        await user.leave()


async def test_a_call_failing_as_every_call_would_takes_the_host_out_of_the_fleet(livekit_server, serves, room_name):
    """Exit 2 (configuration), 3 or 4 (key or session configuration rejected) would repeat
    for every call: the worker stops taking calls, lets the others finish, exits with it."""
    from livekit import api

    w = serves("hopeless", AGENT_NAME="hopeless")
    await w.registered()
    users = [await join(livekit_server, f"{room_name}-{i}") for i in range(3)]
    lk = api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET)
    try:
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="hopeless", room=users[0].room_name))
        assert await served_by(users[0], [w]) is w
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="hopeless", room=users[1].room_name,
            metadata=json.dumps({"fake": {"crash_after_s": 0.2, "crash_code": 2}})))
        await w.wait_for_output(r"a call process exited with 2 \(a configuration error\)", 15)
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="hopeless", room=users[2].room_name))
        await asyncio.sleep(3.0)
        assert AGENT not in users[2].room.remote_participants
        assert w.alive and AGENT in users[0].room.remote_participants  # the healthy call goes on
        await users[0].leave()
        assert await w.wait_exit(15) == 2
    finally:
        await lk.aclose()
        await leave_all(users)


async def test_drain_timeout_hands_calls_over_cleanly(livekit_server, serves, room_name):
    w = serves("short-drain", DRAIN_TIMEOUT_S="2")
    await w.registered()
    user = await join(livekit_server, room_name)
    try:
        assert await served_by(user, [w]) is w
        w.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert await w.wait_exit(15) == 0
        took = time.monotonic() - t0
        assert 2.0 <= took < 2.0 + 5 + 3, took
        assert "drain timeout (2 s): handing 1 calls still in progress over" in w.output()
        assert "ending the call: hand-over" in w.output()  # left the clean way, not killed
        await wait_until(lambda: AGENT not in user.room.remote_participants, 5, "the agent to leave")
    finally:
        await user.leave()


async def test_sigterm_delivered_twice_at_once_drains_and_does_not_end_the_calls(livekit_server, serves, room_name):
    """`timeout`, cron wrappers and `kill PID; kill -- -PGID` deliver SIGTERM twice within
    microseconds: one stop, so the host drains; the call in progress goes on (a second
    signal, later, would end it)."""
    w = serves("twice")
    await w.registered()
    user = await join(livekit_server, room_name)
    try:
        assert await served_by(user, [w]) is w
        w.signal(signal.SIGTERM)
        time.sleep(0.05)  # two deliveries, as `kill PID; kill -- -PGID` makes them
        w.signal(signal.SIGTERM)
        await w.wait_for_output("draining: no new calls", 5)
        await asyncio.sleep(2.0)
        assert "again: handing" not in w.output(), "one SIGTERM delivered twice handed the calls over instead of draining"
        assert w.alive and AGENT in user.room.remote_participants, "the call did not go on while draining"
    finally:
        await user.leave()


async def test_a_room_named_with_terminal_escapes_and_a_newline_forges_no_log_line(livekit_server, standin, serves):
    """Under automatic dispatch anyone who may create a room names it: a name with ANSI escapes
    and a newline must neither colour the operator's terminal nor start a log line of its own,
    in the serve process's log or its call process's (the same stream)."""
    evil = "\x1b[31mEVIL\x1b[0m\nFAKE-LOG-LINE"
    w = serves("evil", standin=standin, AMBIENT_SOUND="none", LOG_LEVEL="info")
    await w.registered()
    user = await join(livekit_server, evil, publish=True)
    try:
        await agent_of(user)
        await w.wait_for_output(r"job AJ_\w+: the call is in room", 15)
    finally:
        await user.leave()
    out = w.output()
    assert "EVIL" in out, "the room name is not in the log at all"
    assert "\x1b" not in out, "a raw escape character from a room name reached the log (it colours the terminal)"
    forged = [line for line in out.splitlines() if line.startswith("FAKE-LOG-LINE")]
    assert not forged, f"a room name forged log lines: {forged}"


async def test_cpu_threshold_refuses_when_the_host_is_busy(livekit_server, serves, room_name):
    # A threshold no host stays under (the test host is busy anyway): every job is refused,
    # with the reason in the log, and the server knows we are full.
    w = serves("busy", LOAD_THRESHOLD="0.05")
    await w.registered()
    burn = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        await w.wait_for_output(r"not taking calls: host CPU", 10)
        user = await join(livekit_server, room_name)
        try:
            await asyncio.sleep(3.0)
            assert AGENT not in user.room.remote_participants and w.accepted() == 0
        finally:
            await user.leave()
    finally:
        burn.kill()
        burn.wait()


def drop_agent_connection(pid: int, server_port: int) -> int:
    """Kill the serve process's /agent TCP connection (only that one: the calls' own
    signalling connections are other processes') with ``ss -K``. Returns its local port."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local_port, remote_port, inode = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[9]
        if remote_port == server_port and inode in inodes:
            subprocess.run(["ss", "-K", "src", "127.0.0.1", "sport", "=", f":{local_port}", "dst", "127.0.0.1",
                            "dport", "=", f":{server_port}"], check=True, capture_output=True, timeout=10)
            return local_port
    raise AssertionError("the serve process has no connection to the server")


async def test_a_dropped_agent_connection_calls_go_on_it_registers_again_and_serves(livekit_server, serves, room_name):
    if not shutil.which("ss"):
        pytest.skip("ss (iproute2) is needed to cut one TCP connection")
    w = serves("blip")
    await w.registered()
    u1 = await join(livekit_server, f"{room_name}-1", publish=True)
    users = [u1]
    try:
        assert await served_by(u1, [w]) is w
        heard = await u1.wait_heard(AGENT)
        child = children_of("blip")
        t_drop = time.monotonic()
        drop_agent_connection(w.proc.pid, livekit_server.port)
        await w.wait_for_output(r"lost the connection to LiveKit; 1 calls go on", 10)
        await w.registered(times=2, timeout=20)
        assert "registered again with LiveKit as worker" in w.output() and "(1 calls in progress)" in w.output()
        # The call never noticed: same process, still in the room, still playing.
        await asyncio.sleep(1.0)
        assert children_of("blip") == child and AGENT in u1.room.remote_participants
        assert max(a for t, a in heard.timeline(440) if t > t_drop + 0.5) > 0.2
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        assert await served_by(u2, [w]) is w
        assert w.alive
    finally:
        await leave_all(users)


# --- operations ----------------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_sd_notify_ready_once_registered_watchdog_health_and_a_quick_idle_exit(livekit_server, serves, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    messages: list[tuple[float, str]] = []

    def poll() -> list[str]:
        while True:
            try:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except BlockingIOError:
                return [m for _, m in messages]

    port = free_port()
    w = serves("notify", NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", HEALTH_PORT=str(port), LOG_FORMAT="json")
    try:
        await wait_until(lambda: any(m.startswith("READY=1") for m in poll()), 20, "READY=1")
        assert "registered with LiveKit" in w.output(), "READY=1 before the registration"
        await asyncio.sleep(1.6)
        assert sum(1 for m in poll() if m == "WATCHDOG=1") >= 2
        assert http_get(port, "/healthz") == (200, "ok\n")
        assert http_get(port, "/readyz")[0] == 200
        status = json.loads(http_get(port, "/status")[1])
        assert status["registered"] and status["worker_id"].startswith("AW_") and status["max_calls"] == 4
        w.signal(signal.SIGTERM)
        assert await w.wait_exit(5) == 0  # no call in progress: nothing to wait for
        assert any(m.startswith("STOPPING=1") for m in poll())
        for line in w.output().splitlines():
            rec = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= rec.keys()
    finally:
        sock.close()


async def test_check_probe_against_the_real_server(livekit_server, tmp_path):
    ok, line = await dispatch.probe_registration(livekit_server.url, API_KEY, API_SECRET)
    assert ok and "agent worker" in line and "AW_" in line, line
    ok, line = await dispatch.probe_registration(livekit_server.url, API_KEY, "not-the-secret-" + "z" * 20)
    assert not ok and "rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET" in line and "not-the-secret" not in line
    ok, line = await dispatch.probe_registration(f"ws://127.0.0.1:{free_port()}", API_KEY, API_SECRET, timeout_s=3)
    assert not ok and "cannot reach" in line


async def test_serve_refuses_to_start_with_a_rejected_key_or_a_bad_setting(livekit_server, standin, tmp_path):
    """Whatever would fail every call fails the serve process at start, before it registers:
    a LiveKit key the server rejects (6), an API key the Voice Agent API rejects (3, with
    STARTUP_CHECK), a sound that does not decode and a tools module that does not load (2)."""
    bad_sound = tmp_path / "bed.wav"
    bad_sound.write_bytes(b"not audio")
    cases = [({"LIVEKIT_API_SECRET": "not-the-secret-" + "z" * 20}, 6, "rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET"),
             ({"ASSEMBLYAI_API_KEY": "wrong-key-" + "q" * 20, "STARTUP_CHECK": "1"}, 3, "ASSEMBLYAI_API_KEY"),
             ({"AMBIENT_SOUND": str(bad_sound)}, 2, "AMBIENT_SOUND"),
             ({"TOOLS_MODULE": str(tmp_path / "missing_tools.py")}, 2, "TOOLS_MODULE"),
             ({"JOB_STOP_TIMEOUT_S": "6"}, 2, "JOB_STOP_TIMEOUT_S")]
    procs = [ServeProcess(serve_env(livekit_server, f"bad{i}", standin.url, **env), tmp_path / f"bad{i}").start()
             for i, (env, _, _) in enumerate(cases)]
    try:
        for w, (env, code, text) in zip(procs, cases):
            assert await w.wait_exit(20) == code, w.output()
            out = w.output()
            assert text in out and "registered with LiveKit" not in out, out
            assert "not-the-secret" not in out and "wrong-key" not in out and "Traceback" not in out
    finally:
        for w in procs:
            w.kill()


async def test_serve_failing_for_a_local_reason_opens_no_billed_session(livekit_server, standin, tmp_path):
    """A taken HEALTH_PORT or an address that is not this machine's: one line, exit 2 (which
    systemd does not restart), found before the start-up key check opens a billed session."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [({"HEALTH_PORT": str(taken.getsockname()[1])}, f"HEALTH_PORT {taken.getsockname()[1]} on HEALTH_HOST"),
             ({"HEALTH_PORT": str(free_port()), "HEALTH_HOST": "999.1.1.1"}, "HEALTH_HOST 999.1.1.1")]
    try:
        for i, (env, text) in enumerate(cases):
            w = ServeProcess(serve_env(livekit_server, f"local{i}", standin.url, STARTUP_CHECK="1", **env),
                             tmp_path / f"local{i}").start()
            try:
                code = await w.wait_exit(20)
            finally:
                w.kill()
            out = w.output()
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert code == 2 and "Traceback" not in out, f"exit {code}, not one line and exit 2:\n{out}"
            assert len(errors) == 1 and text in errors[0], out
            assert "registered with LiveKit" not in out
        assert not standin.sessions, (f"{len(standin.sessions)} billed Voice Agent sessions opened by starts that then "
                                      "failed for a local reason")
    finally:
        taken.close()


async def test_a_restarted_serve_does_not_prove_the_key_again(livekit_server, standin, tmp_path):
    """A service manager restarting serve (LiveKit unreachable, a crash: systemd restarts it
    every few seconds for ever) must not open a billed session per restart: a successful key
    check is remembered for a while (a hash in the state folder, never the key)."""
    env = serve_env(livekit_server, "again", standin.url, STARTUP_CHECK="1", STATE_DIR=str(tmp_path / "state"))
    for attempt in range(2):
        w = ServeProcess(env, tmp_path / f"again{attempt}").start()
        try:
            await w.registered()
            w.signal(signal.SIGTERM)
            assert await w.wait_exit(10) == 0
        finally:
            w.kill()
    assert len(standin.sessions) == 1, f"{len(standin.sessions)} billed key checks for two starts within minutes"
    assert "not checked again" in w.output()
    stamps = list((tmp_path / "state").glob("key-check-*"))
    assert len(stamps) == 1 and ASSEMBLYAI_KEY not in stamps[0].read_text() + stamps[0].name


async def test_job_mode_refuses_to_run_without_a_job(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "worker.py"), "job"], stdin=subprocess.DEVNULL,
                       env={"PATH": os.environ.get("PATH", "")}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "started by `python worker.py serve`" in r.stderr, r.stderr
