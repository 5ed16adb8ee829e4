#!/usr/bin/env python3
"""Dispatch benchmark: a room is created -> the dispatched agent's first audio is heard.

    python bench/dispatch_bench.py [--quick] [--rooms N] [--levels 1,2,4] [--agent fake|worker] [--json PATH]
    ./scripts/bench --only dispatch      # in its own network namespace (preferred)

Real parts: the local livekit-server (``.tools/bin/server``), ``python worker.py serve`` (serve
mode) as a subprocess configured through its environment, one child process per job, and
Python-SDK users (``tests/harness.py:RoomUser``) who create each room by joining it, as a
browser does with agent-starter-react. Every time is ``time.monotonic()`` in this process.

The agent (``--agent``):

* ``fake`` (quick, no stand-in): ``tests/fake_agent_child.py``, which
  reads the job, joins with the job's token, publishes a tone and reports READY=1. It is
  what the dispatch path costs without a call: the dispatch figures are real, the CPU per
  call is not that of a conversation.
* ``worker`` (the default): ``python worker.py job``, the real call, with the Voice Agent API stand-in
  (``standin.py``: greeting on, replies are 1 s 1000 Hz tones) and the built-in bed.

Figures
-------
1. Rooms one after another (``--rooms``, default 10; 5 with --quick), one serve process:
   the user calls ``connect()`` (the room does not exist yet; this join creates it) ->
   a) ``connect()`` returns (the user's own join), b) the agent participant is seen in the
   room, c) the agent's first audio is heard: the first 20 ms window of its track above
   -40 dBFS (detection adds up to 20 ms). Then the user leaves and the call ends on its own.
2. Bursts: N rooms created at once (``--levels``, default 1,2,4,6; 1,2,4 with --quick), with
   ``MAX_CALLS`` above N: per level the same latencies (median and max over the N rooms),
   then all N calls held ``--hold`` seconds (``--agent fake``: 10 s; 5) to measure CPU in cores: the
   serve process, each call process (start-up: spawn to first audio heard; steady: the
   hold), this bench process (the N users who observe: the observer cost, which a worker
   host does not pay), the livekit-server, and the whole machine.
3. With ``--agent worker`` (the default) the bursts are a ramp of real calls: levels
   1,2,4,6,8,10,12,14,16 (14 is the default MAX_CALLS on 2 cores; 1,2,4,6 with --quick),
   held 15 s (8 s with --quick). During the hold every user takes a turn every few
   seconds (a 0.8 s 450 Hz tone; the stand-in answers with 1 s of 1000 Hz), and per level
   the bench counts reply latency (the user's end of speech -> the reply heard), replies
   never heard and the calls' ``audio underrun`` warnings. The ramp stops at the first
   level that degrades (a reply or greeting missed, an underrun during the turns, or the
   median reply latency above 1.5 x that of one call): the level below is the number of
   calls a host holds in serve mode.

The machine is shared (2 cores here, other test runs on it): the header prints the load
average at start and end; compare levels within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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

from e2e_bench import (BenchPriority, MachineMeter, fmt, git_describe, loadavg, proc_cpu_s,  # noqa: E402
                       save_results, self_cpu_s, stats)
from harness import (API_KEY, API_SECRET, ASSEMBLYAI_KEY, LiveKitServer, RoomUser, WorkerProcess,  # noqa: E402
                     find_server_binary, tone)

AGENT = "voice-agent"
FIRST_AUDIO_DBFS = -40.0
WIN = 480  # 20 ms at 24 kHz
# --agent worker: the turns of the ramp. The user speaks a 450 Hz tone, the stand-in answers
# with a 1000 Hz tone after its end-of-turn silence (DEFAULT_MIN_SILENCE_MS) and think time.
USER_HZ, REPLY_HZ, REPLY_ON = 450.0, 1000.0, 0.1
USER_SPEECH_S, REPLY_S = 0.8, 1.0
REPLY_WAIT_S = 5.0  # a reply not heard this long after the user's turn ended is missed
# A level degrades when any reply is missed, the calls' audio underran during the turns, or
# the median reply latency is above DEGRADED_LATENCY x that of one call.
DEGRADED_LATENCY = 1.5


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
    """``python worker.py serve``, configured through its environment."""

    def start(self, *args: str) -> "ServeProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
        out = open(self.output_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "worker.py"), "serve"], env={**base, **self.env},
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
        await user.join(publish=self.standin is not None)
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
        log_at = len(s.output())
        if self.standin is not None:  # the real call: turns during the hold
            until = time.monotonic() + self.args.hold
            turn_results = await asyncio.gather(*(self.turns(u, until) for u in users))
        else:
            turn_results = []
            await asyncio.sleep(self.args.hold)
        hold = time.monotonic() - t_heard
        hold_log = s.output()[log_at:]
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
            **({"reply_ms": stats([v * 1000 for r in turn_results for v in r if v is not None]),
                "turns": sum(len(r) for r in turn_results),
                "replies_missed": sum(1 for r in turn_results for v in r if v is None),
                "underruns_hold": hold_log.count("audio underrun"),
                "underruns_all": s.output().count("audio underrun")} if self.standin is not None else {}),
        }

    async def turns(self, user: RoomUser, until: float) -> list[float | None]:
        """Turns until ``until``: the user speaks, the reply's first audio is awaited; the
        latency is the user's end of speech -> the reply heard (None: missed)."""
        out: list[float | None] = []
        await asyncio.sleep(random.uniform(0, 1))  # the users do not speak in lockstep
        while time.monotonic() + USER_SPEECH_S < until:
            end = user.say(tone(USER_HZ, USER_SPEECH_S, amplitude=0.6))
            heard_at = None
            while time.monotonic() < end + REPLY_WAIT_S and heard_at is None:
                await asyncio.sleep(0.05)
                h = user.heard.get(AGENT)
                if h is not None:
                    heard_at = next((t for t, a in h.timeline(REPLY_HZ, since=end) if t > end and a > REPLY_ON), None)
            out.append(None if heard_at is None else heard_at - end)
            await asyncio.sleep(REPLY_S + 0.7)  # the reply plays out, then a pause
            if time.monotonic() >= until:
                break
        return out

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

            self.standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, greeting_seconds=1.0, reply_mode="tone",
                                                  reply_freq_hz=REPLY_HZ, reply_seconds=REPLY_S))
            await self.standin.start()
        self.server = LiveKitServer(binary, self.tmp / "livekit")
        self.server.start()  # inherits our policy: infrastructure, not on a worker host in production
        try:
            self.progress(f"1/2 rooms one after another: {self.args.rooms}")
            res["sequential"] = await self.sequential()
            res["bursts"] = []
            for n in self.args.levels:
                self.progress(f"2/2 burst: {n} rooms at once, held {self.args.hold:.0f} s")
                b = await self.burst(n)
                res["bursts"].append(b)
                if self.standin is not None:
                    b["degraded"] = degraded(b, res["bursts"][0])
                    self.progress(f"   {n} calls: replies {fmt(b['reply_ms'], ' ms')}, {b['replies_missed']} missed, "
                                  f"{b['underruns_hold']} underruns" + (f": DEGRADED ({b['degraded']})"
                                                                         if b["degraded"] else ""))
                    if b["degraded"]:
                        break
            if self.standin is not None:
                good = [b["rooms"] for b in res["bursts"] if not b.get("degraded")]
                first_bad = next((b["rooms"] for b in res["bursts"] if b.get("degraded")), None)
                res["calls_per_host"] = max([g for g in good if first_bad is None or g < first_bad], default=0)
        finally:
            for s in self.serves:
                s.kill()
            self.server.stop()
            if self.standin is not None:
                await self.standin.stop()
        res["machine"]["loadavg_end"] = loadavg()
        return res


