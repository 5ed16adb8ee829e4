"""Agent dispatch against the real livekit-server v1.13.5: ``python dispatch.py`` (the serve
process) registers as an agent worker and runs ``tests/fake_agent_child.py`` per job (a
tone-playing stand-in for one call; phase 2 runs the real worker). Users are Python-SDK
participants who create rooms by joining them."""

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
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dispatch
from harness import (API_KEY, API_SECRET, REPO, LiveKitServer, RoomUser, WorkerProcess, find_server_binary, free_port,
                     wait_until)

pytestmark = pytest.mark.e2e

FAKE_CHILD = REPO / "tests" / "fake_agent_child.py"
AGENT = "voice-agent"
JOIN_BOUND_S = 15.0  # room created -> the agent in it (typically 1-2 s; a loaded 2-core host)


class ServeProcess(WorkerProcess):
    """``python dispatch.py`` as a user (or systemd) starts it: configured through env vars."""

    def start(self, *args: str) -> "ServeProcess":
        WorkerProcess.started.append(self)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
        out = open(self.output_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "dispatch.py"), *args], env={**base, **self.env},
                                     cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    @property
    def output_path(self) -> Path:
        return self.workdir / "serve.log"

    async def registered(self, times: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(r"registered (with|again with) LiveKit", self.output())) < times:
            assert self.alive, f"serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"not registered {times}x:\n{self.output()[-4000:]}"
            await asyncio.sleep(0.05)

    def accepted(self) -> int:
        return len(re.findall(r"accepted job AJ_", self.output()))


def serve_env(server: LiveKitServer, tag: str, tone: float = 440.0, **extra: str) -> dict[str, str]:
    env = {
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "MAX_CALLS": "4",
        # The test host is shared and busy: only MAX_CALLS limits here (the CPU gate has a test of its own).
        "LOAD_THRESHOLD": "1",
        "DRAIN_TIMEOUT_S": "60",
        "JOB_STOP_TIMEOUT_S": "5",
        "LOG_LEVEL": "debug",
        "SERVE_JOB_COMMAND": json.dumps([sys.executable, str(FAKE_CHILD), "--tag", tag, "--tone", str(tone)]),
    }
    env.update(extra)
    return env


