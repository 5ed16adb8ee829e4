"""Configuration: every variable documented everywhere, bad values are one clear line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

import config
import environment
import mixer
from harness import REPO

REQUIRED = {"LIVEKIT_URL": "ws://127.0.0.1:7880", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s",
            "ASSEMBLYAI_API_KEY": "a"}
VARIABLES = [f.name.upper() for f in dataclasses.fields(config.Config)]


def run_worker(env: dict[str, str], *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "worker.py"), *args], env={"PATH": "/usr/bin:/bin", **env},
                          cwd=cwd or REPO / "tests", capture_output=True, text=True, timeout=30)


def test_every_variable_is_in_readme_env_example_and_help():
    readme = (REPO / "README.md").read_text()
    example = (REPO / ".env.example").read_text()
    help_text = " ".join(run_worker({}, "--help").stdout.split())
    for name in VARIABLES:
        assert f"| `{name}` |" in readme, f"{name} missing from README's configuration table"
        assert re.search(rf"^{name}=", example, re.M), f"{name} missing from .env.example"
        assert f"env {name};" in help_text, f"{name} missing from --help"


def test_env_example_lines_each_have_one_comment():
    lines = (REPO / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            assert lines[i - 1].startswith("# "), f"{line.split('=')[0]} in .env.example has no comment above it"


def test_env_example_is_a_valid_configuration_once_the_key_is_filled_in():
    from dotenv import dotenv_values

    values = {k: v or "" for k, v in dotenv_values(REPO / ".env.example").items()}
    values["ASSEMBLYAI_API_KEY"] = "x"
    # LIVEKIT_URL empty: `run` starts a local LiveKit server, which provides the URL and keys.
    assert values["LIVEKIT_URL"] == ""
    cfg = config.load_config(values, optional=config.LOCAL_SERVER_PROVIDES)
    assert cfg.room_name == "voice-agent-demo" and cfg.ambient_volume == 0.3


def test_defaults():
    cfg = config.load_config(REQUIRED)
    assert cfg.room_name == "voice-agent-demo"
    assert cfg.voice_agent_url == "wss://agents.assemblyai.com/v1/ws"
    assert cfg.agent_identity == "voice-agent"
    assert cfg.turn_detection() == {}  # the default profile sends nothing
    # The mixer bench's "ours" is Mixer()'s default queue: it must be the worker's.
    assert cfg.output_queue_ms == mixer.DEFAULT_QUEUE_MS
    assert cfg.output_batch_ms == mixer.DEFAULT_BATCH_MS
    assert cfg.tokio_worker_threads == 1  # not tokio's one per core (scheduling.sdk_runtime_threads)


def test_turn_profile_and_overrides():
    cfg = config.load_config({**REQUIRED, "TURN_PROFILE": "standard", "MIN_SILENCE_MS": "400",
                              "INTERRUPT_RESPONSE": "0"})
    assert cfg.turn_detection() == {"min_silence": 400, "max_silence": 1500, "interrupt_response": False}


@pytest.mark.parametrize("env, message", [
    # Under systemd (NOTIFY_SOCKET); elsewhere `run` starts a local server (tests/test_demo.py).
    ({"LIVEKIT_URL": None, "NOTIFY_SOCKET": "/run/nonexistent"}, "LIVEKIT_URL is not set"),
    ({"LOCAL_SERVER_BIND": "localhost"}, "LOCAL_SERVER_BIND must be an IP address"),
    ({"ASSEMBLYAI_API_KEY": "  "}, "ASSEMBLYAI_API_KEY is not set"),
    ({"LIVEKIT_URL": "localhost:7880"}, "LIVEKIT_URL must be a URL"),
    ({"AMBIENT_VOLUME": "1.5"}, "AMBIENT_VOLUME must be between 0 and 1"),
    ({"AMBIENT_VOLUME": "loud"}, "AMBIENT_VOLUME must be a number"),
    ({"AMBIENT_VOLUME": "nan"}, "AMBIENT_VOLUME must be a finite number"),
    ({"OUTPUT_QUEUE_MS": "45"}, "OUTPUT_QUEUE_MS must be a multiple of 10"),
    ({"BARGE_IN": "sometimes"}, "BARGE_IN must be one of interrupted, speech"),
    ({"TOKIO_WORKER_THREADS": "0"}, "TOKIO_WORKER_THREADS must be between 1 and 64"),
    ({"TOKIO_WORKER_THREADS": "two"}, "TOKIO_WORKER_THREADS must be an integer"),
    ({"MIN_SILENCE_MS": "900", "MAX_SILENCE_MS": "800"}, "MIN_SILENCE_MS (900) must be less than MAX_SILENCE_MS"),
    ({"INTERRUPT_RESPONSE": "maybe"}, "INTERRUPT_RESPONSE must be 1/0"),
    ({"KEYTERMS": ",".join(f"t{i}" for i in range(101))}, "KEYTERMS at most 100 terms"),
    ({"ROOM_NAME": "has space"}, "ROOM_NAME must be 1-128 characters without spaces"),
])
def test_bad_values_are_one_line_exit_2_no_traceback(env, message):
    merged = {k: v for k, v in {**REQUIRED, **env}.items() if v is not None}
    r = run_worker(merged)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], f"more than one line: {r.stderr!r}"
    assert message in r.stderr and "Traceback" not in r.stderr


def test_bad_ambient_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bed.wav"
    bad.write_bytes(b"this is not audio")
    r = run_worker({**REQUIRED, "AMBIENT_SOUND": str(bad)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "AMBIENT_SOUND" in r.stderr and "bed.wav" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_flags_override_env_and_env_overrides_dotenv(tmp_path):
    (tmp_path / ".env").write_text("ROOM_NAME=from-dotenv\nGREETING=from dotenv\n")
    env = environment.gather_env({"GREETING": None}, cwd=tmp_path)
    assert env["ROOM_NAME"] == "from-dotenv"
    import os

    os.environ["ROOM_NAME"] = "from-env"
    try:
        assert environment.gather_env({}, cwd=tmp_path)["ROOM_NAME"] == "from-env"
        assert environment.gather_env({"ROOM_NAME": "from-flag"}, cwd=tmp_path)["ROOM_NAME"] == "from-flag"
    finally:
        del os.environ["ROOM_NAME"]


@pytest.mark.parametrize("content, line, also", [
    ("ROOM_NAME=r1\n".encode("utf-16"), 1, "UTF-16"),  # what a Windows editor saves
    (b"ROOM_NAME=r1\nAMBIENT_VOLUME 0.9\nGREETING=hi\n", 2, "AMBIENT_VOLUME"),
    (b"ROOM_NAME=r1\nASSEMBLYAI_API_KEY sk-very-secret-value\n", 2, "ASSEMBLYAI_API_KEY"),
    (b'ROOM_NAME=r1\nGREETING="unterminated\n', 2, "GREETING"),
], ids=["utf-16", "no-equals-sign", "a-secret-on-the-line", "unterminated-quote"])
def test_a_dotenv_that_cannot_be_read_whole_is_one_line_naming_the_file_and_line(tmp_path, content, line, also):
    """Not UTF-8, or a line that is not NAME=value: python-dotenv skips it with a warning that
    names neither file nor line, and its setting silently takes the default. One line, exit 2,
    and never the line's value (it may be a secret)."""
    (tmp_path / ".env").write_bytes(content)
    r = run_worker(REQUIRED, "token", cwd=tmp_path)
    assert r.returncode == 2, f"exit {r.returncode} with a broken .env:\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{tmp_path / '.env'} line {line}" in r.stderr and also in r.stderr, r.stderr
    assert "sk-very-secret-value" not in r.stderr


