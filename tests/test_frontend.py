"""LiveKit's own frontend logic as the user: a page built on @livekit/components-react
(tests/browser/frontend/app.jsx, bundled by ./scripts/setup --browser) in headless Debian Chromium.

The page is wired the way agent-starter-react is: `useSession` with a fixed token (a
`TokenSource.literal`), `session.start()` with its defaults (microphone on, recorded into the
pre-connect buffer before any agent is there) inside a `SessionProvider`. The one difference is the
Room it hands useSession: no voice processing on the microphone, and `publishDefaults.preConnectBuffer`,
because livekit-client 2.23.0 ignores the `{preConnectBuffer: true}` that useSession passes as publish
options (it reads capture options there; app.jsx explains). It records, timestamped
on the page's clock, what the hooks the frontends use report: `useVoiceAssistant()` (state,
agentTranscriptions: LiveKit transcription packets), `useAgent()` (state, failureReasons: the
"Agent joined the room but did not complete initializing" error that makes the starter end the
call) and `useSessionMessages()` (the `lk.transcription` text streams, and chat).

Two calls, one after the other, each with its own room, stand-in and worker. The page joins first
(the user creates the room); the worker is started WORKER_DELAY_S after the page is in:
- mic off: the page never enables its microphone. The agent must still reach `listening` within
  5 s of joining, and useAgent must report no error past its 20 s timeout.
- pre-connect: the starter's default. The microphone (Chromium's fake capture device playing a
  WAV) says a 550 Hz tone in its first two seconds, before the worker is even started; livekit-client
  records it and sends it to the agent as a byte stream on `lk.agent.pre-connect-audio-buffer`.
  The tone must reach the Voice Agent API (the stand-in records its input audio); the agent must
  reach `listening` within 5 s, with no error; and its captions must show on both channels.

Issue 16. Needs `./scripts/setup --browser` (Chromium, `npm ci` in tests/browser, the bundle):
without it the tests fail, they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import numpy as np
import pytest

from harness import ASSEMBLYAI_KEY, LiveKitServer, WorkerProcess, tone, tone_amplitude, worker_env, write_wav
from standin import StandIn, StandInOptions, normalized_format, _lookup
from test_browser import BROWSER_DIR, CHROMIUM_FLAGS, Browser, preflight, serve_page

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FRONTEND_DIR = BROWSER_DIR / "frontend"
AGENT = "voice-agent"
GREETING = "Hello from the voice agent"

# Multiples of 50 Hz. FIRST_WORDS_HZ is what the microphone says before the agent joins; nobody
# else plays it.
FIRST_WORDS_HZ, GREETING_HZ, REPLY_HZ = 550.0, 650.0, 1000.0
MIC_RATE = 48000
# The microphone WAV: silence, the first words, then silence for longer than a call lasts here
# (Chromium loops the file). The lead leaves livekit-client time to start its recorder.
MIC_LEAD_S, MIC_TONE_S, MIC_TOTAL_S = 0.8, 1.0, 90.0

WORKER_DELAY_S = 1.5  # after the page is in the room (and its first words are over); livekit-client sends the
# pre-connect buffer only to an agent that is there within 10 s of the microphone's publication
LISTENING_WITHIN_MS = 5000  # issue 16: listening within 5 s of the agent joining, microphone or not
AGENT_TIMEOUT_MS = 20_000  # components-react useAgent: DEFAULT_AGENT_CONNECT_TIMEOUT_MILLISECONDS
PRE_CONNECT_TOPIC = "lk.agent.pre-connect-audio-buffer"
TF_PRECONNECT_BUFFER = 6  # livekit_models.proto AudioTrackFeature: what the publication advertises


def preflight_frontend() -> str:
    """The node binary, once the browser tools and an up-to-date bundle are there; or fail."""
    node = preflight()
    problems = []
    for pkg in ("@livekit/components-react", "react", "esbuild"):
        if not (BROWSER_DIR / "node_modules" / pkg / "package.json").is_file():
            problems.append(f"tests/browser/node_modules/{pkg} is missing")
    stamp_path = FRONTEND_DIR / "dist" / "build.json"
    if not (FRONTEND_DIR / "dist" / "app.js").is_file() or not stamp_path.is_file():
        problems.append("the page is not built (tests/browser/frontend/dist/app.js)")
    else:
        inputs = json.loads(stamp_path.read_text())["inputs"]
        stale = [p for p, digest in inputs.items()
                 if hashlib.sha256((FRONTEND_DIR / p).read_bytes()).hexdigest() != digest]
        if stale:
            problems.append(f"the page's bundle is older than {', '.join(stale)}")
    if problems:
        pytest.fail(f"frontend test prerequisites: {'; '.join(problems)}; run ./scripts/setup --browser",
                    pytrace=False)
    return node


def mic_wav(path: Path) -> Path:
    lead = np.zeros(int(MIC_LEAD_S * MIC_RATE), np.int16)
    words = tone(FIRST_WORDS_HZ, MIC_TONE_S, amplitude=0.5, rate=MIC_RATE)
    tail = np.zeros(int((MIC_TOTAL_S - MIC_LEAD_S - MIC_TONE_S) * MIC_RATE), np.int16)
    return write_wav(path, np.concatenate([lead, words, tail]), rate=MIC_RATE)


# --- one call: page, stand-in, worker -----------------------------------------------------------


def first_at(changes: list, value: Any) -> float | None:
    """Page time of the first [t, value] entry with that value."""
    return next((t for t, v in changes if v == value), None)


@dataclass
class Call:
    mic: str  # "on" (useSession's default start: microphone with the pre-connect buffer) or "off"
    room: str
    server: LiveKitServer
    standin: StandIn
    browser: Browser
    worker: WorkerProcess | None = None
    worker_started_page_ms: float | None = None
    page_offset: float = 0.0  # monotonic time = page time (s) + page_offset
    last: dict = field(default_factory=dict)

    async def results(self) -> dict:
        t0 = time.monotonic()
        page_now_ms, results = await self.browser.evaluate("[window.__now(), window.__results]")
        t1 = time.monotonic()
        self.page_offset = (t0 + t1) / 2 - page_now_ms / 1000
        results["now"] = page_now_ms
        self.last = results
        return results

    def page_ms(self, monotonic: float) -> float:
        return (monotonic - self.page_offset) * 1000

    async def wait(self, predicate: Callable[[dict], Any], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.results()
            if predicate(r):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")
            if self.worker is not None and not self.worker.alive:
                raise AssertionError(f"the worker exited while waiting for {what}\n{self.diagnostics()}")
            await asyncio.sleep(0.2)

    async def poll(self, predicate: Callable[[dict], Any], until_page_ms: float) -> dict:
        """Results once `predicate` holds or the page's clock passes `until_page_ms`, whichever first."""
        r = await self.results()
        while not predicate(r) and r["now"] < until_page_ms:
            await asyncio.sleep(0.2)
            r = await self.results()
        return r

    def session(self):
        return self.standin.sessions[0] if self.standin.sessions else None

    def diagnostics(self) -> str:
        r = self.last or {}
        brief = {k: r.get(k) for k in (
            "now", "phase", "mic", "errors", "identity", "connection", "sessionStartedAt", "getUserMediaAt",
            "micPublishedAt", "micTrackSid", "micAudioFeatures", "micSubscribedAt", "agentJoinedAt",
            "agentIdentity")}
        brief["byteStreams"] = [{k: v for k, v in b.items() if k != "base64"} for b in r.get("byteStreams") or []]
        brief["worker started (page ms)"] = self.worker_started_page_ms
        brief["voiceAssistant"] = r.get("voiceAssistant")
        brief["useAgent"] = r.get("agent")
        brief["messages"] = [(m.get("type"), m.get("from"), m.get("text"),
                              (m.get("attributes") or {}).get("lk.transcription_final"))
                             for m in r.get("messages") or []][-12:]
        brief["transcription packets"] = (r.get("transcriptionPackets") or [])[-6:]
        brief["livekit-client log"] = (r.get("log") or [])[-15:]
        s = self.session()
        stand_in = "no session" if s is None else {
            "ready_at (page ms)": s.ready_at and round(self.page_ms(s.ready_at)),
            "input audio s": round(len(s.audio) / 2 / input_rate(s), 2),
            "replies": [(x.kind, x.status, x.text) for x in s.replies],
            "user transcripts": [e.get("text") for e in s.events("transcript.user")],
            "errors sent": s.errors_sent}
        worker = self.worker.output()[-3000:] if self.worker else "(not started)"
        return (f"page: {json.dumps(brief)[:8000]}\nstand-in: {stand_in}\n{self.browser.diagnostics()}\n"
                f"worker output:\n{worker}\nserver log: {self.server.log_path}")


