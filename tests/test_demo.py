"""Two commands from nothing (issue 19): `./scripts/run demo` and `./scripts/run` as a new
user runs them, in a clean copy of the checkout (the files git tracks or would track: no
.env, no state) with nothing in the environment but PATH and HOME (an empty HOME).

The copy reuses this checkout's .venv and .tools (livekit-server) through symlinks, so
nothing is rebuilt: CI runs from a clean clone anyway, and building the server is tested
here with a stand-in for `go` (the real first build takes minutes). The participant joins
with the URL and token the script printed for the Agents Playground.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from harness import ASSEMBLYAI_KEY, REPO, RoomUser, tone, wait_until
from standin import StandIn, StandInOptions

pytestmark = pytest.mark.e2e

ROOM = "voice-agent-demo"  # ROOM_NAME's default
GREETING = "Hi! I am the demo agent. Say something, and I will play it back to you."  # worker.DEMO_GREETING
USER_HZ = 450.0
LONG_HZ, BARGE_HZ = 520.0, 1000.0  # a long turn, and the speech that cuts its echo off
BARE_PATH = "/usr/bin:/bin"  # no go, no livekit-server (checked below)


def checkout(dest: Path, *, tools: bool = True) -> Path:
    """A clean copy of this checkout as it is now, with .venv (and .tools) borrowed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        if name.split(b"/")[0] in (b".venv", b".tools"):  # symlinks to them: `.venv/` in .gitignore misses those
            continue
        src, dst = REPO / name.decode(), dest / name.decode()
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    (dest / ".venv").symlink_to((REPO / ".venv").resolve())
    if tools:
        (dest / ".tools").symlink_to((REPO / ".tools").resolve())
    assert not (dest / ".env").exists()
    return dest


