"""A real browser as the user: headless Debian Chromium, driven by playwright-core, on a
test-only page (tests/browser/) that joins the room with livekit-client from npm.

The page's microphone is a WAV file (Chromium's fake capture device, which loops it): silence,
a 1 s burst at 450 Hz, silence. The worker runs with a 300 Hz ambient bed; the stand-in greets
with 650 Hz and answers the burst with a 2 s tone at 1000 Hz. From inside the page we check that
the agent is heard (Web Audio analysis of its remote track), that it is seen as an agent that
reaches `lk.agent.state` = listening, and what arrives on `lk.transcription` text streams.

One call for the whole module (Chromium and the worker start once); each test polls the page's
`window.__results` for its own condition. Needs `./scripts/setup --browser` (Debian's chromium,
`npm ci` in tests/browser): without it the tests fail, they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

from harness import ASSEMBLYAI_KEY, REPO, LiveKitServer, WorkerProcess, tone, worker_env, write_wav
from standin import ReplyRecord, StandIn, StandInOptions

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
ROOM = "browser-call"
USER = "browser-user"
AGENT = "voice-agent"

# Multiples of 50 Hz, as in test_e2e.py; CONTROL_HZ is in nothing anyone plays.
AMBIENT_HZ, GREETING_HZ, REPLY_HZ, USER_HZ, CONTROL_HZ = 300.0, 650.0, 1000.0, 450.0, 850.0
FREQS = (AMBIENT_HZ, GREETING_HZ, REPLY_HZ, CONTROL_HZ)  # the page measures these, in this order
MIC_RATE = 48000
BED_FLOOR = 0.005  # tone amplitude (full scale 1) that counts as heard; the analysis' own floor is ~0.0005
MIC_LEAD_S, MIC_BURST_S, MIC_TAIL_S = 3.0, 1.0, 5.0  # the looped microphone file

# Off the network: no background services, no QUIC, no DNS (every name but loopback fails to
# resolve), no mDNS `.local` host candidates (the server would resolve them by multicast). And ICE
# on loopback only: by default Chromium gathers a host candidate on eth0's address and the pair
# (that address, server's 127.0.0.1) wins; with the "default public interface only" policy it
# gathers on an unbound socket, so its packets to 127.0.0.1 leave from 127.0.0.1 (a peer-reflexive
# candidate) and both ends of the pair are loopback. test_the_call_stays_on_loopback checks it.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-domain-reliability",
    "--disable-breakpad", "--no-default-browser-check", "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--webrtc-ip-handling-policy=default_public_interface_only",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]


def preflight() -> str:
    """The node binary; or fail (never skip) with what to run."""
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium ({CHROMIUM})")
    node = shutil.which("node")
    if node is None:
        missing.append("Node.js (node on PATH)")
    for pkg in ("livekit-client", "playwright-core"):
        if not (BROWSER_DIR / "node_modules" / pkg / "package.json").is_file():
            missing.append(f"tests/browser/node_modules/{pkg}")
    if missing:
        pytest.fail(f"browser test prerequisites missing: {', '.join(missing)}; run ./scripts/setup --browser",
                    pytrace=False)
    assert node is not None
    return node


# --- the page, served from loopback ------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript", ".js": "text/javascript", ".map": "application/json"}
    requests: ClassVar[list[str]]  # one list per server (serve_page)

    def log_message(self, format: str, *args: Any) -> None:
        self.requests.append(format % args)


@contextlib.contextmanager
def serve_page(directory: Path):
    handler = type("Handler", (_Quiet,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield httpd, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- Chromium through playwright-core (tests/browser/run.mjs) ------------------------------------


class Browser:
    """`node run.mjs`: Chromium with one page. `evaluate()` runs an expression in the page."""

    def __init__(self, node: str, url: str, args: list[str], profile: Path, log_path: Path) -> None:
        self.node, self.url, self.args, self.profile, self.log_path = node, url, args, profile, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = 0
        self._reader: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._log = None

    async def start(self, timeout: float = 60.0) -> dict:
        cfg = {"executablePath": CHROMIUM, "userDataDir": str(self.profile), "args": self.args, "url": self.url}
        self._log = self.log_path.open("ab")  # closed in close()
        self.proc = await asyncio.create_subprocess_exec(
            self.node, str(BROWSER_DIR / "run.mjs"), json.dumps(cfg), cwd=BROWSER_DIR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self._log,
            limit=1 << 26)
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"Chromium did not load the page within {timeout:.0f} s; {self.diagnostics()}")
        fatal = [e for e in self.events if e.get("event") == "fatal"]
        if fatal:
            raise AssertionError(f"could not start Chromium: {fatal[0]['error']}")
        return next(e for e in self.events if e.get("event") == "ready")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"event": "stdout", "text": line.decode(errors="replace")}
            if "id" in msg and msg["id"] in self._pending:
                self._pending.pop(msg["id"]).set_result(msg)
                continue
            self.events.append(msg)
            if msg.get("event") != "console":
                self._log.write(line)
                self._log.flush()
            if msg.get("event") in ("ready", "fatal"):
                self._ready.set()
        self._ready.set()
        for fut in self._pending.values():
            fut.set_exception(AssertionError(f"the browser driver exited; {self.diagnostics()}"))
        self._pending.clear()

    async def evaluate(self, expr: str, timeout: float = 15.0) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        if self.proc.returncode is not None or self._reader is None or self._reader.done():
            raise AssertionError(f"the browser driver is gone; {self.diagnostics()}")
        self._ids += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        self.proc.stdin.write(json.dumps({"id": self._ids, "expr": expr}).encode() + b"\n")
        await self.proc.stdin.drain()
        msg = await asyncio.wait_for(fut, timeout)
        if "error" in msg:
            raise AssertionError(f"page.evaluate({expr!r}) failed: {msg['error']}")
        return msg.get("value")

    def console(self, last: int = 25) -> list[str]:
        lines = [f"{e.get('type')}: {e.get('text')}" for e in self.events if e.get("event") in ("console", "pageerror")]
        return lines[-last:]

    def blocked(self) -> list[str]:
        return [e["url"] for e in self.events if e.get("event") == "blocked"]

    def diagnostics(self) -> str:
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        return f"driver log ({self.log_path}):\n{tail}\npage console:\n" + "\n".join(self.console())

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()  # our own child, by its handle
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
        if self._log is not None:
            self._log.close()


# --- the call: worker + stand-in + browser --------------------------------------------------------


@dataclass
class Call:
    server: LiveKitServer
    standin: StandIn
    worker: WorkerProcess
    browser: Browser
    page_offset: float = 0.0  # monotonic time = page time (s) + page_offset
    page_requests: list[str] = field(default_factory=list)
    last: dict = field(default_factory=dict)

    async def results(self) -> dict:
        t0 = time.monotonic()
        page_now_ms, results = await self.browser.evaluate("[window.__now(), window.__results]")
        t1 = time.monotonic()
        self.page_offset = (t0 + t1) / 2 - page_now_ms / 1000
        self.last = results
        return results

    def page_ms(self, monotonic: float) -> float:
        """A stand-in / test timestamp on the page's clock."""
        return (monotonic - self.page_offset) * 1000

    async def wait(self, predicate: Callable[[dict], Any], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.results()
            if predicate(r):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")
            if not self.worker.alive:
                raise AssertionError(f"the worker exited while waiting for {what}\n{self.diagnostics()}")
            await asyncio.sleep(0.2)

    def diagnostics(self) -> str:
        r = self.last or {}
        brief = {k: r.get(k) for k in ("phase", "errors", "identity", "micTrackSid", "connectionState", "agent")}
        audio = r.get("audio") or {}
        brief["audio"] = {k: v for k, v in audio.items() if k != "windows"}
        if windows := audio.get("windows"):  # the last 2 s: median and max per column
            recent = np.array([w[1:] for w in windows if w[0] >= windows[-1][0] - 2000])
            brief["audio"]["last 2 s"] = {name: [round(float(np.median(col)), 4), round(float(col.max()), 4)]
                                          for name, col in zip(["rms", *map(str, FREQS)], recent.T)}
        brief["audio"]["windows"] = len(audio.get("windows") or [])
        brief["agent states"] = {p: e.get("states") for p, e in (r.get("participants") or {}).items()}
        brief["captions"] = [(c["sender"], c["text"], c["attributes"] or c["attributesAtOpen"])
                             for c in r.get("captions") or []][-12:]
        return (f"page: {json.dumps(brief)[:6000]}\n{self.browser.diagnostics()}\n"
                f"worker output:\n{self.worker.output()[-3000:]}\nserver log: {self.server.log_path}")

    def session(self):
        return self.standin.sessions[0] if self.standin.sessions else None

    def turn_reply(self) -> ReplyRecord | None:
        s = self.session()
        return next((r for r in s.replies if r.kind == "turn"), None) if s else None


def mic_wav(path: Path) -> Path:
    """What the browser's microphone says, looped by Chromium: silence, a 450 Hz burst, silence."""
    samples = np.concatenate([np.zeros(int(MIC_LEAD_S * MIC_RATE), np.int16),
                              tone(USER_HZ, MIC_BURST_S, amplitude=0.5, rate=MIC_RATE),
                              np.zeros(int(MIC_TAIL_S * MIC_RATE), np.int16)])
    return write_wav(path, samples, rate=MIC_RATE)


@pytest.fixture(scope="module")
async def call(livekit_server: LiveKitServer, tmp_path_factory: pytest.TempPathFactory):
    node = preflight()
    tmp = tmp_path_factory.mktemp("browser")
    standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_mode="tone", reply_freq_hz=REPLY_HZ,
                                     reply_seconds=2.0, greeting_freq_hz=GREETING_HZ, greeting_seconds=0.6,
                                     default_min_silence_ms=500, lead_ms=400))
    await standin.start()
    ambient = write_wav(tmp / "ambient.wav", tone(AMBIENT_HZ, 2.37, amplitude=0.5, fade_ms=0))
    mic = mic_wav(tmp / "mic.wav")
    worker = WorkerProcess(worker_env(livekit_server, standin.url, ROOM, AMBIENT_SOUND=str(ambient),
                                      AMBIENT_VOLUME="0.5", GREETING="Hello there"), tmp / "worker").start()
    browser = None
    try:
        with serve_page(BROWSER_DIR) as (httpd, requests):
            query = urlencode({"url": livekit_server.url, "token": livekit_server.token(USER, ROOM), "agent": AGENT,
                               "freqs": ",".join(f"{f:g}" for f in FREQS)})
            url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html?{query}"
            browser = Browser(node, url, [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic}"],
                              tmp / "chromium-profile", tmp / "browser.log")
            await browser.start()
            c = Call(livekit_server, standin, worker, browser, page_requests=requests)
            await c.wait(lambda r: r["phase"] in ("joined", "failed"), 30, "the page to join and publish")
            assert c.last["phase"] == "joined", c.diagnostics()
            yield c
    finally:
        if browser is not None:
            await browser.close()
        worker.signal(signal.SIGTERM)
        try:
            await worker.wait_exit(timeout=8)
        except AssertionError:
            worker.kill()
        await standin.stop()


