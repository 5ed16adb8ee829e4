"""Real parts for the end-to-end tests: a livekit-server process on loopback, the worker
as a subprocess (started as a user would start it), and a Python-SDK participant that
speaks into its microphone and listens to the agent's track. Plus the little signal
analysis the assertions need."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 24000
API_KEY = "testkey"
# A long, distinctive secret: tests grep every output for it.
API_SECRET = "s3cr3t-" + "x7Qp" * 10
ASSEMBLYAI_KEY = "aai-test-" + "K9zR" * 8


# --- the LiveKit server ------------------------------------------------------------------


def find_server_binary() -> str | None:
    for candidate in (os.environ.get("LIVEKIT_SERVER_BIN"), str(REPO / ".tools" / "bin" / "server"),
                      shutil.which("livekit-server")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveKitServer:
    binary: str
    workdir: Path
    port: int = 0
    rtc_tcp_port: int = 0
    rtc_udp_port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    # "127.0.0.1:PORT" of a RedisServer: the node then joins the cluster of every node given it.
    redis_address: str | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "livekit-server.log"

    @property
    def node_id(self) -> str | None:
        """This process's node id (random at every start), from its log's start line."""
        try:
            ids = re.findall(r'starting LiveKit server.*?"nodeID": "(ND_\w+)"', self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return None
        return ids[-1] if ids else None

    @property
    def media_ip(self) -> str:
        """Where WebRTC media flows. scripts/test runs the tests in a network namespace of
        their own with a veth address (VOICE_AGENT_TEST_IP); libwebrtc ignores loopback, so
        without it clients pair one of this host's addresses with the server's 127.0.0.1."""
        return os.environ.get("VOICE_AGENT_TEST_IP", "127.0.0.1")

    def config(self) -> str:
        # Signalling on loopback; media on the namespace's address; no external IP
        # discovery and no public STUN servers.
        ip = self.media_ip
        return f"""
port: {self.port}
bind_addresses: ["127.0.0.1"]
keys: {{{API_KEY}: {API_SECRET}}}
rtc:
  tcp_port: {self.rtc_tcp_port}
  udp_port: {self.rtc_udp_port}
  use_external_ip: false
  node_ip: {ip}
  enable_loopback_candidate: {"true" if ip.startswith("127.") else "false"}
  ips: {{includes: ["{ip}/32"]}}
  stun_servers: ["127.0.0.1:3478"]
