"""devserver.py and worker.py's local services without a LiveKit server: when a local
server is wanted, what it is told, and that its children never outlive us.
tests/test_demo.py runs the real thing."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import devserver
import worker
from harness import REPO


@pytest.mark.parametrize("command, env, wanted", [
    ("run", {}, True),
    ("demo", {"LIVEKIT_URL": "  "}, True),
    ("run", {"LIVEKIT_URL": "wss://example.livekit.cloud"}, False),  # with a LIVEKIT_URL nothing changes
    ("demo", {"LIVEKIT_URL": "ws://127.0.0.1:7880"}, False),
    ("token", {}, False),
    ("control", {}, False),
    ("run", {"NOTIFY_SOCKET": "/run/systemd/notify"}, False),  # a systemd unit without LIVEKIT_URL: an error
    ("run", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),
])
def test_when_a_local_server_is_started(command, env, wanted):
    assert worker.local_server_wanted(command, env) is wanted


def test_what_the_server_is_told():
    body = devserver.config_body(7880, 7882)
    assert body.splitlines() == ["port: 7880", "rtc:", "  udp_port: 7882", "  tcp_port: 0",
                                 '  stun_servers: ["127.0.0.1:3478"]', "logging:", "  level: info"]


def test_children_do_not_see_our_secrets_or_the_servers_settings(monkeypatch):
    for name, value in {"LIVEKIT_API_SECRET": "s", "LIVEKIT_KEYS": "k: s", "LIVEKIT_CONFIG": "port: 1",
                        "NODE_IP": "1.2.3.4", "UDP_PORT": "9", "REDIS_HOST": "r", "ASSEMBLYAI_API_KEY": "a",
                        "SESSION_EXTRA": "{}", "KEEP_ME": "1"}.items():
        monkeypatch.setenv(name, value)
    env = devserver.child_env({"STANDIN_API_KEY": "x"})
    assert env["KEEP_ME"] == "1" and env["STANDIN_API_KEY"] == "x"
    assert not {"LIVEKIT_API_SECRET", "LIVEKIT_KEYS", "LIVEKIT_CONFIG", "NODE_IP", "UDP_PORT", "REDIS_HOST",
                "ASSEMBLYAI_API_KEY", "SESSION_EXTRA"} & set(env)


def test_stop_child_escalates_to_sigkill():
    stubborn = devserver.spawn([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                "signal.SIG_IGN); print(flush=True); time.sleep(60)"],
                               devserver.child_env(), stdout=subprocess.PIPE, stderr=None)
    stubborn.stdout.readline()  # its handler is in place
    t0 = time.monotonic()
    devserver.stop_child(stubborn, grace_s=0.2, second_term=True, force_s=0.3)
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - t0 < 2


def test_a_child_dies_with_its_parent(tmp_path: Path):
    """PR_SET_PDEATHSIG: a parent killed with SIGKILL stops nothing itself; the kernel does."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        import devserver
        child = devserver.spawn(["sleep", "60"], devserver.child_env(), stdout=None, stderr=None)
        print(child.pid, flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 3
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.02)


def test_demo_is_a_command(capsys):
    text = " ".join(worker.build_parser().format_help().split())
    assert "demo: the same against a local echo agent" in text
    assert "LOCAL_SERVER_BIND" in text


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # the dev secret is short: it is public anyway
def test_the_settings_name_the_local_server_after_it_starts(monkeypatch, capsys):
    """What a process of ours started afterwards reads (a call process of serve, handed ``env``
    or the environment) names the local server and its dev keys, not the empty LIVEKIT_URL."""
    from config import LOCAL_SERVER_PROVIDES, load_config

    stopped: list[str] = []
    fake = SimpleNamespace(url="ws://127.0.0.1:17880", browser_url="ws://localhost:17880", api_key="devkey",
                           api_secret="secret", stop=lambda: stopped.append("server"))
    monkeypatch.setattr(devserver, "start_server", lambda bind: fake)
    for name in LOCAL_SERVER_PROVIDES:  # unset now, and as they were after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    env = {"ASSEMBLYAI_API_KEY": "k" * 20}
    cfg = load_config(env, optional=LOCAL_SERVER_PROVIDES)
    with contextlib.ExitStack() as services:
        cfg = worker.start_services(cfg, "run", env, True, services)
        assert (cfg.livekit_url, cfg.livekit_api_key, cfg.livekit_api_secret) == ("ws://127.0.0.1:17880", "devkey",
                                                                                  "secret")
        expected = {"LIVEKIT_URL": "ws://127.0.0.1:17880", "LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "secret"}
        assert {k: env[k] for k in expected} == expected
        assert {k: os.environ[k] for k in expected} == expected
        assert dataclasses.replace(load_config(env), assemblyai_api_key="") == dataclasses.replace(
            cfg, assemblyai_api_key="")
    assert stopped == ["server"]
    out = capsys.readouterr().out
    assert "LiveKit URL:  ws://localhost:17880" in out and "Demo:" not in out


def test_with_no_server_and_no_go_the_one_line_is_not_preceded_by_a_port_note(monkeypatch):
    """Port 7880 held by another dev server, no livekit-server anywhere and no Go: the error
    is all that is said (no "starting a separate one on port ..." for a server that never starts)."""
    from exits import FatalError

    said: list[str] = []
    monkeypatch.setattr(devserver, "find_binary", lambda: None)
    monkeypatch.setattr(devserver.shutil, "which", lambda name: None)
    monkeypatch.setattr(devserver, "_bindable", lambda *a, **k: False)
    monkeypatch.setattr(devserver, "answers", lambda *a, **k: True)
    monkeypatch.setattr(devserver, "accepts_dev_keys", lambda *a, **k: True)
    with pytest.raises(FatalError) as err:
        devserver.start_server("127.0.0.1", say=said.append)
    assert str(err.value) == devserver.NO_SERVER
    assert said == [], f"said before the error: {said}"