# --- helpers on the page's analysis windows: [t ms, rms, amp(FREQS[0]), amp(FREQS[1]), ...] ----------


def amps(r: dict, freq: float, since: float = -1e18, until: float = 1e18) -> list[tuple[float, float]]:
    col = 2 + FREQS.index(freq)
    return [(w[0], w[col]) for w in r["audio"]["windows"] if since <= w[0] <= until]


def fraction_above(series: list[tuple[float, float]], level: float) -> float:
    return sum(a > level for _, a in series) / max(1, len(series))


# --- the tests --------------------------------------------------------------------------------------


async def test_the_agent_hears_the_browser_microphone(call: Call) -> None:
    """Chromium's fake capture device (the WAV) reaches the voice API through the worker."""
    await call.standin.wait_for(lambda: call.session() is not None and call.session().events("transcript.user"),
                                30, "the stand-in to hear the browser's tone burst")
    text = call.session().events("transcript.user")[0]["text"]
    m = re.fullmatch(r"tone (\d+) Hz ([\d.]+) s", text)
    assert m, f"unexpected user transcript {text!r}"
    assert abs(int(m[1]) - USER_HZ) <= 10, f"the stand-in heard {text!r}, expected a {USER_HZ:.0f} Hz tone"
    assert 0.7 <= float(m[2]) <= 1.5, f"the stand-in heard {text!r}, expected about {MIC_BURST_S} s"


