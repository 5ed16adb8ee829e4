#!/usr/bin/env python3
"""LiveKit room <-> AssemblyAI Voice Agent API bridge: the command line and the composition root.

Reads the configuration (flags > environment > ./.env > defaults), joins the room as
the agent participant (room.py), publishes ONE audio track fed by the mixer (reply +
ambient bed + cues), bridges the user's microphone to the Voice Agent API (bridge.py) and
its replies back, and shuts down cleanly on SIGTERM/SIGINT. ``Worker`` is the I/O around
the call's state machine (call.py): it feeds it events and carries out its actions.
ARCHITECTURE.md has the whole layout.

    python worker.py            run the worker in ROOM_NAME (LIVEKIT_URL empty: with a local LiveKit server)
    python worker.py demo       the same against a local echo agent: no AssemblyAI key
    python worker.py serve      agent dispatch: a call process per room the LiveKit server sends
    python worker.py --help     every setting, with its environment variable and default
"""

from __future__ import annotations

import os
import signal

if __name__ == "__main__":
    # Ctrl-C while the modules below load (~0.3 s): nothing has started, nothing is printed
    # yet, so stop quietly (exit 0, as for any stop) rather than with a traceback.
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MIN_PYTHON = (3, 11)  # asyncio.timeout, datetime.UTC; scripts/setup, `check` and the README say the same
if sys.version_info < MIN_PYTHON:
    print(f"error: Python >= {'.'.join(map(str, MIN_PYTHON))} is required; this is {sys.version.split()[0]}",
          file=sys.stderr)
    raise SystemExit(2)

# requirements.txt's packages (av is loaded only for non-WAV sounds, and says so itself):
# `python worker.py` outside the virtualenv would end in a ModuleNotFoundError traceback.
import importlib.util  # noqa: E402


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


_MISSING = [name for name, module in (("livekit", "livekit.rtc"), ("livekit-api", "livekit.api"),
                                       ("websockets", "websockets"), ("numpy", "numpy"),
                                       ("python-dotenv", "dotenv"))
            if not _installed(module)]
if _MISSING:
    print(f"error: {', '.join(_MISSING)} not installed for {sys.executable}: run ./scripts/run (it sets up .venv "
          f"and runs the worker in it), or .venv/bin/python worker.py", file=sys.stderr)
    raise SystemExit(2)

import backoff  # noqa: E402  (after the version check: the modules below need 3.11)
import bridge  # noqa: E402
import control  # noqa: E402
import exits  # noqa: E402
import metrics  # noqa: E402
import rescue  # noqa: E402
import scheduling  # noqa: E402
import sounds  # noqa: E402
from config import (  # noqa: E402
    LOCAL_SERVER_PROVIDES,
    Config,
    check_serve_config,
    check_state_dir,
    env_name,
    load_banks,
    load_config,
    log_session_config,
    session_settings,
    shown_default,
)
from environment import ConfigError, gather_env  # noqa: E402
from exits import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    FatalError,
)
import call  # noqa: E402
from audio_output import AudioOutput, PlaybackEvent, ReplyStartedPlaying  # noqa: E402
from call import Call, CallSettings, Timer  # noqa: E402
from captions import Captions  # noqa: E402
from logs import LogContext, LogLimiter, escape_controls, one_line, setup_logging  # noqa: E402
from pcm import SAMPLE_RATE  # noqa: E402
from room import RoomLink  # noqa: E402
from session_channel import SessionChannel  # noqa: E402
from systemd import SystemdNotifier  # noqa: E402
from tokens import (  # noqa: E402
    USER_TOKEN_TTL,
    USER_TOKEN_TTL_MAX,
    USER_TOKEN_TTL_MIN,
    duration_text,
    mint_token,
    parse_ttl,
    print_token,
    server_api,
)

log = logging.getLogger("worker")

# IDLE_TIMEOUT_S when it is not set. A room of its own keeps its call a while for the user to
# come back; a dispatched call frees its slot (and its billed session) soon after its last
# user left, yet outlives a page reload: the same identity is back in 1-3 s.
ROOM_IDLE_TIMEOUT_S = 30.0
JOB_IDLE_TIMEOUT_S = 5.0



# --- the worker: the I/O around one room's calls ----------------------------------------------------


