#!/usr/bin/env python3
"""Dispatch benchmark: a room is created -> the dispatched agent's first audio is heard.

    python bench/dispatch_bench.py [--quick] [--rooms N] [--levels 1,2,4] [--agent fake|worker] [--json PATH]
    ./scripts/bench --only dispatch      # in its own network namespace (preferred)

Real parts: the local livekit-server (``.tools/bin/server``), ``python dispatch.py`` (serve
mode) as a subprocess configured through its environment, one child process per job, and
Python-SDK users (``tests/harness.py:RoomUser``) who create each room by joining it, as a
browser does with agent-starter-react. Every time is ``time.monotonic()`` in this process.

The agent (``--agent``):

* ``fake`` (default until worker.py has a job mode): ``tests/fake_agent_child.py``, which
  reads the job, joins with the job's token, publishes a tone and reports READY=1. It is
  what the dispatch path costs without a call: the dispatch figures are real, the CPU per
  call is not that of a conversation.
* ``worker`` (phase 2): ``python worker.py job`` with the Voice Agent API stand-in
  (``standin.py``, greeting on) and a 300 Hz bed, as the e2e bench runs the worker.
  ``AGENTS`` below is the hook: a command and the environment the serve process passes on.

Figures
-------
1. Rooms one after another (``--rooms``, default 10; 5 with --quick), one serve process:
   the user calls ``connect()`` (the room does not exist yet; this join creates it) ->
   a) ``connect()`` returns (the user's own join), b) the agent participant is seen in the
   room, c) the agent's first audio is heard: the first 20 ms window of its track above
   -40 dBFS (detection adds up to 20 ms). Then the user leaves and the call ends on its own.
2. Bursts: N rooms created at once (``--levels``, default 1,2,4,6; 1,2,4 with --quick), with
   ``MAX_CALLS`` above N: per level the same latencies (median and max over the N rooms),
   then all N calls held ``--hold`` seconds (default 10; 5) to measure CPU in cores: the
   serve process, each call process (start-up: spawn to first audio heard; steady: the
   hold), this bench process (the N users who observe: the observer cost, which a worker
   host does not pay), the livekit-server, and the whole machine. With ``--agent worker``
   phase 2 adds underruns and reply latency per level and stops the ramp where they
   degrade: that is the number of calls a host holds in serve mode.

The machine is shared (2 cores here, other test runs on it): the header prints the load
average at start and end; compare levels within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from e2e_bench import BenchPriority, MachineMeter, fmt, git_describe, loadavg, proc_cpu_s, self_cpu_s, stats  # noqa: E402
from harness import API_KEY, API_SECRET, ASSEMBLYAI_KEY, LiveKitServer, RoomUser, WorkerProcess, find_server_binary  # noqa: E402

AGENT = "voice-agent"
FIRST_AUDIO_DBFS = -40.0
WIN = 480  # 20 ms at 24 kHz


@dataclass
class AgentKind:
    """What the serve process runs per job, and what it needs around it."""

    name: str
    command: list[str]
    note: str
    env: dict[str, str] = field(default_factory=dict)
    needs_standin: bool = False


AGENTS = {
    "fake": AgentKind("fake", [sys.executable, str(REPO / "tests" / "fake_agent_child.py"), "--tag", "bench"],
                      "tests/fake_agent_child.py: joins with the job's token, publishes a tone (no conversation)",
                      env={"FAKE_IDLE_S": "1"}),
    # Phase 2: the real call. The stand-in's URL and the worker's settings are added in run().
    "worker": AgentKind("worker", [sys.executable, str(REPO / "worker.py"), "job"],
                        "python worker.py job: the real call, with the Voice Agent API stand-in",
                        env={"GREETING": "Hello", "AMBIENT_VOLUME": "0.5", "STARTUP_CHECK": "0", "IDLE_TIMEOUT_S": "1",
                             "STATE_DIR": "", "LOG_LEVEL": "info"},
                        needs_standin=True),
}


class ServeProcess(WorkerProcess):
    def start(self, *args: str) -> "ServeProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
        out = open(self.output_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "dispatch.py")], env={**base, **self.env},
                                     cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    @property
    def output_path(self) -> Path:
        return self.workdir / "serve.log"


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def first_audio(user: RoomUser, since: float) -> float | None:
    h = user.heard.get(AGENT)
    if h is None:
        return None
    buf = np.zeros(0, np.float32)
    for t, c in h.chunks:
        if t < since:
            continue
        buf = np.concatenate([buf, c.astype(np.float32) / 32768])
        while len(buf) >= WIN:
            rms = float(np.sqrt(np.mean(buf[:WIN] ** 2)))
            if rms > 0 and 20 * np.log10(rms) > FIRST_AUDIO_DBFS:
                return t
            buf = buf[WIN:]
    return None


@dataclass
class Timing:
    joined: float | None = None
    agent_in: float | None = None
    audio: float | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, priority: BenchPriority) -> None:
        self.args, self.priority = args, priority
        self.agent = AGENTS[args.agent]
        self.tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
        self.server: LiveKitServer | None = None
        self.serves: list[ServeProcess] = []
        self.standin: Any = None
        self.t0 = time.monotonic()
        self._rooms = 0

    def progress(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    def room(self, prefix: str) -> str:
        self._rooms += 1
        return f"{prefix}-{self._rooms}"

    async def start_serve(self, name: str, max_calls: int) -> ServeProcess:
        assert self.server is not None
        env = {"LIVEKIT_URL": self.server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET,
               "MAX_CALLS": str(max_calls), "LOAD_THRESHOLD": "1", "DRAIN_TIMEOUT_S": "30", "LOG_LEVEL": "info",
               "SERVE_JOB_COMMAND": json.dumps(self.agent.command), **self.agent.env}
        if self.standin is not None:
            env.update({"ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY, "VOICE_AGENT_URL": self.standin.url})
        with self.priority.normal():
            s = ServeProcess(env, self.tmp / name).start()
        self.serves.append(s)
        deadline = time.monotonic() + 30
        while "registered with LiveKit" not in s.output():
            if not s.alive or time.monotonic() > deadline:
                raise RuntimeError(f"serve process did not register:\n{s.output()[-3000:]}")
            await asyncio.sleep(0.05)
        return s

    async def stop_serve(self, s: ServeProcess) -> None:
        s.signal(signal.SIGTERM)
        s.signal(signal.SIGTERM)  # end calls now
        try:
            await s.wait_exit(20)
        except AssertionError:
            s.kill()

    async def one_room(self, room: str, timing: Timing, timeout: float = 30.0) -> RoomUser:
        user = RoomUser(self.server, room, "user")
        t = time.monotonic()
        await user.join(publish=False)
        timing.joined = time.monotonic() - t
        deadline = t + timeout
        while time.monotonic() < deadline:
            if timing.agent_in is None and AGENT in user.room.remote_participants:
                timing.agent_in = time.monotonic() - t
            a = first_audio(user, t)
            if a is not None:
                timing.audio = a - t
                break
            await asyncio.sleep(0.01)
        return user

    async def sequential(self) -> dict[str, Any]:
        s = await self.start_serve("sequential", 4)
        timings = []
        for i in range(self.args.rooms):
            tm = Timing()
            user = await self.one_room(self.room("seq"), tm)
            timings.append(tm)
            ms = ["-" if v is None else f"{v * 1000:.0f} ms" for v in (tm.joined, tm.agent_in, tm.audio)]
            self.progress(f"room {i + 1}/{self.args.rooms}: joined {ms[0]}, agent in the room {ms[1]}, heard {ms[2]}")
            await user.leave()
            await asyncio.sleep(0.5)
        await self.stop_serve(s)
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        return {"joined_ms": stats([ms(t.joined) for t in timings]),
                "agent_in_ms": stats([ms(t.agent_in) for t in timings]),
                "audio_ms": stats([ms(t.audio) for t in timings]),
                "missed": sum(1 for t in timings if t.audio is None)}

    async def burst(self, n: int) -> dict[str, Any]:
        s = await self.start_serve(f"burst-{n}", n + 1)
        assert s.proc is not None
        serve_cpu0, self_cpu0 = proc_cpu_s(s.proc.pid) or 0.0, self_cpu_s()
        server_cpu0 = proc_cpu_s(self.server.proc.pid) or 0.0
        meter = MachineMeter()
        t_start = time.monotonic()
        timings = [Timing() for _ in range(n)]
        users = await asyncio.gather(*(self.one_room(self.room(f"burst{n}"), tm) for tm in timings))
        t_heard = time.monotonic()
        kids = children(s.proc.pid)
        start_cpu = {k: proc_cpu_s(k) or 0.0 for k in kids}  # spawn -> first audio (all heard)
        serve_cpu1, self_cpu1 = proc_cpu_s(s.proc.pid) or 0.0, self_cpu_s()
        server_cpu1 = proc_cpu_s(self.server.proc.pid) or 0.0
        await asyncio.sleep(self.args.hold)
        hold = time.monotonic() - t_heard
        steady = {k: (proc_cpu_s(k) or 0.0) - start_cpu[k] for k in kids}
        serve_cpu2, self_cpu2 = proc_cpu_s(s.proc.pid) or 0.0, self_cpu_s()
        server_cpu2 = proc_cpu_s(self.server.proc.pid) or 0.0
        machine = meter.stop()
        for u in users:
            await u.leave()
        await self.stop_serve(s)
        ms = lambda v: None if v is None else v * 1000  # noqa: E731
        return {
            "rooms": n, "calls_seen": len(kids),
            "agent_in_ms": stats([ms(t.agent_in) for t in timings]), "audio_ms": stats([ms(t.audio) for t in timings]),
            "missed": sum(1 for t in timings if t.audio is None),
            "startup_cpu_s_per_call": stats(list(start_cpu.values())),
            "steady_cores_per_call": stats([v / hold for v in steady.values()]),
            "serve_cores_hold": round((serve_cpu2 - serve_cpu1) / hold, 3),
            "serve_cpu_s_startup": round(serve_cpu1 - serve_cpu0, 2),
            "observer_cores": round((self_cpu2 - self_cpu0) / (time.monotonic() - t_start), 3),
            "observer_cores_hold": round((self_cpu2 - self_cpu1) / hold, 3),
            "server_cores_hold": round((server_cpu2 - server_cpu1) / hold, 3),
            "machine": machine, "seconds": round(time.monotonic() - t_start, 1),
        }

    async def run(self) -> dict[str, Any]:
        binary = find_server_binary()
        if binary is None:
            raise SystemExit("livekit-server not found: ./scripts/setup --server builds it")
        res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()},
                               "git": git_describe(), "agent": self.agent.name, "agent_note": self.agent.note,
                               "bench_priority": self.priority.note, "logs": str(self.tmp)}
        if self.agent.name == "worker":
            help_text = subprocess.run([sys.executable, str(REPO / "worker.py"), "--help"], capture_output=True,
                                       text=True, timeout=30).stdout
            if " job" not in help_text:
                raise SystemExit("worker.py has no job mode yet (phase 2 of issue 14): use --agent fake")
            from standin import StandIn, StandInOptions

            self.standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, greeting_seconds=1.0))
            await self.standin.start()
        self.server = LiveKitServer(binary, self.tmp / "livekit")
        self.server.start()  # inherits our policy: infrastructure, not on a worker host in production
        try:
            self.progress(f"1/2 rooms one after another: {self.args.rooms}")
            res["sequential"] = await self.sequential()
            res["bursts"] = []
            for n in self.args.levels:
                self.progress(f"2/2 burst: {n} rooms at once, held {self.args.hold:.0f} s")
                res["bursts"].append(await self.burst(n))
        finally:
            for s in self.serves:
                s.kill()
            self.server.stop()
            if self.standin is not None:
                await self.standin.stop()
        res["machine"]["loadavg_end"] = loadavg()
        return res


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"dispatch bench: {m['cpus']} CPUs; load average {m['loadavg_start']} at start, {m['loadavg_end']} at end",
        f"code: {res['git']}; agent: {res['agent']} ({res['agent_note']})",
        f"bench process: {res['bench_priority']}; logs in {res['logs']}",
        "",
        "1. a user creates a room by joining it -> ..., rooms one after another, one serve process",
    ]
    s = res["sequential"]
    lines += [
        f"   the user's own join (connect() returns)      {fmt(s['joined_ms'], ' ms')}",
        f"   the agent in the room                        {fmt(s['agent_in_ms'], ' ms')}",
        f"   the agent's first audio heard                {fmt(s['audio_ms'], ' ms')}"
        + (f"   ({s['missed']} rooms never heard it)" if s["missed"] else ""),
        "",
        "2. bursts: N rooms created at once; CPU in cores over the hold after every agent was heard",
        "   rooms  agent in room (ms)       first audio (ms)         start-up CPU/call  per call  serve  "
        "observers  server  machine",
    ]
    for b in res["bursts"]:
        a, f = b["agent_in_ms"], b["audio_ms"]
        med = lambda x: f"{x['median']:.0f}/{x['max']:.0f}" if x.get("n") else "n/a"  # noqa: E731
        lines.append(
            f"   {b['rooms']:>5}  {med(a):>10} median/max  {med(f):>10} median/max  "
            f"{b['startup_cpu_s_per_call'].get('median', float('nan')):>6.2f} s         "
            f"{b['steady_cores_per_call'].get('median', float('nan')):>5.3f}  {b['serve_cores_hold']:>5.3f}  "
            f"{b['observer_cores_hold']:>9.3f}  {b['server_cores_hold']:>6.3f}  "
            f"{b['machine'].get('busy_cores', float('nan')):>5.2f}"
            + (f"  ({b['missed']} never heard)" if b["missed"] else ""))
    lines += [
        "   observers = this bench process (the N users, who would not be on a worker host); machine = every",
        "   process on this host, other test runs included.",
    ]
    if res["agent"] == "fake":
        lines.append("   calls per host: needs --agent worker (phase 2): the stand-in agent costs less than a call.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rooms, bursts of 1, 2, 4, 5 s holds")
    ap.add_argument("--rooms", type=int, default=None, help="rooms one after another (default 10; 5 with --quick)")
    ap.add_argument("--levels", default=None, help="burst sizes (default 1,2,4,6; 1,2,4 with --quick)")
    ap.add_argument("--hold", type=float, default=None, help="seconds every burst's calls are held (default 10; 5)")
    ap.add_argument("--agent", choices=sorted(AGENTS), default="fake")
    ap.add_argument("--bench-priority", choices=["rt", "normal"], default="rt")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    args.rooms = args.rooms or (5 if args.quick else 10)
    args.levels = [int(x) for x in (args.levels or ("1,2,4" if args.quick else "1,2,4,6")).split(",")]
    args.hold = args.hold or (5.0 if args.quick else 10.0)
    if not os.environ.get("VOICE_AGENT_TEST_IP"):
        print("warning: VOICE_AGENT_TEST_IP is unset: WebRTC media will use this host's addresses; "
              "./scripts/bench runs this in its own network namespace", file=sys.stderr)
    priority = BenchPriority(args.bench_priority)
    priority.apply()
    bench = Bench(args, priority)
    res = asyncio.run(bench.run())
    print(report(res), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"raw numbers: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