async def test_the_browser_hears_the_agent(call: Call) -> None:
    """The agent's remote track, routed into Web Audio in the page: the 300 Hz bed, continuously, and
    the 1000 Hz reply while the stand-in sends it; not a frequency nobody plays."""
    r = await call.wait(lambda r: any(a > BED_FLOOR for _, a in amps(r, AMBIENT_HZ)), 30,
                        "the ambient bed in the page's Web Audio analysis")
    first = next(t for t, a in amps(r, AMBIENT_HZ) if a > BED_FLOOR)
    assert first - r["audio"]["subscribedAt"] < 10_000, "the bed took over 10 s to be heard after subscribing"
    # From 1 s in (the jitter buffer settles), 3 s of the bed. Its level is the worker's business (beds are
    # loudness-normalised, then AMBIENT_VOLUME): judge presence against its own median, which must be
    # well above the analysis floor; a few glitched windows on a loaded machine are allowed for.
    r = await call.wait(lambda r: r["audio"]["windows"][-1][0] >= first + 4200, 20, "4 s of analysed audio")
    bed = amps(r, AMBIENT_HZ, first + 1000, first + 4000)
    level = float(np.median([a for _, a in bed]))
    assert level > 2 * BED_FLOOR, f"the bed is barely there: {level:.4f} at {AMBIENT_HZ:.0f} Hz"
    assert fraction_above(bed, level / 3) > 0.9, \
        f"the bed was heard in only {fraction_above(bed, level / 3):.0%} of windows"
    control = [a for _, a in amps(r, CONTROL_HZ, first + 1000)]
    assert float(np.percentile(control, 95)) < level / 5, \
        f"energy at {CONTROL_HZ:.0f} Hz, which nobody plays: the analysis hears noise, not tones"
    assert r["audio"]["context"]["state"] == "running"
    assert r["audio"]["element"]["paused"] is False, "the agent's <audio> element is not playing (autoplay?)"

    # The reply to the browser's tone burst: 2 s at 1000 Hz, heard when the stand-in sends it (plus the
    # way through the worker, the SFU and the browser's jitter buffer), and for as long.
    await call.standin.wait_for(lambda: (rep := call.turn_reply()) is not None and rep.done_at is not None,
                                35, "the stand-in's reply to the browser's tone burst")
    reply = call.turn_reply()
    assert reply.status == "completed", f"the reply was {reply.status}"
    sent = call.page_ms(reply.first_audio_at)
    r = await call.wait(lambda r: r["audio"]["windows"][-1][0] >= sent + 3000, 10, "the reply's analysis")
    onset = next((t for t, a in amps(r, REPLY_HZ, sent - 200) if a > 0.05), None)
    assert onset is not None, "the reply tone was never heard in the page"
    assert onset - sent < 1500, f"the reply was heard {onset - sent:.0f} ms after the stand-in sent it"
    heard = amps(r, REPLY_HZ, onset + 200, onset + 1500)
    assert len(heard) >= 6, f"only {len(heard)} analysis windows during the reply (page timers throttled?)"
    assert fraction_above(heard, 0.05) > 0.9, \
        f"the reply tone was heard in only {fraction_above(heard, 0.05):.0%} of windows while it played"
    under = amps(r, AMBIENT_HZ, onset + 200, onset + 1500)
    assert fraction_above(under, level / 6) > 0.9, "the bed was not heard under the reply (ducking is fine)"
    before = amps(r, REPLY_HZ, first + 1000, call.page_ms(reply.started_at))
    assert fraction_above(before, 0.05) < 0.05, "the reply tone was heard before the reply"


