"""The systemd unit as deployed: every instance serves its own room (the room, the state
directory and the log format come from the instance name and no env file can override them),
the shared env file example holds only shared settings, and the hardening is in place."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import environment
import worker
from harness import REPO

UNIT = REPO / "deploy" / "voice-agent@.service"
COMMON_EXAMPLE = REPO / "deploy" / "common.env.example"
# What belongs to one instance: set by the unit from the instance name, never by a shared file.
PER_INSTANCE = ("ROOM_NAME", "STATE_DIR", "LOG_FORMAT")
FILLED = {"LIVEKIT_URL": "wss://example.livekit.cloud", "LIVEKIT_API_KEY": "APIkey123",
          "LIVEKIT_API_SECRET": "a-long-livekit-secret-for-tests", "ASSEMBLYAI_API_KEY": "aai-key-for-tests"}


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys repeat: EnvironmentFile=)."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        assert not line.endswith("\\"), f"continued line not handled by this parser: {line}"
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def one(entries, key: str, section: str = "Service") -> str:
    found = values(entries, key, section)
    assert len(found) == 1, f"{key}= set {len(found)} times in the unit"
    return found[0]


def expand(value: str, instance: str) -> str:
    """The specifiers the unit uses, as systemd expands them for a system service."""
    specifiers = {"i": instance, "S": "/var/lib", "%": "%"}

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in specifiers, f"specifier %{m.group(1)} is not simulated here"
        return specifiers[m.group(1)]

    return re.sub(r"%(.)", sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= (KEY=VALUE lines, # comments): python-dotenv reads this subset the
    same way systemd does."""
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


def systemd_env(entries, instance: str, files: dict[str, Path]) -> dict[str, str]:
    """The worker's environment as systemd builds it: Environment= first, then every
    EnvironmentFile= in the unit's order, each overriding what came before ('-' prefix: may be
    missing). ``files`` maps the unit's (expanded) paths to the files standing in for them."""
    env: dict[str, str] = {}
    for assignment in values(entries, "Environment"):
        for word in shlex.split(expand(assignment, instance)):
            k, _, v = word.partition("=")
            env[k] = v
    for spec in values(entries, "EnvironmentFile"):
        optional = spec.startswith("-")
        path = expand(spec.lstrip("-"), instance)
        if path in files:
            env.update(read_env_file(files[path]))
        else:
            assert optional, f"EnvironmentFile={path} is required but the test gave no stand-in for it"
    return env


def exec_args(entries, instance: str) -> list[str]:
    """The worker's own arguments from ExecStart= (after the interpreter and worker.py)."""
    argv = shlex.split(expand(one(entries, "ExecStart"), instance))
    assert argv[0].endswith("/python") and argv[1].endswith("/worker.py"), argv
    return argv[2:]


def merged_settings(monkeypatch, entries, instance: str, files: dict[str, Path], cwd: Path) -> config.Config:
    """What the worker would run with: its real argument parser and its real merge
    (flags > environment > ./.env), on the environment systemd would give it."""
    args = worker.build_parser().parse_args(exec_args(entries, instance))
    cli = {k: v for k, v in vars(args).items() if k.isupper()}
    monkeypatch.setattr(os, "environ", systemd_env(entries, instance, files))
    return config.load_config(environment.gather_env(cli, cwd=cwd))


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def test_room_state_and_log_format_are_flags_from_the_instance(unit):
    args = shlex.split(one(unit, "ExecStart"))[2:]
    assert "--room-name=%i" in args and "--state-dir=%S/voice-agent/%i" in args and "--log-format=json" in args
    assert one(unit, "StateDirectory") == "voice-agent/%i", "instances must not share a state directory"
    # Not also as Environment=: an EnvironmentFile= would override those, and they would mislead.
    for assignment in values(unit, "Environment"):
        assert not any(assignment.startswith(f"{name}=") for name in PER_INSTANCE), assignment
    # The flags are the worker's own, mapped to the variables they stand for.
    parsed = vars(worker.build_parser().parse_args(exec_args(unit, "support-line")))
    assert parsed["ROOM_NAME"] == "support-line"
    assert parsed["STATE_DIR"] == "/var/lib/voice-agent/support-line" and parsed["LOG_FORMAT"] == "json"
    # Flags, env files: in that order of precedence, as the unit's comment and README say.
    assert values(unit, "EnvironmentFile") == ["/etc/voice-agent/common.env", "-/etc/voice-agent/%i.env"]


def test_common_env_example_holds_only_shared_settings():
    text = COMMON_EXAMPLE.read_text()
    assigned = re.findall(r"^([A-Z_]+)=", text, re.M)
    for name in PER_INSTANCE:
        assert name not in assigned, f"{name} in {COMMON_EXAMPLE.name}: the unit sets it from the instance"
    assert set(FILLED) <= set(assigned), "the example must name the secrets and the server"
    known = {f.name.upper() for f in dataclasses.fields(config.Config)}
    assert set(assigned) <= known, f"unknown variables: {set(assigned) - known}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z_]+=", line):
            assert lines[i - 1].startswith("# "), f"{line.split('=')[0]} has no comment above it"
    # Once the keys are filled in, it is a valid configuration.
    values_ = {**read_env_file(COMMON_EXAMPLE), **FILLED}
    cfg = config.load_config(values_)
    assert cfg.livekit_url == FILLED["LIVEKIT_URL"]
    # And .env.example says it is not the file for the unit.
    assert "common.env.example" in (REPO / ".env.example").read_text()


