"""`python worker.py check`: every precondition of a run, one line each with its fix:
Python, the configuration, the LiveKit server and key, the Voice Agent API key (a short
session), the sound files."""

from __future__ import annotations

import asyncio
import sys
from typing import Callable, Mapping

import bridge
from config import ConfigError, load_bank, load_config, session_settings
from logs import LogContext, one_line
from tokens import server_api

async def preflight(env: Mapping[str, str], min_python: tuple[int, int], out: Callable[[str], None] = print) -> int:
    """`python worker.py check`: every precondition, one line each, with the fix."""
    failures = 0

    def ok(what: str) -> None:
        out(f"\u2713 {what}")

    def bad(what: str, fix: str) -> None:
        nonlocal failures
        failures += 1
        out(f"\u2717 {what}\n    fix: {fix}")

    minimum = ".".join(map(str, min_python))
    if sys.version_info >= min_python:
        ok(f"Python {sys.version.split()[0]} (>= {minimum})")
    else:  # unreachable when run as worker.py (it stops at import), kept for library use
        bad(f"Python {sys.version.split()[0]} is too old", f"use Python {minimum} or newer")
    try:
        cfg = load_config(env)
    except ConfigError as e:
        bad(f"configuration: {e}", "set it in the environment or .env (see .env.example)")
        out("1 check failed" if failures == 1 else f"{failures} checks failed")
        return 1
    ok("configuration: every variable present and valid")

    from livekit import api

    redact = LogContext(cfg.secrets).redact
    try:
        async with server_api(cfg) as lk:
            rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 10)
        ok(f"LiveKit at {cfg.livekit_url}: reachable, key and secret accepted ({len(rooms.rooms)} rooms)")
    except api.TwirpError as e:
        if e.status in (401, 403) or "unauthenticated" in str(e.code).lower():
            bad(f"LiveKit at {cfg.livekit_url} rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET",
                "copy the key and secret of this server (livekit-server --dev: devkey / secret)")
        else:
            bad(f"LiveKit at {cfg.livekit_url}: {redact(str(e))[:160]}", "check LIVEKIT_URL and the server's logs")
    except Exception as e:
        bad(f"LiveKit at {cfg.livekit_url} is not reachable ({redact(one_line(e))})",
            "start the server (livekit-server --dev) or fix LIVEKIT_URL")

    try:
        sid = await bridge.verify_session(cfg.voice_agent_url, cfg.assemblyai_api_key, session_settings(cfg))
        ok(f"Voice Agent API at {cfg.voice_agent_url}: key accepted, session {sid} opened and ended")
    except bridge.ApiError as e:
        bad(f"Voice Agent API: {redact(str(e))}", "set ASSEMBLYAI_API_KEY to a key from your AssemblyAI dashboard"
            if isinstance(e, bridge.KeyRejected) else "fix the session setting named above")
    except Exception as e:
        bad(f"Voice Agent API at {cfg.voice_agent_url} is not reachable ({redact(one_line(e))})",
            "check VOICE_AGENT_URL and this machine's access to it")

    for variable in ("AMBIENT_SOUND", "THINKING_SOUND"):
        try:
            bank = load_bank(cfg, variable)
        except ConfigError as e:
            bad(str(e), f"point {variable} at a playable file, a builtin:<name>, or none")
            continue
        ok(f"{variable}: " + (", ".join(f"{s.name} ({s.duration_s:.1f} s)" for s in bank.sounds()) or "none"))

    out("all checks passed" if not failures else ("1 check failed" if failures == 1 else f"{failures} checks failed"))
    return 0 if not failures else 1
