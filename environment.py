"""Where both processes' settings come from: flags, then the real environment, then ./.env;
and the error a missing or invalid setting raises. Light on purpose: the serve host
(dispatch.py) and every call process read their settings through it at start-up."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping


class ConfigError(Exception):
    """A missing or invalid setting. ``str()`` is one line naming the variable."""


def gather_env(cli: Mapping[str, str | None] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Flags win over the real environment, which wins over ./.env. Raises ConfigError for
    a .env that cannot be read as a whole."""
    merged: dict[str, str] = {}
    dotenv_path = (cwd or Path.cwd()) / ".env"
    if dotenv_path.is_file():
        merged.update(read_dotenv(dotenv_path))
    merged.update(os.environ)
    merged.update({k: v for k, v in (cli or {}).items() if v is not None})
    return merged


def read_dotenv(path: Path) -> dict[str, str]:
    """A .env file's settings. A file that is not UTF-8 text (a Windows editor's UTF-16) or
    holds a line that is not NAME=value is a ConfigError naming the file and the line:
    python-dotenv would skip that line with a warning that names neither, and the setting
    on it would silently take its default."""
    import io

    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(f"{path} line {line}: not UTF-8 text{hint}; save it as UTF-8") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            # Named by its variable at most: the rest of the line may be a secret's value.
            name = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)", binding.original.string)
            what = f" ({name.group(1)})" if name else ""
            raise ConfigError(f"{path} line {binding.original.line}{what}: not NAME=value; fix the line (quote a "
                              "value with spaces or #) or comment it out with #")
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}