class Worker:
    """Owns the room link, the mixer, the Voice Agent session and every task it starts, and
    carries out what the call state machine (call.py) decides: it feeds ``self.call`` the
    events of the room, the bridge, the audio output, the tools and its timers, and
    performs the actions it gets back."""

    def __init__(self, cfg: Config, log_ctx: LogContext, job: Any = None) -> None:
        self.cfg = cfg
        self.log_ctx = log_ctx
        # Job mode (`python worker.py job`, dispatch.JobSpec): one call in a dispatched room,
        # joined with the job's token, never rejoined; the process ends with the call.
        self.job = job
        self.idle_timeout_s = cfg.idle_timeout_s if cfg.idle_timeout_s is not None else (
            JOB_IDLE_TIMEOUT_S if job is not None else ROOM_IDLE_TIMEOUT_S)
        self.call = Call(CallSettings(idle_timeout_s=self.idle_timeout_s,
                                      chat_interrupts=cfg.interrupt_response is not False))
        self._stop = asyncio.Event()
        self.link = RoomLink(cfg, log_ctx, spawn=self._spawn, stop=self._stop, on_event=self._feed,
                             send_audio=self._send_audio, on_chat=self._on_chat, job=job)
        self.session_channel = SessionChannel(
            room=lambda: self.link.room if self.link.connected else None, is_user=self.link.is_user,
            agent_state=lambda: self.call.state.value, agent_identity=cfg.agent_identity, spawn=self._spawn)
        self.mixer: Any = None  # mixer.Mixer: the bed, and the audio the call plays
        self.output: AudioOutput | None = None  # the mixer as the call sees it
        self.captions: Captions | None = None
        self.client: bridge.VoiceAgentClient | None = None
        self.ambient: Any = None  # sounds.ClipBank
        self.thinking: Any = None  # sounds.ClipBank
        self._rng = random.Random()
        self.controller: Any = None  # control.Controller
        self.tools: Any = None  # tools.ToolRegistry
        self._hangup: asyncio.Task[None] | None = None
        self._restored = False
        self._bed_source: str | None = None
        self._exit_code = EXIT_OK
        self._fatal_message: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_task: asyncio.Task[None] | None = None
        self._history: list[tuple[str, str]] = []  # the conversation of the call's last session
        self._timers: dict[Timer, asyncio.TimerHandle] = {}
        self.notifier = SystemdNotifier()
        # Serve mode: the host is going away, the call leaves with its session resumable.
        self._handover = False
        # Serve mode, a call this process takes over (rescue.py): the session to resume ("":
        # none), consumed by the first session; None: a call of its own.
        self._takeover: str | None = None
        if job is not None and (job.rescue == rescue.RESCUE_LOST or job.resume_session):
            self._takeover = job.resume_session
        self._api_verified = asyncio.Event()
        self._input_errors = LogLimiter()  # failures of tasks that handle outside input
        # The call's figures: in a serve process's child they reach its /metrics through the
        # multiprocess files (metrics.py), in the single-room worker METRICS_PORT serves them.
        self.metrics = metrics.CallMetrics(metrics.new_registry(), count_calls=job is None)
        self.metrics_server: metrics.MetricsServer | None = None

    # -- task ownership --

    def _spawn(self, coro: Any, name: str, *, isolated: bool = False) -> asyncio.Task[Any]:
        """A task this worker owns. An ``isolated`` task handles input from outside (a
        participant, an upload, a stream): whatever it raises is logged (rate-limited) and
        the call goes on; any other task's crash is a bug that ends the process."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._isolated_done if isolated else self._task_done)
        return task

    def _isolated_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self._input_errors.allow(task.get_name().split("-")[0]):
            log.warning("%s failed (the call goes on): %s: %s", task.get_name(), type(exc).__name__,
                        one_line(exc), exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, (FatalError, bridge.ApiError)):
            self.fail(exit_code(exc), str(exc))
        elif exc is not None:
            log.error("task %s crashed: %s", task.get_name(), exc, exc_info=exc)
            self.fail(EXIT_INTERNAL, f"internal error in {task.get_name()}: {exc}")

    def fail(self, code: int, message: str) -> None:
        if self._fatal_message is None:
            self._exit_code, self._fatal_message = code, message
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    def hand_over(self, why: str) -> None:
        """Serve mode: leave the room with the Voice Agent session resumable (no session.end),
        for another host of the fleet to take the call over (rescue.py)."""
        if not self._handover:
            log.info("handing the call over (%s): leaving with the Voice Agent session resumable", why)
        self._handover = True
        self._stop.set()

    # -- main --

    async def run(self) -> int:
        from livekit import rtc

        import mixer as mixer_mod

        self.log_ctx.fields["room"] = self.cfg.room_name
        self.mixer = mixer_mod.Mixer(
            mixer_mod.MixerSettings(frame_ms=self.cfg.mix_frame_ms, ambient_volume=self.cfg.ambient_volume,
                                    duck_db=self.cfg.ambient_duck_db, thinking_volume=self.cfg.thinking_volume),
            queue_ms=self.cfg.output_queue_ms,
            batch_ms=self.cfg.output_batch_ms,
            clear_queue_on_barge_in=self.cfg.barge_in_clear_queue,
            priority=self.cfg.audio_priority,
            on_air=False,  # until the track is published
        )
        self.output = self.mixer  # the Mixer is the AudioOutput
        self.output.add_listener(self._on_playback)
        self.captions = Captions(self.link, self.output, self.cfg.agent_identity)
        source = self.mixer.start()  # first LiveKit call: its media threads start on the audio thread
        # Sounds and tools are loaded before we touch the network: a bad file fails fast. The
        # configured sounds are decoded like any file, on the decoding thread at ordinary
        # priority (this thread may be real-time: a huge file must not starve the machine).
        self.ambient, self.thinking = await asyncio.get_running_loop().run_in_executor(
            sounds.decode_executor(), sounds.run_in_background, load_banks, self.cfg)
        self.tools = load_tool_registry(self.cfg)
        self.controller = control.Controller(control_settings(self.cfg), self.mixer, self.cfg.room_name)
        self._restored = await self.controller.restore()
        if not self._restored:
            self._pick_bed()
        log.info("audio: %d ms frames, %d ms output queue, audio thread scheduling %s",
                 self.cfg.mix_frame_ms, self.cfg.output_queue_ms, self.mixer.priority)
        track = rtc.LocalAudioTrack.create_audio_track("agent-audio", source)
        try:
            if self.job is not None:
                self.metrics.call_started()  # a job is one call, with or without a user
            elif self.cfg.metrics_port:
                self.metrics_server = metrics.MetricsServer(self.metrics.render, self.cfg.metrics_host,
                                                            self.cfg.metrics_port)
                try:
                    await self.metrics_server.start()
                except OSError as e:
                    self.metrics_server = None
                    raise FatalError(EXIT_CONFIG, f"cannot serve metrics on {self.cfg.metrics_host}:"
                                     f"{self.cfg.metrics_port} (METRICS_HOST, METRICS_PORT): {e.strerror or e}") from None
            # Once a second: how late the loop runs, and the mixer's and the client's counters.
            self._spawn(metrics.monitor_loop_lag(self.metrics.loop_lag, then=self._sync_metrics_now), "metrics")
            if self.job is None:
                self._spawn(self.link.run(track, self._joined, restored_bed=self._restored), "room")
                self._spawn(self._startup_check(), "startup-check")
            else:
                self._spawn(self._job_room(track), "room")
                self._api_verified.set()  # the serve process proved the key once, at its start
            self._spawn(self.captions.run(), "captions")
            self._spawn(self._report_counters(), "counters")
            self._spawn(self._notify_ready(), "sd-ready")
            if self.notifier.watchdog_s:
                self._spawn(self._watchdog(), "sd-watchdog")
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self._fatal_message:
            report_fatal(self.cfg, self.log_ctx, self._fatal_message, self._exit_code)
        return self._exit_code

    async def _job_room(self, track: Any) -> None:
        """Job mode: the call's room, joined once; when the agent is out of it (the call
        ended, the room closed, the agent removed, a full disconnect), the process ends."""
        await self.link.run(track, self._joined)
        self.request_stop()

    def _joined(self, room: Any) -> None:
        self.mixer.on_air = True
        self.controller.register(room, lambda coro, name: self._spawn(coro, name, isolated=True))
        self.session_channel.register(room)

    async def _shutdown(self) -> None:
        t0 = time.monotonic()
        # asyncio.wait, not wait_for: a step that ignores cancellation (an SDK call waiting
        # for a dead peer) must not hold the exit past the bound.
        graceful = asyncio.ensure_future(self._graceful_stop())
        done, _ = await asyncio.wait({graceful}, timeout=self.cfg.shutdown_timeout_s)
        if graceful in done:
            if not graceful.cancelled() and graceful.exception() is not None:
                log.warning("clean shutdown failed: %s", one_line(graceful.exception()))
        else:
            graceful.cancel()
            log.warning("clean shutdown took longer than %.1f s; exiting anyway", self.cfg.shutdown_timeout_s)
        for timer in self._timers.values():
            timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        self._log_call_end("failed" if self._fatal_message else "completed")
        if self.mixer is not None:
            await asyncio.wait({asyncio.ensure_future(self.mixer.aclose())}, timeout=2.5)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        log.info("stopped in %.2f s", time.monotonic() - t0)

    async def _graceful_stop(self) -> None:
        self.notifier.notify("STOPPING=1")
        fade_ms = 300
        if self.mixer is not None:
            self.mixer.stop_bed(fade_ms)
        # The bed fades out while the session ends; then leave the room. A call handed over,
        # or taken over by another agent, leaves its session to the one that goes on.
        await asyncio.gather(self._end_session(keep=self._handover or self.link.replaced),
                             asyncio.sleep((fade_ms + (self.mixer.max_queue_ms if self.mixer is not None else 0)) / 1000))
        await self.link.leave()

    async def _startup_check(self) -> None:
        log_session_config(self.cfg)
        if self.cfg.startup_check:
            await prove_api_key(self.cfg, self.tools)
        self._api_verified.set()

    async def _notify_ready(self) -> None:
        await self.link.joined.wait()
        await self._api_verified.wait()
        log.info("ready: in room %s, waiting for a user", self.cfg.room_name)
        self.notifier.notify("READY=1", f"STATUS=in room {self.cfg.room_name}, waiting for a user")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 while both loops are alive: this task proves the main loop, the
        heartbeat proves the audio thread. A hung loop stops the pings; systemd restarts us."""
        interval = self.notifier.watchdog_s / 2
        while True:
            await asyncio.sleep(interval)
            stale = time.monotonic() - self.mixer.heartbeat
            if self.mixer.alive and stale < max(1.0, interval):
                self.notifier.notify("WATCHDOG=1")
            else:
                log.error("audio loop stalled for %.1f s: not pinging the systemd watchdog", stale)

    async def _report_counters(self) -> None:
        """Mixer and bridge counters, periodically, at debug level (benchmarks read them too)."""
        while True:
            await asyncio.sleep(10)
            log.debug("counters", extra={"fields": self.counters()})

    def _sync_metrics_now(self) -> None:
        """The mixer's and the API client's counters into the metrics."""
        if self.mixer is not None:
            audio = self.mixer.snapshot()
            self.metrics.sync(int(audio["underruns"]), float(audio["queue_ms"]), self.client)

    def _log_call_end(self, outcome: str) -> None:
        """The call's one summary line (no text, no names, no secrets: metrics.CallFigures)."""
        self._sync_metrics_now()
        if outcome == "completed" and self.job is not None and getattr(self.job, "rescue", ""):
            outcome = "recovered"
        line = self.metrics.call_ended(outcome)
        if line is not None:
            log.info("call ended", extra={"fields": line})

    def counters(self) -> dict[str, Any]:
        """Everything worth watching for leaks and health, in one place (also on SIGUSR1)."""
        client = self.client
        return {
            "mixer": self.mixer.snapshot(),
            "bridge": dict(client.counters) if client is not None else None,
            "control": dict(self.controller.counters) if self.controller is not None else None,
            "tasks": len(asyncio.all_tasks()),
            "owned_tasks": len(self._tasks),
            "threads": threading.active_count(),
            "inputs": len(self.link.inputs),
            "caption_segments": self.captions.open_segments if self.captions is not None else 0,
            "preconnect": dict(self.link.preconnect.counters),
            "session_channel": dict(self.session_channel.counters),
            "calls": self.call.calls,
            "rss_kb": _rss_kb(),
        }

    def dump_counters(self) -> None:
        log.info("counters", extra={"fields": self.counters()})
        if log.isEnabledFor(logging.DEBUG):
            for task in asyncio.all_tasks():
                frames = task.get_stack()[-4:]  # the innermost frames: where it waits
                where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
                log.debug("task %s at %s", task.get_name(), where or "(not started)")

    # -- the call state machine: events in, actions carried out --

    def _feed(self, event: call.Event) -> None:
        for action in self.call.handle(event, time.monotonic()):
            self._perform(action)

    def _perform(self, action: call.Action) -> None:  # noqa: C901 - one case per action
        match action:
            case call.ShowState(state):
                self.link.show_state(state.value)
                self.session_channel.agent_state(state.value)
            case call.StartSession(number, new_bed, replacement):
                if not replacement and self.job is None:
                    # A call the service ended while nobody was left has had no end of its own.
                    self._log_call_end("completed")
                    self.metrics.call_started()
                self._start_session(number, new_bed, replacement)
            case call.SendText(text, interrupt):
                if self.client is not None:
                    self._spawn(self._send_text(self.client, text, interrupt), "chat", isolated=True)
                else:
                    log.warning("typed chat dropped: no Voice Agent session")
            case call.TellUser(notice):
                log.warning("telling the user: %s", NOTICES[notice])
                self.captions.notice(NOTICES[notice])
            case call.EndCall(reason):
                log.info("no user for %.0f s: ending the Voice Agent session", self.idle_timeout_s)
                self._spawn(self._end_call(), "end-call")
            case call.StartThinking():
                self._start_thinking()
            case call.StopThinking():
                self.output.stop_thinking()
            case call.PlayReply(reply_id, pcm):
                self.output.push_reply(reply_id, pcm)
                self.captions.wake()  # its words can become due
            case call.DropReply(reply_id, reason):
                self._drop_reply(reply_id, reason)
            case call.LogTurn(turn, latency_ms):
                barge_ins = self.client.counters["barge_ins"] if self.client is not None else 0
                log.info("turn %d: first reply audio %.0f ms after the user's end of turn; %d barge-ins so far",
                         turn, latency_ms, barge_ins,
                         extra={"fields": {"turn": turn, "latency_ms": round(latency_ms), "barge_ins": barge_ins}})
            case call.StartTimer(timer, seconds):
                self._cancel_timer(timer)
                self._timers[timer] = asyncio.get_running_loop().call_later(seconds, self._timer_fired, timer)
            case call.CancelTimer(timer):
                self._cancel_timer(timer)
            case call.HangUp(reason):
                if self._hangup is None or self._hangup.done():
                    self._hangup = self._spawn(self._hang_up(reason), "hang-up")
            case call.ForgetRestoredBed():
                if self.controller.active is not None:
                    log.info("no user came back within %.0f s: dropping the restored bed", self.idle_timeout_s)
                    self._call_ended()

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self._feed(call.TimerFired(timer))

    def _cancel_timer(self, timer: Timer) -> None:
        handle = self._timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _on_playback(self, event: PlaybackEvent) -> None:
        self.captions.wake()
        if isinstance(event, ReplyStartedPlaying):
            st = self.output.reply_stats(event.reply_id)
            self.metrics.reply_playing(event.reply_id, event.at, st.first_received_at if st is not None else None)
            self._feed(call.PlaybackStarted(event.reply_id))
        else:
            self.metrics.reply_silent(event.reply_id, event.at, event.interrupted)
            self._feed(call.PlaybackStopped())

    # -- the Voice Agent session: starts with the first user, ends when the last has gone --

    def _start_session(self, number: int, new_bed: bool, replacement: bool = False) -> None:
        if self._stop.is_set():
            return  # shutting down: no new session
        settings = session_settings(self.cfg, self.tools.definitions())
        takeover, self._takeover = self._takeover, None
        resume = None
        if takeover is not None:
            # A call taken over: its session resumed, else a fresh one that says the recovery
            # line, not the first-time greeting.
            if not self.cfg.agent_id:
                settings = dataclasses.replace(settings, greeting=self.cfg.recovery_greeting or None)
            resume = (takeover, time.monotonic()) if takeover else None
            log.info("taking the call over: %s", f"resuming Voice Agent session {takeover}" if takeover
                     else "a new Voice Agent session (none to resume)")
        self.client = bridge.VoiceAgentClient(
            self.cfg.voice_agent_url,
            self.cfg.assemblyai_api_key,
            settings,
            self,
            bridge.ClientOptions(barge_in=self.cfg.barge_in, give_up_after_s=self.cfg.reconnect_give_up_s,
                                 input_backlog_ms=self.cfg.input_backlog_ms, tool_timeout_s=self.cfg.tool_timeout_s),
            # A replacement for a session the service ended: no second greeting, and the
            # conversation so far in its system prompt (as after a failed resume).
            greet=not replacement,
            history=self._history if replacement else None,
            resume=resume,
        )
        if replacement:
            log.info("the Voice Agent service ended the session: starting a replacement (call %d goes on)", number)
        else:
            log.info("starting a Voice Agent session (call %d)", number)
            self._history = []
        if new_bed and self.controller.active is None:
            self._pick_bed()  # one ambient pick per call
        self._session_task = self._spawn(self._run_session(self.client), "session")

    async def _run_session(self, client: bridge.VoiceAgentClient) -> None:
        by_service = False
        try:
            await client.run()
            by_service = client.protocol.ended and not client.ending
        finally:
            self._history = client.protocol.history
            self.metrics.sync_api(client)  # its last attempts, before a replacement's client
            if self.client is client:
                self.client = None
                self.log_ctx.fields["session_id"] = None
                self.log_ctx.fields["reply_id"] = None
                self._feed(call.SessionClosed(by_service=by_service and not self._stop.is_set()))

    def _send_audio(self, pcm: bytes, held: bool = False) -> None:
        client = self.client
        if client is not None:
            client.send_audio(pcm, held)

    async def _end_call(self) -> None:
        await self._end_session()
        self._call_ended()
        if self.job is not None:
            await self._close_room_to_fleet()
            self.request_stop()  # job mode: one call per process

    async def _close_room_to_fleet(self) -> None:
        """Serve mode, a call that ended on purpose: delete the room's dispatch for this agent,
        which is how the fleet knows not to bring the agent back (rescue.py), and the session
        record on the users."""
        try:
            async with server_api(self.cfg) as lk:
                for d in await lk.agent_dispatch.list_dispatch(room_name=self.cfg.room_name):
                    if d.agent_name == self.job.agent_name:
                        await lk.agent_dispatch.delete_dispatch(d.id, self.cfg.room_name)
                await self._note_on_users(lk, "")
        except Exception as e:  # the room is gone already, most often
            log.debug("could not close room %s to the fleet: %s", self.cfg.room_name, one_line(e))

    async def _record_session(self, session_id: str) -> None:
        """Serve mode: the session id on the users' attributes, signed, so the call that takes
        this one over if its host goes away can resume the session (rescue.py)."""
        async with server_api(self.cfg) as lk:
            await self._note_on_users(lk, rescue.session_record(self.cfg.livekit_api_secret, self.cfg.room_name,
                                                                session_id))

    async def _note_on_users(self, lk: Any, record: str) -> None:
        """The session record ("": none) on every user of the call."""
        from livekit import api

        for identity in sorted(self.link.present):
            try:
                await lk.room.update_participant(api.UpdateParticipantRequest(
                    room=self.cfg.room_name, identity=identity, attributes={rescue.SESSION_ATTRIBUTE: record}))
            except Exception as e:  # that user has just left, most often
                log.info("could not note the session on user %s (%s)", identity, one_line(e))

    async def _end_session(self, keep: bool = False) -> None:
        """End the session (session.end), or with ``keep`` only close its socket: a call
        handed over leaves the session resumable for the one that goes on."""
        client, task = self.client, self._session_task
        if client is not None:
            await (client.drop() if keep else client.end(timeout=1.5))
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass

    def _call_ended(self) -> None:
        """A call ended normally: its summary line; its runtime bed goes with it."""
        self._log_call_end("completed")
        had_runtime_bed = self.controller.active is not None
        self.controller.call_ended()
        if had_runtime_bed:
            self._bed_source = None
            self._pick_bed()

    def _pick_bed(self) -> None:
        choice = self.ambient.pick(self._rng)
        source = None if choice is None else choice.clip.source
        if choice is None:
            if self._bed_source is not None:
                self.mixer.stop_bed()
        else:
            volume = choice.clip.volume if choice.clip.volume is not None else self.cfg.ambient_volume
            if source != self._bed_source:
                self.mixer.set_bed(choice.sound.name, choice.sound.samples, volume)
            else:
                self.mixer.set_bed_volume(volume)
        if self.ambient:
            log.info("ambient: %s", source or "silence (no clip picked)")
        self._bed_source = source

    def _start_thinking(self) -> None:
        choice = self.thinking.pick(self._rng)  # a new pick every thinking phase
        if choice is not None:
            volume = choice.clip.volume if choice.clip.volume is not None else self.cfg.thinking_volume
            self.output.start_thinking(choice.sound.name, choice.sound.samples, volume)

    def _drop_reply(self, reply_id: str, reason: str) -> None:
        st = self.output.interrupt(reply_id)
        self.captions.agent_done(reply_id, cut_at=st.played if st is not None else 0)
        if st is not None:
            log.info("reply %s interrupted (%s) after %.2f s of %.2f s received",
                     reply_id, reason, st.played / SAMPLE_RATE, st.received / SAMPLE_RATE)

    # -- text typed in the frontend (read and checked by the room link) --

    async def _on_chat(self, sender: str, text: str) -> None:
        """Typed text from a user of the call: the call decides (it is the user's turn, and
        interrupts the agent if it is speaking: call.SendText)."""
        log.info("chat from %s (%d characters)", sender, len(text))
        self.session_channel.message("user", text)
        self._feed(call.TextTyped(sender, text))

    async def _send_text(self, client: bridge.VoiceAgentClient, text: str, interrupt: str | None) -> None:
        # The bridge holds it (bounded) until the session is ready (and, unless it interrupts,
        # the greeting has been spoken), then asks for a reply whose instructions quote it.
        await client.send_text(text, interrupt)

    # -- bridge.BridgeEvents: called on the event loop by the bridge --

    def on_event(self, event: bridge.BridgeEvent) -> None:
        """Logging context and captions here; the call's decisions in self.call."""
        match event:
            case bridge.SessionReady(session_id, resumed):
                self.log_ctx.fields["session_id"] = session_id
                log.info("Voice Agent session %s (%s)", "resumed" if resumed else "ready", session_id)
                if self.job is not None and not resumed:
                    self._spawn(self._record_session(session_id), "session-record", isolated=True)
            case bridge.SpeechStarted():
                self.metrics.speech_started()
                log.debug("user started speaking")
                self.session_channel.user_speaking(True)
            case bridge.SpeechStopped():
                self.metrics.speech_stopped()
                self.session_channel.user_speaking(False)
            case bridge.ReplyInterrupted(reply_id):
                self.metrics.reply_interrupted(reply_id)
            case bridge.UserTranscript(text, item_id, final):
                who = self.link.caption_speaker()
                if who is not None and text:
                    self.captions.user(who[0], who[1], item_id, text, final)
                if text:
                    self.session_channel.user_transcript(text, final)
            case bridge.ReplyStarted(reply_id):
                self.log_ctx.fields["reply_id"] = reply_id
            case bridge.AgentTranscriptDelta(reply_id, delta, start_ms):
                self.captions.agent_word(reply_id, delta, self._word_position(reply_id, start_ms))
            case bridge.AgentTranscript(reply_id, text, interrupted):
                st = self.output.reply_stats(reply_id)
                self.captions.agent_text(reply_id, text, st.received if st is not None else 0)
                if text:
                    self.session_channel.message("agent", text, interrupted)
            case bridge.ReplyDone(reply_id):
                self.captions.agent_done(reply_id)
                if self.log_ctx.fields["reply_id"] == reply_id:
                    self.log_ctx.fields["reply_id"] = None
            case bridge.SessionLost():
                # The reply in flight is abandoned: close its caption once its audio has played.
                self.captions.all_done()
            case bridge.SessionEnded():
                log.info("Voice Agent session ended")
        if isinstance(event, CALL_EVENTS):
            self._feed(event)

    def _word_position(self, reply_id: str, start_ms: float | None) -> int:
        """Where a word starts in its reply's audio, in samples: the service's start_ms, else
        the end of the audio received so far."""
        if start_ms is not None:
            return int(start_ms * SAMPLE_RATE / 1000)
        st = self.output.reply_stats(reply_id)
        return st.received if st is not None else 0

    # -- tools --

    async def on_tool_call(self, name: str, arguments: dict[str, Any], call_id: str) -> Any:
        """Runs concurrently with the audio path (the bridge owns the task and its timeout).
        While it runs the agent is 'thinking' and the thinking cue plays."""
        import tools as tools_mod

        log.info("tool %s called (%s)", name, call_id)
        self._feed(call.ToolStarted(call_id, name))

        async def end_call(reason: str | None) -> None:
            self._feed(call.HangUpRequested(reason or "end_call", call_id))

        ctx = tools_mod.ToolContext(self.cfg.room_name, self.link.user(), call_id, self._play_cue_for_tool, end_call,
                                    job_metadata=self.job.metadata if self.job is not None else "")
        try:
            return await self.tools.call(name, arguments, ctx)
        except (tools_mod.ToolCallError, tools_mod.ToolFailed) as e:
            raise bridge.ToolError(str(e)) from None  # meant for the agent; anything else is not
        finally:
            self._feed(call.ToolFinished(call_id))

    async def _play_cue_for_tool(self, clip: str, volume: float | None) -> bool:
        import sounds

        try:
            sound = await asyncio.get_running_loop().run_in_executor(  # ordinary priority, not real-time
                sounds.decode_executor(), lambda: sounds.load(clip, target_lufs=self.cfg.cue_target_lufs))
        except sounds.SoundError as e:
            log.warning("tool cue %s cannot be played: %s", clip, e)
            return False
        return await self.output.play_cue(sound.name, sound.samples,
                                          self.cfg.thinking_volume if volume is None else volume)

    async def _hang_up(self, reason: str) -> None:
        """The call decided (call.HangUp) that the agent has finished: the reply that called
        end_call, and a goodbye spoken after the tool's result. Once every reply sample has
        been heard, fade the bed, end the session and end the call for everyone (or only
        leave)."""
        await self.output.wait_for_playout()
        log.info("hanging up (%s): %s", reason, "deleting the room" if self.cfg.end_call_action == "delete_room"
                 else "leaving the room")
        self.mixer.stop_bed(500)
        await asyncio.gather(self._end_session(), asyncio.sleep(0.5 + self.mixer.max_queue_ms / 1000))
        self._call_ended()
        self.link.hung_up = True
        if self.cfg.end_call_action == "delete_room":
            from livekit import api

            try:
                async with server_api(self.cfg) as lk:
                    await lk.room.delete_room(api.DeleteRoomRequest(room=self.cfg.room_name))
                return
            except Exception as e:
                log.warning("could not delete room %s (%s); leaving it instead", self.cfg.room_name, one_line(e))
        if self.job is not None:
            await self._close_room_to_fleet()  # the user stays: the fleet must not bring the agent back
        await self.link.leave()


