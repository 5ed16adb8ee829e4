"""The serve-mode deployment files: deploy/voice-agent.service (systemd-analyze verify, and
the same hardening as voice-agent@.service) and deploy/kubernetes.yaml (parsed by a strict
parser for the plain YAML subset it uses; PyYAML is not a dependency)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest

import config
import dispatch
import exits
from harness import REPO

DEPLOY = REPO / "deploy"


# --- a strict parser for plain YAML -------------------------------------------------------------


class YamlSubsetError(ValueError):
    pass


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and block sequences (including ``- key: value`` items), plain and
    quoted scalars, comments, one document. Anything else (flow collections, anchors, tags,
    block scalars, tabs, duplicate keys) is an error, so the test cannot silently misread
    the manifest."""
    lines: list[tuple[int, int, str]] = []  # (line number, indent, content)
    for n, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise YamlSubsetError(f"line {n}: tab")
        stripped = _strip_comment(raw, n).rstrip()
        if not stripped.strip() or stripped.strip() == "---":
            continue
        lines.append((n, len(stripped) - len(stripped.lstrip(" ")), stripped.strip()))
    value, i = _block(lines, 0, lines[0][1] if lines else 0)
    if i != len(lines):
        raise YamlSubsetError(f"line {lines[i][0]}: unexpected indentation")
    return value


def _strip_comment(line: str, n: int) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'" and (i == 0 or line[i - 1] in " :-"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
    if quote:
        raise YamlSubsetError(f"line {n}: unterminated quote")
    return line


def _scalar(s: str, n: int) -> Any:
    if not s:
        raise YamlSubsetError(f"line {n}: empty value")
    if s[0] in "\"'":
        if len(s) < 2 or s[-1] != s[0]:
            raise YamlSubsetError(f"line {n}: bad quoted scalar {s!r}")
        return s[1:-1]
    if s[0] in "[{&*!|>%@`":
        raise YamlSubsetError(f"line {n}: unsupported YAML {s!r}")
    if s in ("true", "false"):
        return s == "true"
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    if ": " in s or s.endswith(":"):
        raise YamlSubsetError(f"line {n}: ambiguous plain scalar {s!r}")
    return s


def _split_key(content: str, n: int) -> tuple[str, str]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-/]+):(?: (.*))?", content)
    if not m:
        raise YamlSubsetError(f"line {n}: expected 'key: value', got {content!r}")
    return m.group(1), (m.group(2) or "").strip()