async def test_the_browser_sees_an_agent_that_listens(call: Call) -> None:
    """livekit-client sees kind AGENT, one microphone track, and lk.agent.state reaching listening;
    after the reply it goes speaking and back to listening, as the frontends expect."""
    r = await call.wait(lambda r: r["agent"] and r["participants"][r["agent"]]["attributes"].get("lk.agent.state")
                        == "listening", 25, "the agent to reach lk.agent.state=listening")
    assert r["agent"] == AGENT, f"the page took {r['agent']!r} for the agent"
    agent = r["participants"][AGENT]
    assert agent["isAgent"] is True, f"participant.kind is {agent['kind']}, not ParticipantKind.AGENT"
    assert "lk.publish_on_behalf" not in agent["attributes"]
    audio = [t for t in agent["tracks"].values() if t["kind"] == "audio"]
    assert len(agent["tracks"]) == 1 and len(audio) == 1, f"the agent should publish one audio track: {agent['tracks']}"
    assert audio[0]["source"] == "microphone" and audio[0]["subscribed"]

    await call.standin.wait_for(lambda: (rep := call.turn_reply()) is not None and rep.done_at is not None,
                                35, "the stand-in's reply to the browser's tone burst")
    r = await call.wait(lambda r: "speaking" in [s for _, s in r["participants"][AGENT]["states"]]
                        and r["participants"][AGENT]["states"][-1][1] == "listening", 10,
                        "lk.agent.state to go speaking, then listening again")
    states = [s for _, s in r["participants"][AGENT]["states"]]
    assert states.index("listening") < states.index("speaking"), states
    assert set(states) <= {"initializing", "listening", "thinking", "speaking"}, states