# What the user is told (the agent's captions) when the agent cannot answer.
NOTICES: dict[call.Notice, str] = {
    call.Notice.SERVICE_UNREACHABLE: "Sorry, I can't reach my voice service right now. I'm still trying: "
                                     "please hold on, or try again in a few minutes.",
}

# The bridge events the call state machine takes (the rest are for logs and captions).
CALL_EVENTS = (bridge.SessionReady, bridge.SessionLost, bridge.SpeechStarted, bridge.SpeechStopped,
               bridge.ReplyStarted, bridge.ReplyAudio, bridge.ReplyInterrupted, bridge.ReplyDone,
               bridge.ToolResultSent)


def control_settings(cfg: Config) -> control.ControlSettings:
    return control.ControlSettings(
        identities=frozenset(cfg.control_identities),
        ambient_dir=Path(cfg.ambient_dir) if cfg.ambient_dir else None,
        state_dir=Path(cfg.state_dir) if cfg.state_dir else None,
        max_upload_bytes=int(cfg.control_max_upload_mb * 1024 * 1024),
        max_audio_s=cfg.control_max_audio_s,
        calls_per_minute=cfg.control_rate_per_min,
        default_volume=cfg.ambient_volume,
        bed_target_lufs=cfg.ambient_target_lufs,
        cue_target_lufs=cfg.cue_target_lufs,
    )


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def load_tool_registry(cfg: Config) -> Any:
    """The tools the agent is offered: the built-in end_call, and TOOLS_MODULE's."""
    import tools as tools_mod

    loaded: list[Any] = []
    if cfg.tools_module.strip():
        try:
            loaded = tools_mod.load_tools(cfg.tools_module)
        except tools_mod.ToolError as e:
            raise ConfigError(f"TOOLS_MODULE: {e}") from None
    if cfg.end_call_tool:
        async def end_call(ctx: tools_mod.ToolContext) -> dict[str, Any]:
            """End the call when the conversation is over. Say goodbye first, then call this: the line is closed
            once your goodbye has been heard."""
            await ctx.end_call("the agent ended the call")
            return {"ok": True, "note": "The call will end once your current reply has been heard. Say goodbye now "
                                        "if you have not."}

        loaded.append(tools_mod.make_tool(end_call, "end_call"))
    return tools_mod.ToolRegistry(loaded)