logging: {{level: info}}
""" + (f"redis: {{address: {self.redis_address}}}\n" if self.redis_address else "")

    def start(self, timeout: float = 30.0) -> None:
        if not self.port:
            self.port, self.rtc_tcp_port = free_port(), free_port()
            self.rtc_udp_port = free_port(socket.SOCK_DGRAM)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LIVEKIT_") and k not in ("REDIS_HOST", "NODE_IP", "UDP_PORT")}
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "--config-body", self.config()], stdout=logf,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        logf.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.http_url + "/", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"livekit-server did not answer on {self.http_url} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        # SIGTERM waits for participants to leave; a second SIGTERM forces it.
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=1.5)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def token(self, identity: str, room: str, *, kind: str | None = None, name: str | None = None,
              admin: bool = False, room_config: Any = None) -> str:
        from livekit import api

        grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                 can_publish_data=True, can_update_own_metadata=True)
        if admin:
            grants.room_admin = True
        t = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_name(name or identity).with_grants(grants)
        if kind:
            t = t.with_kind(kind)
        if room_config is not None:  # api.RoomConfiguration: e.g. agents to dispatch when the room is created
            t = t.with_room_config(room_config)
        return t.to_jwt()


def find_redis_binary() -> str | None:
    for candidate in (os.environ.get("REDIS_SERVER_BIN"), "/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class RedisServer:
    """Debian's redis-server on a loopback port, in memory only: what makes livekit-server
    nodes one cluster (node registry, room -> node map, psrpc between nodes)."""

    workdir: Path
    binary: str = ""
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def command(self, *args: str, timeout: float = 2.0) -> Any:
        """One command over RESP; the reply as str, int or list (enough for PING, HLEN, HKEYS)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            req = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(req.encode())
            f = sock.makefile("rb")

            def read() -> Any:
                line = f.readline().rstrip(b"\r\n").decode()
                kind, rest = line[:1], line[1:]
                if kind == "+":
                    return rest
                if kind == "-":
                    raise RuntimeError(f"redis: {rest}")
                if kind == ":":
                    return int(rest)
                if kind == "$":
                    return None if rest == "-1" else f.read(int(rest) + 2)[:-2].decode(errors="replace")
                if kind == "*":
                    return [read() for _ in range(int(rest))]
                raise RuntimeError(f"redis: unexpected reply {line!r}")

            return read()

    def start(self, timeout: float = 10.0) -> None:
        self.binary = self.binary or find_redis_binary() or ""
        if not self.binary:
            raise RuntimeError("redis-server not found: run ./scripts/setup --fleet (Debian's redis-server)")
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        # No persistence: a test cluster starts empty and leaves nothing behind.
        self.proc = subprocess.Popen([self.binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
                                      "--port", str(self.port), "--dir", str(self.workdir)],
                                     stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if self.command("PING", timeout=0.5) == "PONG":
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on {self.address} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LiveKitCluster:
    """A real multi-node livekit-server: one RedisServer and ``nodes`` LiveKitServer processes,
    each with ports of its own. Any node takes clients and agent workers; each room lives on
    one node (the server picks it at random when the room is created), and signalling and jobs
    cross nodes through Redis."""

    def __init__(self, binary: str, workdir: Path, nodes: int = 2) -> None:
        self.binary, self.workdir = binary, workdir
        self.redis = RedisServer(workdir / "redis")
        self.nodes = [LiveKitServer(binary, workdir / f"node{i}") for i in range(nodes)]

    def node_ids(self) -> list[str]:
        """The node ids registered in Redis (livekit-server's routing hash ``nodes``)."""
        return sorted(self.redis.command("HKEYS", "nodes"))

    def room_node(self, room: str) -> str | None:
        """The id of the node that hosts ``room`` (Redis ``room_node_map``), or None."""
        return self.redis.command("HGET", "room_node_map", room)

    def start(self, timeout: float = 30.0) -> None:
        try:
            self.redis.start()
            for node in self.nodes:
                node.redis_address = self.redis.address
                node.start(timeout)
            # Every node registered in Redis: from then on rooms may be placed on any of them.
            deadline = time.monotonic() + timeout
            while len(self.node_ids()) < len(self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(self.node_ids())} of {len(self.nodes)} nodes registered in Redis")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.redis.stop()

    def __enter__(self) -> "LiveKitCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the worker process -------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """``python worker.py`` as a user starts it: configured through env vars only."""

    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def output_path(self) -> Path:
        return self.workdir / "worker.log"

    # Every worker started by the current test, so a failure report can show their logs.
    started: ClassVar[list["WorkerProcess"]] = []

    def start(self, *args: str) -> "WorkerProcess":
        WorkerProcess.started.append(self)
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV") if k in os.environ}
        out = open(self.output_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "worker.py"), *args], env={**base, **self.env},
                                     cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_output(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.output())
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker never logged {pattern!r}; output:\n{self.output()[-4000:]}")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                # Ask it where it is stuck (SIGUSR1: counters, and task stacks at debug level).
                self.signal(signal.SIGUSR1)
                await asyncio.sleep(1.0)
                raise AssertionError(f"worker still running after {timeout:.1f} s; output:\n{self.output()[-5000:]}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def worker_env(server: LiveKitServer, standin_url: str, room: str, **extra: str) -> dict[str, str]:
    env = {
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "ROOM_NAME": room,
        "ASSEMBLYAI_API_KEY": ASSEMBLYAI_KEY,
        "VOICE_AGENT_URL": standin_url,
        "LOG_LEVEL": "debug",
        # Tests count the stand-in's sessions from the first call; the start-up key check
        # (an extra, immediately ended session) has tests of its own.
        "STARTUP_CHECK": "0",
        # Test beds are loud pure tones; keep them loud enough to measure after loudness
        # normalisation (a 0.5-amplitude sine is about -10 LUFS).
        "AMBIENT_TARGET_LUFS": "-12",
    }
    env.update(extra)
    return env


# --- a room participant ------------------------------------------------------------------------


@dataclass
class Heard:
    """Audio received from one remote track: 24 kHz mono, with arrival times."""

    chunks: list[tuple[float, np.ndarray]] = field(default_factory=list)

    def samples(self, since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        parts = [c for t, c in self.chunks if since <= t <= until]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def timeline(self, freq: float, window_ms: int = 20, since: float = 0.0) -> list[tuple[float, float]]:
        """(arrival time of the window's last sample, amplitude of ``freq`` 0..1) per window."""
        n = SAMPLE_RATE * window_ms // 1000
        out = []
        buf = np.zeros(0, np.float32)
        for t, c in self.chunks:
            if t < since:
                continue
            buf = np.concatenate([buf, c.astype(np.float32) / 32768])
            while len(buf) >= n:
                out.append((t, tone_amplitude(buf[:n], freq)))
                buf = buf[n:]
        return out


def tone_amplitude(x: np.ndarray, freq: float, rate: int = SAMPLE_RATE) -> float:
    """Amplitude of a sinusoid at ``freq`` in ``x`` (single-bin DFT, Hann-windowed)."""
    n = len(x)
    if n == 0:
        return 0.0
    w = np.hanning(n)
    k = np.exp(-2j * np.pi * freq * np.arange(n) / rate)
    return float(2 * abs(np.sum(x * w * k)) / np.sum(w))


def tone(freq: float, seconds: float, amplitude: float = 0.5, rate: int = SAMPLE_RATE, fade_ms: float = 5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t)
    f = int(fade_ms * rate / 1000)
    if f:
        ramp = np.linspace(0, 1, f)
        x[:f] *= ramp
        x[-f:] *= ramp[::-1]
    return (x * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


class RoomUser:
    """A human stand-in in the room: a microphone we can speak tones into (a real-time
    publisher, silence in between) and ears on every remote audio track."""

    def __init__(self, server: LiveKitServer, room: str, identity: str = "user", kind: str | None = None,
                 room_config: Any = None) -> None:
        self.server, self.room_name, self.identity, self.kind = server, room, identity, kind
        self.room_config = room_config
        self.room: Any = None
        self.source: Any = None
        self.heard: dict[str, Heard] = {}
        self.track_sources: dict[str, int] = {}
        self._say: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self.publication: Any = None
        self.speaking_until = 0.0
        self.states: list[tuple[float, str]] = []  # the agent's lk.agent.state, as seen here
        self.captions: list[dict[str, Any]] = []  # lk.transcription streams received

    async def join(self, publish: bool = True) -> "RoomUser":
        from livekit import rtc

        self.room = rtc.Room()

        @self.room.on("track_subscribed")
        def on_sub(track: Any, pub: Any, participant: Any) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                heard = self.heard.setdefault(participant.identity, Heard())
                self.track_sources[participant.identity] = pub.source
                self._tasks.append(asyncio.create_task(self._listen(track, heard)))

        @self.room.on("participant_attributes_changed")
        def on_attrs(changed: dict, participant: Any) -> None:
            if "lk.agent.state" in changed:
                self.states.append((time.monotonic(), changed["lk.agent.state"]))

        @self.room.on("participant_connected")
        def on_connected(participant: Any) -> None:
            state = participant.attributes.get("lk.agent.state")
            if state:
                self.states.append((time.monotonic(), state))

        def on_caption(reader: Any, sender: str) -> None:
            self._tasks.append(asyncio.create_task(self._read_caption(reader, sender)))

        self.room.register_text_stream_handler("lk.transcription", on_caption)
        await self.room.connect(self.server.url, self.server.token(self.identity, self.room_name, kind=self.kind,
                                                                   room_config=self.room_config))
        for p in self.room.remote_participants.values():
            state = p.attributes.get("lk.agent.state")
            if state:
                self.states.append((time.monotonic(), state))
        if publish:
            self.source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=100)
            track = rtc.LocalAudioTrack.create_audio_track("mic", self.source)
            self.publication = await self.room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            self._tasks.append(asyncio.create_task(self._mic()))
        return self

    async def _read_caption(self, reader: Any, sender: str) -> None:
        opened = time.monotonic()
        try:
            text = await reader.read_all()
        except Exception:  # the stream was cut when someone left: not a caption
            return
        info = reader.info
        self.captions.append({"sender": sender, "text": text, "attributes": dict(info.attributes),
                              "opened": opened, "closed": time.monotonic(), "stream_id": info.stream_id})

    def state_sequence(self) -> list[str]:
        out: list[str] = []
        for _, s in self.states:
            if not out or out[-1] != s:
                out.append(s)
        return out

    async def _listen(self, track: Any, heard: Heard) -> None:
        from livekit import rtc

        stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1)
        try:
            async for ev in stream:
                heard.chunks.append((time.monotonic(), np.frombuffer(ev.frame.data, dtype=np.int16).copy()))
        finally:
            await stream.aclose()

    async def _mic(self) -> None:
        """Real-time microphone: queued speech, else silence, 10 ms at a time."""
        from livekit import rtc

        frame = SAMPLE_RATE // 100
        pending = np.zeros(0, np.int16)
        while True:
            if len(pending) == 0 and not self._say.empty():
                pending = self._say.get_nowait()
            if len(pending):
                chunk, pending = pending[:frame], pending[frame:]
                if len(chunk) < frame:
                    chunk = np.concatenate([chunk, np.zeros(frame - len(chunk), np.int16)])
            else:
                chunk = np.zeros(frame, np.int16)
            await self.source.capture_frame(rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, frame))

    def say(self, samples: np.ndarray) -> float:
        """Queue speech; returns when (monotonic) it will have been spoken."""
        self._say.put_nowait(samples)
        start = max(time.monotonic(), self.speaking_until)
        self.speaking_until = start + len(samples) / SAMPLE_RATE
        return self.speaking_until

    def agent(self, identity: str = "voice-agent") -> Heard:
        return self.heard.setdefault(identity, Heard())

    async def wait_heard(self, identity: str = "voice-agent", timeout: float = 20.0) -> Heard:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.heard.get(identity)
            if h is not None and h.chunks:
                return h
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.identity} never received audio from {identity}")

    async def leave(self) -> None:
        """Leave, bounded: teardown must never hang a test run (an SDK call that waits for
        a peer that was killed is abandoned after a few seconds)."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3)
        self._tasks.clear()
        for closing in ((self.room.disconnect() if self.room is not None else None),
                        (self.source.aclose() if self.source is not None else None)):
            if closing is not None:
                task = asyncio.ensure_future(closing)
                done, _ = await asyncio.wait({task}, timeout=5)
                if task in done and not task.cancelled():
                    task.exception()
        self.room = self.source = None


async def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition", interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class HostStallProbe:
    """Notices when the whole machine stops running us (a shared VM's vCPU descheduled by
    its host, "steal"): a thread at the highest real-time priority that only sleeps 2 ms at
    a time. If even it could not run for a while, every process was frozen, and a gap heard
    then says nothing about the worker. Tests use it to tell the two apart, and say so."""

    def __init__(self, threshold_s: float = 0.03) -> None:
        import threading

        self.threshold_s = threshold_s
        self.stalls: list[tuple[float, float]] = []
        self.realtime = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def __enter__(self) -> "HostStallProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        import threading

        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(50))
            self.realtime = True
        except (OSError, AttributeError):
            pass
        last = time.monotonic()
        while not self._stop.is_set():
            time.sleep(0.002)
            now = time.monotonic()
            if now - last > self.threshold_s:
                self.stalls.append((last, now))
            last = now

    def frozen_near(self, t: float, margin_s: float = 0.15) -> bool:
        """Was the host frozen within ``margin_s`` of ``t``? Only a real-time probe can say."""
        return self.realtime and any(a - margin_s <= t <= b + margin_s for a, b in self.stalls)