def _block(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    n, ind, content = lines[i]
    if ind != indent:
        raise YamlSubsetError(f"line {n}: unexpected indentation")
    if content == "-" or content.startswith("- "):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _mapping(lines: list[tuple[int, int, str]], i: int, indent: int, first: str | None = None) -> tuple[dict, int]:
    out: dict[str, Any] = {}
    while i < len(lines):
        n, ind, content = lines[i]
        if first is not None:
            content, first = first, None
        elif ind < indent:
            break
        elif ind > indent:
            raise YamlSubsetError(f"line {n}: unexpected indentation")
        elif content.startswith("- "):
            break
        key, rest = _split_key(content, n)
        if key in out:
            raise YamlSubsetError(f"line {n}: duplicate key {key!r}")
        i += 1
        if rest:
            out[key] = _scalar(rest, n)
        elif i < len(lines) and (lines[i][1] > indent or (lines[i][1] == indent and lines[i][2].startswith("- "))):
            out[key], i = _block(lines, i, lines[i][1])
        else:
            raise YamlSubsetError(f"line {n}: {key!r} has no value")
    return out, i


def _sequence(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[list, int]:
    out: list[Any] = []
    while i < len(lines):
        n, ind, content = lines[i]
        if ind < indent or not (content == "-" or content.startswith("- ")):
            if ind > indent:
                raise YamlSubsetError(f"line {n}: unexpected indentation")
            break
        if ind > indent:
            raise YamlSubsetError(f"line {n}: unexpected indentation")
        item = content[2:].strip()
        if not item:
            raise YamlSubsetError(f"line {n}: empty sequence item")
        if re.match(r"[A-Za-z0-9_.\-/]+:( |$)", item):
            value, i = _mapping(lines, i, indent + 2, first=item)
            out.append(value)
        else:
            out.append(_scalar(item, n))
            i += 1
    return out, i


def test_the_yaml_subset_parser_reads_what_it_should_and_refuses_the_rest():
    doc = parse_yaml_subset("""
a: 1            # comment
b:
  c: "x # not a comment"
  d:
    - one
    - k: v
      l: 'w'
    - "3"
e: true
""")
    assert doc == {"a": 1, "b": {"c": "x # not a comment", "d": ["one", {"k": "v", "l": "w"}, "3"]}, "e": True}
    for bad in ("a: [1, 2]", "a: {b: c}", "a: &x 1", "a: |\n  text", "a: 1\na: 2", "a:\n\tb: 1", "a:\n  b: 1\n c: 2",
                "a: b: c", "a:"):
        with pytest.raises(YamlSubsetError):
            parse_yaml_subset(bad)


# --- systemd ---------------------------------------------------------------------------------------


def unit_lines(name: str) -> list[str]:
    return [ln.strip() for ln in (DEPLOY / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_serve_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI: scripts/setup installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI runs this check")
    unit = (DEPLOY / "voice-agent.service").read_text()
    unit = unit.replace("/opt/voice-agent/.venv/bin/python", sys.executable).replace("/opt/voice-agent", str(REPO))
    path = tmp_path / "voice-agent.service"
    path.write_text(unit)
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_serve_unit_drains_within_its_stop_timeout_and_keeps_the_templates_hardening():
    lines = unit_lines("voice-agent.service")
    settings = dict(ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("["))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecStart"].endswith("/worker.py serve")
    assert float(settings["WatchdogSec"]) > 0
    assert settings["KillMode"] == "mixed" and settings["KillSignal"] == "SIGTERM"
    default_drain = config.load_config({"LIVEKIT_URL": "ws://x", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s",
                                        "ASSEMBLYAI_API_KEY": "a"})
    assert float(settings["TimeoutStopSec"]) > default_drain.drain_timeout_s + default_drain.job_stop_timeout_s
    assert "DRAIN_TIMEOUT_S" not in settings.get("Environment", "")  # the default, which the timeout covers
    hopeless = sorted(str(c) for c in {*exits.HOPELESS_EXITS, exits.EXIT_CONFIG, exits.EXIT_LIVEKIT_AUTH})
    assert settings["RestartPreventExitStatus"].split() == hopeless
    assert settings["Restart"] == "on-failure" and settings["RestartPreventExitStatus"].split() == ["2", "3", "4", "6"]
    # Every hardening and capability line of the per-room template, unchanged, except the limits
    # and the state directory, which are per host here (one cgroup for every call process).
    template = unit_lines("voice-agent@.service")
    start = template.index("Nice=-10")
    per_host = ("MemoryMax=", "TasksMax=", "StateDirectory=")
    kept = [ln for ln in template[start:template.index("[Install]")] if not ln.startswith(per_host)]
    missing = [ln for ln in kept if ln not in lines]
    assert not missing, f"serve unit lacks the template's {missing}"
    assert settings["StateDirectory"] == "voice-agent"
    memory_max = settings["MemoryMax"]
    assert memory_max.endswith("G") and float(memory_max[:-1]) * 1024 >= 768 * 2, "room for more than one call"
    assert int(settings["TasksMax"]) >= 256


# --- Kubernetes ----------------------------------------------------------------------------------


def manifest() -> dict:
    return parse_yaml_subset((DEPLOY / "kubernetes.yaml").read_text())


def test_kubernetes_deployment_drains_has_a_liveness_check_and_takes_secrets_from_a_secret():
    m = manifest()
    assert m["apiVersion"] == "apps/v1" and m["kind"] == "Deployment"
    pod = m["spec"]["template"]["spec"]
    assert m["spec"]["selector"]["matchLabels"].items() <= m["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    assert c["command"][-2:] == ["/opt/voice-agent/worker.py", "serve"]
    env = {e["name"]: e for e in c["env"]}
    value = {k: e.get("value") for k, e in env.items()}
    # Secrets never as literal values.
    for name in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "ASSEMBLYAI_API_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    # The settings parse as the worker would read them.
    settings = config.load_config({**{k: v for k, v in value.items() if v is not None},
                                   "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s", "ASSEMBLYAI_API_KEY": "a"})
    config.check_serve_config(settings)
    # Drain: Kubernetes waits longer than the drain and the clean end of the last calls.
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s + settings.job_stop_timeout_s
    # Liveness: the worker's own health endpoint, reachable on the pod's address.
    assert settings.health_host == "0.0.0.0" and settings.health_port
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    live = c["livenessProbe"]["httpGet"]
    assert live["path"] == "/healthz" and ports[live["port"]] == settings.health_port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Resources from the measured per-call figures: CPU for MAX_CALLS calls, a memory limit.
    req = c["resources"]["requests"]
    cpu = int(req["cpu"].rstrip("m")) / 1000 if req["cpu"].endswith("m") else float(req["cpu"])
    assert settings.max_calls is not None, "MAX_CALLS set: a pod without a CPU limit sees the node's cores"
    assert cpu >= settings.max_calls * dispatch.PER_CALL_CORES
    assert "memory" in c["resources"]["limits"] and "cpu" not in c["resources"]["limits"]
    mem = int(req["memory"].rstrip("Mi"))
    assert mem >= settings.max_calls * 100
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    rollout = m["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def test_serve_env_example_is_valid_and_fits_the_units_stop_timeout():
    from dotenv import dotenv_values

    values = {k: v or "" for k, v in dotenv_values(DEPLOY / "serve.env.example").items()}
    assert set(values) <= {f.name.upper() for f in dataclasses.fields(config.Config)}
    cfg = config.load_config({**values, "LIVEKIT_URL": "wss://x.livekit.cloud", "LIVEKIT_API_KEY": "k",
                              "LIVEKIT_API_SECRET": "s", "ASSEMBLYAI_API_KEY": "a"})
    config.check_serve_config(cfg)
    unit = dict(ln.split("=", 1) for ln in unit_lines("voice-agent.service") if "=" in ln and not ln.startswith("["))
    assert float(unit["TimeoutStopSec"]) > cfg.drain_timeout_s + cfg.job_stop_timeout_s
    assert "EnvironmentFile=-/etc/voice-agent/serve.env" in unit_lines("voice-agent.service")
