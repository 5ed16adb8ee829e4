"""dispatch.py without a server: the sans-I/O protocol core fed ServerMessages, the job
line a child gets, the serve settings (in config.Config), the CPU meter, the log redaction, and the supervisor
with small stand-in children (no LiveKit)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from livekit.protocol import agent, models

import dispatch
from dispatch import CoreSettings, Launch, Phase, Reconnect, Send, Stop, WorkerCore

URL = "ws://lk.example:7880"


def core(**kw) -> WorkerCore:
    return WorkerCore(CoreSettings(url=URL, **{"max_calls": 2, "load_threshold": 0.7, **kw}))


def registered(c: WorkerCore, now: float = 0.0) -> list:
    c.connection_opened(now)
    return c.receive(agent.ServerMessage(register=agent.RegisterWorkerResponse(
        worker_id="AW_1", server_info=models.ServerInfo(version="1.13.5"))), now)


def job(jid: str = "AJ_1", room: str | None = None, metadata: str = "", agent_name: str = "") -> agent.Job:
    room = room or f"room-{jid}"  # a room per job: a second job for a room we are in is refused
    return agent.Job(id=jid, dispatch_id="AD_" + jid, type=agent.JT_ROOM, room=models.Room(name=room, sid="RM_" + room),
                     metadata=metadata, agent_name=agent_name, attributes={"a": "b"})


def availability(j: agent.Job) -> agent.ServerMessage:
    return agent.ServerMessage(availability=agent.AvailabilityRequest(job=j))


def assignment(j: agent.Job, token: str = "tok-" + "x" * 20, url: str | None = None) -> agent.ServerMessage:
    a = agent.JobAssignment(job=j, token=token)
    if url is not None:
        a.url = url
    return agent.ServerMessage(assignment=a)


def sent(effects: list, kind: str) -> list:
    return [e.message for e in effects if isinstance(e, Send) and e.message.WhichOneof("message") == kind]


def answer(effects: list) -> agent.AvailabilityResponse:
    (m,) = sent(effects, "availability")
    return m.availability


def status(effects: list) -> agent.UpdateWorkerStatus | None:
    msgs = sent(effects, "update_worker")
    return msgs[-1].update_worker if msgs else None


def accept(c: WorkerCore, jid: str, now: float = 1.0, **kw) -> dispatch.JobSpec:
    j = job(jid, room=f"room-{jid}", **kw)
    assert answer(c.receive(availability(j), now)).available
    (launch,) = [e for e in c.receive(assignment(j), now) if isinstance(e, Launch)]
    return launch.spec



# --- registration, identity ---------------------------------------------------------------


def test_register_request_then_status_at_once():
    c = core(agent_name="support", identity="voice-agent")
    (e,) = c.connection_opened(0.0)
    reg = e.message.register
    assert reg.type == agent.JT_ROOM and reg.agent_name == "support" and reg.version == dispatch.WORKER_VERSION
    assert reg.ping_interval == int(dispatch.PING_INTERVAL_S)
    p = reg.allowed_permissions
    assert p.can_publish and p.can_subscribe and p.can_publish_data and p.can_update_metadata and p.agent
    # Until told, the server thinks a new worker is idle: the real status goes at once.
    effects = c.receive(agent.ServerMessage(register=agent.RegisterWorkerResponse(worker_id="AW_9")), 0.1)
    assert sent(effects, "migrate_job") == []  # no call to name
    st = status(effects)
    assert st is not None and st.HasField("status") and st.status == agent.WS_AVAILABLE and st.job_count == 0
    assert c.registered and c.worker_id == "AW_9"


def test_nothing_but_register_is_handled_before_registration():
    c = core()
    c.connection_opened(0.0)
    assert c.receive(availability(job()), 0.1) == []
    assert c.jobs == {}


def test_accepts_with_identity_and_name_then_launches_with_the_job():
    c = core(identity="voice-agent", display_name="Voice Agent")
    registered(c)
    j = job("AJ_7", "support-42", metadata='{"customer": "c-1"}', agent_name="")
    a = answer(c.receive(availability(j), 1.0))
    assert a.job_id == "AJ_7" and a.available
    assert a.participant_identity == "voice-agent" and a.participant_name == "Voice Agent"
    assert c.jobs["AJ_7"].phase is Phase.RESERVED
    effects = c.receive(assignment(j, token="secret-token-" + "q" * 20), 1.1)
    (launch,) = [e for e in effects if isinstance(e, Launch)]
    spec = launch.spec
    # livekit-server v1.13.5 sends no url: the worker's own URL is used.
    assert spec.url == URL and spec.token == "secret-token-" + "q" * 20
    assert (spec.job_id, spec.room, spec.room_sid) == ("AJ_7", "support-42", "RM_support-42")
    assert spec.dispatch_id == "AD_AJ_7"
    assert (spec.identity, spec.name, spec.kind) == ("voice-agent", "Voice Agent", "agent")
    assert spec.metadata == '{"customer": "c-1"}' and dict(spec.attributes) == {"a": "b"} and spec.worker_id == "AW_1"
    assert c.jobs["AJ_7"].phase is Phase.STARTING and c.job_count == 1
    assert status(effects).job_count == 1


def test_assignment_url_wins_when_the_server_sends_one():
    c = core()
    registered(c)
    j = job()
    c.receive(availability(j), 1.0)
    (launch,) = [e for e in c.receive(assignment(j, url="wss://elsewhere"), 1.0) if isinstance(e, Launch)]
    assert launch.spec.url == "wss://elsewhere"


def test_ready_and_exit_become_job_status_updates():
    c = core()
    registered(c)
    accept(c, "AJ_1")
    (u,) = sent(c.job_ready("AJ_1", 2.0), "update_job")
    assert u.update_job.job_id == "AJ_1" and u.update_job.status == agent.JS_RUNNING
    assert c.jobs["AJ_1"].phase is Phase.RUNNING
    effects = c.job_exited("AJ_1", 9.0, ok=True)
    (u,) = sent(effects, "update_job")
    assert u.update_job.status == agent.JS_SUCCESS and u.update_job.error == ""
    assert status(effects).job_count == 0 and c.jobs == {}
    accept(c, "AJ_2")
    (u,) = sent(c.job_exited("AJ_2", 9.0, ok=False, error="call process exited with code 3"), "update_job")
    assert u.update_job.status == agent.JS_FAILED and "code 3" in u.update_job.error
    assert c.ended == {"success": 1, "failed": 1}


# --- capacity ---------------------------------------------------------------------------------


def test_max_calls_refuses_and_reports_full_then_available_again():
    c = core(max_calls=2, load_threshold=1.0)
    registered(c)
    accept(c, "AJ_1")
    j2 = job("AJ_2")
    effects = c.receive(availability(j2), 2.0)
    assert answer(effects).available
    # The second promise fills us: the server learns it with the answer, not 2.5 s later.
    assert status(effects).status == agent.WS_FULL and status(effects).load == 1.0
    effects = c.receive(availability(job("AJ_3")), 2.1)
    assert not answer(effects).available and c.refused["full"] == 1
    c.receive(assignment(j2), 2.2)
    st = status(c.job_exited("AJ_1", 5.0, ok=True))
    assert st.status == agent.WS_AVAILABLE and 0 < st.load < dispatch.SERVER_TARGET_LOAD


def test_promises_count_before_their_assignment():
    c = core(max_calls=1, load_threshold=1.0)
    registered(c)
    assert answer(c.receive(availability(job("AJ_1")), 1.0)).available
    assert not answer(c.receive(availability(job("AJ_2")), 1.0)).available


def test_cpu_threshold_refuses_counting_starting_calls():
    c = core(max_calls=10, load_threshold=0.7)
    registered(c)
    c.cpu_load = 0.75
    assert not answer(c.receive(availability(job("AJ_1")), 1.0)).available
    assert c.refused["host"] == 1
    c.cpu_load = 0.2
    accept(c, "AJ_2")
    c.job_ready("AJ_2", 2.0)
    # One running call shows 0.2: each starting one is counted at that cost. With two
    # starting: 0.6 < 0.7, one more is taken; then 0.8 >= 0.7.
    accept(c, "AJ_3")
    accept(c, "AJ_4")
    assert c.effective_cpu() == pytest.approx(0.6)
    accept(c, "AJ_5")
    assert not answer(c.receive(availability(job("AJ_6")), 2.0)).available


def test_threshold_one_means_only_max_calls_and_load_stays_dispatchable_while_available():
    c = core(max_calls=4, load_threshold=1.0)
    registered(c)
    c.cpu_load = 1.0  # a saturated shared host
    effects = c.receive(availability(job("AJ_1")), 1.0)
    assert answer(effects).available
    # livekit-server offers a node jobs only while target_load (0.7) - load > 0.
    st = status(c.tick(10.0))
    assert st.status == agent.WS_AVAILABLE and 0.69 < st.load < dispatch.SERVER_TARGET_LOAD


def test_load_is_utilisation_on_the_servers_scale():
    c = core(max_calls=4, load_threshold=0.8)
    registered(c)
    c.cpu_load = 0.1
    accept(c, "AJ_1")
    c.job_ready("AJ_1", 1.5)
    assert c.utilisation() == pytest.approx(0.25)  # 1 of 4 calls; CPU 0.1 of 0.8
    assert c.load() == pytest.approx(0.7 * 0.25)
    c.cpu_load = 0.6
    assert c.utilisation() == pytest.approx(0.75) and c.load() == pytest.approx(0.7 * 0.75)
    c.cpu_load = 0.8
    assert c.load() == 1.0 and status(c.tick(10.0)).status == agent.WS_FULL


# --- timing: assignment, registration, ping ---------------------------------------------------------


def test_a_promise_without_assignment_is_released():
    c = core(max_calls=1)
    registered(c)
    c.receive(availability(job("AJ_1")), 1.0)
    c.tick(1.0 + dispatch.ASSIGNMENT_TIMEOUT_S - 0.1)
    assert "AJ_1" in c.jobs
    effects = c.tick(1.0 + dispatch.ASSIGNMENT_TIMEOUT_S + 0.1)
    assert c.jobs == {} and status(effects).status == agent.WS_AVAILABLE


def test_late_assignment_is_taken_if_possible_else_failed():
    c = core(max_calls=1)
    registered(c)
    j = job("AJ_1")
    effects = c.receive(assignment(j), 1.0)  # never promised (or the promise expired)
    assert [e for e in effects if isinstance(e, Launch)] and c.jobs["AJ_1"].phase is Phase.STARTING
    effects = c.receive(assignment(job("AJ_2")), 1.0)
    (u,) = sent(effects, "update_job")
    assert u.update_job.job_id == "AJ_2" and u.update_job.status == agent.JS_FAILED
    assert not [e for e in effects if isinstance(e, Launch)]


def test_duplicate_availability_and_assignment_are_harmless():
    c = core()
    registered(c)
    accept(c, "AJ_1")
    assert not answer(c.receive(availability(job("AJ_1", room="room-AJ_1")), 2.0)).available
    assert c.receive(assignment(job("AJ_1", room="room-AJ_1")), 2.0) == []
    assert c.job_count == 1


def test_registration_timeout_reconnects():
    c = core()
    c.connection_opened(0.0)
    assert c.tick(dispatch.REGISTER_TIMEOUT_S - 1) == []
    (e,) = c.tick(dispatch.REGISTER_TIMEOUT_S + 0.1)
    assert isinstance(e, Reconnect) and "registration" in e.reason


def test_pings_on_interval_and_reconnects_when_the_server_goes_quiet():
    c = core()
    registered(c, 0.0)
    pings = []
    t = 0.0
    while t < 12.0:
        t += 0.5
        effects = c.tick(t)
        pings += sent(effects, "ping")
        assert not any(isinstance(e, Reconnect) for e in effects)
        c.receive(agent.ServerMessage(pong=agent.WorkerPong(last_timestamp=int((t - 0.05) * 1000))), t)
    assert len(pings) == int(12.0 // dispatch.PING_INTERVAL_S)
    assert c.rtt_ms == pytest.approx(50, abs=1)
    # Now nothing more arrives.
    quiet_from = t
    while t < quiet_from + dispatch.PING_TIMEOUT_S - 0.5:
        t += 0.5
        assert not any(isinstance(e, Reconnect) for e in c.tick(t))
    t += 1.0
    assert any(isinstance(e, Reconnect) and "ping" in e.reason for e in c.tick(t))


def test_status_every_interval_and_on_change_only():
    c = core(max_calls=1, load_threshold=1.0)
    registered(c, 0.0)
    assert status(c.tick(1.0)) is None
    assert status(c.tick(dispatch.STATUS_INTERVAL_S + 0.1)) is not None
    assert status(c.tick(dispatch.STATUS_INTERVAL_S + 0.6)) is None


def test_connection_lost_drops_promises_keeps_calls_and_reregistration_reports_them():
    c = core(max_calls=3, load_threshold=1.0)
    registered(c)
    accept(c, "AJ_1")
    c.receive(availability(job("AJ_2")), 2.0)
    c.connection_lost(3.0)
    assert set(c.jobs) == {"AJ_1"} and not c.registered
    # Job updates while disconnected are produced; the I/O layer drops them.
    effects = registered(c, 4.0)
    assert status(effects).job_count == 1 and c.registrations == 2
    (m,) = sent(effects, "migrate_job")
    assert list(m.migrate_job.job_ids) == ["AJ_1"]


# --- termination, draining, stopping -----------------------------------------------------------------


def test_termination_stops_the_call_once():
    c = core()
    registered(c)
    accept(c, "AJ_1")
    (e,) = c.receive(agent.ServerMessage(termination=agent.JobTermination(job_id="AJ_1")), 3.0)
    assert e == Stop("AJ_1", "terminated by the server") and c.jobs["AJ_1"].phase is Phase.STOPPING
    assert c.receive(agent.ServerMessage(termination=agent.JobTermination(job_id="AJ_1")), 3.1) == []
    assert c.receive(agent.ServerMessage(termination=agent.JobTermination(job_id="AJ_x")), 3.1) == []
    # A promise terminated before its assignment is simply forgotten.
    c.receive(availability(job("AJ_2")), 4.0)
    assert not [e for e in c.receive(agent.ServerMessage(termination=agent.JobTermination(job_id="AJ_2")), 4.1)
                if isinstance(e, Stop)]
    assert "AJ_2" not in c.jobs


def test_draining_refuses_new_jobs_but_honours_a_promise():
    c = core(max_calls=4, load_threshold=1.0)
    registered(c)
    j = job("AJ_1")
    c.receive(availability(j), 1.0)
    st = status(c.drain(1.1))
    assert st.status == agent.WS_FULL and st.draining
    assert not answer(c.receive(availability(job("AJ_2")), 1.2)).available
    # Accepted before the drain: its assignment still launches.
    assert [e for e in c.receive(assignment(j), 1.3) if isinstance(e, Launch)]
    assert c.drain(1.4) == []


def test_stop_all_ends_every_call_and_fails_later_assignments():
    c = core(max_calls=4, load_threshold=1.0)
    registered(c)
    accept(c, "AJ_1")
    accept(c, "AJ_2")
    c.job_ready("AJ_2", 2.0)
    j3 = job("AJ_3")
    c.receive(availability(j3), 2.0)
    stops = [e for e in c.stop_all("drain timeout", 3.0) if isinstance(e, Stop)]
    assert {s.job_id for s in stops} == {"AJ_1", "AJ_2"} and all(s.reason == "drain timeout" for s in stops)
    effects = c.receive(assignment(j3), 3.1)
    assert not [e for e in effects if isinstance(e, Launch)]
    assert sent(effects, "update_job")[0].update_job.status == agent.JS_FAILED


# --- the job line -------------------------------------------------------------------------------------


def test_job_line_round_trip_and_repr_hides_the_token():
    spec = dispatch.JobSpec(job_id="AJ_1", room="r", url=URL, token="eyJhbGciOi.secret.token", identity="voice-agent",
                            name="Voice Agent", metadata='{"x": 1}', attributes={"k": "v"}, parent_pid=42)
    line = spec.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = dispatch.JobSpec.from_json(line)
    assert back == spec
    assert "eyJ" not in repr(spec) and "eyJ" not in str(spec)
    with pytest.raises(ValueError):
        dispatch.JobSpec.from_json(json.dumps({"format": 99}))
    with pytest.raises(ValueError):
        dispatch.JobSpec.from_json(json.dumps({"format": 1, "job_id": "x"}))


def test_read_job_reads_exactly_one_line_and_leaves_the_rest():
    r, w = os.pipe()
    spec = dispatch.JobSpec(job_id="AJ_1", room="r", url=URL, token="t" * 30, identity="a", name="A")
    os.write(w, spec.to_json_line() + b"more")
    assert dispatch.read_job(r, timeout_s=2) == spec
    assert os.read(r, 10) == b"more"
    os.close(w)
    with pytest.raises(EOFError):
        dispatch.read_job(r, timeout_s=2)
    os.close(r)


def test_redactor_removes_the_secret_and_any_jwt():
    from livekit import api

    secret = "s3cr3t-" + "z" * 30
    tok = api.AccessToken("k", secret).with_identity("voice-agent").to_jwt()
    import logs

    r = logs.LogContext([secret], redact_jwts=True)
    out = r.redact(f"token={tok} secret={secret} fine")
    assert tok not in out and secret not in out and out.endswith("fine")
    assert "eyJ" not in out


# --- settings -------------------------------------------------------------------------------------------


BASE = {"LIVEKIT_URL": "ws://localhost:7880", "LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "secret",
        "ASSEMBLYAI_API_KEY": "aai"}


def test_serve_settings_are_part_of_the_worker_config_and_errors_name_the_variable():
    import config

    cfg = config.load_config(BASE)
    assert cfg.agent_name == "" and cfg.agent_identity == "voice-agent" and cfg.load_threshold is None
    assert cfg.drain_timeout_s == 600 and cfg.max_calls is None and dispatch.max_calls(cfg) == dispatch.default_max_calls()
    assert dispatch.job_command(cfg)[1:] == (str(dispatch.REPO / "worker.py"), "job")
    config.check_serve_config(cfg)  # the defaults fit: 5 s clean shutdown + 4 <= 10 s stop bound
    for env, var in (({"MAX_CALLS": "0"}, "MAX_CALLS"), ({"LOAD_THRESHOLD": "1.5"}, "LOAD_THRESHOLD"),
                     ({"DRAIN_TIMEOUT_S": "soon"}, "DRAIN_TIMEOUT_S"), ({"LIVEKIT_URL": "localhost"}, "LIVEKIT_URL"),
                     ({"AGENT_NAME": "two words"}, "AGENT_NAME"), ({"LIVEKIT_API_SECRET": ""}, "LIVEKIT_API_SECRET"),
                     ({"SERVE_JOB_COMMAND": "[1, 2]"}, "SERVE_JOB_COMMAND"), ({"HEALTH_PORT": "70000"}, "HEALTH_PORT")):
        with pytest.raises(config.ConfigError, match=var):
            config.load_config({**BASE, **env})
    cfg = config.load_config({**BASE, "SERVE_JOB_COMMAND": '["python3", "child.py", "--tag", "a b"]', "MAX_CALLS": "3"})
    assert dispatch.job_command(cfg) == ("python3", "child.py", "--tag", "a b") and dispatch.max_calls(cfg) == 3
    assert dispatch.job_command(config.load_config({**BASE, "SERVE_JOB_COMMAND": "python3 child.py --x"}))[-1] == "--x"
    with pytest.raises(config.ConfigError, match="JOB_STOP_TIMEOUT_S .* SHUTDOWN_TIMEOUT_S"):
        config.check_serve_config(config.load_config({**BASE, "JOB_STOP_TIMEOUT_S": "8"}))


def test_max_calls_default_from_cores():
    plenty = float("inf")  # memory no limit here
    assert dispatch.default_max_calls(2, plenty) == 14
    assert dispatch.default_max_calls(4, plenty) == 28
    assert dispatch.default_max_calls(0.5, plenty) == 3
    assert dispatch.default_max_calls(0.1, plenty) == 1  # never 0


def fake_host(tmp_path, cgroup: str, limits: dict[str, str], available_kb: int, v1: bool = False):
    """A /proc and /sys/fs/cgroup as dispatch.available_memory_mb reads them."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: {2 * available_kb} kB\nMemAvailable: {available_kb} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(f"4:memory:{cgroup}\n" if v1 else f"0::{cgroup}\n")
    top = tmp_path / ("sys/fs/cgroup/memory" if v1 else "sys/fs/cgroup")
    for folder, value in limits.items():
        (top / folder).mkdir(parents=True, exist_ok=True)
        (top / folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(value + "\n")
    return tmp_path


def test_the_serve_units_memory_limit_bounds_the_default_max_calls(tmp_path):
    """deploy/voice-agent.service's MemoryMax holds about 30 calls at 90 MB each (plus the serve
    process and an upload's decode), but cores x 7 is 56 on 8 cores: the cgroup would meet the
    OOM killer, which may kill serve and every call with it. The default follows the memory."""
    unit = (dispatch.REPO / "deploy" / "voice-agent.service").read_text()
    memory_max = re.search(r"^MemoryMax=(\d+)G$", unit, re.M)
    assert memory_max, "the serve unit's MemoryMax is not in G"
    limit = int(memory_max.group(1)) * 2**30
    root = fake_host(tmp_path / "v2", "/system.slice/voice-agent.service",
                     {"system.slice/voice-agent.service": str(limit), "system.slice": "max"}, available_kb=64 * 2**20)
    memory_mb = dispatch.available_memory_mb(root)
    assert memory_mb == limit / 2**20
    calls = dispatch.default_max_calls(8, memory_mb)
    needed_mb = calls * dispatch.PER_CALL_MEMORY_MB + dispatch.MEMORY_RESERVE_MB
    assert needed_mb <= limit / 2**20, (f"the default MAX_CALLS on 8 cores is {calls}: {needed_mb:.0f} MB, over the "
                                        f"unit's MemoryMax={memory_max.group(1)}G")
    assert calls == 29
    # cgroup v1 (and the tighter of a parent's limit and the host's free memory).
    root = fake_host(tmp_path / "v1", "/pod/c1", {"pod": str(1024 * 2**20), "pod/c1": str(2**63 - 4096)},
                     available_kb=64 * 2**20, v1=True)
    assert dispatch.default_max_calls(8, dispatch.available_memory_mb(root)) == 7
    root = fake_host(tmp_path / "bare", "/", {}, available_kb=2 * 2**20)  # 2 GB free, no limit
    assert dispatch.default_max_calls(8, dispatch.available_memory_mb(root)) == 18


def test_agent_url():
    assert dispatch.agent_ws_url("ws://localhost:7880") == "ws://localhost:7880/agent?protocol=1"
    assert dispatch.agent_ws_url("https://p.livekit.cloud/") == "wss://p.livekit.cloud/agent?protocol=1"
    assert dispatch.agent_ws_url("wss://h/prefix") == "wss://h/prefix/agent?protocol=1"


def test_cpu_meter_from_proc_stat_and_cgroup_quota(tmp_path):
    (tmp_path / "proc").mkdir()
    stat = tmp_path / "proc" / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    m = dispatch.CpuMeter(window=2, root=tmp_path)
    assert m.sample() == 0.0
    stat.write_text("cpu  150 0 150 900 0 0 0 0 0 0\n")  # busy 100 of 200
    assert m.sample() == pytest.approx(0.5)
    stat.write_text("cpu  150 0 150 900 0 0 0 100 0 0\n")  # all steal: busy
    assert m.sample() == pytest.approx(0.75)  # average of 0.5 and 1.0
    cg = tmp_path / "sys" / "fs" / "cgroup"
    cg.mkdir(parents=True)
    (cg / "cpu.max").write_text("50000 100000\n")  # half a core
    (cg / "cpu.stat").write_text("usage_usec 0\n")
    m = dispatch.CpuMeter(window=1, root=tmp_path)
    m.sample()
    time.sleep(0.2)
    (cg / "cpu.stat").write_text(f"usage_usec {int(0.1 * 1e6)}\n")  # 0.1 s of CPU in ~0.2 s of half a core
    assert 0.7 < m.sample() <= 1.0


# --- the supervisor, with small stand-in children ---------------------------------------------------


CHILD = textwrap.dedent("""
    import os, signal, socket, sys, time
    sys.path.insert(0, {repo!r})
    import dispatch, systemd
    job = dispatch.read_job()
    mode = sys.argv[1]
    out = {out!r}
    with open(out, "w") as f:
        f.write(repr(sorted(os.environ)) + "\\n" + " ".join(sys.argv) + "\\n" + job.room + " " + str(job.parent_pid))
    n = systemd.SystemdNotifier()
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode != "never-ready":
        n.notify("READY=1")
    if mode == "exit3":
        sys.exit(3)
    if mode == "hang":
        n.notify("WATCHDOG=1")
        time.sleep(60)
    if mode == "ok-after":
        time.sleep(0.3)
        sys.exit(0)
    while True:
        n.notify("WATCHDOG=1")
        time.sleep(0.05)
""")


class Recorder:
    def __init__(self) -> None:
        self.ready: list[str] = []
        self.exits: dict[str, tuple[bool, str]] = {}
        self.codes: dict[str, int | None] = {}

    def on_ready(self, job_id: str) -> None:
        self.ready.append(job_id)

    def on_exit(self, job_id: str, ok: bool, error: str, returncode: int | None) -> None:
        self.exits[job_id] = (ok, error)
        self.codes[job_id] = returncode


def spec(jid: str) -> dispatch.JobSpec:
    return dispatch.JobSpec(job_id=jid, room=f"room-{jid}", url=URL, token="eyJtoken." + "k" * 30 + ".sig" + "s" * 20,
                            identity="voice-agent", name="Voice Agent")


async def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
def child_script(tmp_path):
    def make(name: str = "child") -> tuple[list[str], Path]:
        out = tmp_path / f"{name}.out"
        script = tmp_path / f"{name}.py"
        script.write_text(CHILD.format(repo=str(dispatch.REPO), out=str(out)))
        return [sys.executable, str(script)], out
    return make


async def test_child_gets_the_job_on_stdin_only_and_a_private_notify_socket(child_script, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # ours: a child must not inherit it
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    cmd, out = child_script()
    rec = Recorder()
    sup = dispatch.Supervisor([*cmd, "ok-after"], stop_timeout_s=2, start_timeout_s=10, on_ready=rec.on_ready,
                              on_exit=rec.on_exit, watchdog_s=1)
    sup.launch(spec("AJ_1"))
    await wait_for(lambda: "AJ_1" in rec.exits)
    assert rec.ready == ["AJ_1"] and rec.exits["AJ_1"] == (True, "")
    env_names, argv, line = out.read_text().splitlines()
    assert "eyJtoken" not in env_names + argv  # nowhere but stdin
    assert line == f"room-AJ_1 {os.getpid()}"
    assert sup.children == {}


async def test_exit_code_means_failure_and_a_hung_child_is_killed(child_script):
    cmd, _ = child_script()
    rec = Recorder()
    sup = dispatch.Supervisor(cmd, stop_timeout_s=1, start_timeout_s=10, on_ready=rec.on_ready, on_exit=rec.on_exit,
                              watchdog_s=0.3)
    sup.command = (*cmd, "exit3")
    sup.launch(spec("AJ_1"))
    sup.command = (*cmd, "hang")
    sup.launch(spec("AJ_2"))
    t0 = time.monotonic()
    while "AJ_2" not in rec.exits:
        sup.check(time.monotonic())
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(0.05)
    assert rec.exits["AJ_1"] == (False, "call process exited with code 3") and rec.codes["AJ_1"] == 3
    ok, error = rec.exits["AJ_2"]
    assert not ok and "watchdog" in error


async def test_stop_is_sigterm_then_sigkill_after_the_bound(child_script):
    cmd, _ = child_script()
    rec = Recorder()
    sup = dispatch.Supervisor(cmd, stop_timeout_s=0.5, start_timeout_s=10, on_ready=rec.on_ready, on_exit=rec.on_exit,
                              watchdog_s=5)
    sup.command = (*cmd, "loop")
    sup.launch(spec("AJ_1"))
    sup.command = (*cmd, "ignore-term")
    sup.launch(spec("AJ_2"))
    await wait_for(lambda: len(rec.ready) == 2)
    sup.stop("AJ_1", "terminated by the server")
    sup.stop("AJ_2", "terminated by the server")
    t0 = time.monotonic()
    while len(rec.exits) < 2:
        sup.check(time.monotonic())
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.05)
    assert rec.exits["AJ_1"] == (True, "")  # SIGTERM without a handler: ended on request
    ok, error = rec.exits["AJ_2"]
    assert not ok and "after SIGTERM" in error and time.monotonic() - t0 >= 0.5


async def test_start_timeout_and_a_missing_command(child_script, tmp_path):
    cmd, _ = child_script()
    rec = Recorder()
    sup = dispatch.Supervisor([*cmd, "never-ready"], stop_timeout_s=1, start_timeout_s=0.5, on_ready=rec.on_ready,
                              on_exit=rec.on_exit)
    sup.launch(spec("AJ_1"))
    t0 = time.monotonic()
    while "AJ_1" not in rec.exits:
        sup.check(time.monotonic())
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.05)
    assert not rec.exits["AJ_1"][0] and "not in the room" in rec.exits["AJ_1"][1]
    sup.command = (str(tmp_path / "no-such-program"),)
    sup.launch(spec("AJ_2"))
    await wait_for(lambda: "AJ_2" in rec.exits)
    assert not rec.exits["AJ_2"][0] and "cannot start the job command" in rec.exits["AJ_2"][1]