@pytest.mark.parametrize("common_source", ["common.env.example", ".env.example"])
def test_the_room_is_the_instance_whatever_the_env_files_say(monkeypatch, unit, tmp_path, common_source):
    """The documented common file (and .env.example, copied by mistake: it sets ROOM_NAME,
    STATE_DIR and LOG_FORMAT), plus a per-room file that names another room, merged the way
    systemd merges them, then the unit's flags: every instance still serves its own room."""
    source = COMMON_EXAMPLE if common_source == "common.env.example" else REPO / ".env.example"
    common = tmp_path / "common.env"
    common.write_text(source.read_text() + "".join(f"{k}={v}\n" for k, v in FILLED.items()))
    per_room = tmp_path / "room.env"
    per_room.write_text("ROOM_NAME=someone-elses-room\nSTATE_DIR=/tmp/shared\nLOG_FORMAT=text\nGREETING=Hello\n")
    cwd = tmp_path / "opt"
    cwd.mkdir()
    (cwd / ".env").write_text("ROOM_NAME=from-a-stray-dotenv\n")  # the working directory's ./.env
    rooms = {}
    for instance in ("support-line", "sales"):
        files = {"/etc/voice-agent/common.env": common, f"/etc/voice-agent/{instance}.env": per_room}
        env = systemd_env(unit, instance, files)
        if common_source == ".env.example":
            assert env["ROOM_NAME"] == "someone-elses-room", "the simulation lost the env file's ROOM_NAME"
        cfg = merged_settings(monkeypatch, unit, instance, files, cwd)
        assert cfg.room_name == instance
        assert cfg.state_dir == f"/var/lib/voice-agent/{instance}"
        assert cfg.log_format == "json"
        assert cfg.greeting == "Hello", "the per-room file must still apply to everything else"
        rooms[instance] = (cfg.room_name, cfg.state_dir)
    assert len(set(rooms.values())) == 2


def test_the_worker_itself_joins_the_instance_room_despite_the_env(unit, tmp_path):
    """The same, through the real process: `worker.py <the unit's flags> token` with the
    environment systemd would give it prints the instance's room."""
    common = tmp_path / "common.env"
    common.write_text((REPO / ".env.example").read_text() + "".join(f"{k}={v}\n" for k, v in FILLED.items()))
    env = systemd_env(unit, "support-line", {"/etc/voice-agent/common.env": common})
    assert env["ROOM_NAME"] == "voice-agent-demo"
    r = subprocess.run([sys.executable, str(REPO / "worker.py"), *exec_args(unit, "support-line"), "token"],
                       env={"PATH": "/usr/bin:/bin", **env}, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^Room: +support-line$", r.stdout, re.M), r.stdout


def test_hardening_settings(unit):
    assert one(unit, "DynamicUser") == "yes"
    memory_max = one(unit, "MemoryMax")
    m = re.fullmatch(r"(\d+)([KMG])", memory_max)
    assert m, memory_max
    mib = int(m.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024}[m.group(2)]
    # A call peaks near 90 MB; decoding the largest upload the defaults allow near 340 MB (README).
    assert 512 <= mib <= 2048, f"MemoryMax={memory_max}"
    assert 64 <= int(one(unit, "TasksMax")) <= 1024
    filters = values(unit, "SystemCallFilter")
    assert filters[0] == "@system-service" and "~@privileged" in filters
    assert one(unit, "SystemCallErrorNumber") == "EPERM"
    assert one(unit, "SystemCallArchitectures") == "native"
    assert one(unit, "ProtectProc") == "invisible" and one(unit, "ProcSubset") == "pid"
    denied = " ".join(values(unit, "IPAddressDeny")).split()
    assert "169.254.0.0/16" in denied and "fe80::/10" in denied
    assert one(unit, "CapabilityBoundingSet") == "CAP_SYS_NICE" and one(unit, "RestrictRealtime") == "no"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("UMask", "0077")):
        assert one(unit, key) == value


def analyze_or_skip() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI: scripts/setup installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI runs this check")
    return analyze


def syscall_set(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True, timeout=30).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                seen.add(word)
                names |= syscall_set(analyze, word, seen)
        else:
            names.add(word)
    return names


def test_system_call_filter_keeps_what_the_audio_needs():
    """The audio thread's real-time scheduling (sched_setscheduler) and its fallback, nice -10
    (setpriority), pass @system-service and are not in @privileged."""
    analyze = analyze_or_skip()
    allowed = syscall_set(analyze, "@system-service") - syscall_set(analyze, "@privileged")
    for name in ("sched_setscheduler", "sched_setparam", "setpriority", "getpriority", "mbind"):
        assert name in allowed, name


def installed_copy(tmp_path: Path, instance: str) -> Path:
    """The unit as the README's steps install it, pointed at this checkout."""
    text = UNIT.read_text().replace("/opt/voice-agent/.venv/bin/python", sys.executable)
    path = tmp_path / f"voice-agent@{instance}.service"
    path.write_text(text.replace("/opt/voice-agent", str(REPO)))
    return path


def test_systemd_accepts_the_unit_and_rates_it(tmp_path):
    analyze = analyze_or_skip()
    path = installed_copy(tmp_path, "support-line")
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {(r.stderr or r.stdout).strip()[:200]}")
    # 3.5 before the hardening of issue 20; 1.7 with it. Lower is better.
    assert float(m.group(1)) <= 2.0, r.stdout[-3000:]
