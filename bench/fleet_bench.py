#!/usr/bin/env python3
"""Fleet benchmark: a two-node LiveKit cluster, three serve hosts, rooms opened in bursts while
one host dies, one is drained and one is CPU-hogged. Are rooms served, recovered, never doubled?

    python bench/fleet_bench.py [--rooms 30] [--burst 10] [--real] [--lost-after 10] [--json PATH]
    ./scripts/bench --only fleet         # in its own network namespace (preferred)

Real parts: two livekit-server v1.13.5 nodes sharing one redis-server (``tests/harness.py``
``LiveKitCluster``), three ``python worker.py serve`` processes ("hosts") registered at
nodes 0, 0 and 1 (``--nodes``: the server offers each job to the node whose hosts have the most
headroom in sum, so the node with two hosts takes the jobs while it has room; the killed and the
drained host share it so that both hold calls when their incident comes), each running one call
process per job, and Python-SDK users who create each
room by joining it (join only: no microphone, no subscriptions, so that 30 of them fit on this
machine). The call process is ``tests/fake_agent_child.py`` by default (joins with the job's
token, plays a tone: what dispatch costs without a call, so 30 calls fit on 2 cores);
``--real`` runs ``python worker.py job`` with the Voice Agent API stand-in (fewer rooms by
default: a real call costs about 0.08 cores).

The story (times from the first burst; every step waits for the one before):

1. Bursts of ``--burst`` rooms (all but the last burst), one every ``--burst-gap`` s; users
   alternate between the nodes. Then a wait until every room of them has its agent (at most
   ``--settle-max`` s) and ``--settle`` s more, so that the kill hits calls, not starts.
2. The ``killed`` host dies: its serve process and every call process of it (found by the
   ``VOICE_AGENT_TEST_TAG`` they inherit) are SIGSTOPped together, then SIGKILLed, as a
   machine death would take them all at once. (On loopback the kernel still closes their
   sockets, so the server hears of it at once; a real dead machine is silent until timeouts.)
3. The ``drained`` host gets SIGTERM (a rolling deploy: no new calls, its calls go on; the
   deploy starts its ``replacement`` at the same node, unless ``--no-replacement``), and the
   ``hogged`` host gets a CPU hog: one busy loop per core at nice 19. The three hosts share
   this machine's /proc/stat, so only the hogged host has the CPU gate on
   (``LOAD_THRESHOLD=--hog-threshold``; the others ``1``, gate off): the hog makes it refuse
   without starving the other hosts (nice 19 takes only idle CPU, but counts as busy).
4. Once the hogged host says it is not taking calls, the last burst opens its rooms.
5. ``--hog-s`` later the hog stops: capacity frees (the hogged host takes calls again).
6. ``--second-term-after`` s after that, the drained host gets its second SIGTERM, as a deploy
   tool sends after its grace period: it ends its calls now.
7. ``--observe`` s more, then the users leave and everything stops.

Every room's participants are sampled every ``--sample-ms`` (100) through the server API
(``RoomService.ListParticipants`` on node 0) from the moment its user starts joining; a
participant of kind AGENT is an agent. An agent of the dead host that the server still lists
after the kill (a "ghost": the dead process never said goodbye; one of its rooms' agents that
joined before the kill) does not count as the room's agent.

Figures: room -> agent (the user's ``connect()`` starts -> the SDK sees the agent; rooms of the
bursts before the incidents, and of the last one) p50/p95/max; per incident (the death, the
forced end of the drained host's calls, the rooms refused during the hog) the rooms it hit,
how many got an agent back and how long that took (from the kill, from the second SIGTERM,
from the hog's end); how long ghosts lingered; rooms lost (a room whose user went more than
``--lost-after`` s without an agent, or has none at the end; goal 0); rooms that ever had two
agents at once in one sample (goal 0), counting ghosts and not; where the jobs went (per host,
and the node hosting each room); the sampler's achieved period.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import faulthandler
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from e2e_bench import BenchPriority, MachineMeter, loadavg, proc_cpu_s, save_results, self_cpu_s  # noqa: E402
from harness import (API_KEY, API_SECRET, ASSEMBLYAI_KEY, LiveKitCluster, LiveKitServer,  # noqa: E402
                     find_redis_binary, find_server_binary)

from test_dispatch import FAKE_CHILD, TAG_VARIABLE  # noqa: E402
from test_dispatch import ServeProcess as TestServeProcess  # noqa: E402

AGENT_KIND = 4  # livekit.protocol.models.ParticipantInfo.Kind.AGENT
ROLES = ("killed", "drained", "hogged")


# --- hosts ---------------------------------------------------------------------------------------


class ServeProcess(TestServeProcess):
    """``python worker.py serve`` (the tests' ServeProcess), and what its log says of its calls."""

    def calls(self, log: str | None = None) -> dict[str, str]:
        """job id -> room of every call process it started (a job it accepted, or any other
        way a call may start: the line is the supervisor's)."""
        out = self.output() if log is None else log
        return dict(re.findall(r"job (\S+): call process \d+ started for room (\S+)", out))

    def taking_calls(self) -> bool:
        """Its last word on it: "not taking calls: <why>" or "taking calls again"."""
        said = re.findall(r"not taking calls|taking calls again", self.output())
        return not said or said[-1] != "not taking calls"

    def held_rooms(self) -> set[str]:
        """The rooms of its calls that have not ended (per its log, now)."""
        out = self.output()
        over = set(re.findall(r"job (\S+) for room \S+ (?:ended|failed)", out))
        return {room for job, room in self.calls(out).items() if job not in over}


def tagged_pids(tag: str) -> list[int]:
    """Every live process of a host: the serve process and its call processes, by the tag in
    their environment (so call processes are found whatever their parent)."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except (OSError, IndexError):
            continue
    return pids


def proc_name(pid: int) -> str:
    """What a process runs, in short: the script's name (worker.py serve, fake_agent_child.py)."""
    try:
        argv = [x.decode(errors="replace") for x in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if x]
    except OSError:
        return "?"
    i = next((i for i, x in enumerate(argv) if x.endswith(".py")), None)
    if i is None:
        return Path(argv[0]).name if argv else "?"
    name = Path(argv[i]).name
    return f"{name} {argv[i + 1]}" if name == "worker.py" and i + 1 < len(argv) else name


@dataclass
class Host:
    role: str
    node: int
    tag: str
    serve: ServeProcess | None = None


# --- users and the sampler -------------------------------------------------------------------------


class User:
    """Creates a room by joining it, and only that: no microphone and no subscriptions (the
    lighter user the fleet bench needs 30 of). Notes when the SDK first sees an agent."""

    def __init__(self, node: LiveKitServer, room: str) -> None:
        self.node, self.room_name = node, room
        self.room: Any = None
        self.started = self.joined = self.agent_seen = None  # type: float | None
        self.error = ""

    async def join(self) -> "User":
        from livekit import rtc

        self.room = rtc.Room()

        @self.room.on("participant_connected")
        def on_connected(p: Any) -> None:
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and self.agent_seen is None:
                self.agent_seen = time.monotonic()

        self.started = time.monotonic()
        try:
            await asyncio.wait_for(self.room.connect(self.node.url, self.node.token("user", self.room_name),
                                                     rtc.RoomOptions(auto_subscribe=False)), 20)
            self.joined = time.monotonic()
            if self.agent_seen is None and any(p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                                               for p in self.room.remote_participants.values()):
                self.agent_seen = self.joined
        except Exception as e:  # a user who could not join is reported, not fatal
            self.error = f"{type(e).__name__}: {e}"[:200]
        return self

    async def leave(self) -> None:
        if self.room is None:
            return
        task = asyncio.ensure_future(self.room.disconnect())
        done, _ = await asyncio.wait({task}, timeout=5)
        if task in done and not task.cancelled():
            task.exception()
        self.room = None


@dataclass
class RoomTrack:
    """One room as the server API shows it: a sample every ``period``; changes kept."""

    name: str
    burst: int
    node: int  # the node its user joined through
    user: User
    # (t, agent sids, the live ones among them, users), at every change
    samples: list[tuple[float, tuple[str, ...], tuple[str, ...], int]] = field(default_factory=list)
    errors: int = 0
    periods: list[float] = field(default_factory=list)
    max_agents: int = 0
    max_live_agents: int = 0
    host_node: str | None = None


class Sampler:
    def __init__(self, api_url: str, period_s: float) -> None:
        self.api_url, self.period_s = api_url, period_s
        self.rooms: list[RoomTrack] = []
        # The dead host's agents: those in its rooms that joined before the kill. The server may
        # list one for the first time after it (a join in flight): joined_at tells.
        self.kill_rooms: set[str] = set()
        self.kill_ms: float | None = None
        self.ghosts: set[str] = set()  # found so far: listed, but not an agent
        self._api: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    async def start(self) -> None:
        from livekit import api

        self._api = api.LiveKitAPI(self.api_url.replace("ws://", "http://"), API_KEY, API_SECRET)

    def watch(self, track: RoomTrack) -> None:
        self.rooms.append(track)
        self._tasks.append(asyncio.create_task(self._run(track)))

    async def _run(self, track: RoomTrack) -> None:
        from livekit import api

        last = None
        nxt = time.monotonic()
        while not self.stopping:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
                # arrives as the call completes, and then this loop would outlive stop().
                async with asyncio.timeout(2):
                    res = await self._api.room.list_participants(api.ListParticipantsRequest(room=track.name))
                agents = tuple(sorted(p.sid for p in res.participants if p.kind == AGENT_KIND))
                users = sum(1 for p in res.participants if p.kind != AGENT_KIND)
                if self.kill_ms is not None and track.name in self.kill_rooms:
                    self.ghosts |= {p.sid for p in res.participants
                                    if p.kind == AGENT_KIND and p.joined_at_ms <= self.kill_ms}
            except Exception:  # not created yet, or a slow answer: nothing known in this sample
                track.errors += 1
                agents, users = (), -1
            now = time.monotonic()
            if last is not None:
                track.periods.append(now - last)
            last = now
            live = tuple(a for a in agents if a not in self.ghosts)
            track.max_agents = max(track.max_agents, len(agents))
            track.max_live_agents = max(track.max_live_agents, len(live))
            if not track.samples or track.samples[-1][1:] != (agents, live, users):
                track.samples.append((now, agents, live, users))
            nxt += self.period_s
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - self.period_s)  # a late sample does not cause a burst of catch-ups

    async def stop(self) -> None:
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._api is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._api.aclose()