async def test_notify_messages_from_another_process_are_ignored(child_script):
    cmd, _ = child_script()
    rec = Recorder()
    sup = dispatch.Supervisor([*cmd, "never-ready"], stop_timeout_s=1, start_timeout_s=5, on_ready=rec.on_ready,
                              on_exit=rec.on_exit)
    sup.launch(spec("AJ_1"))
    await wait_for(lambda: sup.children.get("AJ_1") and sup.children["AJ_1"].proc is not None)
    child = sup.children["AJ_1"]
    name = child.sock.getsockname()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", name)  # this test process is not the child
    await asyncio.sleep(0.3)
    assert rec.ready == []
    await sup.shutdown("test over")
    assert "AJ_1" in rec.exits


async def test_a_child_never_outlives_its_parent(tmp_path):
    """The parent (a small serve stand-in) is SIGKILLed: its child gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and exits; if it ignores that, stdin's EOF arms an alarm."""
    marker = tmp_path / "child.pid"
    child_code = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(dispatch.REPO)!r})
        import dispatch
        job = dispatch.read_job()
        dispatch.bind_to_parent(job.parent_pid, stop_timeout_s=0.1)
        if sys.argv[1] == "ignore":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(marker)!r} + sys.argv[1], "w").write(str(os.getpid()))
        while True:
            time.sleep(0.1)
    """)
    (tmp_path / "child.py").write_text(child_code)
    parent_code = textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(dispatch.REPO)!r})
        import dispatch
        async def main():
            sup = dispatch.Supervisor([sys.executable, {str(tmp_path / 'child.py')!r}, sys.argv[1]], stop_timeout_s=1,
                                      start_timeout_s=60, on_ready=lambda j: None, on_exit=lambda *a: None)
            sup.launch(dispatch.JobSpec(job_id="AJ", room="r", url="ws://x", token="t" * 20, identity="a", name="A"))
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    (tmp_path / "parent.py").write_text(parent_code)
    for mode in ("plain", "ignore"):
        parent = await asyncio.create_subprocess_exec(sys.executable, str(tmp_path / "parent.py"), mode)
        pid_file = Path(str(marker) + mode)
        await wait_for(pid_file.exists, 15)
        await asyncio.sleep(0.1)
        child_pid = int(pid_file.read_text())
        parent.kill()
        await parent.wait()
        t0 = time.monotonic()
        # Reparented to init (or the test's subreaper): gone means no /proc entry or a zombie.
        def gone() -> bool:
            try:
                return Path(f"/proc/{child_pid}/stat").read_text().split(") ")[1][0] == "Z"
            except (FileNotFoundError, ProcessLookupError):
                return True
        await wait_for(gone, 10)
        print(f"{mode}: child gone {time.monotonic() - t0:.2f} s after its parent was killed")


# --- the async layer against a fake /agent endpoint ---------------------------------------------------


async def test_a_silent_server_is_dropped_after_the_ping_timeout_and_the_worker_registers_again():
    """A half-open connection (the server answers the registration, then nothing): the
    worker gives up on it after the ping timeout, reconnects and registers again."""
    import dataclasses

    import websockets
    from livekit import api

    secret = "fake-secret-" + "p" * 24
    conns: list = []
    requests: list = []

    async def handler(ws) -> None:
        conns.append(ws)
        requests.append((ws.request.path, ws.request.headers.get("Authorization", "")))
        msg = agent.WorkerMessage()
        msg.ParseFromString(await ws.recv())
        assert msg.WhichOneof("message") == "register"
        reply = agent.ServerMessage(register=agent.RegisterWorkerResponse(worker_id=f"AW_{len(conns)}"))
        await ws.send(reply.SerializeToString())
        if len(conns) == 1:
            await asyncio.sleep(3600)  # silent from now on: no pong, nothing
        async for frame in ws:
            m = agent.WorkerMessage()
            m.ParseFromString(frame)
            if m.WhichOneof("message") == "ping":
                pong = agent.WorkerPong(last_timestamp=m.ping.timestamp, timestamp=int(time.time() * 1000))
                await ws.send(agent.ServerMessage(pong=pong).SerializeToString())

    server = await websockets.serve(handler, "127.0.0.1", 0, ping_interval=None)
    port = server.sockets[0].getsockname()[1]
    import config

    settings = config.load_config({"LIVEKIT_URL": f"ws://127.0.0.1:{port}", "LIVEKIT_API_KEY": "fake-key",
                                   "LIVEKIT_API_SECRET": secret, "ASSEMBLYAI_API_KEY": "aai", "MAX_CALLS": "1",
                                   "LOAD_THRESHOLD": "1", "SERVE_JOB_COMMAND": "true"})
    d = dispatch.Dispatcher(settings)
    d.core.s = dataclasses.replace(d.core.s, ping_interval_s=0.2, ping_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(d.run())
    try:
        await wait_for(lambda: len(conns) >= 2 and d.core.registered and d.core.worker_id == "AW_2", 15)
        assert d.core.registrations == 2
        path, auth = requests[0]
        assert path == "/agent?protocol=1" and auth.startswith("Bearer ")
        claims = api.TokenVerifier("fake-key", secret).verify(auth[len("Bearer "):])
        assert claims.video.agent and not claims.video.room_join
        await wait_for(lambda: d.core.rtt_ms is not None, 5)  # the second server answers pings
        d._on_signal("SIGTERM")  # no call in progress: exits at once
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        task.cancel()
        server.close()


def test_cpu_meter_does_not_judge_a_window_too_short_to_measure(tmp_path):
    """The first tick comes a few ms after start-up's reading: one /proc/stat tick, all of it
    busy, is no 100% (it once turned the first user of `serve` away); the meter measures on
    from the same reading instead."""
    (tmp_path / "proc").mkdir()
    stat = tmp_path / "proc" / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    m = dispatch.CpuMeter(window=5, root=tmp_path)
    m.sample()
    stat.write_text("cpu  101 0 100 800 0 0 0 0 0 0\n")  # one tick, busy
    assert m.sample() == 0.0 and not m.samples
    stat.write_text("cpu  110 0 100 890 0 0 0 0 0 0\n")  # since the first reading: 10 of 100 busy
    assert m.sample() == pytest.approx(0.1)


# --- the CPU gate: a moving average, hysteresis, said once -------------------------------------------


def test_the_cpu_gate_shuts_at_the_threshold_opens_under_it_by_the_hysteresis_and_says_so_once(caplog):
    import logging

    c = core(max_calls=4)
    registered(c)
    caplog.set_level(logging.INFO, logger="dispatch")
    readings = [0.5, 0.72, 0.9, 0.71, 0.68, 0.66, 0.64, 0.5]
    full = []
    for i, cpu in enumerate(readings):
        c.cpu_load = cpu
        c.tick(3.0 + i)  # a change of status is sent at once
        full.append(c.full_reason() is not None)
    # Shut from 0.72 on; still shut at 0.68 and 0.66 (within 0.05 under 0.7); open at 0.64.
    assert full == [False, True, True, True, True, True, False, False]
    said = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("not taking calls") for m in said) == 1, said
    assert sum(m.startswith("taking calls again") for m in said) == 1, said


def test_the_cpu_meter_averages_five_seconds_of_ticks():
    assert dispatch.CPU_WINDOW_TICKS * dispatch.TICK_S == 5.0
    assert dispatch.CpuMeter().samples.maxlen == dispatch.CPU_WINDOW_TICKS


def test_dev_mode_is_a_loopback_server_or_a_terminal_never_under_a_service_manager():
    assert dispatch.dev_mode("ws://127.0.0.1:7880", {}, False) == "the LiveKit server is on this machine"
    assert dispatch.dev_mode("ws://localhost:7880", {}, False)
    assert dispatch.dev_mode("wss://lk.example.com", {}, True) == "run from a terminal"
    assert dispatch.dev_mode("wss://lk.example.com", {}, False) is None
    assert dispatch.dev_mode("ws://127.0.0.1:7880", {"NOTIFY_SOCKET": "/run/systemd/notify"}, True) is None
    assert dispatch.dev_mode("ws://127.0.0.1:7880", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, True) is None


def test_a_rescued_call_counts_against_capacity_and_the_server_never_hears_of_it():
    c = core(max_calls=1)
    registered(c)
    spec = dispatch.JobSpec(job_id="RJ_1", room="lost", url=URL, token="t" * 30, identity="voice-agent",
                            name="Voice Agent", rescue="lost")
    effects = c.rescue(spec, 2.0)
    assert isinstance(effects[0], dispatch.Launch) and c.full_reason() and "lost" in c.rooms()
    assert not [e for e in c.job_ready("RJ_1", 3.0) if isinstance(e, dispatch.Send)
                and e.message.WhichOneof("message") == "update_job"]
    # A job the server offers for a room we already serve is refused (two agents, one identity).
    c.job_exited("RJ_1", 4.0, ok=True)
    c.rescue(spec, 5.0)
    c2 = c.receive(availability(job("AJ_9", room="lost")), 5.1)
    assert not answer(c2).available
