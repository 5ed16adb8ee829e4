"""Operations: the preflight check, JSON logs, systemd notify/watchdog, shutdown, the
unit file, and no secret in any output."""

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

import pytest

from harness import (API_SECRET, ASSEMBLYAI_KEY, REPO, RoomUser, WorkerProcess, tone, wait_until, worker_env,
                     write_wav)
from sound_samples import threads_sched
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e


@pytest.fixture
async def standin():
    s = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.0, greeting_seconds=0.5,
                               default_min_silence_ms=400))
    await s.start()
    yield s
    await s.stop()


async def run_check(env: dict[str, str], cwd) -> tuple[int, str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(sys.executable, str(REPO / "worker.py"), "check", env={**base, **env},
                                                cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_check_passes_against_real_server_and_standin(livekit_server, standin, room_name, tmp_path):
    code, out = await run_check(worker_env(livekit_server, standin.url, room_name), tmp_path)
    assert code == 0, out
    for line in ("\u2713 Python", "\u2713 configuration", "\u2713 LiveKit at", "\u2713 Voice Agent API at",
                 "\u2713 AMBIENT_SOUND: builtin:office", "all checks passed",
                 "\u2713 serve mode: LiveKit accepts this key as an agent worker (registered as AW_"):
        assert line in out, out
    assert "automatic dispatch, up to " in out and "calls on this host (MAX_CALLS from the cores and the memory)" in out
    assert len(standin.sessions) == 1 and standin.sessions[0].ended, "check must open AND end a session"
    assert API_SECRET not in out and ASSEMBLYAI_KEY not in out


async def test_check_names_each_failure_and_its_fix(livekit_server, standin, room_name, tmp_path):
    env = worker_env(livekit_server, standin.url, room_name, LIVEKIT_API_SECRET="not-the-secret-" + "z" * 20,
                     ASSEMBLYAI_API_KEY="wrong-key", AMBIENT_SOUND=str(tmp_path / "missing.wav"))
    code, out = await run_check(env, tmp_path)
    assert code == 1, out
    assert re.search(r"\u2717 LiveKit at .* rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET\n    fix: ", out), out
    assert re.search(r"\u2717 Voice Agent API: .*ASSEMBLYAI_API_KEY.*\n    fix: ", out), out
    assert re.search(r"\u2717 AMBIENT_SOUND: .*missing\.wav.*\n    fix: ", out), out
    assert "3 checks failed" in out
    assert "wrong-key" not in out and "not-the-secret" not in out


async def test_check_reports_an_unreachable_server(standin, tmp_path):
    from harness import free_port

    env = {"LIVEKIT_URL": f"ws://127.0.0.1:{free_port()}", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s",
           "ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY, "VOICE_AGENT_URL": standin.url, "AMBIENT_SOUND": "none"}
    code, out = await run_check(env, tmp_path)
    assert code == 1 and "\u2717 LiveKit at" in out and "not reachable" in out and "fix: start the server" in out


async def test_check_with_livekit_url_empty_says_a_local_server_is_started(standin, tmp_path):
    """.env.example leaves LIVEKIT_URL empty (run, demo and serve then start a local server):
    check says so instead of failing, and still checks the API key and the sounds; under
    systemd an empty LIVEKIT_URL stays an error."""
    env = {"ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY, "VOICE_AGENT_URL": standin.url, "AMBIENT_SOUND": "builtin:office"}
    code, out = await run_check(env, tmp_path)
    assert code == 0, out
    assert "\u2713 LiveKit: LIVEKIT_URL is empty, so run, demo and serve start a local LiveKit server" in out
    assert "\u2713 Voice Agent API at" in out and "all checks passed" in out
    code, out = await run_check({**env, "NOTIFY_SOCKET": str(tmp_path / "nowhere.sock")}, tmp_path)
    assert code == 1 and "\u2717 configuration: LIVEKIT_URL" in out, out


class NotifySocket:
    """What systemd would receive on $NOTIFY_SOCKET."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = str(path)
        self.messages: list[tuple[float, str]] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except BlockingIOError:
                return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


async def test_sd_notify_ready_after_join_and_key_check_then_watchdog_pings(livekit_server, standin, room_name,
                                                                            tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    env = worker_env(livekit_server, standin.url, room_name, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="600000",
                     STARTUP_CHECK="1", AMBIENT_SOUND="none")
    worker = WorkerProcess(env, tmp_path / "w").start()
    observer = RoomUser(livekit_server, room_name, "observer")
    try:
        await wait_until(lambda: any(m.startswith("READY=1") for m in notify.poll()), 20, "READY=1")
        ready_at = next(t for t, m in notify.messages if m.startswith("READY=1"))
        assert standin.sessions and standin.sessions[0].ended, "READY before the API key was proven"
        await observer.join(publish=False)
        assert "voice-agent" in observer.room.remote_participants, "READY before the agent was in the room"
        await asyncio.sleep(1.5)
        notify.poll()
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1" and t > ready_at]
        assert len(pings) >= 3, f"only {len(pings)} watchdog pings in 1.5 s with WATCHDOG_USEC=600000"
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(10) == 0
        assert "STOPPING=1" in notify.poll()
    finally:
        worker.kill()
        notify.close()
        await observer.leave()


async def test_bad_key_at_startup_fails_before_ready(livekit_server, standin, room_name, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    env = worker_env(livekit_server, standin.url, room_name, NOTIFY_SOCKET=notify.path, STARTUP_CHECK="1",
                     ASSEMBLYAI_API_KEY="revoked-key")
    worker = WorkerProcess(env, tmp_path / "w").start()
    try:
        assert await worker.wait_exit(15) == 3, worker.output()
        assert not any(m.startswith("READY=1") for m in notify.poll())
    finally:
        worker.kill()
        notify.close()


async def test_json_logs_parse_line_by_line_with_context(livekit_server, standin, room_name, tmp_path):
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, LOG_FORMAT="json", LOG_LEVEL="info",
                                      GREETING=""), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await asyncio.sleep(0.5)
        user.say(tone(450, 0.8, amplitude=0.6))
        await worker.wait_for_output(r'"turn": 1', 15)
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(10) == 0
    finally:
        worker.kill()
        await user.leave()
    records = []
    for line in worker.output().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert all(r.get("room") == room_name for r in records if r["logger"] == "worker")
    turn = next(r for r in records if r.get("turn") == 1)
    assert turn["session_id"] == standin.sessions[0].session_id and turn["reply_id"]
    assert isinstance(turn["latency_ms"], int) and turn["barge_ins"] == 0


async def test_sigterm_fades_ends_session_leaves_and_exits_0_quickly(livekit_server, standin, room_name, tmp_path):
    bed = write_wav(tmp_path / "bed.wav", tone(300, 1.0, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed),
                                      AMBIENT_VOLUME="0.5", SHUTDOWN_TIMEOUT_S="4"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        heard = await user.wait_heard()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await asyncio.sleep(2.0)
        t0 = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(6) == 0, worker.output()
        elapsed = time.monotonic() - t0
        assert elapsed < 4.0, f"shutdown took {elapsed:.2f} s"
        assert standin.sessions[0].ended, "session.end was not sent"
        assert any(e.get("type") == "session.ended" for e in standin.sessions[0].events("session.ended"))
        await wait_until(lambda: "voice-agent" not in user.room.remote_participants, 5, "the agent to leave")
        # The bed faded out rather than stopping dead: some windows at intermediate level.
        tl = [a for t, a in heard.timeline(300) if t > t0]
        assert any(0.02 < a < 0.2 for a in tl), "no fade-out heard: the ambient stopped abruptly"
        print(f"SIGTERM -> exit: {elapsed * 1000:.0f} ms")
    finally:
        worker.kill()
        await user.leave()


async def test_second_sigterm_exits_at_once(livekit_server, tmp_path, room_name):
    # An API that never answers: the clean shutdown would wait for its timeout.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/ws"
    worker = WorkerProcess(worker_env(livekit_server, url, room_name, SHUTDOWN_TIMEOUT_S="30", AMBIENT_SOUND="none"),
                           tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await worker.wait_for_output("starting a Voice Agent session", 15)
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(0.6)  # later than 0.5 s: a second signal, not the first one delivered twice
        t0 = time.monotonic()
        worker.signal(signal.SIGTERM)
        await worker.wait_exit(3)
        assert time.monotonic() - t0 < 1.0
    finally:
        worker.kill()
        server.close()
        await user.leave()


async def test_sigterm_delivered_twice_at_once_is_one_clean_stop(livekit_server, standin, room_name, tmp_path):
    """`timeout`, cron wrappers and `kill PID; kill -- -PGID` deliver SIGTERM twice within
    microseconds: that is one stop, so the worker ends the session and leaves the room
    (no "exit now" that leaves the agent listed in the room for ~20 s)."""
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND="none"),
                           tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        await wait_until(lambda: "voice-agent" in user.room.remote_participants, 5, "the agent in the room")
        worker.signal(signal.SIGTERM)
        time.sleep(0.05)  # apart enough to be two deliveries, as `kill PID; kill -- -PGID` makes them
        worker.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert await worker.wait_exit(10) == 0, worker.output()
        await wait_until(lambda: "voice-agent" not in user.room.remote_participants, 3,
                         "the agent to leave the room after one stop sent twice")
        assert time.monotonic() - t0 < 8
        assert "exiting now" not in worker.output(), "two signals at once were taken as a hurried second one"
        assert standin.sessions[0].ended, "the session was not ended: the worker exited without a clean stop"
    finally:
        worker.kill()
        await user.leave()


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI: scripts/setup installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI runs this check")
    unit = (REPO / "deploy" / "voice-agent@.service").read_text()
    # As installed: the paths the README's install steps create, pointed at this checkout.
    unit = unit.replace("/opt/voice-agent/.venv/bin/python", sys.executable).replace("/opt/voice-agent", str(REPO))
    path = tmp_path / "voice-agent@test-room.service"
    path.write_text(unit)
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2 3 4 6 8",
                "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                "EnvironmentFile=/etc/voice-agent/common.env"):
        assert key in unit


def sdk_runtime_threads(pid: int) -> int:
    """Threads of ``pid`` named like tokio's runtime threads (the SDK's runtime; a blocking
    task's thread has the same name and ends after 10 s idle)."""
    return sum(comm == "tokio-rt-worker" for comm, _, _ in threads_sched(pid).values())


@pytest.mark.parametrize("setting, expected", [(None, 1), ("2", 2)])
async def test_the_sdk_runtime_gets_the_configured_worker_threads(livekit_server, standin, room_name, tmp_path,
                                                                  setting, expected):
    """TOKIO_WORKER_THREADS (default 1, not tokio's one per core) reaches the SDK's runtime:
    that many threads stay once the worker is in the room (more while a blocking task's thread
    lingers: it ends after 10 s idle)."""
    extra = {} if setting is None else {"TOKIO_WORKER_THREADS": setting}
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, GREETING="", **extra),
                           tmp_path / "w").start()
    try:
        await worker.wait_for_output(r"joined room", 20)
        seen: list[int] = []

        def settled() -> bool:
            seen.append(sdk_runtime_threads(worker.proc.pid))
            return seen[-1] == expected

        await wait_until(settled, 20, f"{expected} SDK runtime thread(s)", interval=0.5)
        await asyncio.sleep(1.0)
        assert sdk_runtime_threads(worker.proc.pid) == expected, seen
        assert worker.alive
    finally:
        worker.kill()