def empty_env(home: Path, path: str | None = None, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": path or os.environ["PATH"], "HOME": str(home), **extra}


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """Every live process below ``root``: pid -> (start time, command line)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found: dict[int, tuple[str, str]] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                start = _start_time(child)
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if start is not None:
                    found[child] = (start, cmd)
                    frontier.append(child)
    return found


def still_running(processes: dict[int, tuple[str, str]]) -> list[str]:
    return [cmd for pid, (start, cmd) in processes.items() if _start_time(pid) == start]


@dataclass
class Script:
    """`./scripts/run ARGS` in a checkout, as from a terminal: a process group of its own,
    so an interrupt reaches it the way Ctrl-C would (the whole foreground group)."""

    checkout: Path
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    children: dict[int, tuple[str, str]] = field(default_factory=dict)

    def start(self) -> "Script":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(self.checkout / "scripts" / "run"), *self.args], cwd=self.checkout,
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.output(), re.M):
                return m
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"never printed {pattern!r}; output:\n{self.output()[-5000:]}")

    def remember_children(self) -> dict[int, tuple[str, str]]:
        self.children = descendants(self.proc.pid)
        return self.children

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout:.0f} s; output:\n{self.output()[-5000:]}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid, (start, _) in self.children.items():  # what the kernel should already have done
            if _start_time(pid) == start:
                os.kill(pid, signal.SIGKILL)


@dataclass
class Printed:
    """What the script printed for the Agents Playground, as a RoomUser's server."""

    url: str
    printed_token: str

    def token(self, *args: object, **kwargs: object) -> str:
        return self.printed_token


async def printed(script: Script) -> Printed:
    url = (await script.wait_for(r"^LiveKit URL: +(\S+)$")).group(1)
    token = (await script.wait_for(r"^Token: +(\S+)$")).group(1)
    return Printed(url, token)


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def amplitude_series(user: RoomUser, freq: float, since: float = 0.0) -> list[tuple[float, float]]:
    return user.agent().timeline(freq, window_ms=20, since=since)


@pytest.fixture
def scripts():
    started: list[Script] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkout(tmp_path_factory.mktemp("clean-checkout"))


def test_the_bare_path_has_no_go_and_no_livekit_server():
    """The tests below rely on it to stand for a machine without them."""
    assert shutil.which("go", path=BARE_PATH) is None and shutil.which("livekit-server", path=BARE_PATH) is None


async def test_run_demo_from_nothing(clean: Path, tmp_path: Path, scripts: list[Script]) -> None:
    """The README's first command: a local LiveKit server, the bridge and the echo agent; a
    participant with the printed token sees the agent, hears the chime and the bed, gets its
    turn played back, with captions and states, and cuts a long echo off by talking over it;
    Ctrl-C stops everything."""
    from livekit import rtc

    assert bindable(7880), "something already listens on 7880 in the test namespace"
    t0 = time.monotonic()
    script = Script(clean, ["demo"], empty_env(tmp_path / "home"), tmp_path / "demo.log").start()
    scripts.append(script)
    where = await printed(script)
    assert where.url == "ws://localhost:7880"
    await script.wait_for(r"ready: in room voice-agent-demo", 60)
    ready_s = time.monotonic() - t0
    out = script.output()
    assert "Started a local LiveKit server in dev mode" in out and "this machine only" in out
    assert "Demo: the agent is a local echo agent" in out
    children = script.remember_children()
    commands = " ".join(cmd for _, cmd in children.values())
    assert "--dev --bind 127.0.0.1" in commands and "standin.py" in commands, children

    user = RoomUser(where, ROOM, identity="user")
    await user.join()
    try:
        agent = user.room.remote_participants.get("voice-agent")
        assert agent is not None and agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        await user.wait_heard(timeout=20)
        # The greeting: a two-note chime (660 then 880 Hz), its text as the agent's caption.
        await wait_until(lambda: any(a > 0.25 for _, a in amplitude_series(user, 880)), 15, "the greeting's chime")
        assert any(a > 0.25 for _, a in amplitude_series(user, 660))
        await wait_until(lambda: any(c["sender"] == "voice-agent" and c["text"] == GREETING for c in user.captions),
                         10, "the greeting's caption")
        # The bed (builtin:office at 0.3): there once the chime is over, never digital silence.
        await asyncio.sleep(1.5)
        quiet_from = time.monotonic()
        await asyncio.sleep(1.0)
        bed = user.agent().samples(since=quiet_from).astype(np.float32) / 32768
        assert len(bed) > 12000 and float(np.sqrt(np.mean(bed ** 2))) > 0.002, "no ambient bed heard"
        # A spoken turn comes back: the same tone, after the turn, then the caption.
        spoken_until = user.say(tone(USER_HZ, 1.0, amplitude=0.3))
        await wait_until(lambda: any(a > 0.15 for t, a in amplitude_series(user, USER_HZ, since=spoken_until)),
                         15, "the echo of the spoken turn")
        await wait_until(lambda: any(c["sender"] == "voice-agent" and c["text"].startswith("Here is what you said")
                                     for c in user.captions), 10, "the echo's caption")
        assert any(c["sender"] == "user" and re.fullmatch(r"\(\d\.\d s of speech\)", c["text"]) for c in user.captions)
        # Barge-in: a long turn comes back, and talking over its echo cuts it off.
        spoken_until = user.say(tone(LONG_HZ, 3.0, amplitude=0.3))
        await wait_until(lambda: any(a > 0.15 for t, a in amplitude_series(user, LONG_HZ, since=spoken_until)),
                         15, "the echo of the long turn")
        echo_from = next(t for t, a in amplitude_series(user, LONG_HZ, since=spoken_until) if a > 0.15)
        await asyncio.sleep(max(0.0, echo_from + 0.8 - time.monotonic()))
        barge_at = time.monotonic()
        user.say(tone(BARGE_HZ, 0.8, amplitude=0.3))
        await asyncio.sleep(max(0.0, barge_at + 2.1 - time.monotonic()))  # the uncut echo runs to barge_at + 2.2
        long_echo = amplitude_series(user, LONG_HZ, since=echo_from)
        before = [a for t, a in long_echo if echo_from + 0.1 <= t <= barge_at]
        after = [a for t, a in long_echo if barge_at + 1.2 <= t <= barge_at + 2.0]
        # (a window or two may dip: the echo is the user's audio as it came through Opus, on a busy machine)
        assert before and sum(a > 0.15 for a in before) / len(before) > 0.6, \
            f"the long echo was not playing: {[round(a, 2) for a in before]}"
        assert after and max(after) < 0.08, \
            f"the echo went on after the user talked over it: {[round(a, 2) for a in after]}"
        states = user.state_sequence()
        assert {"listening", "thinking", "speaking"} <= set(states), states
    finally:
        await user.leave()

    script.interrupt()
    assert await script.wait_exit(20) == 0, script.output()[-3000:]
    await asyncio.sleep(0.2)
    assert still_running(children) == [], "left running after Ctrl-C"
    assert bindable(7880)
    log = tmp_path / "home" / ".cache" / "voice-agent" / "livekit-server-7880.log"
    assert log.is_file() and "starting LiveKit server" in log.read_text(errors="replace")
    print(f"ready {ready_s:.1f} s after ./scripts/run demo")


def test_run_without_a_key_says_where_to_get_one(clean: Path, tmp_path: Path) -> None:
    """`./scripts/run` with nothing set: one line naming the variable, where to get a key,
    and that the demo needs none; exit 2, before any server is started."""
    r = subprocess.run([str(clean / "scripts" / "run")], cwd=clean, env=empty_env(tmp_path / "home"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ASSEMBLYAI_API_KEY is not set: ")
    assert "https://www.assemblyai.com/dashboard" in lines[0] and "./scripts/run demo" in lines[0]
    assert bindable(7880) and not (tmp_path / "home" / ".cache" / "voice-agent").exists()


async def test_run_with_a_key_picks_another_port_and_dies_with_the_worker(clean: Path, tmp_path: Path,
                                                                         scripts: list[Script]) -> None:
    """`ASSEMBLYAI_API_KEY=... ./scripts/run` (the service is the stand-in here): port 7880 is
    held by something that is not LiveKit, so the local server takes another port and says
    so; the worker killed with SIGKILL takes the server with it (PR_SET_PDEATHSIG)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 7880))
    holder.listen(1)
    standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, greeting_freq_hz=650.0, greeting_seconds=1.0))
    await standin.start()
    try:
        env = empty_env(tmp_path / "home", ASSEMBLYAI_API_KEY=ASSEMBLYAI_KEY, VOICE_AGENT_URL=standin.url)
        script = Script(clean, [], env, tmp_path / "run.log").start()
        scripts.append(script)
        where = await printed(script)
        port = int(where.url.rsplit(":", 1)[1])
        assert port != 7880 and where.url == f"ws://localhost:{port}"
        assert f"Port 7880 is taken by something else: the local server uses port {port} instead" in script.output()
        assert "Demo:" not in script.output()
        await script.wait_for(r"ready: in room voice-agent-demo", 60)
        user = RoomUser(where, ROOM, identity="user")
        await user.join()
        try:
            await wait_until(lambda: any(a > 0.2 for _, a in amplitude_series(user, 650)), 20, "the greeting")
        finally:
            await user.leave()
        children = script.remember_children()
        assert any("--dev" in cmd for _, cmd in children.values()), children
        os.kill(script.proc.pid, signal.SIGKILL)  # the worker alone: nothing stops its children but the kernel
        script.proc.wait()
        await wait_until(lambda: not still_running(children), 5, "the server to die with the worker")
    finally:
        holder.close()
        await standin.stop()


async def test_two_demos_side_by_side(clean: Path, tmp_path: Path, scripts: list[Script]) -> None:
    """A second `./scripts/run demo` while the first runs: 7880 holds the first's dev server,
    so the second starts its own on another port (borrowing it would have its agent kick the
    first's out, and the first would stop it from under the second) and says how to use the
    first's instead. Each stops only what it started."""
    first = Script(clean, ["demo"], empty_env(tmp_path / "home"), tmp_path / "first.log").start()
    scripts.append(first)
    assert (await printed(first)).url == "ws://localhost:7880"
    await first.wait_for(r"ready: in room voice-agent-demo", 60)
    first_children = first.remember_children()

    second = Script(clean, ["demo"], empty_env(tmp_path / "home"), tmp_path / "second.log").start()
    scripts.append(second)
    where = await printed(second)
    port = int(where.url.rsplit(":", 1)[1])
    assert port != 7880
    assert (f"Port 7880 is taken by a LiveKit server in dev mode (another ./scripts/run, or a livekit-server --dev "
            f"of yours): starting a separate one on port {port}. To use that one instead, set "
            f"LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret.") in second.output()
    await second.wait_for(r"ready: in room voice-agent-demo", 60)
    user = RoomUser(where, ROOM, identity="user")
    await user.join()
    try:
        await wait_until(lambda: any(a > 0.25 for _, a in amplitude_series(user, 880)), 20, "the second's chime")
    finally:
        await user.leave()
    second_children = second.remember_children()
    second.interrupt()
    assert await second.wait_exit(20) == 0
    assert still_running(second_children) == []
    assert first.proc.poll() is None and len(still_running(first_children)) == len(first_children)
    assert "duplicate" not in first.output().lower()
    first.interrupt()
    assert await first.wait_exit(20) == 0
    assert still_running(first_children) == []


@pytest.mark.parametrize("bind", ["address", "0.0.0.0"])
async def test_local_server_bind_lets_others_join(bind: str, clean: Path, tmp_path: Path,
                                                 scripts: list[Script]) -> None:
    """LOCAL_SERVER_BIND=<an address of this machine> (or 0.0.0.0, all of them): the server
    listens there, says that others can reach it, and a participant joins at that address
    with the printed token. The printed URL names the address (for 0.0.0.0, localhost)."""
    ip = os.environ.get("VOICE_AGENT_TEST_IP")
    if not ip:
        pytest.skip("no address but loopback outside the test network namespace (./scripts/test makes one)")
    bind = ip if bind == "address" else bind
    env = empty_env(tmp_path / "home", LOCAL_SERVER_BIND=bind)
    script = Script(clean, ["demo"], env, tmp_path / "bind.log").start()
    scripts.append(script)
    where = await printed(script)
    assert where.url == ("ws://localhost:7880" if bind == "0.0.0.0" else f"ws://{ip}:7880")
    await script.wait_for(r"ready: in room voice-agent-demo", 60)
    assert f"{bind}: reachable from other machines, with keys anyone knows" in script.output()
    assert bindable(7880) == (bind != "0.0.0.0"), "loopback: only with 0.0.0.0"
    user = RoomUser(Printed(f"ws://{ip}:7880", where.printed_token), ROOM, identity="user")
    await user.join()
    try:
        await wait_until(lambda: any(a > 0.25 for _, a in amplitude_series(user, 880)), 20, "the chime")
    finally:
        await user.leave()
    children = script.remember_children()
    script.interrupt()
    assert await script.wait_exit(20) == 0
    assert still_running(children) == []


FAKE_GO = """#!/usr/bin/env bash
# Stands in for `go install -v github.com/livekit/livekit-server/cmd/server@VERSION`: says what
# go says (modules downloaded, packages compiled, on stderr) and leaves the real binary in GOBIN.
[ "$1" = install ] || exit 2
echo "go: downloading github.com/livekit/livekit-server v1.13.5" >&2
for i in $(seq 1 25); do echo "github.com/example/pkg$i" >&2; sleep 0.1; done
mkdir -p "$GOBIN" && ln -s {binary} "$GOBIN/server"
"""


async def test_where_the_server_comes_from(tmp_path: Path, scripts: list[Script]) -> None:
    """No pinned build in the checkout: without Go or a livekit-server, one line with the
    ways out (exit 2); with livekit-server on PATH, that one; with Go, the pinned build is
    made first, its progress shown, and then used."""
    bare = checkout(tmp_path / "checkout", tools=False)
    home = tmp_path / "home"
    r = subprocess.run([str(bare / "scripts" / "run"), "demo"], cwd=bare, env=empty_env(home, BARE_PATH),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: LIVEKIT_URL is not set, and no LiveKit server"), r.stderr
    assert "brew install livekit" in lines[0] and "https://go.dev/dl/" in lines[0]

    binary = str((REPO / ".tools" / "bin" / "server").resolve())
    on_path = tmp_path / "bin-livekit"
    on_path.mkdir()
    (on_path / "livekit-server").symlink_to(binary)
    script = Script(bare, ["demo"], empty_env(home, f"{on_path}:{BARE_PATH}"), tmp_path / "path.log").start()
    scripts.append(script)
    await script.wait_for(r"ready: in room voice-agent-demo", 60)
    assert f"{on_path}/livekit-server, from PATH" in script.output()
    script.interrupt()
    assert await script.wait_exit(20) == 0
    assert not (bare / ".tools").exists()

    fake_go = tmp_path / "bin-go"
    fake_go.mkdir()
    (fake_go / "go").write_text(FAKE_GO.replace("{binary}", binary))
    (fake_go / "go").chmod(0o755)
    env = empty_env(home, f"{fake_go}:{BARE_PATH}", BUILD_PROGRESS_EVERY_S="1")
    script = Script(bare, ["demo"], env, tmp_path / "build.log").start()
    scripts.append(script)
    await script.wait_for(r"ready: in room voice-agent-demo", 60)
    out = script.output()
    assert "building livekit-server v1.13.5 into .tools/bin/server" in out
    assert re.search(r"^  \.\.\. \d+ s: 1 modules downloaded, \d+ of about 800 packages compiled$", out, re.M), out
    assert re.search(r"^built livekit-server in \d+ s$", out, re.M)
    assert "the pinned build, .tools/bin/server, just built" in out
    script.interrupt()
    assert await script.wait_exit(20) == 0


@pytest.mark.browser
async def test_a_browser_joins_the_demo(clean: Path, tmp_path: Path, scripts: list[Script]) -> None:
    """What the Playground does, with the same livekit-client in Chromium: the printed URL and
    token, from a page of its own. The browser sees the agent, hears its chime and bed, and hears
    its own microphone (a 450 Hz burst) played back; media goes over the machine's own address."""
    from urllib.parse import urlencode

    from test_browser import BROWSER_DIR, CHROMIUM_FLAGS, Browser, mic_wav, preflight, serve_page

    node = preflight()
    freqs = (880.0, USER_HZ)
    script = Script(clean, ["demo"], empty_env(tmp_path / "home"), tmp_path / "demo.log").start()
    scripts.append(script)
    where = await printed(script)
    await script.wait_for(r"ready: in room voice-agent-demo", 60)
    mic = mic_wav(tmp_path / "mic.wav")
    browser = None
    try:
        with serve_page(BROWSER_DIR) as (httpd, _):
            query = urlencode({"url": where.url, "token": where.printed_token, "agent": "voice-agent",
                               "freqs": ",".join(f"{f:g}" for f in freqs)})
            browser = Browser(node, f"http://127.0.0.1:{httpd.server_address[1]}/index.html?{query}",
                              [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic}"],
                              tmp_path / "chromium-profile", tmp_path / "browser.log")
            await browser.start()

            async def until(predicate, timeout: float, what: str) -> dict:
                deadline = time.monotonic() + timeout
                while True:
                    r = await browser.evaluate("window.__results")
                    if predicate(r):
                        return r
                    if time.monotonic() > deadline:
                        raise AssertionError(f"timed out waiting for {what}: phase {r['phase']}, errors "
                                             f"{r['errors']}\n{browser.diagnostics()}\n{script.output()[-3000:]}")
                    await asyncio.sleep(0.2)

            def heard(r: dict, freq: float, level: float) -> bool:
                col = 2 + freqs.index(freq)
                return any(w[col] > level for w in r["audio"]["windows"])

            r = await until(lambda r: r["agent"] == "voice-agent", 30, "the page to see the agent")
            assert r["participants"]["voice-agent"]["isAgent"] is True
            r = await until(lambda r: heard(r, 880.0, 0.2), 20, "the greeting's chime")
            chime = next(w[0] for w in r["audio"]["windows"] if w[2] > 0.2)
            # The bed, once the chime is over: 1 s of windows, none of them silent.
            r = await until(lambda r: r["audio"]["windows"][-1][0] > chime + 2500, 10, "2.5 s more of audio")
            bed = [w[1] for w in r["audio"]["windows"] if chime + 1500 <= w[0] <= chime + 2500]
            assert len(bed) >= 10 and min(bed) > 0.001, f"no ambient bed after the chime: {bed}"
            # The burst comes 3 s into the looped microphone file; its echo follows the turn's end.
            await until(lambda r: heard(r, USER_HZ, 0.1), 30, "the microphone's burst played back")
            ice = await browser.evaluate("window.__ice()")
            media_ip = os.environ.get("VOICE_AGENT_TEST_IP", "127.0.0.1")
            connected = [pc for pc in ice if pc["connectionState"] == "connected"]
            assert connected and all(pc["selected"]["remote"]["address"] == media_ip for pc in connected), ice
            assert browser.blocked() == []
    finally:
        if browser is not None:
            await browser.close()
    script.interrupt()
    assert await script.wait_exit(20) == 0


async def test_serve_from_nothing(clean: Path, tmp_path: Path, scripts: list[Script]) -> None:
    """`ASSEMBLYAI_API_KEY=... ./scripts/run serve` with LIVEKIT_URL empty (the service is the
    stand-in here): serve starts the local server too, registers with it, a user joining with
    the printed token gets a call process on that same server and hears the greeting; Ctrl-C
    ends serve, its calls and the server."""
    standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, greeting_freq_hz=650.0, greeting_seconds=1.0))
    await standin.start()
    try:
        env = empty_env(tmp_path / "home", ASSEMBLYAI_API_KEY=ASSEMBLYAI_KEY, VOICE_AGENT_URL=standin.url)
        script = Script(clean, ["serve"], env, tmp_path / "serve.log").start()
        scripts.append(script)
        where = await printed(script)
        await script.wait_for(r"registered", 60)
        user = RoomUser(where, ROOM, identity="user")
        await user.join()
        try:
            await wait_until(lambda: any(a > 0.2 for _, a in amplitude_series(user, 650)), 30, "the greeting")
        finally:
            await user.leave()
        children = script.remember_children()
        assert any("--dev" in cmd for _, cmd in children.values()), children
        assert any("worker.py job" in cmd for _, cmd in children.values()), children
        script.interrupt()
        assert await script.wait_exit(30) == 0, script.output()[-3000:]
        await wait_until(lambda: not still_running(children), 5, "serve's server and calls to stop")
    finally:
        await standin.stop()