def input_rate(session) -> int:
    return normalized_format(_lookup(session.config, "input.format"))["sample_rate"]


class Calls:
    """One call at a time: asking for the other kind of call ends the current one first."""

    def __init__(self, server: LiveKitServer, tmp: Path, node: str) -> None:
        self.server, self.tmp, self.node = server, tmp, node
        self.current: Call | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def get(self, mic: str) -> Call:
        if self.current is not None and self.current.mic == mic:
            return self.current
        await self.close()
        self._stack = contextlib.AsyncExitStack()
        try:
            self.current = await self._start(mic, self._stack)
        except BaseException:
            await self.close()
            raise
        return self.current

    async def _start(self, mic: str, stack: contextlib.AsyncExitStack) -> Call:
        tmp = self.tmp / f"mic-{mic}"
        tmp.mkdir()
        room, user = f"frontend-mic-{mic}", f"frontend-user-{mic}"
        standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_mode="tone", reply_freq_hz=REPLY_HZ,
                                         reply_seconds=1.5, greeting_freq_hz=GREETING_HZ, greeting_seconds=1.2,
                                         default_min_silence_ms=500, lead_ms=400))
        await standin.start()
        stack.push_async_callback(standin.stop)
        httpd, _requests = stack.enter_context(serve_page(FRONTEND_DIR))
        query = urlencode({"url": self.server.url, "token": self.server.token(user, room), "mic": mic})
        url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html?{query}"
        browser = Browser(self.node, url, [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic_wav(tmp / 'mic.wav')}"],
                          tmp / "chromium-profile", tmp / "browser.log")
        stack.push_async_callback(browser.close)
        call = Call(mic, room, self.server, standin, browser)
        await browser.start()
        # The user is in the room (and, with the microphone on, has published it) before the agent.
        r = await call.wait(lambda r: r["phase"] in ("connected", "failed"), 30, "the page to join the room")
        assert r["phase"] == "connected", f"the page could not start its session\n{call.diagnostics()}"
        await asyncio.sleep(WORKER_DELAY_S)
        if mic == "on":
            # ...and has said its first words: the agent joins after they are over.
            words_end = (MIC_LEAD_S + MIC_TONE_S) * 1000 + 500
            await call.wait(lambda r: r["micPublishedAt"] is not None and r["now"] >= r["getUserMediaAt"] + words_end,
                            15, "the page to publish its microphone and say its first words")
        worker = WorkerProcess(worker_env(self.server, standin.url, room, AMBIENT_SOUND="none", GREETING=GREETING),
                               tmp / "worker")
        worker.start()
        call.worker = worker
        call.worker_started_page_ms = call.page_ms(worker.started_at)

        async def stop_worker() -> None:
            worker.signal(signal.SIGTERM)
            try:
                await worker.wait_exit(timeout=8)
            except AssertionError:
                worker.kill()

        # Unwound in reverse: the browser leaves first (closing twice is harmless), then the worker
        # stops, then the page server and the stand-in.
        stack.push_async_callback(stop_worker)
        stack.push_async_callback(browser.close)
        return call

    async def close(self) -> None:
        stack, self._stack, self.current = self._stack, None, None
        if stack is not None:
            await stack.aclose()


