"""The process's exit codes: one table, read by `--help`, the README, the systemd units
and the serve host (dispatch.py), and the one exception that carries a code out.

Library modules (bridge.py, the call logic) raise their own errors; the composition roots
(worker.py, dispatch.py) map them to these codes."""

from __future__ import annotations

import logging
import os
import sys

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_API_AUTH = 3
EXIT_API_CONFIG = 4
EXIT_API_GAVE_UP = 5
EXIT_LIVEKIT_AUTH = 6
EXIT_LIVEKIT_UNREACHABLE = 7
EXIT_DUPLICATE_IDENTITY = 8
EXIT_ROOM_DELETED = 9

# (code, what it means): `python worker.py --help` prints this table.
EXIT_CODES: list[tuple[int, str]] = [
    (EXIT_OK, "stopped cleanly (SIGTERM/SIGINT)"),
    (EXIT_INTERNAL, "internal error (a bug: please report it); check: a check failed; control: the worker "
                    "refused the call"),
    (EXIT_CONFIG, "configuration error: a missing or invalid variable, or a bad sound file"),
    (EXIT_API_AUTH, "the Voice Agent API rejected ASSEMBLYAI_API_KEY"),
    (EXIT_API_CONFIG, "the Voice Agent API rejected the session configuration"),
    (EXIT_API_GAVE_UP, "gave up reconnecting to the Voice Agent API"),
    (EXIT_LIVEKIT_AUTH, "LiveKit rejected LIVEKIT_API_KEY / LIVEKIT_API_SECRET"),
    (EXIT_LIVEKIT_UNREACHABLE, "gave up joining the LiveKit server"),
    (EXIT_DUPLICATE_IDENTITY, "another participant joined with the agent's identity"),
    (EXIT_ROOM_DELETED, "the room was deleted or the agent was removed from it"),
]

# A call process that exits with one of these failed in a way every other call on the same
# host would too (configuration, a rejected API key or session configuration): the serve
# host stops taking calls and exits with the same code; systemd does not restart on them.
HOPELESS_EXITS: dict[int, str] = {
    EXIT_CONFIG: "a configuration error",
    EXIT_API_AUTH: "the Voice Agent API rejected ASSEMBLYAI_API_KEY",
    EXIT_API_CONFIG: "the Voice Agent API rejected the session configuration",
}


class FatalError(Exception):
    """Something the process cannot survive. ``str()`` is one line for the user."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>2}  {text}" for code, text in EXIT_CODES)


def exit_now(code: int) -> None:
    """End the process with ``code`` once everything it owns is closed: flush the logs and
    the streams, then skip the interpreter's teardown of the LiveKit native library, which
    can crash on its way out (seen as SIGSEGV after a kick)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
