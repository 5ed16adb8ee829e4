"""Where both processes' settings come from: flags, then the real environment, then ./.env;
and the error a missing or invalid setting raises. Light on purpose: the serve host
(dispatch.py) and every call process read their settings through it at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


class ConfigError(Exception):
    """A missing or invalid setting. ``str()`` is one line naming the variable."""


def gather_env(cli: Mapping[str, str | None] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Flags win over the real environment, which wins over ./.env."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    dotenv_path = (cwd or Path.cwd()) / ".env"
    if dotenv_path.is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    merged.update({k: v for k, v in (cli or {}).items() if v is not None})
    return merged