@pytest.fixture
def serves(livekit_server, tmp_path):
    """Start serve processes; every one is killed (and its children checked gone) at the end."""
    started: list[tuple[ServeProcess, str]] = []

    def start(tag: str, server: LiveKitServer | None = None, **env: str) -> ServeProcess:
        s = ServeProcess(serve_env(server or livekit_server, tag, **env), tmp_path / tag).start()
        started.append((s, tag))
        return s

    yield start
    for s, tag in started:
        s.signal(signal.SIGTERM)
        s.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(s.alive for s, _ in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    for s, tag in started:
        s.kill()
    for s, tag in started:
        out = s.output()
        assert API_SECRET not in out, "the API secret is in the serve log"
        assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.", out), "a token is in the serve log"
    deadline = time.monotonic() + 10
    while any(children_of(tag) for _, tag in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(children_of(tag) for _, tag in started), "a call process outlived its serve process"


def children_of(tag: str) -> list[int]:
    """Live fake-agent processes started with ``--tag tag``."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if state != "Z" and str(FAKE_CHILD).encode() in argv and tag.encode() in argv:
            pids.append(int(p.name))
    return pids


async def join(server: LiveKitServer, room: str, identity: str = "user", publish: bool = False,
               room_config=None) -> RoomUser:
    return await RoomUser(server, room, identity, room_config=room_config).join(publish=publish)


async def agent_of(user: RoomUser, timeout: float = JOIN_BOUND_S):
    await wait_until(lambda: AGENT in user.room.remote_participants, timeout, f"the agent in {user.room_name}")
    return user.room.remote_participants[AGENT]


async def served_by(user: RoomUser, timeout: float = JOIN_BOUND_S) -> str:
    p = await agent_of(user, timeout)
    await wait_until(lambda: "fake.tag" in p.attributes, 10, "the agent's attributes")
    return p.attributes["fake.tag"]


def agents_in(user: RoomUser) -> int:
    from livekit import rtc

    return sum(1 for p in user.room.remote_participants.values()
               if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)


async def leave_all(users: list[RoomUser]) -> None:
    await asyncio.gather(*(u.leave() for u in users), return_exceptions=True)


# --- dispatch ------------------------------------------------------------------------------------


async def test_automatic_dispatch_brings_the_agent_to_a_new_room(livekit_server, serves, room_name):
    from livekit import rtc

    a = serves("auto-a", tone="600")
    await a.registered()
    user = RoomUser(livekit_server, room_name)
    t0 = time.monotonic()
    await user.join(publish=True)  # the room does not exist until this join
    try:
        p = await agent_of(user)
        joined_s = time.monotonic() - t0
        assert p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and p.name == "Voice Agent"
        await wait_until(lambda: p.attributes.get("lk.agent.state") == "listening", 10, "listening")
        assert p.attributes.get("lk.agent_name") == ""  # set by the server on the job's token
        heard = await user.wait_heard(AGENT, 10)
        await asyncio.sleep(0.5)
        assert max(a for _, a in heard.timeline(600)) > 0.2, "the agent's tone is not heard"
        assert user.track_sources[AGENT] == rtc.TrackSource.SOURCE_MICROPHONE
        print(f"room created -> agent joined {joined_s:.2f} s")
        await a.wait_for_output(r"job AJ_\w+: the call is in room", 5)
    finally:
        await user.leave()
    # The user left: the call ends (the stand-in's idle timeout), the job is reported ended.
    await a.wait_for_output(r"job AJ_\w+ for room \S+ ended", 15)
    assert a.alive and not children_of("auto-a")


async def test_explicit_dispatch_by_the_user_tokens_room_configuration(livekit_server, serves, room_name):
    from livekit import api

    alpha = serves("alpha", AGENT_NAME="alpha")
    beta = serves("beta", AGENT_NAME="beta")
    await asyncio.gather(alpha.registered(), beta.registered())
    meta = json.dumps({"customer": "c-42"})
    cfg = api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name="alpha", metadata=meta)])
    user = await join(livekit_server, room_name, room_config=cfg)
    try:
        assert await served_by(user) == "alpha"
        p = user.room.remote_participants[AGENT]
        assert p.attributes["lk.agent_name"] == "alpha"
        assert p.attributes["fake.metadata"] == meta, "the job's metadata did not reach the call"
        await asyncio.sleep(1.0)
        assert agents_in(user) == 1
        assert beta.accepted() == 0 and "availability" not in beta.output().lower()
    finally:
        await user.leave()


async def test_named_workers_get_no_automatic_rooms_and_the_dispatch_api_brings_one(livekit_server, serves, room_name):
    from livekit import api

    alpha = serves("alpha", AGENT_NAME="alpha")
    await alpha.registered()
    user = await join(livekit_server, room_name)  # automatic dispatch: nobody registered without a name
    lk = api.LiveKitAPI(livekit_server.http_url, API_KEY, API_SECRET)
    try:
        await asyncio.sleep(3.0)
        assert AGENT not in user.room.remote_participants and alpha.accepted() == 0
        d = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="alpha", room=room_name, metadata="from the API"))
        assert await served_by(user) == "alpha"
        assert user.room.remote_participants[AGENT].attributes["fake.metadata"] == "from the API"
        # Deleting the dispatch terminates the job: the call ends cleanly, the worker stays.
        await lk.agent_dispatch.delete_dispatch(d.id, room_name)
        await wait_until(lambda: AGENT not in user.room.remote_participants, 10, "the agent to leave")
        await alpha.wait_for_output(r"terminated by the server: ending the call", 5)
        await alpha.wait_for_output(r"job AJ_\w+ for room \S+ ended", 10)
        assert alpha.alive
    finally:
        await lk.aclose()
        await user.leave()


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
        assert await served_by(users[0]) == "hopeless"
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


# --- a fleet -------------------------------------------------------------------------------------


async def test_two_workers_six_rooms_one_agent_each_and_both_get_calls(livekit_server, serves, room_name):
    a, b = serves("fleet-a"), serves("fleet-b")
    await asyncio.gather(a.registered(), b.registered())
    users = []
    try:
        for i in range(6):
            users.append(await join(livekit_server, f"{room_name}-{i}"))
        tags = await asyncio.gather(*(served_by(u, 30) for u in users))
        await asyncio.sleep(2.0)  # a second agent would have arrived by now
        assert [agents_in(u) for u in users] == [1] * 6
        # MAX_CALLS=4 each: six rooms cannot all go to one worker.
        assert set(tags) == {"fleet-a", "fleet-b"}, tags
        assert a.accepted() + b.accepted() == 6
        print("rooms per worker:", {t: tags.count(t) for t in set(tags)})
    finally:
        await leave_all(users)


async def test_sigkill_of_a_worker_ends_its_calls_and_new_rooms_go_to_the_survivor(livekit_server, serves, room_name):
    victim = serves("victim")
    await victim.registered()
    u1 = await join(livekit_server, f"{room_name}-1", publish=True)
    users = [u1]
    try:
        assert await served_by(u1) == "victim"
        survivor = serves("survivor")
        await survivor.registered()
        assert children_of("victim")
        victim.kill()  # SIGKILL: no clean-up of its own
        t0 = time.monotonic()
        await wait_until(lambda: AGENT not in u1.room.remote_participants, 10, "the orphaned call to leave")
        print(f"SIGKILL -> the call left the room after {time.monotonic() - t0:.2f} s")
        await wait_until(lambda: not children_of("victim"), 10, "the call process to exit")
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        assert await served_by(u2) == "survivor"
    finally:
        await leave_all(users)


async def test_sigterm_drains_the_call_goes_on_new_rooms_go_elsewhere_exit_0(livekit_server, serves, room_name):
    drained = serves("drained", HEALTH_PORT=str(free_port()))
    await drained.registered()
    port = int(drained.env["HEALTH_PORT"])
    u1 = await join(livekit_server, f"{room_name}-1", publish=True)
    users = [u1]
    try:
        assert await served_by(u1) == "drained"
        heard = await u1.wait_heard(AGENT)
        other = serves("other")
        await other.registered()
        assert http_get(port, "/readyz")[0] == 200
        drained.signal(signal.SIGTERM)
        t_term = time.monotonic()
        await drained.wait_for_output("draining: no new calls", 5)
        assert http_get(port, "/readyz")[0] == 503 and http_get(port, "/healthz")[0] == 200
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        assert await served_by(u2) == "other"
        await asyncio.sleep(3.0)
        # The server answers our pings (WorkerPing -> WorkerPong), also while we drain.
        await wait_until(lambda: json.loads(http_get(port, "/status")[1])["rtt_ms"] is not None, 8, "a pong")
        # The call in progress went on: still there, still playing.
        assert drained.alive and AGENT in u1.room.remote_participants
        assert max(a for t, a in heard.timeline(440) if t > t_term + 2.5) > 0.2
        # It ends when its user leaves; then the drained worker exits 0.
        await u1.leave()
        t_left = time.monotonic()
        assert await drained.wait_exit(20) == 0
        assert time.monotonic() - t_left > 1.0  # exited after the call ended, not at SIGTERM
        assert not children_of("drained")
        assert other.accepted() == 1
    finally:
        await leave_all(users)


async def test_drain_timeout_ends_calls_cleanly(livekit_server, serves, room_name):
    w = serves("short-drain", DRAIN_TIMEOUT_S="2")
    await w.registered()
    user = await join(livekit_server, room_name)
    try:
        assert await served_by(user) == "short-drain"
        w.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert await w.wait_exit(15) == 0
        took = time.monotonic() - t0
        assert 2.0 <= took < 2.0 + 5 + 3, took
        assert "drain timeout (2 s): ending 1 calls" in w.output()
        assert "ending the call: SIGTERM" in w.output()  # ended the clean way, not killed
        await wait_until(lambda: AGENT not in user.room.remote_participants, 5, "the agent to leave")
    finally:
        await user.leave()


async def test_max_calls_one_second_room_goes_to_another_worker_or_waits(livekit_server, serves, room_name):
    one = serves("one", MAX_CALLS="1")
    await one.registered()
    u1 = await join(livekit_server, f"{room_name}-1")
    users = [u1]
    try:
        assert await served_by(u1) == "one"
        await one.wait_for_output("not taking calls: full: 1 of MAX_CALLS=1", 5)
        # Full, and nobody else: v1.13.5 leaves the room without an agent (no retry later).
        u2 = await join(livekit_server, f"{room_name}-2")
        users.append(u2)
        await asyncio.sleep(4.0)
        assert AGENT not in u2.room.remote_participants and one.alive and one.accepted() == 1
        two = serves("two", MAX_CALLS="1")
        await two.registered()
        u3 = await join(livekit_server, f"{room_name}-3")
        users.append(u3)
        assert await served_by(u3) == "two"
        assert one.alive and two.alive and AGENT in u1.room.remote_participants
    finally:
        await leave_all(users)


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


# --- the server restarts -------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path):
    binary = find_server_binary()
    assert binary, "livekit-server not found: run ./scripts/test"
    s = LiveKitServer(binary, tmp_path / "own-livekit")
    s.start()
    yield s
    s.stop()


async def test_livekit_server_restart_the_worker_registers_again_and_serves(own_server, serves, room_name):
    w = serves("restart", server=own_server)
    await w.registered()
    u1 = await join(own_server, f"{room_name}-1")
    try:
        assert await served_by(u1) == "restart"
    finally:
        await u1.leave()
    own_server.stop()
    await w.wait_for_output(r"(lost the connection to LiveKit|cannot reach LiveKit|connection to LiveKit closed)", 20)
    own_server.start()
    await w.registered(times=2, timeout=30)
    u2 = await join(own_server, f"{room_name}-2")
    try:
        assert await served_by(u2) == "restart"
    finally:
        await u2.leave()
    assert w.alive


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
        assert await served_by(u1) == "blip"
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
        assert await served_by(u2) == "blip"
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
    env = {"PATH": os.environ.get("PATH", ""), "LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": API_KEY,
           "LIVEKIT_API_SECRET": API_SECRET}
    r = subprocess.run([sys.executable, str(REPO / "dispatch.py"), "check"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("\u2713"), r.stdout + r.stderr
    assert API_SECRET not in r.stdout + r.stderr


async def test_a_rejected_key_stops_serve_with_exit_6(livekit_server, tmp_path):
    env = serve_env(livekit_server, "badkey", LIVEKIT_API_SECRET="not-the-secret-" + "z" * 20)
    w = ServeProcess(env, tmp_path / "badkey").start()
    try:
        assert await w.wait_exit(15) == 6
        assert "rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET" in w.output()
        assert "not-the-secret" not in w.output()
    finally:
        w.kill()