@pytest.mark.parametrize("args", [(), ("--help",), ("serve",)])
def test_outside_the_virtualenv_is_one_line_saying_how_to_run_it(args):
    """README's `python worker.py` with a Python that lacks requirements.txt (-S: no
    site-packages, as outside .venv): one line naming the fix, exit 2, no traceback."""
    r = subprocess.run([sys.executable, "-S", str(REPO / "worker.py"), *args], env={"PATH": "/usr/bin:/bin"},
                       cwd=REPO / "tests", capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, f"exit {r.returncode}:\n{r.stderr}"
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "./scripts/run" in r.stderr and ".venv/bin/python" in r.stderr and "websockets" in r.stderr, r.stderr


@pytest.mark.parametrize("delay_s", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
def test_ctrl_c_while_it_starts_is_a_quiet_stop(delay_s):
    """Ctrl-C in the first moments (the modules load for ~0.3 s, then the settings are read):
    a stop like any other, exit 0, never a KeyboardInterrupt traceback."""
    proc = subprocess.Popen([sys.executable, str(REPO / "worker.py"), "token"], env={"PATH": "/usr/bin:/bin", **REQUIRED},
                            cwd=REPO / "tests", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import signal
    import time

    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    if "worker.py" not in err and proc.returncode in (1, -signal.SIGINT):
        return  # on a loaded host the signal came before Python itself was up: nothing of ours ran
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, f"Ctrl-C after {delay_s} s:\n{err}"
    assert proc.returncode == 0, f"Ctrl-C after {delay_s} s: exit {proc.returncode}\n{err}"


def test_a_tools_module_raising_keyboardinterrupt_at_import_is_a_configuration_error(tmp_path):
    """A module that raises KeyboardInterrupt (or a Ctrl-C while it imports) is an import
    that failed: one line and exit 2, not a silent exit 0."""
    tools_py = tmp_path / "interrupting_tools.py"
    tools_py.write_text("raise KeyboardInterrupt\n")
    r = run_worker({**REQUIRED, "TOOLS_MODULE": str(tools_py), "LIVEKIT_URL": "ws://127.0.0.1:9"}, "serve")
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert "TOOLS_MODULE" in r.stderr and "KeyboardInterrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_token_command_needs_no_api_key():
    env = {k: v for k, v in REQUIRED.items() if k != "ASSEMBLYAI_API_KEY"}
    r = run_worker(env, "token")
    assert r.returncode == 0, r.stderr
    assert "Token" in r.stdout and "agents-playground" in r.stdout


# SESSION_EXTRA may carry credentials for fields we do not know yet: its strings are redacted, and
# it has no flag either.
SECRET_FLAGS = {"--livekit-api-secret": "LIVEKIT_API_SECRET", "--assemblyai-api-key": "ASSEMBLYAI_API_KEY",
                "--session-extra": "SESSION_EXTRA"}


def test_every_secret_setting_is_env_only():
    secret = {f.name.upper() for f in dataclasses.fields(config.Config) if f.metadata["secret"]}
    assert secret == set(SECRET_FLAGS.values())


@pytest.mark.parametrize("args", [["--livekit-api-secret", "FLAGSECRET-1234567"], ["--livekit-api-secret=FLAGSECRET-1234567"],
                                  ["--assemblyai-api-key", "FLAGSECRET-1234567"], ["token", "--assemblyai-api-key"],
                                  ["--livekit-api-sec", "FLAGSECRET-1234567"], ["check", "--assemblyai-api-key=FLAGSECRET-1234567"],
                                  ["--session-extra", '{"token": "FLAGSECRET-1234567"}']])
def test_a_secret_given_as_a_flag_is_refused_with_one_line(args):
    """A command line is readable by every user of the machine (ps, /proc/<pid>/cmdline)."""
    r = run_worker(REQUIRED, *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    flag = next(f for f in SECRET_FLAGS if f.startswith(next(a for a in args if a.startswith("--")).split("=")[0]))
    assert f"set {SECRET_FLAGS[flag]} in the environment or in ./.env" in r.stderr
    assert "FLAGSECRET" not in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--livekit-api-secrt=FLAGSECRET-1234567"], ["--bogus", "FLAGSECRET-1234567"],
                                  ["run", "extra", "--nope", "FLAGSECRET-1234567"]])
def test_mistyped_flags_are_named_without_their_values(args):
    r = run_worker(REQUIRED, *args)
    assert r.returncode == 2 and "FLAGSECRET" not in r.stdout + r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["nope"], ["--room-name"]])