def window(track: RoomTrack, start: float, end: float) -> list[tuple[float, tuple[str, ...], tuple[str, ...], int]]:
    """The samples that describe the room from ``start`` to ``end``: the one in force at
    ``start`` (samples are kept at changes only), then every change before ``end``."""
    before = [x for x in track.samples if x[0] <= start]
    return before[-1:] + [x for x in track.samples if start < x[0] < end]


def first_new_agent(track: RoomTrack, since: float, old: set[str]) -> float | None:
    """When the room first has an agent that is not one of ``old``, at or after ``since``."""
    for i, (t, agents, _, _) in enumerate(track.samples):
        nxt = track.samples[i + 1][0] if i + 1 < len(track.samples) else float("inf")
        if nxt <= since:
            continue
        if any(a not in old for a in agents):
            return max(t, since)
    return None


def longest_gap(track: RoomTrack, end: float) -> float:
    """The longest time the room's user went without a (live) agent, from the join to ``end``."""
    assert track.user.started is not None
    longest, since = 0.0, track.user.started
    for t, _, live, _ in track.samples:
        if live:
            if since is not None:
                longest = max(longest, t - since)
                since = None
        elif since is None:
            since = t
    if since is not None:
        longest = max(longest, end - since)
    return longest


def pct(values: list[float], q: float) -> float | None:
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = int(k), min(len(v) - 1, int(k) + 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 0.5), "p95": pct(values, 0.95), "max": max(values) if values else None}