@pytest.fixture(scope="module")
async def calls(livekit_server: LiveKitServer, tmp_path_factory: pytest.TempPathFactory):
    c = Calls(livekit_server, tmp_path_factory.mktemp("frontend"), preflight_frontend())
    try:
        yield c
    finally:
        await c.close()


# --- shared checks ------------------------------------------------------------------------------------


async def check_listening_within_5_s(call: Call) -> None:
    r = await call.wait(lambda r: r["agentJoinedAt"] is not None, 30, "the agent to join the room")
    joined = r["agentJoinedAt"]
    r = await call.poll(lambda r: first_at(r["voiceAssistant"]["states"], "listening") is not None,
                        joined + LISTENING_WITHIN_MS + 1000)
    states = r["voiceAssistant"]["states"]
    listening = first_at(states, "listening")
    since_join = [(round(t - joined), s) for t, s in states]
    assert listening is not None and listening - joined <= LISTENING_WITHIN_MS, (
        f"useVoiceAssistant().state did not reach 'listening' within {LISTENING_WITHIN_MS / 1000:.0f} s of the agent "
        f"joining (mic {call.mic}): states (ms after the agent joined) {since_join}\n{call.diagnostics()}")
    agent_listening = first_at(r["agent"]["states"], "listening")
    assert agent_listening is not None and agent_listening - joined <= LISTENING_WITHIN_MS, (
        f"useAgent().state did not reach 'listening' within {LISTENING_WITHIN_MS / 1000:.0f} s of the agent joining: "
        f"{[(round(t - joined), s) for t, s in r['agent']['states']]}\n{call.diagnostics()}")