def test_a_mistyped_command_line_is_one_error_line_pointing_to_help(args):
    """Not 34 lines of usage burying the one that says what is wrong."""
    r = run_worker(REQUIRED, *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, f"exit {r.returncode}:\n{r.stderr}"
    assert r.stderr.startswith("error: ") and r.stderr.rstrip().endswith("see worker.py --help"), r.stderr


def test_control_with_an_unknown_method_says_so_and_lists_the_methods():
    r = run_worker(REQUIRED, "control", "nuke")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: unknown control method 'nuke': use mix_audio, play, state", r.stderr


def test_a_state_dir_that_cannot_be_written_is_found_at_start(tmp_path):
    """Not at the first control call, whose bed would silently not be kept: one line, exit 2,
    before anything is started or contacted."""
    (tmp_path / "a-file").write_text("")
    r = run_worker({**REQUIRED, "LIVEKIT_URL": "ws://127.0.0.1:9", "STATE_DIR": str(tmp_path / "a-file" / "state")})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, f"exit {r.returncode}:\n{r.stderr}"
    assert r.stderr.startswith("error: STATE_DIR") and "cannot write there" in r.stderr, r.stderr


def test_help_shows_defaults_as_the_docs_write_them():
    """Booleans as 1/0 (README, .env.example), and LIVEKIT_URL and its keys not "required":
    empty starts a local server."""
    help_text = " ".join(run_worker({}, "--help").stdout.split())
    readme = (REPO / "README.md").read_text()
    assert "default: True" not in help_text and "default: False" not in help_text
    for f in dataclasses.fields(config.Config):
        if isinstance(f.default, bool):
            name, shown = f.name.upper(), str(int(f.default))
            assert f"env {name}; default: {shown}]" in help_text, f"--help shows {name}'s default other than {shown}"
            assert f"| `{name}` | `{shown}` |" in readme, f"README's {name} default is not {shown}"
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        assert f"env {name}; required]" not in help_text, f"--help calls {name} required; empty starts a local server"
    assert "nice -10 for the rest" not in help_text  # realtime mode runs the whole worker at SCHED_RR


def test_help_says_where_secrets_go():
    text = " ".join(run_worker({}, "--help").stdout.split())
    for flag, name in SECRET_FLAGS.items():
        assert flag not in text
        assert f"{name} (no flag: environment or .env only)" in text
    assert "Secrets (LIVEKIT_API_SECRET, ASSEMBLYAI_API_KEY, SESSION_EXTRA) have no flag" in text
    assert "Set them in the environment or in ./.env" in text