def git_state() -> str:
    def run(*a: str) -> str:
        return subprocess.run(a, cwd=REPO, capture_output=True, text=True, timeout=5, check=False).stdout.strip()

    try:
        rev = run("git", "rev-parse", "--short", "HEAD")
        dirty = run("git", "status", "--porcelain", "--", "dispatch.py", "worker.py", "call.py", "room.py")
        return rev + (" + uncommitted changes to " + ", ".join(sorted(ln[3:] for ln in dirty.splitlines()))
                      if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


# --- the bench -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, priority: BenchPriority) -> None:
        self.args, self.priority = args, priority
        self.tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.t0 = time.monotonic()
        self.cluster: LiveKitCluster | None = None
        self.hosts = [Host(role, node, f"fleet-{role}") for role, node in zip(ROLES, args.nodes)]
        self.standin: Any = None
        self.sampler: Sampler | None = None
        self.users: list[User] = []
        self.events: dict[str, float] = {}
        self.hog: list[subprocess.Popen] = []
        self.hog_log_at = 0
        self.held_at_kill: dict[str, set[str]] = {}
        self.host_states: list[tuple[float, bool]] = []  # the hogged host: (when, taking calls)
        self.killed_what: collections.Counter[str] = collections.Counter()

    def progress(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    def mark(self, what: str) -> float:
        self.events[what] = t = time.monotonic()
        return t

    def host(self, role: str) -> Host:
        return next(h for h in self.hosts if h.role == role)

    def serve_env(self, h: Host) -> dict[str, str]:
        assert self.cluster is not None
        env = {
            "LIVEKIT_URL": self.cluster.nodes[h.node].url, "LIVEKIT_API_KEY": API_KEY,
            "LIVEKIT_API_SECRET": API_SECRET, "ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY,
            "VOICE_AGENT_URL": self.standin.url if self.standin else "ws://127.0.0.1:9/v1/ws",
            "STARTUP_CHECK": "0", "MAX_CALLS": str(self.args.max_calls),
            # One machine's /proc/stat for three "hosts": only the hogged one gates on CPU.
            "LOAD_THRESHOLD": str(self.args.hog_threshold) if h.role == "hogged" else "1",
            "DRAIN_TIMEOUT_S": "600", "LOG_LEVEL": "info", TAG_VARIABLE: h.tag,
        }
        if self.standin is None:
            env.update({"SERVE_JOB_COMMAND": json.dumps([sys.executable, str(FAKE_CHILD), "--tag", h.tag]),
                        "SHUTDOWN_TIMEOUT_S": "1", "JOB_STOP_TIMEOUT_S": "5", "AMBIENT_SOUND": "none",
                        "FAKE_IDLE_S": "5", "FAKE_SILENT": "1"})  # presence is what is measured
        else:
            env.update({"GREETING": "Hello", "AMBIENT_VOLUME": "0.5", "IDLE_TIMEOUT_S": "5", "STATE_DIR": ""})
        return env

    async def start_hosts(self) -> None:
        for h in self.hosts:
            with self.priority.normal():
                h.serve = ServeProcess(self.serve_env(h), self.tmp / h.tag).start()
        deadline = time.monotonic() + 30
        for h in self.hosts:
            assert h.serve is not None
            while "registered with LiveKit" not in h.serve.output():
                if not h.serve.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"{h.tag} did not register:\n{h.serve.output()[-3000:]}")
                await asyncio.sleep(0.05)
        # Two status updates, so every host has reported its real load before the first room.
        await asyncio.sleep(5.5)

    async def burst(self, b: int, rooms: list[str]) -> list[RoomTrack]:
        assert self.cluster is not None and self.sampler is not None
        tracks = []
        for i, name in enumerate(rooms):
            node = (len(self.users) + i) % len(self.cluster.nodes)
            tracks.append(RoomTrack(name, b, node, User(self.cluster.nodes[node], name)))
        for t in tracks:
            self.sampler.watch(t)
        await asyncio.gather(*(t.user.join() for t in tracks))
        self.users += [t.user for t in tracks]
        for t in tracks:
            t.host_node = self.cluster.room_node(t.name)
        return tracks

    def kill_host(self, h: Host) -> list[int]:
        """A machine death: every process of the host frozen at once, then killed."""
        pids = tagged_pids(h.tag)
        self.killed_what = collections.Counter(proc_name(pid) for pid in pids)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if h.serve is not None and h.serve.proc is not None:
            h.serve.proc.wait()
        return pids

    def start_hog(self) -> None:
        burn = "while True: pass"
        for _ in range(os.cpu_count() or 1):
            with self.priority.normal():
                self.hog.append(subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", burn]))

    def stop_hog(self) -> None:
        for p in self.hog:
            p.kill()
            p.wait()
        self.hog.clear()

    async def watch_taking_calls(self, h: Host) -> None:
        """When the host stops and starts taking calls, as its log says (polled every 0.2 s)."""
        state = True
        while h.serve is not None:
            now = h.serve.taking_calls()
            if now != state:
                self.host_states.append((time.monotonic(), now))
                state = now
            await asyncio.sleep(0.2)

    def not_taking_s(self, start: float, end: float) -> float:
        """Seconds the hogged host was not taking calls between ``start`` and ``end``."""
        total, state, since = 0.0, True, start
        for t, taking in [*self.host_states, (end, True)]:
            t = min(max(t, start), end)
            if not state:
                total += t - since
            state, since = taking, t
        return round(total, 1)

    async def wait_taking_calls(self, h: Host, taking: bool, timeout: float) -> bool:
        assert h.serve is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if h.serve.taking_calls() == taking:
                return True
            await asyncio.sleep(0.1)
        return False

    async def story(self) -> dict[str, Any]:
        a = self.args
        assert self.sampler is not None
        names = [f"fleet-{i + 1:02d}" for i in range(a.rooms)]
        bursts = [names[i:i + a.burst] for i in range(0, len(names), a.burst)]
        tracks: list[RoomTrack] = []
        watcher = asyncio.create_task(self.watch_taking_calls(self.host("hogged")))
        self.mark("first_burst")
        for b, rooms in enumerate(bursts[:-1]):
            if b:
                await asyncio.sleep(max(0.0, self.events["first_burst"] + b * a.burst_gap - time.monotonic()))
            self.progress(f"burst {b + 1}/{len(bursts)}: {len(rooms)} rooms")
            tracks += await self.burst(b, rooms)
        # Mid-call, not mid-start: the kill waits (bounded) until the first bursts' agents are in.
        deadline = time.monotonic() + a.settle_max
        while time.monotonic() < deadline and not all(t.samples and t.samples[-1][2] for t in tracks):
            await asyncio.sleep(0.2)
        await asyncio.sleep(a.settle)

        killed, drained, hogged = (self.host(r) for r in ROLES)
        # Where the first bursts' calls are, just before the incidents.
        self.held_at_kill = {h.role: h.serve.held_rooms() if h.serve else set() for h in self.hosts}
        killed_rooms = self.held_at_kill["killed"]
        drained_rooms_at_term = drained.serve.held_rooms() if drained.serve else set()
        self.progress(f"SIGKILL the {killed.tag} host (its {len(killed_rooms)} calls with it)")
        self.sampler.kill_rooms = killed_rooms
        self.sampler.kill_ms = time.time() * 1000  # the server's clock is this machine's
        self.mark("kill")
        pids = self.kill_host(killed)
        self.progress(f"   killed {len(pids)} processes: " + ", ".join(f"{n} {c}" for n, c in self.killed_what.items()))
        await asyncio.sleep(2.0)

        self.progress(f"SIGTERM the {drained.tag} host (drain) and a CPU hog for {hogged.tag}")
        assert drained.serve is not None and hogged.serve is not None
        self.mark("drain")
        drained.serve.signal(signal.SIGTERM)
        if a.replacement:  # a rolling deploy: the new instance comes up as the old one drains
            fresh = Host("replacement", drained.node, "fleet-replacement")
            self.hosts.append(fresh)
            with self.priority.normal():
                fresh.serve = ServeProcess(self.serve_env(fresh), self.tmp / fresh.tag).start()
        self.hog_log_at = len(hogged.serve.output())
        self.mark("hog_start")
        self.start_hog()
        # (On a busy machine it may have said so before the hog already: counted in the results.)
        full = await self.wait_taking_calls(hogged, False, a.hog_wait)
        if full:
            self.mark("hog_full")
        self.progress(f"   {hogged.tag}: " + ("not taking calls (CPU)" if full else
                                              f"still taking calls after {a.hog_wait:.0f} s of the hog"))
        self.progress(f"burst {len(bursts)}/{len(bursts)}: {len(bursts[-1])} rooms during the hog")
        self.mark("last_burst")
        tracks += await self.burst(len(bursts) - 1, bursts[-1])
        await asyncio.sleep(max(0.0, self.events["last_burst"] + a.hog_s - time.monotonic()))
        self.stop_hog()
        self.mark("hog_end")
        self.progress("hog stopped: capacity frees")
        back = await self.wait_taking_calls(hogged, True, 20)
        self.progress(f"   {hogged.tag}: " + ("taking calls again" if back else "not taking calls again within 20 s"))
        await asyncio.sleep(max(0.0, self.events["hog_end"] + a.second_term_after - time.monotonic()))
        drained_rooms = drained.serve.held_rooms()
        self.progress(f"second SIGTERM for {drained.tag}: its calls end now")
        old_drained = {s for t in tracks if t.name in drained_rooms and t.samples for s in t.samples[-1][1]}
        self.mark("second_term")
        drained.serve.signal(signal.SIGTERM)
        await asyncio.sleep(a.observe)
        self.mark("end")
        watcher.cancel()
        return self.results(tracks, killed_rooms, drained_rooms_at_term, drained_rooms, old_drained)

    def results(self, tracks: list[RoomTrack], killed_rooms: set[str], drained_at_term: set[str],
                drained_rooms: set[str], old_drained: set[str]) -> dict[str, Any]:
        assert self.sampler is not None and self.cluster is not None
        ev, a, ghosts = self.events, self.args, self.sampler.ghosts
        last_burst = len(tracks) and max(t.burst for t in tracks)
        node_of = {nid: i for i, nid in enumerate(n.node_id for n in self.cluster.nodes)}
        by_host = {h.role: set(h.serve.calls().values()) if h.serve else set() for h in self.hosts}

        def lat(ts: list[RoomTrack]) -> dict[str, Any]:
            return dist([t.user.agent_seen - t.user.started for t in ts
                         if t.user.agent_seen is not None and t.user.started is not None])

        def recovered(ts: list[RoomTrack], since: float, old: set[str]) -> dict[str, Any]:
            times = [(t.name, first_new_agent(t, since, old)) for t in ts]
            back = [x - since for _, x in times if x is not None]
            return {"rooms": len(ts), "recovered": len(back), "seconds": dist(back),
                    "never": sorted(n for n, x in times if x is None)}

        rooms_out = []
        lost = []
        for t in tracks:
            longest = longest_gap(t, ev["end"])
            last_live = t.samples[-1][2] if t.samples else ()
            is_lost = t.user.error != "" or longest > a.lost_after or not last_live
            if is_lost:
                lost.append(t.name)
            host = next((r for r, rs in self.held_at_kill.items() if t.name in rs), None)
            rooms_out.append({
                "room": t.name, "burst": t.burst + 1, "user_node": t.node,
                "room_node": node_of.get(t.host_node or "", None), "hosts": sorted(r for r, rs in by_host.items()
                                                                                  if t.name in rs),
                "host_at_kill": host, "join_error": t.user.error,
                "agent_s": None if t.user.agent_seen is None else round(t.user.agent_seen - t.user.started, 3),
                "longest_without_agent_s": round(longest, 2), "agent_at_end": bool(last_live), "lost": is_lost,
                "max_agents": t.max_agents, "max_live_agents": t.max_live_agents, "api_errors": t.errors,
                "timeline": [(round(x[0] - self.events["first_burst"], 2), list(x[1]), list(x[2]), x[3])
                             for x in t.samples],
            })

        ghost_gone = []
        for t in tracks:
            if t.name not in killed_rooms:
                continue
            if not any(set(x[1]) & ghosts for x in t.samples):
                continue  # its call had not joined yet: no ghost
            gone = next((x[0] for x in t.samples if x[0] >= ev["kill"] and not (set(x[1]) & ghosts)), None)
            if gone is not None:
                ghost_gone.append(gone - ev["kill"])
        killed_tracks = [t for t in tracks if t.name in killed_rooms]
        drained_tracks = [t for t in tracks if t.name in drained_rooms]
        refused = [t for t in tracks if t.burst == last_burst and (t.user.agent_seen is None
                                                                    or t.user.agent_seen > ev["hog_end"])]
        kept_during_drain = [t for t in tracks if t.name in drained_at_term and
                             all(x[2] for x in window(t, ev["drain"], ev["second_term"]))]
        hogged = self.host("hogged")
        hog_out = hogged.serve.output() if hogged.serve else ""
        server_failures: dict[str, int] = {}
        for n in self.cluster.nodes:  # the job requests' failures (not those of terminations: they name a jobID)
            for err in re.findall(r'failed to send job request\t\{"error": "([^"(]+)[^"]*", "namespace"', n.log_path.read_text(errors="replace")):
                server_failures[err.strip()] = server_failures.get(err.strip(), 0) + 1
        periods = [p for t in tracks for p in t.periods]
        rel = {k: round(v - ev["first_burst"], 2) for k, v in ev.items()}
        placement = {h.role: {"node": h.node, "calls_started": len(h.serve.calls()) if h.serve else 0,
                              "calls_at_kill": len(self.held_at_kill.get(h.role, ()))} for h in self.hosts}
        room_nodes: dict[str, int] = {}
        for r in rooms_out:
            room_nodes[str(r["room_node"])] = room_nodes.get(str(r["room_node"]), 0) + 1
        return {
            "events_s": rel,
            "latency_before_incidents_s": lat([t for t in tracks if t.burst < last_burst]),
            "latency_last_burst_s": lat([t for t in tracks if t.burst == last_burst]),
            "killed": {**recovered(killed_tracks, ev["kill"], ghosts), "ghost_linger_s": dist(ghost_gone)},
            "drained": {"rooms_at_first_sigterm": len(drained_at_term), "kept_agent_while_draining": len(kept_during_drain),
                        **recovered(drained_tracks, ev["second_term"], old_drained)},
            "refused_during_hog": {**recovered(refused, ev["hog_end"], set()),
                                   "hog_full": "hog_full" in ev},
            "lost": sorted(lost), "rooms_lost": len(lost),
            "no_agent_at_end": sorted(r["room"] for r in rooms_out if not r["agent_at_end"]),
            "hogged_not_taking_s": {"before_hog": self.not_taking_s(ev["first_burst"], ev["hog_start"]),
                                    "hog": self.not_taking_s(ev["hog_start"], ev["hog_end"]),
                                    "after_hog": self.not_taking_s(ev["hog_end"], ev["end"])},
            "no_agent_at_kill": sorted(t.name for t in tracks if t.burst < last_burst
                                       and (t.user.agent_seen is None or t.user.agent_seen > ev["kill"])),
            "hogged_refusals_before_hog": len(re.findall(r"refused job", hog_out[:self.hog_log_at])),
            "hogged_full_before_hog": len(re.findall(r"not taking calls: host CPU", hog_out[:self.hog_log_at])),
            "server_job_failures": server_failures,
            "rooms_two_agents": sum(1 for t in tracks if t.max_live_agents >= 2),
            "rooms_two_agents_with_ghosts": sum(1 for t in tracks if t.max_agents >= 2),
            "placement": placement, "room_nodes": room_nodes,
            "cross_node_calls_at_kill": sum(1 for r in rooms_out if r["host_at_kill"] and r["room_node"] is not None
                                            and r["room_node"] != placement[r["host_at_kill"]]["node"]),
            "sampler": {"period_ms": {k: (None if v is None else round(v * 1000, 1)) for k, v in dist(periods).items()
                                      if k != "n"}, "samples": len(periods) + len(tracks),
                        "api_errors": sum(t.errors for t in tracks)},
            "rooms": rooms_out,
        }

    async def run(self) -> dict[str, Any]:
        a = self.args
        binary = find_server_binary()
        if binary is None:
            raise SystemExit("livekit-server not found: ./scripts/setup --server builds it")
        if find_redis_binary() is None:
            raise SystemExit("redis-server not found: ./scripts/setup --fleet installs Debian's")
        res: dict[str, Any] = {
            "command": " ".join(shlex.quote(x) for x in [sys.argv[0], *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()}, "git": git_state(),
            "agent": "worker.py job + stand-in" if a.real else "tests/fake_agent_child.py",
            "settings": {k: v for k, v in vars(a).items() if k != "json"}, "bench_priority": self.priority.note,
            "logs": str(self.tmp)}
        if a.real:
            import logging

            from standin import StandIn, StandInOptions

            # Its connection log would bury the progress lines (start() keeps a level above info).
            logging.getLogger("standin.websockets").setLevel(logging.WARNING)

            self.standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, greeting_seconds=1.0, reply_mode="tone"))
            await self.standin.start()
        self.cluster = LiveKitCluster(binary, self.tmp / "cluster", nodes=2)
        meter = None
        try:
            self.cluster.start()
            self.sampler = Sampler(self.cluster.nodes[0].url, a.sample_ms / 1000)
            await self.sampler.start()
            self.progress("cluster up: " + ", ".join(f"node {i} {n.url}" for i, n in enumerate(self.cluster.nodes)))
            await self.start_hosts()
            self.progress("hosts registered: " + ", ".join(f"{h.tag} at node {h.node}" for h in self.hosts))
            meter = MachineMeter()
            cpu0 = self.observer_cpu()
            t_story = time.monotonic()
            async with asyncio.timeout(a.deadline):
                res.update(await self.story())
            res["observer_cores"] = {k: round((v - cpu0[k]) / (time.monotonic() - t_story), 3)
                                     for k, v in self.observer_cpu().items()}
        except BaseException:
            traceback.print_exc()  # now: the clean-up below takes a while
            raise
        finally:
            res["machine"]["busy_cores"] = meter.stop().get("busy_cores") if meter else None
            self.progress("stopping: the sampler, the users, the hosts, the cluster")
            self.stop_hog()
            if self.sampler is not None:
                await self.sampler.stop()
            await asyncio.gather(*(u.leave() for u in self.users), return_exceptions=True)
            await self.stop_hosts()
            self.cluster.stop()
            if self.standin is not None:
                await self.standin.stop()
        res["machine"]["loadavg_end"] = loadavg()
        res["tracebacks"] = {h.tag: h.serve.output().count("Traceback") for h in self.hosts if h.serve}
        return res

    async def main(self) -> dict[str, Any]:
        """run(), ended cleanly on SIGTERM or SIGINT too: every process it started is stopped."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        return await self.run()

    def observer_cpu(self) -> dict[str, float]:
        """CPU seconds of what a worker host would not run: this bench (users, sampler), the nodes."""
        assert self.cluster is not None
        out = {"bench": self_cpu_s()}
        for i, n in enumerate(self.cluster.nodes):
            out[f"node{i}"] = (proc_cpu_s(n.proc.pid) or 0.0) if n.proc else 0.0
        return out

    def kill_everything(self) -> None:
        """The watchdog's last resort (the event loop is stuck): SIGKILL every process started."""
        pids = [pid for h in self.hosts for pid in tagged_pids(h.tag)] + [p.pid for p in self.hog]
        if self.cluster is not None:
            pids += [x.proc.pid for x in [*self.cluster.nodes, self.cluster.redis] if x.proc is not None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop_hosts(self) -> None:
        for h in self.hosts:
            if h.serve is not None:
                h.serve.signal(signal.SIGTERM)
        await asyncio.sleep(0.7)  # two signals back to back can arrive as one (and serve counts a second one only after 0.5 s)
        for h in self.hosts:
            if h.serve is not None:
                h.serve.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(tagged_pids(h.tag) for h in self.hosts) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for h in self.hosts:  # whatever is left (a bench must stop by itself)
            for pid in tagged_pids(h.tag):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if h.serve is not None:
                h.serve.kill()


# --- the report ------------------------------------------------------------------------------------


def s(v: float | None, unit: str = " s", digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def report(res: dict[str, Any]) -> str:
    m, st = res["machine"], res["settings"]
    ev = res["events_s"]
    lines = [
        f"fleet bench: {m['cpus']} CPUs; load average {m['loadavg_start']} at start, {m['loadavg_end']} at end; "
        f"machine busy {m.get('busy_cores')} cores during the run",
        f"command: {res['command']}",
        f"code: {res['git']}; call process: {res['agent']}; bench process: {res['bench_priority']}",
        f"cluster: 2 livekit-server nodes + redis; hosts: " + ", ".join(
            f"{r} at node {p['node']}" for r, p in res["placement"].items())
        + f"; MAX_CALLS={st['max_calls']} each; {st['rooms']} rooms in bursts of {st['burst']}; logs in {res['logs']}",
        f"timeline (s from the first burst): kill {ev.get('kill')}, drain + hog {ev.get('drain')}, hogged host full "
        f"{ev.get('hog_full') if res['refused_during_hog']['hog_full'] else 'never'}, last burst {ev.get('last_burst')}, "
        f"hog end {ev.get('hog_end')}, second SIGTERM {ev.get('second_term')}, end {ev.get('end')}",
        "",
        f"   {'figure':<64} {'value':<32} goal",
    ]

    def row(name: str, value: str, goal: str = "") -> None:
        lines.append(f"   {name:<64} {value:<32} {goal}")

    def d(x: dict[str, Any]) -> str:
        return "n/a" if not x["n"] else f"p50 {s(x['p50'], '', 2)} p95 {s(x['p95'], '', 2)} max {s(x['max'], '', 2)} s"

    lb, ll = res["latency_before_incidents_s"], res["latency_last_burst_s"]
    row(f"room -> agent, bursts before the incidents (n={lb['n']})", d(lb))
    row(f"room -> agent, last burst, during the hog (n={ll['n']})", d(ll))
    k, dr, rf = res["killed"], res["drained"], res["refused_during_hog"]
    row("killed host: rooms it held / agent back", f"{k['rooms']} / {k['recovered']}", "all back")
    row("   kill -> agent back", d(k["seconds"]))
    row("   kill -> the dead agent gone from the server's list", d(k["ghost_linger_s"]))
    row("drained host: rooms at 1st SIGTERM / kept agent in drain", f"{dr['rooms_at_first_sigterm']} / "
        f"{dr['kept_agent_while_draining']}", "all kept")
    row("   its rooms at the 2nd SIGTERM / agent back", f"{dr['rooms']} / {dr['recovered']}", "all back")
    row("   2nd SIGTERM -> agent back", d(dr["seconds"]))
    row("rooms without an agent at the hog's end / agent back", f"{rf['rooms']} / {rf['recovered']}", "all back")
    row("   hog end (capacity frees) -> agent back", d(rf["seconds"]))
    row(f"rooms lost (no agent > {st['lost_after']:.0f} s, or none at the end)",
        f"{res['rooms_lost']} of {st['rooms']}", "0")
    row("   of them: no agent at the end", f"{len(res['no_agent_at_end'])} of {st['rooms']}", "0")
    row("rooms of the first bursts still without an agent at the kill", str(len(res["no_agent_at_kill"])), "0")
    row("hogged host before the hog: times full (CPU) / refusals",
        f"{res['hogged_full_before_hog']} / {res['hogged_refusals_before_hog']}", "0 / 0")
    nt = res["hogged_not_taking_s"]
    row("hogged host not taking calls: s before / during / after the hog",
        f"{nt['before_hog']} / {nt['hog']} / {nt['after_hog']}",
        f"0 / {res['events_s']['hog_end'] - res['events_s']['hog_start']:.0f} / 0")
    row("jobs the server could not place (its log, by error)",
        ", ".join(f"{k}: {v}" for k, v in sorted(res["server_job_failures"].items())) or "none")
    row("rooms ever with two agents (ghosts counted too)",
        f"{res['rooms_two_agents']} ({res['rooms_two_agents_with_ghosts']})", "0")
    pl = res["placement"]
    row("calls per host just before the kill", ", ".join(f"{r} {p['calls_at_kill']}" for r, p in pl.items()))
    row("calls started per host, whole run", ", ".join(f"{r} {p['calls_started']}" for r, p in pl.items()))
    row("rooms hosted per node (None: never placed)", ", ".join(f"node {n}: {c}" for n, c in
                                                                sorted(res["room_nodes"].items())))
    row("of the calls at the kill, on another node than their room", str(res["cross_node_calls_at_kill"]))
    sp = res["sampler"]["period_ms"]
    row("sampler period (goal --sample-ms)", f"p50 {sp['p50']} p95 {sp['p95']} max {sp['max']} ms",
        f"{st['sample_ms']} ms")
    oc = res.get("observer_cores", {})
    row("observers' CPU: bench (users, sampler) / node 0 / node 1",
        f"{oc.get('bench')} / {oc.get('node0')} / {oc.get('node1')} cores")
    if res["lost"]:
        lines.append(f"   lost: {', '.join(res['lost'])}")
    if any(res["tracebacks"].values()):
        lines.append(f"   tracebacks in serve logs: {res['tracebacks']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="python worker.py job with the stand-in (default: the fake)")
    ap.add_argument("--rooms", type=int, default=None, help="rooms in all (default 30; 9 with --real)")
    ap.add_argument("--burst", type=int, default=None, help="rooms per burst (default 10; 3 with --real)")
    ap.add_argument("--burst-gap", type=float, default=8.0, help="seconds between the first bursts' starts")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds after the first bursts' rooms all have an agent, before the kill")
    ap.add_argument("--settle-max", type=float, default=30.0,
                    help="at most this long for those rooms to have an agent (some may never get one)")
    # The node with two hosts takes every job while it has headroom (livekit-server offers a job
    # to the node whose hosts' summed headroom is highest): killed and drained share it, so that
    # both hold calls when the incidents come.
    ap.add_argument("--nodes", default="0,0,1",
                    help="the nodes of the killed, drained and hogged hosts (default 0,0,1)")
    ap.add_argument("--max-calls", type=int, default=20, help="MAX_CALLS of every host")
    ap.add_argument("--no-replacement", dest="replacement", action="store_false",
                    help="no new host when the drained one drains (the fleet shrinks to one host taking calls)")
    ap.add_argument("--hog-threshold", type=float, default=0.98,
                    help="LOAD_THRESHOLD of the hogged host (high: this machine is shared and busy)")
    ap.add_argument("--hog-wait", type=float, default=30.0, help="at most this long for the hog to make it full")
    ap.add_argument("--hog-s", type=float, default=15.0, help="the hog lasts this long after the last burst")
    ap.add_argument("--second-term-after", type=float, default=5.0, help="seconds after the hog's end")
    ap.add_argument("--observe", type=float, default=30.0, help="seconds after the second SIGTERM")
    ap.add_argument("--lost-after", type=float, default=10.0, help="a room this long without an agent is lost")
    ap.add_argument("--sample-ms", type=float, default=100.0)
    ap.add_argument("--deadline", type=float, default=300.0, help="the whole story is abandoned after this long")
    ap.add_argument("--bench-priority", choices=["rt", "normal"], default="normal",
                    help="normal (default): this bench measures placement and recovery, not audio timing")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    args.rooms = args.rooms or (9 if args.real else 30)
    args.burst = args.burst or (3 if args.real else 10)
    args.nodes = [int(x) for x in args.nodes.split(",")]
    if len(args.nodes) != 3 or not all(n in (0, 1) for n in args.nodes):
        ap.error("--nodes: three of 0 and 1")
    if args.rooms <= args.burst:
        ap.error("--rooms must be more than one --burst: the last burst is the one during the hog")
    if not os.environ.get("VOICE_AGENT_TEST_IP"):
        print("warning: VOICE_AGENT_TEST_IP is unset: WebRTC media will use this host's addresses; "
              "./scripts/bench runs this in its own network namespace", file=sys.stderr)
    priority = BenchPriority(args.bench_priority)
    priority.apply()
    faulthandler.register(signal.SIGUSR1)  # where is it stuck: kill -USR1 <pid>
    bench = Bench(args, priority)

    def watchdog() -> None:
        # The story's own deadline needs a running event loop; this one does not.
        print(f"fleet bench: still running {args.deadline + 120:.0f} s after the start: stopping everything",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        bench.kill_everything()
        os._exit(3)

    timer = threading.Timer(args.deadline + 120, watchdog)
    timer.daemon = True
    timer.start()
    res = asyncio.run(bench.main())
    timer.cancel()
    print(report(res), flush=True)
    save_results(args.json, res)


if __name__ == "__main__":
    main()
    # As dispatch_bench.py: skip the interpreter's teardown of the LiveKit native library.
    import exits

    exits.exit_now(0)