async def check_no_agent_error(call: Call) -> None:
    """useAgent's timer starts when the session starts connecting; past it, no failure reason, ever."""
    r = await call.wait(lambda r: first_at(r["connection"], "connecting") is not None, 10, "the session to connect")
    started = first_at(r["connection"], "connecting")
    r = await call.wait(lambda r: r["now"] > started + AGENT_TIMEOUT_MS + 1500, AGENT_TIMEOUT_MS / 1000 + 15,
                        "useAgent's agent timeout to pass")
    failures = [(round(t - started), reasons) for t, reasons in r["agent"]["failures"] if reasons]
    assert not failures, (
        f"useAgent().failureReasons (ms after the session started connecting; the starter ends the call on it, "
        f"mic {call.mic}): {failures}; useAgent().state: {r['agent']['states']}\n{call.diagnostics()}")
    assert "failed" not in [s for _, s in r["agent"]["states"]], r["agent"]["states"]
    assert r["agentJoinedAt"] is not None, f"the agent never joined\n{call.diagnostics()}"
    assert r["errors"] == [], f"the page reported errors: {r['errors']}"


# --- the microphone off ------------------------------------------------------------------------------------


async def test_mic_off_agent_listens_within_5_s_of_joining(calls: Calls) -> None:
    """A user without a microphone (text only, or not yet allowed) sees a listening agent: LiveKit's
    agents go to `listening` as soon as their session starts."""
    await check_listening_within_5_s(await calls.get("off"))


async def test_mic_off_no_agent_error(calls: Calls) -> None:
    """No 'Agent joined the room but did not complete initializing' after useAgent's 20 s."""
    await check_no_agent_error(await calls.get("off"))


# --- the starter's default: microphone on, pre-connect buffer ------------------------------------------------