def degraded(b: dict[str, Any], base: dict[str, Any]) -> str:
    """Why a level of the ramp degraded ("" if it did not)."""
    why = []
    if b["missed"] or b["replies_missed"]:
        why.append(f"{b['missed'] + b['replies_missed']} greetings/replies never heard")
    if b["underruns_hold"]:
        why.append(f"{b['underruns_hold']} underruns")
    med, base_med = b["reply_ms"].get("median"), base["reply_ms"].get("median")
    if med is not None and base_med is not None and med > DEGRADED_LATENCY * base_med:
        why.append(f"reply latency {med:.0f} ms > {DEGRADED_LATENCY} x {base_med:.0f} ms")
    return "; ".join(why)


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
        lines.append("   calls per host: needs --agent worker: the stand-in agent costs less than a call.")
    else:
        lines += ["", "3. the ramp: real calls, a turn every few seconds per call during the hold",
                  "   calls  reply latency (user's end of speech -> heard), ms     missed  underruns (hold/all)"]
        for b in res["bursts"]:
            lines.append(f"   {b['rooms']:>5}  {fmt(b['reply_ms'], ' ms'):<50}  {b['replies_missed']:>6}  "
                         f"{b['underruns_hold']}/{b['underruns_all']}" + (f"  DEGRADED: {b['degraded']}"
                                                                          if b.get("degraded") else ""))
        lines.append(f"   calls per host in serve mode (the last level before one degrades): {res['calls_per_host']}"
                     + ("" if any(b.get("degraded") for b in res["bursts"]) else " (no level degraded: at least)"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rooms, bursts of 1, 2, 4, 5 s holds")
    ap.add_argument("--rooms", type=int, default=None, help="rooms one after another (default 10; 5 with --quick)")
    ap.add_argument("--levels", default=None, help="burst sizes (default 1,2,4,6; 1,2,4 with --quick)")
    ap.add_argument("--hold", type=float, default=None, help="seconds every burst's calls are held (default 10; 5)")
    ap.add_argument("--agent", choices=sorted(AGENTS), default="worker",
                    help="worker (default): the real call with the stand-in; fake: the tone-playing stand-in child")
    ap.add_argument("--bench-priority", choices=["rt", "normal"], default="rt")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    args.rooms = args.rooms or (5 if args.quick else 10)
    default_levels = ("1,2,4" if args.quick else "1,2,4,6") if args.agent == "fake" else \
        ("1,2,4,6" if args.quick else "1,2,4,6,8,10,12,14,16")
    args.levels = [int(x) for x in (args.levels or default_levels).split(",")]
    args.hold = args.hold or ((5.0 if args.quick else 10.0) if args.agent == "fake" else (8.0 if args.quick else 15.0))
    if not os.environ.get("VOICE_AGENT_TEST_IP"):
        print("warning: VOICE_AGENT_TEST_IP is unset: WebRTC media will use this host's addresses; "
              "./scripts/bench runs this in its own network namespace", file=sys.stderr)
    priority = BenchPriority(args.bench_priority)
    priority.apply()
    bench = Bench(args, priority)
    res = asyncio.run(bench.run())
    print(report(res), flush=True)
    save_results(args.json, res)


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown of the LiveKit native library: it can abort on the way
    # out ("panic in a function that cannot unwind"), after the results, with exit 134.
    import exits

    exits.exit_now(0)