async def test_the_browser_gets_captions(call: Call) -> None:
    """lk.transcription text streams, as livekit-notes.md documents them: the user's turn with the user's
    identity as sender and the user's mic track, the agent's reply with ours and our audio track; each
    segment closed with lk.transcription_final = "true"."""
    await call.standin.wait_for(lambda: (rep := call.turn_reply()) is not None and rep.done_at is not None,
                                35, "the stand-in's reply to the browser's tone burst")
    reply = call.turn_reply()
    user_text = call.session().events("transcript.user")[0]["text"]

    def final(r: dict, sender: str) -> list[dict]:
        return [c for c in r["captions"] if c["sender"] == sender and c["closedAt"] is not None
                and (c["attributes"] or {}).get("lk.transcription_final") == "true"]

    r = await call.wait(lambda r: final(r, USER) and final(r, AGENT), 10, "final captions from the user and the agent")
    for c in r["captions"]:
        assert c["topic"] == "lk.transcription"
        assert c["error"] is None, c
        assert c["sender"] in (USER, AGENT), f"a caption from {c['sender']!r}"
        attrs = c["attributes"] or c["attributesAtOpen"]
        assert attrs.get("lk.segment_id"), f"a caption without lk.segment_id: {c}"
        assert attrs.get("lk.transcription_final") in ("true", "false"), c
        want_track = r["micTrackSid"] if c["sender"] == USER else r["audio"]["trackSid"]
        assert attrs.get("lk.transcribed_track_id") == want_track, \
            f"{c['sender']}'s caption names track {attrs.get('lk.transcribed_track_id')!r}, expected {want_track!r}"

    # Streams sharing a segment id replace each other: the last one per segment is what is shown.
    def segments(sender: str) -> dict[str, dict]:
        last: dict[str, dict] = {}
        for c in r["captions"]:
            if c["sender"] == sender:
                last[(c["attributes"] or c["attributesAtOpen"])["lk.segment_id"]] = c
        return last

    turn = next((c for c in segments(USER).values() if c["text"].strip() == user_text), None)
    assert turn is not None, f"user captions {[c['text'] for c in segments(USER).values()]} never show {user_text!r}"
    answer = next((c for c in segments(AGENT).values() if c["text"].strip() == reply.text.strip()), None)
    assert answer is not None, \
        f"agent captions {[c['text'] for c in segments(AGENT).values()]} never show the reply {reply.text!r}"
    for c in (turn, answer):
        assert c["attributes"]["lk.transcription_final"] == "true", f"the segment's last stream is not final: {c}"
    # In order: the user's turn is final before the first caption of the reply arrives.
    first_of_answer = next(c for c in r["captions"] if c["sender"] == AGENT
                           and c["attributesAtOpen"]["lk.segment_id"] == answer["attributesAtOpen"]["lk.segment_id"])
    assert r["captions"].index(turn) < r["captions"].index(first_of_answer)


async def test_the_call_stays_on_loopback(call: Call) -> None:
    """The page loaded only from the test's server, and ICE paired loopback addresses."""
    await call.wait(lambda r: r["participants"].get(AGENT, {}).get("tracks"), 20, "the agent's track")
    ice = await call.browser.evaluate("window.__ice()")
    assert call.browser.blocked() == [], f"the page tried to leave loopback: {call.browser.blocked()}"
    connected = [pc for pc in ice if pc["connectionState"] == "connected"]
    assert connected, f"no peer connection is connected: {ice}"
    # Loopback, or the address of the network namespace scripts/test runs the tests in.
    media_ip = os.environ.get("VOICE_AGENT_TEST_IP", "127.0.0.1")
    for pc in connected:
        sel = pc["selected"]
        assert sel and sel["remote"]["address"] == media_ip, f"ICE chose {sel} (all: {ice})"
        assert sel["local"]["address"].startswith("127.") or sel["local"]["address"] == media_ip, \
            f"ICE chose {sel} (all: {ice})"
    paths = {urlsplit(line.split('"')[1].split()[1]).path for line in call.page_requests if line.startswith('"')}
    assert "/node_modules/livekit-client/dist/livekit-client.esm.mjs" in paths, call.page_requests