def tone_seconds(pcm: np.ndarray, rate: int, freq: float, floor: float = 0.1) -> tuple[float, float]:
    """Seconds of 20 ms windows in which `freq` is louder than `floor` (full scale 1), and the loudest window."""
    n = rate // 50
    x = pcm[: len(pcm) // n * n].astype(np.float32).reshape(-1, n) / 32768
    amps = [tone_amplitude(w, freq, rate) for w in x]
    return sum(a > floor for a in amps) * 0.02, max(amps, default=0.0)


def decode_recording(b64: str) -> tuple[np.ndarray, int]:
    """The pre-connect buffer (WebM/Opus from MediaRecorder) as mono int16, with PyAV (a runtime
    dependency already, for sounds)."""
    import base64
    import io

    import av

    rate = 48000
    out = []
    with av.open(io.BytesIO(base64.b64decode(b64))) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(container.streams.audio[0]):
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return (np.concatenate(out) if out else np.zeros(0, np.int16)), rate


def spoken_before_agent(r: dict) -> float:
    """How long before the agent joined the first words ended (ms; negative: after)."""
    return r["agentJoinedAt"] - (r["getUserMediaAt"] + (MIC_LEAD_S + MIC_TONE_S) * 1000)


async def test_preconnect_the_page_sends_the_first_words_before_the_agent_joins(calls: Calls) -> None:
    """The set-up itself: the tone ends before the agent joins; livekit-client publishes the microphone
    with TF_PRECONNECT_BUFFER and sends the recording, which holds the tone, to the agent on
    lk.agent.pre-connect-audio-buffer."""
    call = await calls.get("on")
    r = await call.wait(lambda r: r["agentJoinedAt"] is not None, 30, "the agent to join the room")
    assert r["getUserMediaAt"] is not None, "the page never opened its microphone"
    assert spoken_before_agent(r) > 300, (
        f"the agent joined {r['agentJoinedAt'] - r['getUserMediaAt']:.0f} ms after the microphone opened, before "
        f"the first words were over ({(MIC_LEAD_S + MIC_TONE_S) * 1000:.0f} ms): the test proves nothing")
    assert TF_PRECONNECT_BUFFER in (r["micAudioFeatures"] or []), \
        f"the microphone was published without TF_PRECONNECT_BUFFER: {r['micAudioFeatures']}"

    def sent(r: dict) -> list[dict]:
        return [s for s in r["byteStreams"] if s["topic"] == PRE_CONNECT_TOPIC and s["closedAt"] is not None]

    r = await call.wait(lambda r: sent(r), 15, f"the page to send its {PRE_CONNECT_TOPIC} byte stream")
    (stream,) = sent(r)
    assert stream["destinationIdentities"] == [AGENT], stream
    assert stream["error"] is None, stream
    assert stream["attributes"].get("trackId") == r["micTrackSid"], stream
    assert stream["attributes"].get("sampleRate") and stream["attributes"].get("channels"), stream
    assert (stream["mimeType"] or "").startswith("audio/webm"), stream
    pcm, rate = decode_recording(stream["base64"])
    heard, loudest = tone_seconds(pcm, rate, FIRST_WORDS_HZ)
    assert heard >= 0.8 * MIC_TONE_S, (
        f"the pre-connect buffer ({stream['bytes']} bytes, {len(pcm) / rate:.1f} s decoded) holds {heard:.2f} s of "
        f"the {FIRST_WORDS_HZ:.0f} Hz first words (loudest 20 ms window {loudest:.3f})")


async def test_first_words_reach_the_voice_agent_api(calls: Calls) -> None:
    """What the user said before the agent joined (the 550 Hz tone, heard only through the pre-connect
    buffer: the live microphone is silent by then) is in the stand-in's input audio, and is a user turn."""
    call = await calls.get("on")
    r = await call.wait(lambda r: r["agentJoinedAt"] is not None, 30, "the agent to join the room")
    assert spoken_before_agent(r) > 300, "the first words were still being spoken when the agent joined"
    await call.standin.wait_for(lambda: call.session() is not None and call.session().ready_at is not None, 20,
                                "a Voice Agent session")
    session = call.session()
    deadline = time.monotonic() + 20
    heard, loudest = 0.0, 0.0
    while time.monotonic() < deadline:
        heard, loudest = tone_seconds(call.standin.input_pcm(session), input_rate(session), FIRST_WORDS_HZ)
        if heard >= 0.8 * MIC_TONE_S:
            break
        await asyncio.sleep(0.5)
    await call.results()
    streams = [(s["bytes"], s["closedAt"]) for s in call.last.get("byteStreams", []) if s["topic"] == PRE_CONNECT_TOPIC]
    assert heard >= 0.8 * MIC_TONE_S, (
        f"the first words never reached the Voice Agent API: the stand-in's input audio "
        f"({len(session.audio) / 2 / input_rate(session):.1f} s) holds {heard:.2f} s of the {FIRST_WORDS_HZ:.0f} Hz "
        f"tone (loudest 20 ms window {loudest:.3f}; the microphone said {MIC_TONE_S:.1f} s at 0.5) that the page "
        f"sent as {PRE_CONNECT_TOPIC} (bytes, sent at page ms: {streams})\n{call.diagnostics()}")

    def described() -> list[str]:
        texts = [e.get("text", "") for e in session.events("transcript.user")]
        return [t for t in texts if (m := re.fullmatch(r"tone (\d+) Hz ([\d.]+) s", t))
                and abs(int(m[1]) - FIRST_WORDS_HZ) <= 15]

    with contextlib.suppress(AssertionError):
        await call.standin.wait_for(lambda: bool(described()), 10, "")
    assert described(), ("the stand-in got the tone but never heard it as a user turn: transcripts "
                         f"{[e.get('text') for e in session.events('transcript.user')]}\n{call.diagnostics()}")


async def test_preconnect_agent_listens_within_5_s_of_joining(calls: Calls) -> None:
    await check_listening_within_5_s(await calls.get("on"))


async def test_agent_captions_on_both_channels(calls: Calls) -> None:
    """The agent's first completed reply (the greeting, or the answer to the first words), final, in
    useVoiceAssistant().agentTranscriptions (LiveKit transcription packets on the agent's audio track)
    AND in useSessionMessages() (lk.transcription text streams) as an agentTranscript from the agent."""
    call = await calls.get("on")

    def completed():
        s = call.session()
        return next((x for x in s.replies if x.status == "completed"), None) if s else None

    await call.standin.wait_for(lambda: completed() is not None, 30, "a completed reply from the stand-in")
    text = completed().text.strip()
    assert text, "the stand-in's reply has no text"

    def packets(r: dict) -> list[dict]:
        return [s for s in r["voiceAssistant"]["transcriptions"].values()
                if s["final"] and (s["text"] or "").strip() == text]

    def streams(r: dict) -> list[dict]:
        return [m for m in r["messages"] if m["type"] == "agentTranscript" and m["from"] == AGENT
                and (m["text"] or "").strip() == text
                and (m["attributes"] or {}).get("lk.transcription_final") == "true"]

    r = await call.poll(lambda r: packets(r) and streams(r), call.page_ms(time.monotonic()) + 10_000)
    missing = []
    if not packets(r):
        seen = [(s["text"], s["final"]) for s in r["voiceAssistant"]["transcriptions"].values()]
        missing.append(f"useVoiceAssistant().agentTranscriptions (transcription packets) never showed {text!r} "
                       f"as final: segments {seen}; the room received {len(r['transcriptionPackets'])} "
                       f"transcription packets")
    if not streams(r):
        seen = [(m["type"], m["from"], m["text"]) for m in r["messages"]]
        missing.append(f"useSessionMessages() (lk.transcription text streams) never showed {text!r} as a final "
                       f"agentTranscript from {AGENT!r}: messages {seen}")
    assert not missing, "\n".join(missing) + f"\n{call.diagnostics()}"


async def test_preconnect_no_agent_error(calls: Calls) -> None:
    await check_no_agent_error(await calls.get("on"))
