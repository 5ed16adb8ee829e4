"""`python worker.py check`: every precondition of a run, one line each with its fix:
Python, the configuration, the LiveKit server and key, the same key as an agent worker
(serve mode), the Voice Agent API key (a short session), the sound files."""

from __future__ import annotations

import asyncio
import sys
from typing import Callable, Mapping

import bridge
from config import LOCAL_SERVER_PROVIDES, Config, check_serve_config, load_bank, load_config, session_settings
from environment import ConfigError
from logs import LogContext, one_line
from tokens import server_api

class _Report:
    """One line per check: ✓ what, or ✗ what and the fix."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.failures = 0

    def ok(self, what: str) -> None:
        self.out(f"\u2713 {what}")

    def bad(self, what: str, fix: str) -> None:
        self.failures += 1
        self.out(f"\u2717 {what}\n    fix: {fix}")

    def verdict(self) -> int:
        n = self.failures
        self.out("all checks passed" if not n else ("1 check failed" if n == 1 else f"{n} checks failed"))
        return 0 if not n else 1


async def preflight(env: Mapping[str, str], min_python: tuple[int, int], out: Callable[[str], None] = print) -> int:
    """`python worker.py check`: every precondition, one line each, with the fix."""
    report = _Report(out)
    minimum = ".".join(map(str, min_python))
    if sys.version_info >= min_python:
        report.ok(f"Python {sys.version.split()[0]} (>= {minimum})")
    else:  # unreachable when run as worker.py (it stops at import), kept for library use
        report.bad(f"Python {sys.version.split()[0]} is too old", f"use Python {minimum} or newer")
    import devserver

    # LIVEKIT_URL empty outside a service manager: run, demo and serve start a local server
    # (worker.local_server_wanted), so there is no server to probe and nothing is missing.
    local = not env.get("LIVEKIT_URL", "").strip() and devserver.managed_by(env) is None
    try:
        cfg = load_config(env, optional=LOCAL_SERVER_PROVIDES if local else ())
    except ConfigError as e:
        report.bad(f"configuration: {e}", "set it in the environment or .env (see .env.example)")
        return report.verdict()
    report.ok("configuration: every variable present and valid")
    redact = LogContext(cfg.secrets).redact
    if local:
        report.ok("LiveKit: LIVEKIT_URL is empty, so run, demo and serve start a local LiveKit server in dev "
                  "mode on this machine (set LIVEKIT_URL to check a server of yours)")
    else:
        livekit_ok = await _check_livekit(cfg, report, redact)
        await _check_serve(cfg, report, livekit_ok)
    await _check_api(cfg, report, redact)
    _check_sounds(cfg, report)
    return report.verdict()


async def _check_livekit(cfg: Config, report: _Report, redact: Callable[[str], str]) -> bool:
    from livekit import api

    try:
        async with server_api(cfg) as lk:
            rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 10)
        report.ok(f"LiveKit at {cfg.livekit_url}: reachable, key and secret accepted ({len(rooms.rooms)} rooms)")
        return True
    except api.TwirpError as e:
        if e.status in (401, 403) or "unauthenticated" in str(e.code).lower():
            report.bad(f"LiveKit at {cfg.livekit_url} rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET",
                       "copy the key and secret of this server (livekit-server --dev: devkey / secret)")
        else:
            report.bad(f"LiveKit at {cfg.livekit_url}: {redact(str(e))[:160]}",
                       "check LIVEKIT_URL and the server's logs")
    except Exception as e:
        report.bad(f"LiveKit at {cfg.livekit_url} is not reachable ({redact(one_line(e))})",
                   "start the server (livekit-server --dev) or fix LIVEKIT_URL")
    return False


async def _check_serve(cfg: Config, report: _Report, livekit_ok: bool) -> None:
    """Serve mode (`python worker.py serve`): the serve settings fit together, and the server
    takes this key's worker registration (a token with the agent grant, on /agent). Not
    probed when the server or the key already failed above: that line says why."""
    import dispatch

    try:
        check_serve_config(cfg)
    except ConfigError as e:
        report.bad(f"serve mode: {e}", "raise JOB_STOP_TIMEOUT_S or lower SHUTDOWN_TIMEOUT_S")
        return
    if not livekit_ok:
        return
    ok, line = await dispatch.probe_registration(cfg.livekit_url, cfg.livekit_api_key, cfg.livekit_api_secret)
    if ok:
        mode = f"explicit dispatch as {cfg.agent_name!r}" if cfg.agent_name else "automatic dispatch"
        report.ok(f"serve mode: {line}; {mode}, up to {dispatch.max_calls(cfg)} calls on this host"
                  + ("" if cfg.max_calls else " (MAX_CALLS from the cores and the memory)"))
    elif "rejected" in line:
        report.bad(f"serve mode: {line}", "copy the key and secret of this server (livekit-server --dev: devkey / "
                                          "secret); only `python worker.py serve` needs this")
    else:
        report.bad(f"serve mode: {line}", "agent dispatch needs a LiveKit server with the agent service "
                                          "(livekit-server v1.13.5 is tested; LiveKit Cloud has it); only "
                                          "`python worker.py serve` needs it")


async def _check_api(cfg: Config, report: _Report, redact: Callable[[str], str]) -> None:
    try:
        sid = await bridge.verify_session(cfg.voice_agent_url, cfg.assemblyai_api_key, session_settings(cfg))
        report.ok(f"Voice Agent API at {cfg.voice_agent_url}: key accepted, session {sid} opened and ended")
    except bridge.ApiError as e:
        report.bad(f"Voice Agent API: {redact(str(e))}",
                   "set ASSEMBLYAI_API_KEY to a key from your AssemblyAI dashboard"
                   if isinstance(e, bridge.KeyRejected) else "fix the session setting named above")
    except Exception as e:
        report.bad(f"Voice Agent API at {cfg.voice_agent_url} is not reachable ({redact(one_line(e))})",
                   "check VOICE_AGENT_URL and this machine's access to it")


def _check_sounds(cfg: Config, report: _Report) -> None:
    for variable in ("AMBIENT_SOUND", "THINKING_SOUND"):
        try:
            bank = load_bank(cfg, variable)
        except ConfigError as e:
            report.bad(str(e), f"point {variable} at a playable file, a builtin:<name>, or none")
            continue
        report.ok(f"{variable}: " + (", ".join(f"{s.name} ({s.duration_s:.1f} s)" for s in bank.sounds()) or "none"))
