"""Local stand-ins for the two services, so the bridge runs on a machine with nothing set up.

* ``start_server``: a LiveKit server in dev mode (keys ``devkey`` / ``secret``), which
  ``python worker.py`` (``run``, ``demo``) starts when ``LIVEKIT_URL`` is empty. The binary
  is the pinned build of ``scripts/build-server`` (``.tools/bin/server``), else a
  ``livekit-server`` on ``PATH``, else the pinned build made now (Go; its progress shows).
  Port 7880, what LiveKit's docs and the Agents Playground assume, when it is free; else
  free ports, and the URL printed says which. A server already on 7880 is never borrowed,
  even one that takes the dev keys: it may be another ``./scripts/run``'s, which would stop
  it from under us, and whose agent ours would kick out of the room (same identity); the
  line printed says how to use it instead (LIVEKIT_URL).
* ``start_echo_agent``: ``standin.py`` in echo mode on a free loopback port with a key of
  its own, for ``python worker.py demo``: no AssemblyAI account.

Where it listens: signalling and the server API on ``LOCAL_SERVER_BIND`` (127.0.0.1: this
machine only; passing it also keeps the server from listening on every address, which
``--dev`` otherwise does once keys are given). WebRTC media goes over UDP 7882 on this
machine's own addresses, as with ``livekit-server --dev``: browsers and the LiveKit SDKs
ignore loopback candidates, so a loopback-only media port would connect nobody; a
participant needs the credentials handed out over signalling to use it. ICE over TCP (which
would listen on every address) is off, and no public STUN server is used.

Both are child processes that never outlive this one: each runs in a session of its own (a
Ctrl-C at the terminal reaches only the worker, which leaves the room cleanly and then stops
them: SIGTERM, and for the server a second SIGTERM, which stops it without waiting for the
participants still in rooms, then SIGKILL), and the kernel kills them if this process dies
without stopping them (``PR_SET_PDEATHSIG``, as ``dispatch.bind_to_parent`` does for call
processes). Not under a service manager: a unit or a pod without ``LIVEKIT_URL`` is a
mistake to report, not a reason to serve an empty local server (``managed_by``).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from exits import EXIT_CONFIG, EXIT_LIVEKIT_UNREACHABLE, FatalError

REPO = Path(__file__).resolve().parent
PINNED = REPO / ".tools" / "bin" / "server"
DEV_KEY, DEV_SECRET = "devkey", "secret"
PORT, UDP_PORT = 7880, 7882
DEFAULT_BIND = "127.0.0.1"
# Variables the server reads (its own settings) or that are ours to keep: never passed on.
_SERVER_READS = ("REDIS_HOST", "REDIS_PASSWORD", "NODE_IP", "UDP_PORT")
_OURS = ("ASSEMBLYAI_API_KEY", "SESSION_EXTRA")

Say = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def managed_by(env: Mapping[str, str]) -> str | None:
    """The service manager running us, if any: there a missing LIVEKIT_URL stays an error."""
    if env.get("NOTIFY_SOCKET"):
        return "systemd"
    if env.get("KUBERNETES_SERVICE_HOST"):
        return "Kubernetes"
    return None


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without the settings a child must not see or act on."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LIVEKIT_") and k not in _SERVER_READS and k not in _OURS}
    env.update(extra or {})
    return env


# --- child processes that never outlive us ------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: the kernel SIGKILLs the child when we die (Linux; elsewhere None).
    libc is loaded here, in the parent: the child only calls into it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # we died before it was armed
            os._exit(1)
    return arm


def spawn(cmd: list[str], env: Mapping[str, str], stdout: object, stderr: object) -> subprocess.Popen:
    """A child in a session of its own (the terminal's Ctrl-C is ours to handle), bound to
    our life. Call it before any thread starts (preexec_fn) and before the worker raises its
    scheduling priority (children would inherit real-time priority)."""
    return subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, preexec_fn=_die_with_parent())


def stop_child(proc: subprocess.Popen | None, *, grace_s: float, second_term: bool = False,
               force_s: float = 5.0) -> None:
    """SIGTERM; after ``grace_s`` a second SIGTERM (``second_term``: livekit-server's
    "stop now"); after ``force_s`` more, SIGKILL. Never returns with the child alive, even
    when interrupted."""
    if proc is None:
        return
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                if second_term:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(force_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the LiveKit server -----------------------------------------------------------------------


@dataclass
class LocalServer:
    url: str  # what the worker joins: ws://127.0.0.1:<port>
    browser_url: str  # what a person pastes into the Playground: ws://localhost:<port>
    api_key: str
    api_secret: str
    port: int
    binary: str
    log_path: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        # The worker has left by now; a browser may still be in the room: the second
        # SIGTERM stops the server without waiting for it.
        stop_child(self.proc, grace_s=1.0, second_term=True)


def find_binary() -> tuple[str, str] | None:
    """(path, where it comes from) of the server to run, without building one."""
    if PINNED.is_file() and os.access(PINNED, os.X_OK):
        return str(PINNED), f"the pinned build, {PINNED.relative_to(REPO)}"
    found = shutil.which("livekit-server")
    if found:
        return found, f"{found}, from PATH"
    return None


NO_SERVER = ("LIVEKIT_URL is not set, and no LiveKit server is here to start: there is no livekit-server on PATH and "
             "no Go to build one. Install one (brew install livekit, or curl -sSL https://get.livekit.io | bash), or "
             "Go >= 1.26 (https://go.dev/dl/: the first run then builds it, about a minute and a half), or set LIVEKIT_URL, "
             "LIVEKIT_API_KEY and LIVEKIT_API_SECRET to a server of yours")


def build(say: Say) -> tuple[str, str]:
    """scripts/build-server: the pinned version from its Go module, with its progress."""
    if shutil.which("go") is None:
        raise FatalError(EXIT_CONFIG, NO_SERVER)
    say("No LiveKit server yet: building the pinned livekit-server once (it is reused from then on).")
    r = subprocess.run([str(REPO / "scripts" / "build-server")], stdin=subprocess.DEVNULL, env=child_env())
    if r.returncode != 0 or not os.access(PINNED, os.X_OK):
        raise FatalError(EXIT_CONFIG, f"building livekit-server failed (exit {r.returncode}; its output is above); "
                                      f"or install one (brew install livekit, or curl -sSL https://get.livekit.io "
                                      f"| bash), or set LIVEKIT_URL to a server of yours")
    return str(PINNED), f"the pinned build, {PINNED.relative_to(REPO)}, just built"


def _bindable(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's listener does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy


def answers(http_url: str, timeout: float = 1.0) -> bool:
    """Does a LiveKit server answer there (GET / is 200)?"""
    try:
        with _NO_PROXY.open(http_url + "/", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def accepts_dev_keys(http_url: str, timeout: float = 2.0) -> bool:
    """Does the server there accept devkey / secret (a ListRooms call)?"""
    from livekit import api

    token = api.AccessToken(DEV_KEY, DEV_SECRET).with_grants(api.VideoGrants(room_list=True)).to_jwt()
    request = urllib.request.Request(http_url + "/twirp/livekit.RoomService/ListRooms", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def config_body(port: int, udp_port: int) -> str:
    """What --dev leaves to its defaults and we do not: the ports, no ICE over TCP (it would
    listen on every address), no public STUN server handed to clients (a local server needs
    none), info-level logs (--dev's debug is megabytes a minute)."""
    return (f"port: {port}\n"
            f"rtc:\n  udp_port: {udp_port}\n  tcp_port: 0\n  stun_servers: [\"127.0.0.1:3478\"]\n"
            f"logging:\n  level: info\n")


def log_path_for(port: int) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if os.environ.get("HOME") else "")
    folder = Path(base) / "voice-agent" if base else Path("/tmp") / f"voice-agent-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"livekit-server-{port}.log"


def _version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             env=child_env()).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.rsplit(" ", 1)[-1] if out else ""


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:200] for line in text[-lines:])


