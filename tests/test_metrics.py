"""metrics.py: a serve process's /metrics across its call processes (real child processes
writing prometheus_client's multiprocess files), the pairing of the API's events with the
mixer's playback events, and the call-end line."""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest

import bridge
import metrics
from harness import REPO

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import metrics
    m = metrics.CallMetrics(metrics.new_registry())
    turns, underruns, queue_ms = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    for _ in range(turns):
        m.turn_latency.observe(0.7)
    m.sync(underruns, queue_ms)
    print("ready", flush=True)
    sys.stdin.read()
""")


def scrape(serve: metrics.ServeMetrics) -> dict[tuple[str, tuple], float]:
    """The served text, parsed as Prometheus would: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(serve.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fake_dispatcher(jobs: int = 0) -> types.SimpleNamespace:
    core = types.SimpleNamespace(job_count=jobs, load=lambda: 0.25, refused=collections.Counter(full=1))
    return types.SimpleNamespace(core=core, supervisor=types.SimpleNamespace(children={}))


def start_child(serve: metrics.ServeMetrics, job_id: str, turns: int, underruns: int, queue_ms: float):
    spec = types.SimpleNamespace(job_id=job_id, rescue="")
    env = dict(os.environ, **serve.job_env(spec))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(turns), str(underruns), str(queue_ms)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready", "the call process did not start"
    return spec, proc


def test_children_aggregate_a_crash_counts_as_failed_its_gauge_vanishes_counters_hold(tmp_path):
    serve = metrics.ServeMetrics(str(tmp_path / "m"))
    d = fake_dispatcher(jobs=2)
    serve.attach(d)
    a_spec, a = start_child(serve, "AJ_a", turns=2, underruns=1, queue_ms=200)
    b_spec, b = start_child(serve, "AJ_b", turns=3, underruns=4, queue_ms=90)
    try:
        s = scrape(serve)
        assert s[("lk_agents_active_job_count", ())] == 2
        assert s[("lk_agents_worker_load", ())] == 0.25
        assert s[("voice_agent_turn_latency_seconds_count", ())] == 5, "turns of both calls"
        assert s[("voice_agent_output_underruns_total", ())] == 5
        assert s[("voice_agent_output_queue_seconds", ())] == pytest.approx(0.09), "the emptiest live call's queue"
        assert s[("voice_agent_calls_total", (("outcome", "refused"),))] == 1, "the core's refusals"

        b.kill()  # a crash: SIGKILL, nothing written at its end
        b.wait()
        d.core.job_count = 1
        serve.job_exited("AJ_b", False, b_spec)
        s = scrape(serve)
        assert s[("voice_agent_calls_total", (("outcome", "failed"),))] == 1, "a crashed call is not counted failed"
        assert s[("voice_agent_output_queue_seconds", ())] == pytest.approx(0.2), \
            "the crashed call's queue gauge is still served"
        assert s[("voice_agent_turn_latency_seconds_count", ())] == 5, "a counter went backwards when a call crashed"
        assert s[("voice_agent_output_underruns_total", ())] == 5
        assert not os.path.exists(tmp_path / "m" / "job-2"), "the crashed call's files were not removed"

        a.stdin.close()
        a.wait()
        d.core.job_count = 0
        serve.job_exited("AJ_a", True, a_spec)
        s = scrape(serve)
        assert s[("voice_agent_calls_total", (("outcome", "completed"),))] == 1
        assert ("voice_agent_output_queue_seconds", ()) not in s, "a gauge of an ended call is still served"
        assert s[("voice_agent_turn_latency_seconds_count", ())] == 5, "a counter went backwards when a call ended"
        assert s[("voice_agent_turn_latency_seconds_bucket", (("le", "0.8"),))] == 5
        assert s[("voice_agent_turn_latency_seconds_bucket", (("le", "0.6"),))] == 0
        assert s[("voice_agent_turn_latency_seconds_sum", ())] == pytest.approx(3.5)
        assert not any(n.endswith("_created") for n, _ in s), "a child's _created sample leaked"
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        serve.close()
    assert not os.path.exists(tmp_path / "m"), "the metrics directory outlived close()"


def test_a_rescued_job_counts_as_recovered_and_as_a_recovered_room(tmp_path):
    serve = metrics.ServeMetrics(str(tmp_path / "m"))
    spec = types.SimpleNamespace(job_id="AJ_r", rescue="host gone")
    serve.job_env(spec)
    serve.job_started(spec)
    serve.job_exited("AJ_r", True, spec)
    s = scrape(serve)
    assert s[("voice_agent_rooms_recovered_total", ())] == 1
    assert s[("voice_agent_calls_total", (("outcome", "recovered"),))] == 1
    assert s[("voice_agent_calls_total", (("outcome", "completed"),))] == 0
    serve.close()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_turn_reply_and_barge_in_pair_the_apis_events_with_what_left_the_track():
    from prometheus_client import CollectorRegistry

    clock = Clock()
    m = metrics.CallMetrics(CollectorRegistry(), count_calls=True, clock=clock)
    m.call_started()
    m.speech_stopped()  # t=100: the API's end of the user's turn
    # A reply received before the turn ended is not its answer (the greeting, still playing).
    m.reply_playing("greeting", 100.2, 99.0)
    m.reply_playing("r1", 100.9, 100.6)  # received at 100.6, left the track at 100.9
    assert m.figures.turn == [pytest.approx(0.9)] and m.figures.reply == [pytest.approx(1.2), pytest.approx(0.3)]
    clock.t = 101.5
    m.reply_interrupted("r1")
    m.reply_silent("r1", 101.56, interrupted=True)
    m.speech_started()
    clock.t = 102.0
    m.speech_stopped()
    m.speech_started()  # the user went on speaking: no turn yet
    m.reply_playing("r2", 103.0, 102.5)
    assert len(m.figures.turn) == 1, "a turn was counted although the user spoke on"

    class Client:
        protocol = types.SimpleNamespace(results=collections.Counter({("connect", "ok"): 1, ("resume", "ok"): 1,
                                                                      ("resume", "closed"): 1}))

    client = Client()
    m.sync(underruns=2, queue_ms=120, client=client)
    m.sync(underruns=3, queue_ms=110, client=client)  # only what is new since the last look counts
    clock.t = 130.0
    line = m.call_ended("completed")
    assert line == {"event": "call_ended", "outcome": "completed", "duration_s": 30.0, "turns": 1,
                    "turn_latency_p50_ms": 900, "turn_latency_p95_ms": 900, "reply_latency_p50_ms": 500,
                    "reply_latency_p95_ms": 1200, "barge_ins": 1, "barge_in_p50_ms": 60, "underruns": 3,
                    "api_reconnects": 2, "api_resumes": 1}
    text = m.render().decode()
    assert "voice_agent_barge_in_seconds_count 1.0" in text
    assert "voice_agent_turn_latency_seconds_count 1.0" in text
    assert 'voice_agent_api_resumes_total{result="closed"} 1.0' in text
    assert 'voice_agent_calls_total{outcome="completed"} 1.0' in text
    assert "voice_agent_output_underruns_total 3.0" in text
    assert m.call_ended("completed") is None, "a second line for the same call"


def test_the_protocol_counts_session_attempts_by_result():
    p = bridge.Protocol(bridge.SessionSettings())
    p.connection_opened(0.0)
    p.receive(json.dumps({"type": "session.error", "code": "at_capacity", "message": "busy"}))
    p.connection_lost(1.0, 1008, "")
    p.connection_opened(2.0)
    p.receive(json.dumps({"type": "session.ready", "session_id": "s1"}))
    p.connection_lost(3.0, 1006, "")
    p.connection_opened(4.0)  # a resume
    p.connection_lost(5.0, None, "")
    p.connection_opened(6.0)
    p.receive(json.dumps({"type": "session.ready", "session_id": "s1"}))
    assert p.results == {("connect", "capacity"): 1, ("connect", "ok"): 1, ("resume", "unreachable"): 1,
                         ("resume", "ok"): 1}
    with pytest.raises(bridge.KeyRejected):
        p.connection_lost(7.0, None, "", http_status=401)


def test_the_call_end_line_is_one_json_object_without_secrets(capsys):
    """What LOG_FORMAT=json prints for it: one line, one object, the figures only."""
    from logs import setup_logging

    setup_logging(["sk-secret"], "info", "json")
    try:
        logging.getLogger("worker").info("call ended", extra={"fields": metrics.CallFigures(0.0).line(12.0, "failed")})
    finally:
        logging.getLogger().handlers.clear()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "call_ended" in ln]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["outcome"] == "failed" and obj["duration_s"] == 12.0 and obj["turns"] == 0
