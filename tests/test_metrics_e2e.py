"""The real Prometheus (Debian's ``prometheus``, on loopback, scraping every second) scrapes a
``python worker.py serve`` process with two real calls (``python worker.py job`` children
with the Voice Agent API stand-in, real SDK users in two rooms), and is asked through its
HTTP API; then every panel of deploy/grafana-dashboard.json runs against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from harness import API_SECRET, ASSEMBLYAI_KEY, REPO, RoomUser, WorkerProcess, free_port, tone, wait_until, worker_env
from prometheus_server import Prometheus, find_prometheus, finite
from test_dispatch import USER_HZ, agent_of, children_of, serves, session_of, standin  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
LINE_KEYS = {"event", "outcome", "duration_s", "turns", "turn_latency_p50_ms", "turn_latency_p95_ms",
             "reply_latency_p50_ms", "reply_latency_p95_ms", "barge_ins", "barge_in_p50_ms", "underruns",
             "api_reconnects", "api_resumes"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target; Grafana's $__rate_interval as a window that
    covers the whole test (a panel over the last minutes)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", "5m")) for p in panels for t in p["targets"]]


@pytest.fixture
def prometheus(tmp_path):
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path / "prometheus", targets).start()
        started.append(p)
        return p

    if find_prometheus() is None:
        pytest.fail("Debian's prometheus is not installed: run ./scripts/setup --metrics (./scripts/test does)")
    yield start
    for p in started:
        p.stop()


async def until(prom: Prometheus, expr: str, want: float, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = prom.value(expr)
        if got == want:
            return
        assert time.monotonic() < deadline, f"Prometheus says {what} is {got}, not {want} ({expr})"
        await asyncio.sleep(0.25)


def call_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if '"call_ended"' in line:
            out.append(json.loads(line))
    return out


async def test_prometheus_scrapes_two_real_calls_and_every_dashboard_panel_has_data(
        livekit_server, standin, serves, prometheus, room_name):
    health = free_port()
    serve = serves("metrics", standin=standin, HEALTH_PORT=str(health), LOG_FORMAT="json", LOG_LEVEL="info")
    await serve.registered()
    prom = prometheus([f"127.0.0.1:{health}"])
    await wait_until(prom.targets_up, 15, "Prometheus scraping the serve process's /metrics")
    users = [RoomUser(livekit_server, f"{room_name}-{i}") for i in range(2)]
    try:
        for u in users:
            await u.join()
        for u in users:
            await agent_of(u)
        await until(prom, "sum(lk_agents_active_job_count)", 2, 15, "the calls in progress")
        await standin.wait_for(lambda: session_of(standin, 1) is not None, 15, "both calls' sessions")
        sessions = [session_of(standin, 0), session_of(standin, 1)]
        for s in sessions:
            await standin.wait_for(lambda: s.replies and s.replies[0].done_at, 15, "the greeting")
        # A turn in each call.
        for u in users:
            u.say(tone(USER_HZ, 0.8, amplitude=0.6))
        for s in sessions:
            await standin.wait_for(lambda: len(s.replies) >= 2 and s.replies[1].done_at, 15, "an answer")
        first = sessions[0]
        # A long reply in the first call, and the user talks over it (the service interrupts it).
        long = await standin.trigger_reply(seconds=4.0, session=first)
        await standin.wait_for(lambda: long.first_audio_at is not None, 10, "the long reply")
        await asyncio.sleep(1.0)
        users[0].say(tone(USER_HZ, 0.6, amplitude=0.6))
        await standin.wait_for(lambda: long.interrupted_at is not None, 10, "the barge-in")
        await standin.wait_for(lambda: any(r.kind == "turn" and r.started_at and r.started_at > long.interrupted_at
                                           and r.done_at for r in first.replies), 15, "the answer to the barge-in")
        await asyncio.sleep(0.5)
        turns = sum(1 for s in sessions for r in s.replies if r.kind == "turn" and r.first_audio_at)
        assert turns == 3, f"the stand-in answered {turns} turns, the users took 3"
        await until(prom, "sum(voice_agent_turn_latency_seconds_count)", turns, 10,
                    "the number of turns measured")
        await until(prom, "sum(voice_agent_barge_in_seconds_count)", 1, 10, "the number of barge-ins measured")
        body = urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=5).read().decode()
        assert room_name not in body and "sess_" not in body, "a room name or a session id is in /metrics"
        assert API_SECRET not in body and ASSEMBLYAI_KEY not in body, "a secret is in /metrics"
        # While the calls run, every panel has something to draw (the output queue is a gauge of
        # live calls only; the outcomes are counted from 0).
        empty = [(title, q) for title, q in dashboard_queries() if not finite(prom.query(q))]
        assert not empty, f"dashboard panels without data: {empty}"
        for process in ("serve", "call"):
            assert prom.query(f'voice_agent_event_loop_lag_seconds_count{{process="{process}"}} > 0'), \
                f"no event-loop lag measured in the {process} process"
    finally:
        for u in users:
            await u.leave()
    # IDLE_TIMEOUT_S=2: both calls end, cleanly.
    await until(prom, "sum(lk_agents_active_job_count)", 0, 20, "the calls in progress after the users left")
    await until(prom, 'sum(voice_agent_calls_total{outcome="completed"})', 2, 10, "the completed calls")
    # Counters of ended calls stay; their gauges are gone.
    assert prom.value("sum(voice_agent_turn_latency_seconds_count)") == turns, \
        "the turn count went backwards when the calls ended"
    await wait_until(lambda: not prom.query("voice_agent_output_queue_seconds"), 10,
                     "the output queue gauge of ended calls to disappear")
    # A third call whose process crashes (SIGKILL: nothing of its own end runs): counted failed,
    # its gauge gone, the counts of the calls before it kept.
    crasher = RoomUser(livekit_server, f"{room_name}-crash")
    try:
        await crasher.join()
        await agent_of(crasher)
        await until(prom, "count(voice_agent_output_queue_seconds)", 1, 15, "the crashing call's queue gauge")
        pids = children_of("metrics")
        assert len(pids) == 1, f"{len(pids)} call processes for one call"
        os.kill(pids[0], signal.SIGKILL)
        await until(prom, 'sum(voice_agent_calls_total{outcome="failed"})', 1, 15, "the failed calls")
        await until(prom, "sum(lk_agents_active_job_count)", 0, 10, "the calls in progress after the crash")
        await wait_until(lambda: not prom.query("voice_agent_output_queue_seconds"), 10,
                         "the crashed call's output queue gauge to disappear")
        assert prom.value("sum(voice_agent_turn_latency_seconds_count)") == turns, \
            "the turn count went backwards when a call crashed"
        assert prom.value('sum(voice_agent_calls_total{outcome="completed"})') == 2
    finally:
        await crasher.leave()
    # The call-end lines: one per call that ended by itself, the figures only.
    lines = call_lines(serve.output())
    assert len(lines) == 2, f"{len(lines)} call-end lines for 2 calls"
    for line in lines:
        assert set(line) - {"ts", "level", "logger", "msg", "room", "session_id", "reply_id"} == LINE_KEYS, \
            line
        assert line["outcome"] == "completed" and line["underruns"] == 0, line
    assert sorted(ln["turns"] for ln in lines) == [1, 2], lines
    assert sorted(ln["barge_ins"] for ln in lines) == [0, 1], lines
    assert all(ln["turn_latency_p50_ms"] and ln["turn_latency_p50_ms"] > 0 for ln in lines), lines


def scrape_text(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers["Content-Type"]
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_single_room_worker_serves_its_call_on_metrics_port(livekit_server, standin, room_name, tmp_path):
    """METRICS_PORT: the single-room worker's own figures, a call counted when it ends."""
    port = free_port()
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, METRICS_PORT=str(port),
                                      IDLE_TIMEOUT_S="1", GREETING="Hello"), tmp_path / "worker").start()
    user = RoomUser(livekit_server, room_name)
    try:
        await worker.wait_for_output(r"metrics on http://127\.0\.0\.1:\d+/metrics")
        s = scrape_text(port)
        assert s[("voice_agent_calls_total", (("outcome", "completed"),))] == 0
        assert s[("lk_agents_active_job_count", ())] == 0
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].replies
                               and standin.sessions[0].replies[0].done_at, 20, "the greeting")
        session = standin.sessions[0]
        assert scrape_text(port)[("lk_agents_active_job_count", ())] == 1
        user.say(tone(USER_HZ, 0.8, amplitude=0.6))
        await standin.wait_for(lambda: len(session.replies) >= 2 and session.replies[1].done_at, 15, "the answer")
        await asyncio.sleep(0.3)
        assert scrape_text(port)[("voice_agent_turn_latency_seconds_count", ())] == 1
    finally:
        await user.leave()
    await worker.wait_for_output(r"call ended", 15)
    s = scrape_text(port)
    assert s[("voice_agent_calls_total", (("outcome", "completed"),))] == 1
    assert s[("lk_agents_active_job_count", ())] == 0
    assert s[("voice_agent_api_connects_total", (("result", "ok"),))] == 1
    worker.signal()
    assert await worker.wait_exit(15) == 0


def test_a_metrics_port_in_use_is_a_one_line_error(livekit_server, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**worker_env(livekit_server, "ws://127.0.0.1:9/v1/ws", "r"), "METRICS_PORT": str(port),
               "PATH": os.environ.get("PATH", "")}
        r = subprocess.run([sys.executable, str(REPO / "worker.py")], env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "METRICS_PORT" in errors[0], r.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(REPO / "worker.py")], env={**env, "METRICS_PORT": "70000"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "METRICS_PORT" in bad.stderr, bad.stderr