def start_server(bind: str = DEFAULT_BIND, *, say: Say = _stderr, timeout_s: float = 30.0) -> LocalServer:
    """A LiveKit server in dev mode for this process's lifetime. Raises FatalError with the
    line to print."""
    loopback = ipaddress.ip_address(bind).is_loopback
    probe = "127.0.0.1" if bind in ("0.0.0.0", "::") or loopback else bind
    host = "localhost" if loopback or bind in ("0.0.0.0", "::") else bind
    # The server first: with none to run and no Go to build one, that is the one line to say
    # (not a note about a port it will then never use).
    binary, origin = find_binary() or build(say)
    port = PORT
    if not _bindable(bind, PORT):
        port = _free_port(bind)
        http = f"http://{probe}:{PORT}"
        if answers(http) and accepts_dev_keys(http):
            say(f"Port {PORT} is taken by a LiveKit server in dev mode (another ./scripts/run, or a livekit-server "
                f"--dev of yours): starting a separate one on port {port}. To use that one instead, set "
                f"LIVEKIT_URL=ws://localhost:{PORT} LIVEKIT_API_KEY={DEV_KEY} LIVEKIT_API_SECRET={DEV_SECRET}.")
        else:
            say(f"Port {PORT} is taken by something else: the local server uses port {port} instead (paste the URL "
                f"printed below, not ws://localhost:{PORT}).")
    udp_port = UDP_PORT if _bindable("0.0.0.0", UDP_PORT, socket.SOCK_DGRAM) else _free_port("0.0.0.0", socket.SOCK_DGRAM)
    version = _version(binary)
    log_path = log_path_for(port)
    with open(log_path, "wb") as log_file:
        proc = spawn([binary, "--dev", "--bind", bind, "--config-body", config_body(port, udp_port)],
                     child_env(), stdout=log_file, stderr=subprocess.STDOUT)
    server = LocalServer(f"ws://{probe}:{port}", f"ws://{host}:{port}", DEV_KEY, DEV_SECRET, port, binary, log_path,
                         proc)
    try:
        deadline = time.monotonic() + timeout_s
        while not answers(f"http://{probe}:{port}", timeout=0.5):
            if proc.poll() is not None:
                raise FatalError(EXIT_LIVEKIT_UNREACHABLE, f"the local LiveKit server ({binary}) stopped at start; "
                                                           f"its log ({log_path}) ends: {_tail(log_path)}")
            if time.monotonic() > deadline:
                raise FatalError(EXIT_LIVEKIT_UNREACHABLE, f"the local LiveKit server did not answer on port {port} "
                                                           f"within {timeout_s:.0f} s; its log: {log_path}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    where = "this machine only" if loopback else f"{bind}: reachable from other machines, with keys anyone knows"
    say(f"Started a local LiveKit server in dev mode (no LIVEKIT_URL): {server.browser_url}, keys {DEV_KEY} / "
        f"{DEV_SECRET}, {where}; media on UDP {udp_port}. livekit-server {version or '(version unknown)'}, {origin}; "
        f"its log: {log_path}. It stops when this does.")
    return server


# --- the echo agent (standin.py) --------------------------------------------------------------


@dataclass
class EchoAgent:
    url: str
    api_key: str
    proc: subprocess.Popen

    def stop(self) -> None:
        stop_child(self.proc, grace_s=3.0)


def start_echo_agent(timeout_s: float = 30.0) -> EchoAgent:
    """standin.py in echo mode on a free loopback port, with a fresh key passed in its
    environment (not on a command line). Its first line on stdout says where it listens."""
    key = secrets.token_urlsafe(24)
    cmd = [sys.executable, str(REPO / "standin.py"), "--port", "0", "--reply", "echo", "--describe", "speech", "-q"]
    proc = spawn(cmd, child_env({"STANDIN_API_KEY": key}), stdout=subprocess.PIPE, stderr=None)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise FatalError(EXIT_CONFIG, f"the demo's echo agent (standin.py) did not start within "
                                              f"{timeout_s:.0f} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise FatalError(EXIT_CONFIG, f"the demo's echo agent (standin.py) exited at start "
                                              f"(exit {proc.wait()}); its error is above")
            line += chunk
        url = next((w for w in line.decode(errors="replace").split() if w.startswith("ws://")), "")
        if not url:
            raise FatalError(EXIT_CONFIG, f"the demo's echo agent printed no URL: {line[:200]!r}")
    except BaseException:
        stop_child(proc, grace_s=3.0)
        raise
    return EchoAgent(url, key, proc)
