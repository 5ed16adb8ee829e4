#!/usr/bin/env python3
"""LiveKit agent dispatch: the agent comes to every room, one call per child process.

    python worker.py serve      register with the LiveKit server as an agent worker and run
                                one child process per job (``python worker.py job``)
    python worker.py check      includes: can this key register a worker? (``probe_registration``)

The single-room worker (``python worker.py``) joins one configured room and waits. Here the
process registers with the LiveKit server as an *agent worker*; the server offers it a job
for every room that should get an agent, and every job it accepts runs as a child process
of its own: the same single-room code path, given the job's URL and token on its stdin.

Layers, like bridge.py:

* ``WorkerCore`` -- sans-I/O protocol core. Feed it ``ServerMessage``s, connection events,
  child events and the time; it returns effects (``Send`` a ``WorkerMessage``, ``Launch``
  a job, ``Stop`` a job, ``Reconnect``). It decides availability (``MAX_CALLS``, the CPU
  threshold, draining), keeps the job bookkeeping, reports load and status, and times the
  ping/pong and the registration. No sockets, no clock of its own.
* ``Supervisor`` -- the child processes: spawn with the job as one JSON line on stdin
  (never argv, never the environment, never logged), readiness and liveness over an
  sd_notify socket of their own (``READY=1``, ``WATCHDOG=1``: the worker already speaks it
  to systemd), SIGTERM to stop, SIGKILL after ``JOB_STOP_TIMEOUT_S``; exit code -> success
  or failure.
* ``Dispatcher`` -- the thin async layer: the ``/agent`` WebSocket, reconnect with backoff
  and re-register (calls in progress keep running), signals and draining, the CPU meter,
  sd_notify to systemd, an optional health endpoint. A call process that exits with an
  error every call would share (``HOPELESS_EXITS``: configuration, rejected API key)
  takes the host out of the fleet: no new calls, exit with that code once the others end.
* For children: ``read_job()`` and ``bind_to_parent()`` (a child never outlives us).

Protocol flow (``livekit.protocol.agent``)::

    worker                                      livekit-server
    GET <LIVEKIT_URL>/agent?protocol=1, Authorization: Bearer <token with the agent grant>
    RegisterWorkerRequest(JT_ROOM, agent_name, version, ping_interval, permissions) ->
                                             <- RegisterWorkerResponse(worker_id, server_info)
    UpdateWorkerStatus(WS_AVAILABLE|WS_FULL, load, job_count) -> (at once, then every 2.5 s
                                                                   and on every change)
                                             <- AvailabilityRequest(job)       (a room wants us)
    AvailabilityResponse(job_id, available, participant_identity/name) ->
                                             <- JobAssignment(job, url, token)
    (child joins the room with url/token, sends READY=1)
    UpdateJobStatus(job_id, JS_RUNNING) ->
                                             <- JobTermination(job_id)          (optional)
    UpdateJobStatus(job_id, JS_SUCCESS|JS_FAILED, error) ->   (when the child exits)
    WorkerPing(ts) -> / <- WorkerPong(last_timestamp=ts, timestamp)          (every 5 s)

What livekit-server v1.13.5 does (read in its source, pkg/agent/{worker,client}.go,
pkg/service/agentservice.go, pkg/rtc/room.go and psrpc's client, then tried against the
binary; tests/test_dispatch.py checks the parts this module relies on):

* Registration: the ``/agent`` upgrade needs a token whose video grant has ``agent``
  (else HTTP 401); the ``protocol`` query parameter sets the worker protocol (1). The
  server waits 10 s for the RegisterWorkerRequest, then answers with a worker id
  (``AW_...``). ``RegisterWorkerRequest.ping_interval`` is ignored. The server pings the
  socket (WebSocket ping frames) every 10 s and answers ``WorkerPing`` with ``WorkerPong``;
  it has no read deadline of its own once registered.
* Which rooms: every room, when it is created, gets a dispatch per ``RoomAgentDispatch`` of
  its creator's token (``RoomConfiguration.agents``), or one dispatch with an empty agent
  name if there is none (automatic dispatch). ``AgentDispatchService.CreateDispatch`` adds
  one to an existing room. A dispatch is offered only to workers registered with exactly
  that agent name; a room created while no worker with that name is registered gets no
  agent, and nothing retries it later (``JobRestartPolicy`` is not implemented in OSS).
* Selection, about 0.2 s after the room is created: first a node, by affinity = the sum
  of ``agents.target_load`` (0.7 by default) minus ``load`` over its workers with that
  name whose last status is ``WS_AVAILABLE``; a node with affinity 0 is never chosen, so
  when every available worker reports a load >= 0.7 the job goes nowhere ("no servers
  available"). Then one of those workers at random, weighted by ``1 - load``. A new worker
  counts as available with load 0 until it reports.
* Availability: ``available=false`` -> the server tries the next worker it has not tried
  for this job; when none is left the job fails ("no workers with sufficient capacity")
  and the room stays without an agent for good. A socket that closes while the server
  waits counts as a refusal (next worker). The whole request, every worker tried, is
  bounded by psrpc's 3 s client timeout (the worker's own 10 s ``AssignJobTimeout`` never
  comes into play): a worker that has not answered within 3 s loses the job, and nothing
  retries it. ``terminate=true`` ends the job as successful at once.
* Assignment: right after an accepting answer. ``JobAssignment.url`` is empty (join the URL
  the worker uses); ``token`` is a JWT valid for 1 h, minted by the server with the
  answer's identity, name, metadata and attributes plus ``lk.agent_name`` = the worker's
  agent name, kind AGENT, the grants ``roomJoin``, ``agent``, ``room``, and the
  publish/subscribe/data/metadata permissions the worker registered with.
* Job status: a job is "running" from the assignment on. ``UpdateJobStatus`` with
  JS_SUCCESS or JS_FAILED ends it (updates for unknown jobs are ignored). When the agent
  participant leaves the room the server ends the job itself (JS_FAILED, "agent worker
  left the room") and sends ``JobTermination``; deleting a dispatch, or the room closing,
  does the same. So a JobTermination often arrives for a child that is already leaving.
* ``UpdateWorkerStatus``: the server keeps ``status`` (when present) and ``load``;
  ``job_count`` is informational. ``MigrateJobRequest`` is a no-op in OSS.
* A closed socket deregisters the worker and forgets its jobs (no JobTermination will come
  for them); re-registering gives a new worker id. The calls themselves are unaffected:
  they are independent room participants. After a server restart the rooms are gone, the
  children's own reconnect logic decides what they do.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime
import enum
import ipaddress
import json
import logging
import math
import os
import random
import shlex
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import rescue
from backoff import Backoff
from http_endpoint import Endpoint
from exits import EXIT_CONFIG, EXIT_INTERNAL, EXIT_LIVEKIT_AUTH, EXIT_OK, HOPELESS_EXITS, FatalError
from logs import LogContext, one_line
from systemd import SystemdNotifier

if TYPE_CHECKING:
    from config import Config  # the serve process's configuration; not imported by the call processes

log = logging.getLogger("dispatch")

REPO = Path(__file__).resolve().parent
WORKER_VERSION = "voice-agent-bridge/1"
AGENT_PROTOCOL = 1  # the `protocol` query parameter of /agent (livekit-server's agent.CurrentProtocol)

# Timing of the worker protocol (seconds). livekit-agents uses 7.5 s for the assignment and
# 2.5 s for the status; the server waits 10 s for an availability answer and 10 s for the
# registration.
ASSIGNMENT_TIMEOUT_S = 7.5
STATUS_INTERVAL_S = 2.5
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 15.0
REGISTER_TIMEOUT_S = 10.0
TICK_S = 0.5

# Capacity. PER_CALL_CORES: one call process of serve mode (`python worker.py job`, the
# stand-in API), measured with `bench/dispatch_bench.py` (2026-11-30, this 2-core VM shared
# with other engineers' runs, two runs at load averages 0.6-5.1 and 4.5-5.3): 0.062-0.080
# cores per call held with a turn every ~3.5 s (0.8 s of user speech, a 1 s reply: busier
# than a real conversation), at 1 to 8 calls at once; the e2e bench measured the single-room
# worker at 0.077-0.090. 0.1 is that rounded up by about a third (longer replies, tool
# calls). Not in it: the start-up burst of every call process (0.5-0.7 CPU s in its first
# second), which TARGET_CPU_SHARE's headroom covers. TARGET_CPU_SHARE: calls may use 70 % of
# the cores, the rest is headroom for the real-time audio threads, start-up bursts and the
# rest of the host; livekit-agents' production load threshold is 0.7 as well. So a host
# holds 14 calls per 2 cores by default (4 cores 28, 8 cores 56). A host that does more than
# calls is held back by LOAD_THRESHOLD (the same 0.7, on the host's CPU): the bench's ramp,
# with its own users (0.5 cores at 6 calls) and livekit-server on the same 2 cores, held 6
# calls cleanly and degraded at 8 (4 and 6 in the busier run).
PER_CALL_CORES = 0.1
TARGET_CPU_SHARE = 0.7

# Memory. PER_CALL_MEMORY_MB: one call process with a conversation going (2026-12-08, this VM,
# three calls at once with the stand-in API): 86 MB RSS, 55 MB PSS, 51 MB of it private; 90 is
# the RSS rounded up (the shared pages count once in a cgroup, so this errs on the safe side).
# MEMORY_RESERVE_MB: the serve process (64 MB RSS) and one control upload being decoded (up to
# ~310 MB, deploy/voice-agent.service), which any call may start at any time. Without this
# bound a host of 8 cores (56 calls by the CPU) under the serve unit's MemoryMax=3G would meet
# the OOM killer, which may take serve and every call with it.
PER_CALL_MEMORY_MB = 90
MEMORY_RESERVE_MB = 384

# livekit-server's `agents.target_load` default: a node whose available workers all report a
# load at or above it is not offered jobs at all (see WorkerCore.load).
SERVER_TARGET_LOAD = 0.7

# Once the CPU gate shuts, it opens again only this far under LOAD_THRESHOLD: a host hovering
# at the threshold neither flaps between taking and refusing calls nor logs each flip.
CPU_HYSTERESIS = 0.05
# The CPU figure is a moving average over this many ticks (TICK_S each): 5 s, twice LiveKit
# Agents' 2.5 s. A browser starting or a page compiling is a 1-3 s burst that must not turn a
# user away; a host really full for 5 s is still noticed well inside the frontend's 20 s.
CPU_WINDOW_TICKS = 10

# What a call process gets to hand its call over (see WorkerCore.stop_all), also as its
# parent-death signal: a host that dies leaves its calls to the rest of the fleet.
HANDOVER_SIGNAL = signal.SIGUSR2

# A second SIGTERM/SIGINT counts (hands the calls over now) only this long after the first.
URGENT_SIGNAL_AFTER_S = 0.5

CHILD_WATCHDOG_S = 10.0  # WATCHDOG_USEC given to a child: it pings every 5 s
CHILD_WATCHDOG_GRACE = 2.0  # killed after 2 x CHILD_WATCHDOG_S without a ping

AGENT_NAME_ATTRIBUTE = "lk.agent_name"  # set by the server on the agent's token
AGENT_DISPLAY_NAME = "Voice Agent"  # the agent participant's name in every room


# --- settings -------------------------------------------------------------------------------


def available_cores() -> float:
    """CPUs this process may use: a cgroup v2 CPU quota (a container's limit) if there is one,
    else the CPUs of its affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(0.1, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


def available_memory_mb(root: Path = Path("/")) -> float | None:
    """Memory this process and its calls may use, in MB: the host's MemAvailable, or less
    where a cgroup memory limit on the way from this process's cgroup to the top is lower
    (a container's or a systemd unit's MemoryMax; cgroup v2 memory.max, v1
    memory.limit_in_bytes). None if neither can be read."""
    limits: list[float] = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        groups = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        groups = []
    for line in groups:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            top, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            top, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        folder = top / path.strip().lstrip("/")
        while folder == top or top in folder.parents:
            try:
                text = (folder / name).read_text().strip()
                if text != "max":
                    limits.append(int(text) / 2**20)
            except (OSError, ValueError):
                pass
            if folder == top:
                break
            folder = folder.parent
    return min(limits) if limits else None


def default_max_calls(cores: float | None = None, memory_mb: float | None = None) -> int:
    """The calls this host holds: by the cores (TARGET_CPU_SHARE of them at PER_CALL_CORES a
    call) and by the memory (PER_CALL_MEMORY_MB a call after MEMORY_RESERVE_MB), whichever is
    fewer. None: this process's (available_cores, available_memory_mb)."""
    cores = available_cores() if cores is None else cores
    by_cpu = math.floor(cores * TARGET_CPU_SHARE / PER_CALL_CORES + 1e-9)
    memory_mb = available_memory_mb() if memory_mb is None else memory_mb
    by_memory = (math.floor((memory_mb - MEMORY_RESERVE_MB) / PER_CALL_MEMORY_MB)
                 if memory_mb is not None and math.isfinite(memory_mb) else by_cpu)
    return max(1, min(by_cpu, by_memory))


def default_job_command() -> tuple[str, ...]:
    return (sys.executable, str(REPO / "worker.py"), "job")


def job_command(cfg: "Config") -> tuple[str, ...]:
    """What runs per job: SERVE_JOB_COMMAND, else ``python worker.py job``."""
    return tuple(cfg.serve_job_command) or default_job_command()


def dev_mode(livekit_url: str, env: Mapping[str, str], interactive: bool) -> str | None:
    """Why this serve process is a developer's (LiveKit Agents' ``dev``), or None in
    production: there a busy host never turns a call away (the browser and the bundler of
    the frontend share the machine; a refused room gets no agent for good)."""
    from urllib.parse import urlsplit

    import devserver

    if devserver.managed_by(env) is not None:
        return None
    host = (urlsplit(livekit_url).hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return "the LiveKit server is on this machine"
    if interactive:
        return "run from a terminal"
    return None


def load_threshold(cfg: "Config", env: Mapping[str, str], interactive: bool) -> tuple[float, str | None]:
    """LOAD_THRESHOLD, else TARGET_CPU_SHARE in production and off (1) in dev mode; and why
    dev mode, when it decided."""
    if cfg.load_threshold is not None:
        return cfg.load_threshold, None
    why = dev_mode(cfg.livekit_url, env, interactive)
    return (1.0, why) if why else (TARGET_CPU_SHARE, None)


def max_calls(cfg: "Config") -> int:
    """MAX_CALLS, else the default for the cores this process may use."""
    return cfg.max_calls or default_max_calls()


def agent_ws_url(livekit_url: str) -> str:
    """``<LIVEKIT_URL>/agent?protocol=1``, with ws/wss for http/https; a path prefix is kept."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(livekit_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/agent", f"protocol={AGENT_PROTOCOL}", ""))


def worker_token(api_key: str, api_secret: str, ttl_s: int = 600) -> str:
    """The token for the /agent socket: only the ``agent`` grant (it gates the handshake)."""
    from livekit import api

    return (api.AccessToken(api_key, api_secret).with_grants(api.VideoGrants(agent=True))
            .with_ttl(datetime.timedelta(seconds=ttl_s)).to_jwt())


# --- the job, as a child receives it ------------------------------------------------------------


JOB_FORMAT = 1


@dataclass(frozen=True)
class JobSpec:
    """Everything a child needs for its call. Goes to the child as one JSON line on stdin."""

    job_id: str
    room: str
    url: str
    token: str
    identity: str
    name: str
    kind: str = "agent"
    metadata: str = ""
    agent_name: str = ""
    dispatch_id: str = ""
    room_sid: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    worker_id: str = ""
    parent_pid: int = 0
    stop_timeout_s: float = 10.0
    # Not a job of the server's: a room this host found without its agent and joins with a
    # token of its own (rescue.RESCUE_UNPLACED or RESCUE_LOST).
    rescue: str = ""
    resume_session: str = ""  # with a rescue: the Voice Agent session its call had, to resume

    def __repr__(self) -> str:  # never print the token
        return f"JobSpec(job_id={self.job_id!r}, room={self.room!r}, identity={self.identity!r})"

    __str__ = __repr__

    def to_json_line(self) -> bytes:
        d = {"format": JOB_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        d["attributes"] = dict(self.attributes)
        return (json.dumps(d, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != JOB_FORMAT:
            raise ValueError(f"not a job of format {JOB_FORMAT}")
        missing = [k for k in ("job_id", "room", "url", "token", "identity") if not d.get(k)]
        if missing:
            raise ValueError(f"job without {', '.join(missing)}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def read_job(fd: int = 0, timeout_s: float = 30.0) -> JobSpec:
    """In a child: read the job line from stdin (fd 0), byte-wise so nothing after it is
    consumed (stdin stays open: its EOF tells the child its parent is gone)."""
    import select

    buf = bytearray()
    deadline = time.monotonic() + timeout_s
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("no job on stdin")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError("stdin closed before a job arrived")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ValueError("job line too long")
    return JobSpec.from_json(bytes(buf))


PR_SET_PDEATHSIG = 1


def bind_to_parent(parent_pid: int, stop_timeout_s: float = 10.0, *, watch_fd: int | None = 0,
                   sig: int = HANDOVER_SIGNAL) -> bool:
    """In a child: never outlive the serve process.

    1. ``prctl(PR_SET_PDEATHSIG, sig)``: when the parent dies (even by SIGKILL) the kernel
       sends us ``sig``, so the call hands itself over (leaves, session resumable) for
       another host to take it on.
    2. If the parent is already gone (we were reparented before 1.), exit now.
    3. A thread blocks on stdin (the parent keeps its end open for our whole life): EOF means
       the parent is gone; it then arms ``alarm(stop_timeout_s + 5)``, whose default action
       kills the process even if its event loop is wedged and the SIGTERM is never handled.
    Returns False where prctl is not available (not Linux): only 2 and 3 apply then."""
    armed = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        try:
            while os.read(watch_fd, 4096):
                pass
        except OSError:
            pass
        signal.alarm(int(math.ceil(stop_timeout_s)) + 5)
        if not armed:
            os.kill(os.getpid(), sig)

    if watch_fd is not None:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return armed


# --- the sans-I/O core --------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    message: Any  # livekit.protocol.agent.WorkerMessage


@dataclass(frozen=True)
class Launch:
    spec: JobSpec


@dataclass(frozen=True)
class Stop:
    job_id: str
    reason: str
    handover: bool = False  # the host is going away: leave the session resumable for another host


@dataclass(frozen=True)
class Reconnect:
    reason: str


Effect = Union[Send, Launch, Stop, Reconnect]


class Phase(enum.Enum):
    RESERVED = "reserved"  # we answered available; waiting for the assignment
    STARTING = "starting"  # assigned; the child is starting and joining
    RUNNING = "running"  # the child is in the room (READY=1)
    STOPPING = "stopping"  # asked to end (termination, drain timeout, shutdown)


@dataclass
class Job:
    id: str
    room: str
    phase: Phase
    since: float
    dispatch_id: str = ""
    spec: JobSpec | None = None
    stop_reason: str = ""
    rescued: bool = False  # launched by this host (rescue.py), unknown to the server


@dataclass(frozen=True)
class CoreSettings:
    url: str
    agent_name: str = ""
    identity: str = "voice-agent"
    display_name: str = "Voice Agent"
    max_calls: int = 4
    load_threshold: float = TARGET_CPU_SHARE  # >= 1: no CPU gate
    cpu_hysteresis: float = CPU_HYSTERESIS
    host_id: str = ""  # set as the agent's rescue.HOST_ATTRIBUTE
    version: str = WORKER_VERSION
    ping_interval_s: float = PING_INTERVAL_S
    ping_timeout_s: float = PING_TIMEOUT_S
    register_timeout_s: float = REGISTER_TIMEOUT_S
    assignment_timeout_s: float = ASSIGNMENT_TIMEOUT_S
    status_interval_s: float = STATUS_INTERVAL_S


class WorkerCore:
    """The worker side of LiveKit's agent protocol, without I/O. Every method takes ``now``
    (monotonic seconds) and returns the effects to carry out, in order."""

    def __init__(self, settings: CoreSettings) -> None:
        from livekit.protocol import agent

        self._pb = agent
        self.s = settings
        self.jobs: dict[str, Job] = {}
        self.worker_id = ""
        self.server_version = ""
        self.connected = False
        self.registered = False
        self.registrations = 0
        self.draining = False
        self.stopping = False  # ending every call: no job is launched any more
        self.cpu_load = 0.0  # the host's CPU, 0..1, set by the I/O layer before tick()
        self.cpu_full = False  # the CPU gate is shut (see CPU_HYSTERESIS)
        self.rescued = 0
        self.rtt_ms: float | None = None
        self.accepted = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.ended: collections.Counter[str] = collections.Counter()
        self._opened_at = self._last_rx = self._last_ping = self._last_status = 0.0
        self._sent_state: tuple[int, int] | None = None
        self._last_full_reason: str | None = None

    # -- what we are --

    def _count(self, *phases: Phase) -> int:
        return sum(1 for j in self.jobs.values() if j.phase in phases)

    @property
    def job_count(self) -> int:
        """Calls with a child (starting, running or stopping)."""
        return self._count(Phase.STARTING, Phase.RUNNING, Phase.STOPPING)

    @property
    def slots_used(self) -> int:
        """Calls plus promised ones (answered available, not yet assigned)."""
        return len(self.jobs)

    @property
    def cpu_gate(self) -> bool:
        return self.s.load_threshold < 1.0

    def effective_cpu(self) -> float:
        """The CPU load with the calls that have not reached it yet (promised, starting)
        counted at the cost the running ones show, so a burst of rooms cannot all squeeze
        under the threshold before the meter notices (livekit-agents' reserved slots)."""
        pending = self._count(Phase.RESERVED, Phase.STARTING)
        running = self._count(Phase.RUNNING, Phase.STOPPING)
        per_call = self.cpu_load / running if running else self.s.load_threshold / self.s.max_calls
        return self.cpu_load + pending * per_call

    def full_reason(self) -> str | None:
        """Why we would refuse a job now, or None."""
        if self.stopping:
            return "shutting down"
        if self.draining:
            return "draining"
        if self.slots_used >= self.s.max_calls:
            return f"full: {self.slots_used} of MAX_CALLS={self.s.max_calls} calls"
        if self.cpu_gate and (self.cpu_full or self.effective_cpu() >= self.s.load_threshold):
            return (f"host CPU {self.cpu_load:.0%} ({self.effective_cpu():.0%} with starting calls) "
                    f">= LOAD_THRESHOLD {self.s.load_threshold:.0%}")
        return None

    def _update_cpu_gate(self) -> None:
        """The measured CPU shuts the gate at the threshold and opens it only under it by the
        hysteresis; calls starting count at once on top (effective_cpu)."""
        if self.cpu_gate:
            limit = self.s.load_threshold - (self.s.cpu_hysteresis if self.cpu_full else 0.0)
            self.cpu_full = self.cpu_load >= limit

    def rooms(self) -> set[str]:
        """The rooms this host has a call (or a promise of one) in."""
        return {j.room for j in self.jobs.values()}

    def utilisation(self) -> float:
        """How full we are, 0..1: the larger of our share of MAX_CALLS and the CPU against
        its threshold (the bare CPU when there is no CPU gate)."""
        cpu = self.effective_cpu() / self.s.load_threshold if self.cpu_gate else self.cpu_load
        return max(0.0, cpu, self.slots_used / self.s.max_calls)

    def load(self) -> float:
        """The load we report, on the server's scale: livekit-server offers a job to a node
        only while the sum of ``target_load - load`` over its available workers is above 0
        (``agents.target_load``, 0.7 by default), then picks a worker weighted by
        ``1 - load``. So our utilisation maps to 0..0.7, kept just under 0.7 while we take
        calls, and 1 when we do not."""
        if self.full_reason():
            return 1.0
        return round(SERVER_TARGET_LOAD * min(0.99, self.utilisation()), 4)

    # -- messages --

    def _msg(self, **kw: Any) -> Any:
        return self._pb.WorkerMessage(**kw)

    def _status(self, now: float) -> list[Effect]:
        if not self.registered:
            return []
        reason = self.full_reason()
        status = self._pb.WS_FULL if reason else self._pb.WS_AVAILABLE
        kind = _reason_kind(reason)
        if kind != self._last_full_reason:
            # Said once per change of kind: the CPU figure in the reason moves every tick.
            if reason and not (self.draining or self.stopping):
                log.info("not taking calls: %s", reason)
            elif not reason and self._last_full_reason is not None:
                log.info("taking calls again (%d of %d in progress)", self.slots_used, self.s.max_calls)
            self._last_full_reason = kind
        self._sent_state = (status, self.job_count)
        self._last_status = now
        update = self._pb.UpdateWorkerStatus(status=status, load=self.load(), job_count=self.job_count,
                                             draining=self.draining)
        return [Send(self._msg(update_worker=update))]

    def _status_if_changed(self, now: float) -> list[Effect]:
        status = self._pb.WS_FULL if self.full_reason() else self._pb.WS_AVAILABLE
        if self.registered and (status, self.job_count) != self._sent_state:
            return self._status(now)
        return []

    def _job_update(self, job_id: str, status: int, error: str = "") -> list[Effect]:
        j = self.jobs.get(job_id)
        if j is not None and j.rescued:
            return []  # the server never knew it
        return [Send(self._msg(update_job=self._pb.UpdateJobStatus(job_id=job_id, status=status, error=error)))]

    # -- connection --

    def connection_opened(self, now: float) -> list[Effect]:
        from livekit.protocol import models

        self.connected, self.registered, self.worker_id = True, False, ""
        self._opened_at = self._last_rx = now
        self._sent_state = None
        register = self._pb.RegisterWorkerRequest(
            type=self._pb.JT_ROOM,
            agent_name=self.s.agent_name,
            version=self.s.version,
            ping_interval=int(self.s.ping_interval_s),
            allowed_permissions=models.ParticipantPermission(
                can_subscribe=True, can_publish=True, can_publish_data=True, can_update_metadata=True, agent=True),
        )
        return [Send(self._msg(register=register))]

    def connection_lost(self, now: float) -> list[Effect]:
        """The socket is gone: the server has forgotten this worker and its jobs. Promises
        die with it (the server retries those jobs elsewhere); calls keep running."""
        self.connected = self.registered = False
        for j in [j for j in self.jobs.values() if j.phase is Phase.RESERVED]:
            del self.jobs[j.id]
            log.info("job %s for room %s dropped: the connection closed before its assignment", j.id, j.room)
        return []

    def receive(self, msg: Any, now: float) -> list[Effect]:
        self._last_rx = now
        which = msg.WhichOneof("message")
        if which == "register":
            return self._on_register(msg.register, now)
        if not self.registered:
            log.warning("server sent %s before registering us; ignored", which)
            return []
        if which == "availability":
            return self._on_availability(msg.availability, now)
        if which == "assignment":
            return self._on_assignment(msg.assignment, now)
        if which == "termination":
            return self._on_termination(msg.termination.job_id, now)
        if which == "pong":
            self.rtt_ms = max(0.0, now * 1000 - msg.pong.last_timestamp)
            if self.rtt_ms > 2000:
                log.warning("LiveKit server answered a ping after %.0f ms", self.rtt_ms)
            return []
        log.debug("ignoring server message %s", which)
        return []

    def _on_register(self, reg: Any, now: float) -> list[Effect]:
        self.registered = True
        self.registrations += 1
        self.worker_id = reg.worker_id
        self.server_version = reg.server_info.version
        self._last_ping = now
        self._last_full_reason = None
        # Our real load and job count at once: until then the server thinks we are idle.
        out = self._status(now)
        running = [j.id for j in self.jobs.values() if j.phase is not Phase.RESERVED and not j.rescued]
        if running:
            # As livekit-agents does after a reconnect: name the calls we still run (a no-op
            # in livekit-server v1.13.5, which forgot them with the old connection).
            out.append(Send(self._msg(migrate_job=self._pb.MigrateJobRequest(job_ids=running))))
        return out

    def _on_availability(self, req: Any, now: float) -> list[Effect]:
        job = req.job
        reason = ("already have this job" if job.id in self.jobs
                  else "already in this room" if job.room.name in self.rooms() else self.full_reason())
        answer = self._pb.AvailabilityResponse(job_id=job.id, available=reason is None)
        if reason:
            self.refused[reason.split(":")[0].split(" ")[0]] += 1
            log.info("refused job %s for room %s: %s", job.id, job.room.name, reason)
            return [Send(self._msg(availability=answer))]
        answer.participant_identity = self.s.identity
        answer.participant_name = self.s.display_name
        if self.s.host_id:
            answer.participant_attributes[rescue.HOST_ATTRIBUTE] = self.s.host_id
        self.jobs[job.id] = Job(job.id, job.room.name, Phase.RESERVED, now, dispatch_id=job.dispatch_id)
        log.info("accepted job %s for room %s%s", job.id, job.room.name,
                 f" (dispatch {job.dispatch_id})" if job.dispatch_id else "")
        return [Send(self._msg(availability=answer)), *self._status_if_changed(now)]

    def _spec(self, a: Any) -> JobSpec:
        job = a.job
        return JobSpec(job_id=job.id, room=job.room.name, url=a.url or self.s.url, token=a.token,
                       identity=self.s.identity, name=self.s.display_name, metadata=job.metadata,
                       agent_name=job.agent_name, dispatch_id=job.dispatch_id, room_sid=job.room.sid,
                       attributes=dict(job.attributes), worker_id=self.worker_id)

    def _on_assignment(self, a: Any, now: float) -> list[Effect]:
        job_id = a.job.id
        j = self.jobs.get(job_id)
        if j is not None and j.phase is not Phase.RESERVED:
            log.warning("second assignment for job %s ignored", job_id)
            return []
        if j is None:
            # Late (our promise timed out, or from before a reconnect): the server already
            # counts it as ours, and a user is waiting. Take it if we still can.
            reason = self.full_reason()
            if reason:
                log.warning("assignment for unknown job %s (room %s) refused: %s", job_id, a.job.room.name, reason)
                return self._job_update(job_id, self._pb.JS_FAILED, f"worker could not take the job: {reason}")
            log.warning("assignment for job %s (room %s) arrived after its promise expired; taking it",
                        job_id, a.job.room.name)
            j = self.jobs[job_id] = Job(job_id, a.job.room.name, Phase.RESERVED, now, dispatch_id=a.job.dispatch_id)
        if self.stopping:
            del self.jobs[job_id]
            return [*self._job_update(job_id, self._pb.JS_FAILED, "worker shutting down"), *self._status_if_changed(now)]
        j.phase, j.since, j.spec = Phase.STARTING, now, self._spec(a)
        self.accepted += 1
        return [Launch(j.spec), *self._status_if_changed(now)]

    def _on_termination(self, job_id: str, now: float) -> list[Effect]:
        j = self.jobs.get(job_id)
        if j is None:
            log.debug("termination for unknown job %s", job_id)
            return []
        if j.phase is Phase.RESERVED:
            del self.jobs[job_id]
            log.info("job %s for room %s terminated before its assignment", job_id, j.room)
            return self._status_if_changed(now)
        if j.phase is Phase.STOPPING:
            return []
        j.phase, j.stop_reason = Phase.STOPPING, "terminated by the server"
        # Also what the server does when the agent has left on its own (the call ended).
        log.info("job %s for room %s terminated by the server: ending the call (if it is not over already)",
                 job_id, j.room)
        return [Stop(job_id, j.stop_reason)]

    # -- time --

    def tick(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        self._update_cpu_gate()
        for j in [j for j in self.jobs.values() if j.phase is Phase.RESERVED]:
            if now - j.since > self.s.assignment_timeout_s:
                del self.jobs[j.id]
                log.warning("job %s for room %s: no assignment within %.1f s; slot released", j.id, j.room,
                            self.s.assignment_timeout_s)
        if self.connected and not self.registered:
            if now - self._opened_at > self.s.register_timeout_s:
                return [Reconnect(f"no registration answer within {self.s.register_timeout_s:.0f} s")]
            return out
        if not self.registered:
            return out
        if now - self._last_rx > self.s.ping_timeout_s:
            return [Reconnect(f"nothing from the server for {now - self._last_rx:.0f} s (ping timeout)")]
        if now - self._last_ping >= self.s.ping_interval_s:
            self._last_ping = now
            out.append(Send(self._msg(ping=self._pb.WorkerPing(timestamp=int(now * 1000)))))
        if now - self._last_status >= self.s.status_interval_s:
            out += self._status(now)
        else:
            out += self._status_if_changed(now)
        return out

    # -- our decisions and the children's news --

    def drain(self, now: float) -> list[Effect]:
        """Take no new job; calls in progress go on."""
        if self.draining:
            return []
        self.draining = True
        return self._status(now)

    def stop_all(self, reason: str, now: float) -> list[Effect]:
        """Hand every call over and launch nothing more: the host is going away, so each call
        leaves its room with its Voice Agent session still resumable, for another host (or
        this one, restarted) to take over (rescue.py)."""
        self.draining = self.stopping = True
        out: list[Effect] = []
        for j in list(self.jobs.values()):
            if j.phase is Phase.RESERVED:
                continue  # its assignment, if it comes, is answered JS_FAILED
            if j.phase is not Phase.STOPPING:
                j.phase, j.stop_reason = Phase.STOPPING, reason
                out.append(Stop(j.id, reason, handover=True))
        return out + self._status(now)

    def rescue(self, spec: JobSpec, now: float) -> list[Effect]:
        """Launch a call this host decided on itself (rescue.py): a room with a user and no
        agent. Counted like any call; the server is never told about it."""
        if self.full_reason() or spec.room in self.rooms():
            return []
        self.jobs[spec.job_id] = Job(spec.job_id, spec.room, Phase.STARTING, now, dispatch_id=spec.dispatch_id,
                                     spec=spec, rescued=True)
        self.rescued += 1
        log.info("rescuing room %s (%s): job %s", spec.room,
                 "its job was never placed" if spec.rescue == rescue.RESCUE_UNPLACED else "its call was lost", spec.job_id)
        return [Launch(spec), *self._status_if_changed(now)]

    def job_ready(self, job_id: str, now: float) -> list[Effect]:
        j = self.jobs.get(job_id)
        if j is None or j.phase is not Phase.STARTING:
            return []
        j.phase = Phase.RUNNING
        log.info("job %s: the call is in room %s (%.1f s after its assignment)", job_id, j.room, now - j.since)
        return [*self._job_update(job_id, self._pb.JS_RUNNING), *self._status_if_changed(now)]

    def job_exited(self, job_id: str, now: float, *, ok: bool, error: str = "") -> list[Effect]:
        j = self.jobs.get(job_id)
        if j is None:
            return []
        update = self._job_update(job_id, self._pb.JS_SUCCESS if ok else self._pb.JS_FAILED, "" if ok else error[:200])
        del self.jobs[job_id]
        self.ended["success" if ok else "failed"] += 1
        if ok:
            log.info("job %s for room %s ended", job_id, j.room)
        else:
            log.warning("job %s for room %s failed: %s", job_id, j.room, error)
        return [*update, *self._status_if_changed(now)]

    def snapshot(self, rooms: bool = False) -> dict[str, Any]:
        """Counters; with ``rooms``, every job's room too (for our log only: room names can
        carry personal data, e.g. a caller's number)."""
        out = {
            "worker_id": self.worker_id, "registered": self.registered, "draining": self.draining,
            "calls": self.job_count, "reserved": self._count(Phase.RESERVED), "max_calls": self.s.max_calls,
            "cpu": round(self.cpu_load, 3), "load": self.load(), "accepted": self.accepted,
            "refused": dict(self.refused), "ended": dict(self.ended), "rtt_ms": self.rtt_ms,
            "registrations": self.registrations, "rescued": self.rescued,
        }
        if rooms:
            out["jobs"] = {j.id: {"room": j.room, "phase": j.phase.value} for j in self.jobs.values()}
        return out


def _reason_kind(reason: str | None) -> str | None:
    """What a refusal is about ("full", "host", "draining" ...), without its figures."""
    return None if reason is None else reason.split(":")[0].split(" ")[0]


# --- CPU load -------------------------------------------------------------------------------------


class CpuMeter:
    """The host's CPU load, 0..1, averaged over the last ``window`` samples (one per tick of
    TICK_S: CPU_WINDOW_TICKS makes 5 s), a moving average as livekit-agents' default load
    function is (theirs: 5 samples of 0.5 s). Inside a container with a CPU
    quota (cgroup v2 ``cpu.max``), usage against the quota; otherwise ``/proc/stat`` for the
    whole host, counting steal as busy (a hypervisor's steal is CPU we do not have)."""

    def __init__(self, window: int = CPU_WINDOW_TICKS, root: Path = Path("/")) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=window)
        self.root = root
        self._quota_cores: float | None = None
        try:
            quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()[:2]
            if quota != "max":
                self._quota_cores = int(quota) / int(period)
        except (OSError, ValueError):
            pass
        self._last: tuple[float, float] | None = None
        # The shortest window a sample may cover: 0.05 CPU-seconds (in /proc/stat's clock
        # ticks, or in core-seconds against a quota).
        self._min_total = 0.05 if self._quota_cores else 0.05 * os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float] | None:
        """(busy, total) in comparable units, or None."""
        try:
            if self._quota_cores:
                for line in (self.root / "sys/fs/cgroup/cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6, time.monotonic() * self._quota_cores
                return None
            first = (self.root / "proc/stat").read_text().split("\n", 1)[0].split()
            v = [int(x) for x in first[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8])  # guest time is already part of user
            return total - idle, total
        except (OSError, ValueError, IndexError):
            return None

    def sample(self) -> float:
        cur = self._read()
        if cur is not None and self._last is not None:
            d_total = cur[1] - self._last[1]
            # A window too short to measure (the first tick comes right after start-up, a
            # few ms after the first reading: one clock tick of /proc/stat is then 0% or
            # 100%, and a false 100% turned the first user away): measure on from the same
            # reading next time.
            if d_total < self._min_total:
                return self.value
            self.samples.append(min(1.0, max(0.0, (cur[0] - self._last[0]) / d_total)))
        self._last = cur
        return self.value

    @property
    def value(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


# --- child processes ------------------------------------------------------------------------------


@dataclass
class Child:
    spec: JobSpec
    started: float
    proc: asyncio.subprocess.Process | None = None
    sock: socket.socket | None = None
    ready_at: float | None = None
    last_watchdog: float | None = None
    term_sent_at: float | None = None
    stop_reason: str = ""
    stop_signal: int = signal.SIGTERM
    kill_reason: str = ""
    task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


# Variables a child must not inherit: our own systemd notify/watchdog and socket activation.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class Supervisor:
    """One child process per job. The job goes to the child's stdin as one JSON line and
    stdin stays open (its EOF tells the child we are gone). The child reports on an
    sd_notify socket of its own (abstract, per child, sender checked by its credentials):
    ``READY=1`` once it is in the room, ``WATCHDOG=1`` while it is alive. Children run in
    their own session, so a terminal's Ctrl-C reaches only us and we decide how calls end."""

    def __init__(self, command: Sequence[str], *, stop_timeout_s: float, start_timeout_s: float,
                 on_ready: Callable[[str], None], on_exit: Callable[[str, bool, str, int | None], None],
                 watchdog_s: float = CHILD_WATCHDOG_S, env: Mapping[str, str] | None = None,
                 job_env: Callable[[JobSpec], Mapping[str, str]] | None = None) -> None:
        self.command = tuple(command)
        self.job_env = job_env  # variables of one job's process on top of ``env`` (its metrics directory)
        self.stop_timeout_s = stop_timeout_s
        self.start_timeout_s = start_timeout_s
        self.watchdog_s = watchdog_s
        self.on_ready, self.on_exit = on_ready, on_exit
        self.base_env = {k: v for k, v in (os.environ if env is None else env).items() if k not in _PRIVATE_ENV}
        self.children: dict[str, Child] = {}
        self._seq = 0

    def launch(self, spec: JobSpec) -> None:
        spec = replace(spec, parent_pid=os.getpid(), stop_timeout_s=self.stop_timeout_s)
        child = Child(spec, time.monotonic())
        self.children[spec.job_id] = child
        child.task = asyncio.create_task(self._run(child, self.command), name=f"job-{spec.job_id}")

    def _notify_socket(self, child: Child) -> str:
        self._seq += 1
        name = f"\0voice-agent-serve/{os.getpid()}/{self._seq}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        s.bind(name)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        child.sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._on_notify, child)
        return "@" + name[1:]

    def _close_socket(self, child: Child) -> None:
        if child.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(child.sock.fileno())
            except (RuntimeError, ValueError):
                pass
            child.sock.close()
            child.sock = None

    async def _run(self, child: Child, command: tuple[str, ...]) -> None:
        spec = child.spec
        ok, error, rc = False, "", None
        try:
            env = dict(self.base_env, NOTIFY_SOCKET=self._notify_socket(child),
                       WATCHDOG_USEC=str(int(self.watchdog_s * 1e6)))
            if self.job_env is not None:
                env.update(self.job_env(spec))
            try:
                child.proc = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                error = f"cannot start the job command {command[0]!r}: {e.strerror or e}"
                return
            log.info("job %s: call process %d started for room %s", spec.job_id, child.proc.pid, spec.room)
            if child.stop_reason:  # stopped while it was being spawned
                self._signal(child, child.stop_signal)
                child.term_sent_at = time.monotonic()
            assert child.proc.stdin is not None
            child.proc.stdin.write(spec.to_json_line())
            try:
                await child.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            rc = await child.proc.wait()
            ok, error = self._outcome(child, rc)
        except asyncio.CancelledError:
            ok, error = False, "worker shutting down"
            raise
        finally:
            self._close_socket(child)
            if child.proc is not None and child.proc.returncode is None:
                self._signal(child, signal.SIGKILL, group=True)
            self.children.pop(spec.job_id, None)
            self.on_exit(spec.job_id, ok, error, rc)

    def _outcome(self, child: Child, rc: int) -> tuple[bool, str]:
        if child.kill_reason:
            return False, child.kill_reason
        if rc == 0:
            return True, ""
        if rc in (-signal.SIGTERM, -HANDOVER_SIGNAL) and child.term_sent_at is not None:
            return True, ""  # ended on our request, without a handler of its own
        if rc < 0:
            try:
                return False, f"call process killed by {signal.Signals(-rc).name}"
            except ValueError:
                return False, f"call process killed by signal {-rc}"
        return False, f"call process exited with code {rc}"

    def _on_notify(self, child: Child) -> None:
        while child.sock is not None:
            try:
                data, anc, _, _ = child.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                    pid = struct.unpack("=iII", payload[:12])[0]
            if child.proc is None or pid != child.proc.pid:
                log.debug("job %s: notify message from pid %s ignored", child.spec.job_id, pid)
                continue
            now = time.monotonic()
            for line in data.decode("utf-8", "replace").splitlines():
                if line == "READY=1" and child.ready_at is None:
                    child.ready_at = now
                    self.on_ready(child.spec.job_id)
                elif line == "WATCHDOG=1":
                    child.last_watchdog = now
                elif line.startswith("STATUS="):
                    log.debug("job %s: %s", child.spec.job_id, line[7:200])

    def _signal(self, child: Child, sig: int, group: bool = False) -> None:
        if child.proc is None or child.proc.returncode is not None:
            return
        try:
            if group:
                os.killpg(child.proc.pid, sig)
            else:
                os.kill(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, job_id: str, reason: str, handover: bool = False) -> None:
        """Ask a call to end (SIGTERM: the worker sends session.end and leaves), or with
        ``handover`` to leave its room with the session resumable (HANDOVER_SIGNAL); killed
        if it is still there after ``stop_timeout_s``."""
        child = self.children.get(job_id)
        if child is None or child.term_sent_at is not None:
            return
        child.stop_reason = reason
        child.stop_signal = HANDOVER_SIGNAL if handover else signal.SIGTERM
        if child.proc is not None:
            self._signal(child, child.stop_signal)
            child.term_sent_at = time.monotonic()

    def _kill(self, child: Child, reason: str) -> None:
        if not child.kill_reason:
            child.kill_reason = reason
            log.warning("job %s: %s; killing its call process", child.spec.job_id, reason)
        self._signal(child, signal.SIGKILL, group=True)

    def check(self, now: float) -> None:
        """Stop deadlines, start timeouts, watchdogs."""
        for child in list(self.children.values()):
            if not child.alive:
                continue
            if child.term_sent_at is not None:
                if now - child.term_sent_at > self.stop_timeout_s:
                    self._kill(child, f"still running {self.stop_timeout_s:.0f} s after SIGTERM")
            elif child.ready_at is None:
                if now - child.started > self.start_timeout_s:
                    self._kill(child, f"not in the room {self.start_timeout_s:.0f} s after its assignment")
            elif child.last_watchdog is not None and now - child.last_watchdog > self.watchdog_s * CHILD_WATCHDOG_GRACE:
                self._kill(child, f"no watchdog ping for {now - child.last_watchdog:.0f} s (hung)")

    async def shutdown(self, reason: str) -> None:
        """Hand every call over (the host is going away), wait up to ``stop_timeout_s``, then
        SIGKILL."""
        for job_id in list(self.children):
            self.stop(job_id, reason, handover=True)
        tasks = [c.task for c in self.children.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.stop_timeout_s + 1)
        self.kill_all()
        tasks = [c.task for c in self.children.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def kill_all(self) -> None:
        """Last resort, synchronous: SIGKILL every child's process group."""
        for child in list(self.children.values()):
            if child.alive:
                child.kill_reason = child.kill_reason or "worker exiting"
                self._signal(child, signal.SIGKILL, group=True)

    def pids(self) -> dict[str, int]:
        return {j: c.proc.pid for j, c in self.children.items() if c.proc is not None}


# --- logging, systemd, health -----------------------------------------------------------------------


class HealthServer(Endpoint):
    """``GET /healthz``: 200 while the event loop and the supervision tick run (liveness:
    never fails because LiveKit is unreachable, a restart would only end the calls in
    progress). ``GET /readyz``: 200 while registered and taking calls, else 503.
    ``GET /status``: the worker's counters as JSON (no secrets, no room names).
    ``GET /metrics``: Prometheus (metrics.ServeMetrics), when the dispatcher has it."""

    def __init__(self, dispatcher: "Dispatcher", host: str, port: int) -> None:
        super().__init__(self._answer, host, port)
        self.d = dispatcher

    async def start(self) -> None:
        """Listen; a port or an address that cannot be had is a configuration error (exit 2),
        found before anything billed or remote happens (the serve process starts it first)."""
        if self.server is not None:
            return
        try:
            await super().start()
        except OSError as e:
            raise FatalError(EXIT_CONFIG, f"HEALTH_PORT {self.port} on HEALTH_HOST {self.host}: cannot listen there "
                                          f"({e.strerror or one_line(e)}); free the port, or set another port "
                                          "(0: no health endpoint) or an address of this machine") from None
        log.info("health endpoint on http://%s:%d/healthz", self.host, self.port)

    def _answer(self, path: str) -> tuple[int, bytes, str]:
        core = self.d.core
        if path == "/healthz":
            alive = time.monotonic() - self.d.last_tick < 10
            code, body = (200, "ok\n") if alive else (503, "supervision stalled\n")
        elif path == "/readyz":
            ready = core.registered and not core.draining
            code, body = (200, "ready\n") if ready else (503, "draining\n" if core.draining else "not registered\n")
        elif path == "/status":
            code, body = 200, json.dumps(core.snapshot()) + "\n"
        elif path == "/metrics" and self.d.metrics is not None:
            import metrics

            return 200, self.d.metrics.render(), metrics.CONTENT_TYPE
        else:
            code, body = 404, "not found\n"
        return code, body.encode(), "text/plain"


# --- the async layer ------------------------------------------------------------------------------------


class Dispatcher:
    """The serve process: one /agent WebSocket (reconnected with backoff, re-registered),
    the core, the children, signals."""

    BACKOFF_INITIAL_S = 0.5
    BACKOFF_MAX_S = 10.0
    STABLE_S = 30.0  # a registration that lasted this long resets the backoff

    def __init__(self, cfg: "Config", redactor: LogContext | None = None,
                 child_env: Mapping[str, str] | None = None, metrics: Any = None) -> None:
        """``cfg``: the worker's whole configuration (config.Config; the serve settings are
        AGENT_NAME, MAX_CALLS, ...). ``child_env``: variables every call process gets on top
        of this process's environment (the settings as this process read them, flags and
        ./.env included, so a call sees exactly what was validated here). ``metrics``: a
        metrics.ServeMetrics (``GET /metrics`` on the health endpoint), or None."""
        self.settings = cfg
        self.max_calls = max_calls(cfg)
        self.job_command = job_command(cfg)
        self.redactor = redactor or LogContext(cfg.secrets, redact_jwts=True)
        threshold, self.dev_mode = load_threshold(cfg, os.environ, sys.stdin.isatty() and sys.stderr.isatty())
        host_id = os.urandom(6).hex()
        self.core = WorkerCore(CoreSettings(
            url=cfg.livekit_url, agent_name=cfg.agent_name, identity=cfg.agent_identity,
            display_name=AGENT_DISPLAY_NAME, max_calls=self.max_calls, load_threshold=threshold, host_id=host_id))
        # Names this process to the fleet (rescue.py: its claims, its beacon, its agents'
        # voice_agent.host); opaque, since room participants see it; worker ids change with
        # every registration.
        self.host_id = host_id
        self.rescuer: rescue.Rescuer | None = None
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env.update(child_env or {})
        self.metrics = metrics
        self.supervisor = Supervisor(self.job_command, stop_timeout_s=cfg.job_stop_timeout_s,
                                     start_timeout_s=cfg.job_start_timeout_s,
                                     on_ready=self._child_ready, on_exit=self._child_exited, env=env,
                                     job_env=metrics.job_env if metrics is not None else None)
        if metrics is not None:
            metrics.attach(self)
        self.cpu = CpuMeter()
        self.notifier = SystemdNotifier()
        self.health: HealthServer | None = None
        self.url = agent_ws_url(cfg.livekit_url)
        self.last_tick = time.monotonic()
        self._ws: Any = None
        self._out: asyncio.Queue[bytes] | None = None
        self._signals = 0
        self._first_signal_at = 0.0
        self._drain_deadline: float | None = None
        self._finished: asyncio.Event | None = None
        self._fatal: FatalError | None = None
        self._ready_sent = False
        self._registered_at: float | None = None  # when the worker registered on the current socket
        self._rng = random.Random()

    # -- effects --

    def _apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                if self._out is not None:
                    self._out.put_nowait(e.message.SerializeToString())
            elif isinstance(e, Launch):
                self.supervisor.launch(e.spec)
                if self.metrics is not None:
                    self.metrics.job_started(e.spec)
            elif isinstance(e, Stop):
                self.supervisor.stop(e.job_id, e.reason, e.handover)
            elif isinstance(e, Reconnect):
                log.warning("reconnecting to LiveKit: %s", e.reason)
                ws = self._ws
                if ws is not None and ws.transport is not None:
                    ws.transport.abort()

    def _child_ready(self, job_id: str) -> None:
        self._apply(self.core.job_ready(job_id, time.monotonic()))

    def _child_exited(self, job_id: str, ok: bool, error: str, returncode: int | None) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            job = self.core.jobs.get(job_id)
            self.metrics.job_exited(job_id, ok, job.spec if job is not None else None)
        self._apply(self.core.job_exited(job_id, now, ok=ok, error=error))
        why = HOPELESS_EXITS.get(returncode) if returncode is not None else None
        if why and self._fatal is None:
            self._fatal = FatalError(returncode, f"a call process exited with {returncode} ({why}): every call on this "
                                            "host would fail the same way; fix it and restart")
            log.error("%s; not taking calls any more, exiting once the %d calls in progress end",
                      self._fatal, self.core.job_count)
            self.notifier.notify(f"STATUS=not taking calls: {why}")
            self._apply(self.core.drain(now))
        self._check_finished()

    # -- lifecycle --

    def _check_finished(self) -> None:
        if self._finished is None or self._finished.is_set():
            return
        if self.core.draining and not self.core.jobs and not self.supervisor.children:
            log.info("no call in progress: exiting")
            self._finished.set()

    def _on_signal(self, name: str) -> None:
        now = time.monotonic()
        if self._signals and now - self._first_signal_at < URGENT_SIGNAL_AFTER_S:
            # One stop delivered twice at once (`timeout`, `kill PID; kill -- -PGID`): not a
            # second signal, which would end the calls that should drain.
            log.debug("%s again %.3f s after the first: one stop, already draining", name, now - self._first_signal_at)
            return
        self._signals += 1
        if self._signals == 1:
            self._first_signal_at = now
        calls = self.core.job_count
        if self._signals == 1:
            self._drain_deadline = now + self.settings.drain_timeout_s
            log.info("%s: draining: no new calls; %d in progress may go on for up to %.0f s (%s again hands them over "
                     "now)",
                     name, calls, self.settings.drain_timeout_s, name)
            self.notifier.notify("STOPPING=1", f"STATUS=draining, {calls} calls in progress")
            self._apply(self.core.drain(now))
            self._check_finished()
        elif self._signals == 2:
            log.info("%s again: handing %d calls over now", name, calls)
            self._apply(self.core.stop_all("worker stopping", now))
            self._check_finished()
        else:
            log.warning("%s a third time: killing every call and exiting", name)
            self.supervisor.kill_all()
            if self._finished is not None:
                self._finished.set()

    async def open_health(self) -> None:
        """The health endpoint (HEALTH_PORT), if any: listening from here on. Called before
        the start-up key check too, so a taken port fails before a billed session."""
        if self.settings.health_port and self.health is None:
            health = HealthServer(self, self.settings.health_host, self.settings.health_port)
            await health.start()
            self.health = health

    def dump_status(self) -> None:
        log.info("status: %s", json.dumps(self.core.snapshot(rooms=True)))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._finished = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_status)
        log.info("serving %s as agent %r (%s), participant %r, host %s; up to %d calls, CPU threshold %s, job "
                 "command: %s", self.settings.livekit_url,
                 self.settings.agent_name, "explicit dispatch" if self.settings.agent_name else "automatic dispatch",
                 self.settings.agent_identity, self.host_id, self.max_calls,
                 f"{self.core.s.load_threshold:.0%}" if self.core.cpu_gate else "off",
                 shlex.join(self.job_command))
        if self.dev_mode:
            log.info("dev mode (%s): a busy CPU never makes this host refuse a call; LOAD_THRESHOLD=0.7 to change",
                     self.dev_mode)
        await self.open_health()
        self.cpu.sample()
        conn = asyncio.create_task(self._connection_loop(), name="agent-socket")
        ticker = asyncio.create_task(self._tick_loop(), name="tick")
        tasks = [conn, ticker]
        if self.settings.rescue_interval_s > 0:
            self.rescuer = self._make_rescuer()
            tasks.append(asyncio.create_task(self.rescuer.run(), name="rescue"))
        try:
            waiter = asyncio.create_task(self._finished.wait())
            await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    if isinstance(exc, FatalError):
                        self._fatal = exc
                    else:
                        log.error("internal error in %s: %r", t.get_name(), exc, exc_info=exc)
                        self._fatal = FatalError(EXIT_INTERNAL, f"internal error: {exc!r}")
        finally:
            self.notifier.notify("STOPPING=1")
            await self.supervisor.shutdown("worker exiting")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.health is not None:
                await self.health.close()
        if self._fatal is not None:
            log.error("%s", self._fatal)
            return self._fatal.exit_code
        return EXIT_OK

    # -- rooms without their agent (rescue.py) --

    def _make_rescuer(self) -> rescue.Rescuer:
        from tokens import server_api

        planner = rescue.RescuePlanner(rescue.PlannerSettings(
            agent_name=self.settings.agent_name, secret=self.settings.livekit_api_secret, worker_id=self.host_id))
        return rescue.Rescuer(lambda: server_api(self.settings), planner, agent_identity=self.settings.agent_identity,
                              interval_s=self.settings.rescue_interval_s,
                              can_take=self._free_slots,
                              busy_rooms=self.core.rooms, launch=self._launch_rescue)

    def _free_slots(self) -> int:
        core = self.core
        return 0 if not core.registered or core.full_reason() else core.s.max_calls - core.slots_used

    def _launch_rescue(self, room: rescue.RoomView, decision: rescue.Decision) -> bool:
        """Start a call of our own in a room that lacks its agent (rescue.Rescuer decided)."""
        from tokens import mint_token

        d = decision.dispatch
        token = mint_token(replace(self.settings, room_name=room.name), self.settings.agent_identity, kind="agent",
                           name=AGENT_DISPLAY_NAME, attributes={AGENT_NAME_ATTRIBUTE: self.settings.agent_name,
                                                                rescue.HOST_ATTRIBUTE: self.host_id})
        spec = JobSpec(job_id=f"RJ_{os.urandom(6).hex()}", room=room.name, url=self.settings.livekit_url, token=token,
                       identity=self.settings.agent_identity, name=AGENT_DISPLAY_NAME,
                       metadata=d.metadata if d else "", agent_name=self.settings.agent_name,
                       dispatch_id=d.id if d else "", room_sid=room.sid,
                       attributes=dict(d.attributes) if d else {}, worker_id=self.core.worker_id,
                       rescue=decision.kind, resume_session=decision.session_id or "")
        effects = self.core.rescue(spec, time.monotonic())
        self._apply(effects)
        return bool(effects)

    async def _tick_loop(self) -> None:
        last_watchdog = 0.0
        while True:
            now = time.monotonic()
            self.last_tick = now
            self.core.cpu_load = self.cpu.sample()
            self._apply(self.core.tick(now))
            self.supervisor.check(now)
            if self._drain_deadline is not None and now >= self._drain_deadline and not self.core.stopping:
                log.warning("drain timeout (%.0f s): handing %d calls still in progress over",
                            self.settings.drain_timeout_s, self.core.job_count)
                self._apply(self.core.stop_all("drain timeout", now))
            self._check_finished()
            if self.notifier.watchdog_s and now - last_watchdog >= self.notifier.watchdog_s / 2:
                last_watchdog = now
                self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(TICK_S)

    async def _connection_loop(self) -> None:
        import websockets
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        retry = Backoff(self.BACKOFF_INITIAL_S, self.BACKOFF_MAX_S, rng=self._rng)  # no give-up: calls go on
        ever_registered = False
        while not self.core.draining:
            self._registered_at = None
            try:
                async with websockets.connect(
                    self.url,
                    additional_headers={"Authorization": "Bearer " + worker_token(
                        self.settings.livekit_api_key, self.settings.livekit_api_secret)},
                    open_timeout=REGISTER_TIMEOUT_S, ping_interval=None, close_timeout=1, max_size=4 << 20,
                    user_agent_header=WORKER_VERSION,
                ) as ws:
                    self._ws, self._out = ws, asyncio.Queue()
                    sender = asyncio.create_task(self._send_loop(ws, self._out), name="agent-send")
                    try:
                        self._apply(self.core.connection_opened(time.monotonic()))
                        await self._read_messages(ws, ever_registered)
                    finally:
                        sender.cancel()
            except InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403) and not ever_registered:
                    raise FatalError(EXIT_LIVEKIT_AUTH, f"LiveKit at {self.settings.livekit_url} rejected "
                                "LIVEKIT_API_KEY/LIVEKIT_API_SECRET for an agent worker (HTTP "
                                f"{status})") from None
                log.warning("LiveKit refused the agent connection: HTTP %s", status)
            except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
                log.warning("cannot reach LiveKit at %s: %s", self.settings.livekit_url,
                            self.redactor.redact(one_line(e)))
            except ConnectionClosed as e:
                log.warning("connection to LiveKit closed (%s)", self.redactor.redact(one_line(e)))
            finally:
                self._ws, self._out = None, None
                self._apply(self.core.connection_lost(time.monotonic()))
            registered_at = self._registered_at
            ever_registered = ever_registered or registered_at is not None
            if self.core.draining:
                break
            if registered_at is not None:
                log.warning("lost the connection to LiveKit; %d calls go on; reconnecting", self.core.job_count)
                self.notifier.notify(f"STATUS=reconnecting to LiveKit, {self.core.job_count} calls in progress")
                if time.monotonic() - registered_at >= self.STABLE_S:
                    retry.succeeded()
            await asyncio.sleep(retry.failed() or self.BACKOFF_INITIAL_S)
        # Draining without a connection: no new job can come; the calls end on their own.
        await asyncio.Event().wait()

    async def _read_messages(self, ws: Any, again: bool) -> None:
        """Feed the core every message of one socket until it closes; ``self._registered_at``
        says when the worker registered on it (``again``: it had registered before)."""
        from livekit.protocol import agent

        async for frame in ws:
            if isinstance(frame, str):
                log.warning("LiveKit sent a text frame on /agent; ignored")
                continue
            msg = agent.ServerMessage()
            try:
                msg.ParseFromString(frame)
            except Exception:  # protobuf's DecodeError
                log.warning("undecodable message from LiveKit (%d bytes); ignored", len(frame))
                continue
            was = self.core.registered
            self._apply(self.core.receive(msg, time.monotonic()))
            if self.core.registered and not was:
                self._registered_at = time.monotonic()
                self._registered(again)
                again = True

    def _registered(self, again: bool) -> None:
        c = self.core
        mode = f"explicit dispatch as {c.s.agent_name!r}" if c.s.agent_name else "automatic dispatch: every new room"
        if again:
            log.info("registered again with LiveKit as worker %s (%d calls in progress)", c.worker_id, c.job_count)
        else:
            log.info("registered with LiveKit %s as worker %s (%s)", c.server_version, c.worker_id, mode)
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.notify("READY=1", f"STATUS=registered as {c.worker_id}, taking calls")
        else:
            self.notifier.notify(f"STATUS=registered as {c.worker_id}, {c.job_count} calls in progress")

    async def _send_loop(self, ws: Any, queue: asyncio.Queue[bytes]) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                await ws.send(await queue.get())
        except ConnectionClosed:
            pass


# --- check: does the server accept this key as an agent worker? ------------------------------------------


async def probe_registration(livekit_url: str, api_key: str, api_secret: str,
                             timeout_s: float = 10.0) -> tuple[bool, str]:
    """Open /agent with a worker token and register (under a throw-away agent name, so no
    room is ever offered to the probe), then close. Returns (ok, one line)."""
    import websockets
    from livekit.protocol import agent
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    redact = LogContext([api_secret], redact_jwts=True).redact
    name = f"voice-agent-check-{os.urandom(4).hex()}"
    try:
        async with asyncio.timeout(timeout_s):
            headers = {"Authorization": "Bearer " + worker_token(api_key, api_secret)}
            async with websockets.connect(agent_ws_url(livekit_url), open_timeout=timeout_s, ping_interval=None,
                                          close_timeout=1, max_size=4 << 20, user_agent_header=WORKER_VERSION,
                                          additional_headers=headers) as ws:
                core = WorkerCore(CoreSettings(url=livekit_url, agent_name=name, max_calls=1))
                for e in core.connection_opened(time.monotonic()):
                    await ws.send(e.message.SerializeToString())
                async for frame in ws:
                    msg = agent.ServerMessage()
                    msg.ParseFromString(frame)
                    if msg.WhichOneof("message") == "register":
                        return True, (f"LiveKit accepts this key as an agent worker (registered as "
                                      f"{msg.register.worker_id}, server {msg.register.server_info.version})")
                return False, "LiveKit closed the agent connection before registering the worker"
    except InvalidStatus as e:
        status = e.response.status_code
        if status in (401, 403):
            return False, f"LiveKit rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET for an agent worker (HTTP {status})"
        return False, f"LiveKit refused the agent endpoint /agent: HTTP {status} (is LIVEKIT_URL a LiveKit server?)"
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
        return False, f"cannot reach the agent endpoint at {livekit_url}: {redact(one_line(e))}"