# A successful start-up key check is trusted this long: a service manager restarting the
# worker (LiveKit unreachable, a crash) must not open a billed session every restart.
KEY_CHECK_VALID_S = 3600.0


def key_check_stamp(cfg: Config, settings: bridge.SessionSettings) -> Path | None:
    """Where a successful key check is remembered: a file named after a hash of the URL,
    the key and the session settings (never the key itself), in STATE_DIR, else systemd's
    $STATE_DIRECTORY, else ~/.cache/voice-agent. None if there is nowhere to keep it."""
    import hashlib

    digest = hashlib.sha256(repr((cfg.voice_agent_url, cfg.assemblyai_api_key, settings)).encode()).hexdigest()
    cache = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if os.environ.get("HOME") else "")
    if cfg.state_dir:
        folder = Path(cfg.state_dir)
    elif os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory= (serve's unit sets no STATE_DIR)
        folder = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    elif cache:
        folder = Path(cache) / "voice-agent"
    else:
        return None
    return folder / f"key-check-{digest[:32]}"


def _key_check_cached(stamp: Path | None) -> bool:
    try:
        return stamp is not None and 0 <= time.time() - stamp.stat().st_mtime < KEY_CHECK_VALID_S
    except OSError:
        return False


def _remember_key_check(stamp: Path | None) -> None:
    if stamp is None:
        return
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in stamp.parent.glob("key-check-*"):  # one stamp: the last key and settings proven
            if old != stamp:
                old.unlink(missing_ok=True)
        stamp.touch()  # its time is the check's
    except OSError as e:
        log.debug("cannot remember the key check in %s (%s): the next start checks again", stamp.parent,
                  one_line(e))


async def prove_api_key(cfg: Config, tools: Any) -> None:
    """Prove the API key once at start (STARTUP_CHECK), so systemd (or the serve host, for
    every call it will run) knows a bad key before any call. An unreachable or busy service
    is retried (backoff.Backoff) for RECONNECT_GIVE_UP_S seconds, then bridge.GaveUp (exit 5);
    a rejected key or configuration raises at once (exit 3 or 4). A success with the same
    key, URL and session settings within KEY_CHECK_VALID_S is not repeated (it is billed)."""
    settings = session_settings(cfg, tools.definitions())
    stamp = key_check_stamp(cfg, settings)
    if _key_check_cached(stamp):
        log.info("Voice Agent API key verified within the last %.0f minutes with these settings: not checked again",
                 KEY_CHECK_VALID_S / 60)
        return
    give_up = cfg.reconnect_give_up_s
    retry = backoff.Backoff(0.5, 10.0, give_up)
    while True:
        try:
            # No attempt outlasts the give-up time by more than a second.
            timeout = max(1.0, min(10.0, give_up - retry.failing_for()))
            sid = await bridge.verify_session(cfg.voice_agent_url, cfg.assemblyai_api_key, settings, timeout)
            log.info("Voice Agent API key verified (session %s opened and ended)", sid)
            _remember_key_check(stamp)
            return
        except (OSError, asyncio.TimeoutError) as e:
            delay = retry.failed()
            if delay is None:
                raise bridge.GaveUp(f"could not verify ASSEMBLYAI_API_KEY: the Voice Agent API at "
                                    f"{cfg.voice_agent_url} failed for {give_up:.0f} s ({one_line(e)})")
            log.warning("cannot verify the Voice Agent API yet (%s); retrying in %.1f s", one_line(e), delay)
            await asyncio.sleep(delay)


# --- command line ------------------------------------------------------------------------------


SECRETS_HELP = ("Secrets ({names}) have no flag: a command line is readable by every user of this machine "
                "(ps, /proc/<pid>/cmdline) and stays in shell history. Set them in the environment or in ./.env "
                "(the systemd unit: its EnvironmentFile).")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # argparse echoes unrecognised arguments and invalid choices, values included: a
        # mistyped secret flag would print the secret. Name the options only.
        if "invalid choice: " in message:
            head, _, rest = message.partition("invalid choice: ")
            message = head + "invalid choice" + (" (" + rest.split(" (", 1)[1] if " (" in rest else "")
        if message.startswith("unrecognized arguments: "):
            words = message.split(": ", 1)[1].split()
            options = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            hidden = len(words) - len(options)
            message = ("unrecognized arguments: " + (" ".join(options) or "(values)")
                       + (f" (and {hidden} value{'s' if hidden != 1 else ''}, not shown)" if options and hidden else ""))
        # One line, as for every other mistake: the usage is 34 lines that bury it.
        self.exit(EXIT_CONFIG, f"error: {message}; see {self.prog} --help\n")


class _SecretFlag(argparse.Action):
    """A flag for a secret setting, kept only to refuse it with one clear line (exit 2),
    without echoing the value."""

    def __init__(self, *args: Any, variable: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variable = variable

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.exit(EXIT_CONFIG, f"error: {option_string} is not accepted: a secret on the command line is readable "
                                 f"by every user of this machine; set {self.variable} in the environment or in "
                                 f"./.env instead\n")


def build_parser() -> argparse.ArgumentParser:
    import textwrap

    secret_names = [env_name(f) for f in dataclasses.fields(Config) if f.metadata["secret"]]
    parser = _Parser(
        prog="worker.py",
        description="Bridge a LiveKit room to AssemblyAI's Voice Agent API. Every setting is an environment "
                    "variable (also read from ./.env); a flag overrides it.\n\n"
                    + textwrap.fill(SECRETS_HELP.format(names=", ".join(secret_names)), 79),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=exits.exit_code_help(),
    )
    parser.add_argument("command", nargs="?", default="run",
                        choices=("run", "demo", "serve", "token", "check", "control", "job"),
                        help="run (default): join ROOM_NAME and run its calls (LIVEKIT_URL empty: with a local "
                             "LiveKit server in dev mode); demo: the same against a local echo agent that plays back "
                             "what you say (no AssemblyAI key); serve: register with the LiveKit "
                             "server as an agent worker and run one call process per room it dispatches to this "
                             "host (agent dispatch: the Serve mode settings); token: print a user token and what "
                             "to paste into the Agents Playground or meet.livekit.io; check: verify the "
                             "configuration, the LiveKit server (as a room participant and as an agent worker), "
                             "the Voice Agent API key and the sound files, one line each; control METHOD [JSON]: "
                             "call the running worker's control API (mix_audio, play, state) as --identity; job: "
                             "one dispatched call, started by serve (the job on stdin)")
    parser.add_argument("method", nargs="?", help="control: mix_audio, play or state")
    parser.add_argument("payload", nargs="?", default="{}", help="control: the JSON payload (default {})")
    parser.add_argument("--identity", default=None,
                        help="token: the user's identity (default: user); control: the caller's identity, which "
                             "must be in CONTROL_IDENTITIES (default: operator)")
    parser.add_argument("--file", default=None,
                        help="control mix_audio/play: send this sound file as the audio (large files go as a "
                             "byte stream)")
    parser.add_argument("--ttl", default=None, metavar="DURATION",
                        help=f"token: how long the token can be used to join, e.g. 30m or 2h (default: "
                             f"{duration_text(USER_TOKEN_TTL)}; {duration_text(USER_TOKEN_TTL_MIN)} to "
                             f"{duration_text(USER_TOKEN_TTL_MAX)})")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        default = shown_default(f)
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["secret"]:
            # Listed in the group's text, and the flag refused (never stored) if given anyway.
            groups[g].description = (groups[g].description or "") + f"{env_name(f)} (no flag: environment or .env only)\n" \
                + textwrap.fill(f"{f.metadata['help']} [env {env_name(f)}; {default}]", 75, initial_indent="    ",
                                subsequent_indent="    ") + "\n"
            groups[g].add_argument(flag, action=_SecretFlag, variable=env_name(f), nargs="?", dest="_" + f.name,
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        groups[g].add_argument(
            flag, dest=env_name(f), metavar="VALUE",
            help=f"{f.metadata['help']} [env {env_name(f)}; {default}]",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    # PyJWT warns about short HMAC keys; livekit-server --dev's "secret" is one. Not ours to nag about.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k.isupper()}
    try:
        gather_env(cli)  # a broken ./.env is one line for every command, before anything starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        logging.basicConfig(level=logging.CRITICAL)
        import check

        return asyncio.run(check.preflight(gather_env(cli), MIN_PYTHON))
    if args.command == "job":
        return run_job(cli)
    if args.command == "serve":
        return run_serve(cli)
    env = gather_env(cli)
    local = local_server_wanted(args.command, env)
    optional = (("ASSEMBLYAI_API_KEY",) if args.command in ("token", "control", "demo") else ()) \
        + (LOCAL_SERVER_PROVIDES if local else ())
    try:
        cfg = load_config(env, optional=optional)
    except ConfigError as e:
        print(f"error: {local_server_refused(e, args.command, env)}", file=sys.stderr)
        return EXIT_CONFIG
    scheduling.sdk_runtime_threads(cfg.tokio_worker_threads)  # before the SDK's first call
    if args.command == "token":
        try:
            ttl = parse_ttl(args.ttl) if args.ttl is not None else USER_TOKEN_TTL
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        return print_token(cfg, args.identity or "user", ttl)
    if args.command == "control":
        identity = args.identity or "operator"
        return asyncio.run(control.call(cfg.livekit_url, mint_token(cfg, identity, name=identity), cfg.agent_identity,
                                        args.method, args.payload, args.file))
    try:
        check_state_dir(cfg)  # a local resource: before a server is started or anything remote is tried
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with contextlib.ExitStack() as services:  # stopped after the worker has left the room
            try:
                cfg = start_services(cfg, args.command, env, local, services)
            except FatalError as e:
                print(f"error: {e}", file=sys.stderr)
                return e.exit_code
            log_ctx = setup_logging(cfg.secrets, cfg.log_level, cfg.log_format)
            scheduling.raise_main_thread(cfg.audio_priority)  # after the services: they keep normal priority
            return asyncio.run(_run(cfg, log_ctx))
    except KeyboardInterrupt:  # Ctrl-C while a service starts (or a second one while they stop)
        return EXIT_OK


# --- local services: a LiveKit server when LIVEKIT_URL is empty, the demo's echo agent ----------

# Commands that start a local LiveKit server when LIVEKIT_URL is empty. A command added here
# calls start_services before it uses cfg; serve's call processes, given ``env`` after that,
# join the same server.
LOCAL_SERVER_COMMANDS = ("run", "demo", "serve")

DEMO_GREETING = "Hi! I am the demo agent. Say something, and I will play it back to you."
DEMO_TEXT = """\
Demo: the agent is a local echo agent (standin.py, which speaks the Voice Agent API; no AssemblyAI account,
nothing leaves this machine). It greets you with a chime, then plays back what you say, with captions; speak
while it plays to interrupt it. The ambient bed plays under everything. The real agent: ASSEMBLYAI_API_KEY=... ./scripts/run
"""


def local_server_wanted(command: str, env: dict[str, str]) -> bool:
    """LIVEKIT_URL is empty and this command joins a room: start a local LiveKit server,
    unless a service manager runs us (there a missing LIVEKIT_URL is a mistake to report)."""
    import devserver

    return (command in LOCAL_SERVER_COMMANDS and not env.get("LIVEKIT_URL", "").strip()
            and devserver.managed_by(env) is None)


def local_server_refused(e: ConfigError, command: str, env: dict[str, str]) -> str:
    """A missing LIVEKIT_URL under a service manager: say why no local server was started."""
    import devserver

    manager = devserver.managed_by(env)
    if command in LOCAL_SERVER_COMMANDS and manager and str(e).startswith("LIVEKIT_URL is not set"):
        return (f"LIVEKIT_URL is not set: set it (and LIVEKIT_API_KEY, LIVEKIT_API_SECRET) to your LiveKit server; "
                f"under {manager} no local server is started")
    return str(e)


def start_services(cfg: Config, command: str, env: dict[str, str], local: bool,
                   services: contextlib.ExitStack) -> Config:
    """The local services this command needs, as child processes that stop with the stack
    (and die with us): a LiveKit server in dev mode when ``local``, and for ``demo`` the
    echo agent. Returns the configuration pointed at them, after printing what a person
    pastes into the Agents Playground; ``env`` and ``os.environ`` then name the local server.
    Raises FatalError with the line to print."""
    import devserver

    browser_url = cfg.livekit_url
    if local:
        server = devserver.start_server(cfg.local_server_bind)
        services.callback(server.stop)
        browser_url = server.browser_url
        cfg = dataclasses.replace(cfg, livekit_url=server.url, livekit_api_key=server.api_key,
                                  livekit_api_secret=server.api_secret)
        # Our settings now name it, for any process of ours that reads them: ``env`` (what
        # this process read, handed on to call processes) and the environment.
        names = dict(LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key, LIVEKIT_API_SECRET=server.api_secret)
        env.update(names)
        os.environ.update(names)
    if command == "demo":
        agent = devserver.start_echo_agent()
        services.callback(agent.stop)
        # What the echo agent cannot honour goes: a stored agent, a voice, unknown fields.
        cfg = dataclasses.replace(cfg, voice_agent_url=agent.url, assemblyai_api_key=agent.api_key, agent_id=None,
                                  voice="", session_extra=None,
                                  greeting=cfg.greeting if "GREETING" in env else DEMO_GREETING)
        print(DEMO_TEXT)
    if local or command == "demo":
        print_token(dataclasses.replace(cfg, livekit_url=browser_url), "user")
        print(flush=True)
    return cfg


# A second SIGTERM/SIGINT means "exit now" only this long after the first; see _run.
URGENT_SIGNAL_AFTER_S = 0.5


async def _run(cfg: Config, log_ctx: LogContext, job: Any = None) -> int:
    worker = Worker(cfg, log_ctx, job)
    loop = asyncio.get_running_loop()
    signals_seen = 0
    first_signal_at = 0.0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen, first_signal_at
        now = time.monotonic()
        if signals_seen and now - first_signal_at < URGENT_SIGNAL_AFTER_S:
            # `timeout`, cron wrappers and `kill PID; kill -- -PGID` deliver one stop twice
            # within microseconds: that is the first signal again, not a hurried human.
            log.debug("%s again %.3f s after the first: one stop, already shutting down", signame,
                      now - first_signal_at)
            return
        signals_seen += 1
        if signals_seen == 1:
            first_signal_at = now
        if signals_seen > 1 and job is not None:
            # A call process is stopped by its serve process (SIGKILL after JOB_STOP_TIMEOUT_S),
            # not by a hurried human. And one death of the serve process can deliver the
            # parent-death SIGTERM more than once (once per exiting thread it was reparented
            # to): a second one must not cut the clean end short.
            log.debug("%s again: already ending the call", signame)
            return
        if signals_seen > 1:
            log.warning("second %s: exiting now", signame)
            os._exit(EXIT_OK)
        log.info("%s received: shutting down", signame)
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, worker.dump_counters)
    if job is not None:
        import dispatch

        # From the serve process when the host goes away, or the kernel when it died.
        loop.add_signal_handler(dispatch.HANDOVER_SIGNAL, worker.hand_over, "the serve host is going away")
    try:
        return await worker.run()
    except ConfigError as e:
        report_fatal(cfg, log_ctx, str(e), EXIT_CONFIG)
        return EXIT_CONFIG
    except (FatalError, bridge.ApiError) as e:
        report_fatal(cfg, log_ctx, str(e), exit_code(e))
        return exit_code(e)


# --- serve mode: the host, and one call per process ---------------------------------------------


def run_serve(cli: dict[str, str]) -> int:
    """`python worker.py serve`: validate everything a call needs (the whole configuration,
    the sounds, the tools; the API key once, with STARTUP_CHECK) before registering, so a
    mistake shows at start and not in every call; then dispatch.Dispatcher: the agent
    worker, one `python worker.py job` per job."""
    env = gather_env(cli)
    local = local_server_wanted("serve", env)
    try:
        cfg = load_config(env, optional=LOCAL_SERVER_PROVIDES if local else ())
        check_serve_config(cfg)
        load_banks(cfg)  # decoded again by each call; here only to fail fast
        tools = load_tool_registry(cfg)
    except ConfigError as e:
        print(f"error: {local_server_refused(e, 'serve', env)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with contextlib.ExitStack() as services:  # stopped after the calls have ended
            try:
                cfg = start_services(cfg, "serve", env, local, services)  # env names it from here on
            except FatalError as e:
                print(f"error: {e}", file=sys.stderr)
                return e.exit_code
            return _serve(cfg, env, tools)
    except KeyboardInterrupt:
        return EXIT_OK


def _serve(cfg: Config, env: dict[str, str], tools: Any) -> int:
    import dispatch

    log_ctx = setup_logging(cfg.secrets, cfg.log_level, cfg.log_format, redact_jwts=True)
    # The calls read their settings as this process did: flags and ./.env included.
    names = {env_name(f) for f in dataclasses.fields(Config)}
    serve_metrics = metrics.ServeMetrics() if cfg.health_port else None  # /metrics on the health port
    dispatcher = dispatch.Dispatcher(cfg, log_ctx, child_env={k: v for k, v in env.items() if k in names},
                                     metrics=serve_metrics)

    async def serve() -> int:
        await dispatcher.open_health()  # local resources first: nothing billed on a path that then fails here
        lag = (asyncio.create_task(metrics.monitor_loop_lag(serve_metrics.loop_lag), name="loop-lag")
               if serve_metrics is not None else None)
        try:
            if cfg.startup_check:
                log_session_config(cfg)
                await prove_api_key(cfg, tools)
            return await dispatcher.run()
        finally:
            if lag is not None:
                lag.cancel()

    try:
        return asyncio.run(serve())
    except (FatalError, bridge.ApiError) as e:
        report_fatal(cfg, log_ctx, str(e), exit_code(e))
        return exit_code(e)
    finally:
        dispatcher.supervisor.kill_all()
        if serve_metrics is not None:
            serve_metrics.close()  # its children's files: after they are gone


def run_job(cli: dict[str, str]) -> int:
    """`python worker.py job`, run by the serve process for one dispatched room: the job
    (its room, URL and token) arrives as one JSON line on stdin, never on the command line
    or in the environment. The process never outlives its parent, joins with the job's
    token, takes no start-up key check (the serve process made it) and keeps no per-room
    state (STATE_DIR); it ends with the call, exit 0, however the call ended."""
    import dispatch

    if sys.stdin.isatty():
        print("error: `job` runs one dispatched call and is started by `python worker.py serve`",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        job = dispatch.read_job()
    except (OSError, ValueError, EOFError, TimeoutError) as e:
        print(f"error: no job on stdin ({one_line(e)}); `job` is started by `python worker.py serve`",
              file=sys.stderr)
        return EXIT_CONFIG
    dispatch.bind_to_parent(job.parent_pid, job.stop_timeout_s)
    try:
        cfg = load_config(gather_env(cli))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # The room and the identity are the job's (set after validation: a room name is whatever
    # the user's frontend chose); no bed is kept per room.
    cfg = dataclasses.replace(cfg, room_name=job.room, agent_identity=job.identity, state_dir="",
                              startup_check=False)
    log_ctx = setup_logging([*cfg.secrets, job.token], cfg.log_level, cfg.log_format, redact_jwts=True)
    log_ctx.text_fields = ("room", "session_id", "reply_id")  # many calls share the serve process's log
    log.info("job %s: room %s%s", job.job_id, job.room,
             f", dispatched as agent {job.agent_name!r}" if job.agent_name else "")
    scheduling.sdk_runtime_threads(cfg.tokio_worker_threads)
    scheduling.raise_main_thread(cfg.audio_priority)
    return asyncio.run(_run(cfg, log_ctx, job))


# What the Voice Agent API's refusals mean for the process (exits.py has the table).
API_EXITS: dict[type[bridge.ApiError], int] = {
    bridge.KeyRejected: exits.EXIT_API_AUTH,
    bridge.ConfigRejected: exits.EXIT_API_CONFIG,
    bridge.GaveUp: exits.EXIT_API_GAVE_UP,
}


def exit_code(e: BaseException) -> int:
    """The exit code an error that ends the process stands for."""
    if isinstance(e, FatalError):
        return e.exit_code
    for kind, code in API_EXITS.items():
        if isinstance(e, kind):
            return code
    return EXIT_INTERNAL


def report_fatal(cfg: Config, log_ctx: LogContext, message: str, code: int) -> None:
    """The one line that says why the process ends: plain on stderr, or a JSON log
    object when LOG_FORMAT=json (log shippers parse every line)."""
    if cfg.log_format == "json":
        log.critical(message, extra={"fields": {"exit_code": code}})
    else:
        print(f"error: {escape_controls(log_ctx.redact(message))}", file=sys.stderr)  # it may name the room


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the modules are loaded: main() handles Ctrl-C
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside what main() guards (settings, `check`): a stop, not a crash
        code = EXIT_OK
    exits.exit_now(code)
