#!/usr/bin/env python3
"""What serving metrics costs: CPU of a serve host with N calls, metrics on against off.

    python bench/metrics_bench.py [--calls 10] [--seconds 30] [--rounds 2]

Real parts: metrics.ServeMetrics behind dispatch.HealthServer (the serve process's /metrics)
with its own event-loop monitor, scraped over HTTP once a second as Prometheus does (the
scraper's own CPU is not counted: it is Prometheus's), and N call processes, each an
asyncio loop doing what a call's metrics do (metrics.CallMetrics writing prometheus_client's
multiprocess files in its own directory): the event-loop monitor with the sync of the
mixer's and the client's counters (one wake-up a second), a turn every 3.5 s (turn and
reply latency), a barge-in every third turn. No audio, no room: the calls' own work is the
same with metrics on or off, so it is left out and the difference is what metrics cost.
The children's loops are otherwise idle, so each wake-up costs more than in a real call,
whose loop is busy anyway: the calls' share is an upper bound.

Modes, alternated per round: ``on`` (the children observe and write their files, the
parent is scraped every second) and ``off`` (the children run the same loop without
metrics, nothing is scraped). CPU is utime+stime from /proc, in % of one core, over the
measured window (after the children are up, and 2 s more). Also: the time one scrape
takes with N calls (wall clock, as the scraper sees it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import asyncio, os, sys, time
sys.path.insert(0, sys.argv[1])
on = sys.argv[2] == "on"

async def main():
    import metrics
    m = metrics.CallMetrics(metrics.new_registry()) if on else None
    client = type("C", (), {"protocol": type("P", (), {"results": {("connect", "ok"): 1}})()})()
    if m is not None:  # as worker.py: the loop monitor and the 1 s counter sync, one wake-up
        m.call_started()
        asyncio.get_running_loop().create_task(
            metrics.monitor_loop_lag(m.loop_lag, then=lambda: m.sync(0, 100.0, client)))
    print("ready", flush=True)
    turn = 0
    next_turn = time.monotonic() + 3.5
    while True:  # a call's own 1 s work, with metrics or without
        await asyncio.sleep(1.0)
        if time.monotonic() >= next_turn:
            next_turn += 3.5
            turn += 1
            if m is not None:
                now = time.monotonic()
                m.speech_stopped()
                m.reply_playing(f"r{turn}", now + 0.5, now + 0.4)
                if turn % 3 == 0:
                    m.reply_interrupted(f"r{turn}")
                    m.reply_silent(f"r{turn}", time.monotonic() + 0.05, True)

asyncio.run(main())
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVE = r"""
import asyncio, sys, types
sys.path.insert(0, sys.argv[1])
import dispatch, metrics

async def main():
    serve = metrics.ServeMetrics(sys.argv[2])
    core = types.SimpleNamespace(job_count=int(sys.argv[3]), load=lambda: 0.3, refused={}, registered=True,
                                 draining=False, snapshot=lambda: {})
    d = types.SimpleNamespace(core=core, supervisor=types.SimpleNamespace(children={}), metrics=serve, last_tick=0.0)
    serve.attach(d)
    for i in range(int(sys.argv[3])):
        spec = types.SimpleNamespace(job_id=f"AJ_{i}")
        print(serve.job_env(spec)["PROMETHEUS_MULTIPROC_DIR"], flush=True)
    health = dispatch.HealthServer(d, "127.0.0.1", 0)
    await health.start()
    if sys.argv[4] == "on":  # the serve process's own event-loop monitor (worker._serve)
        asyncio.get_running_loop().create_task(metrics.monitor_loop_lag(serve.loop_lag))
    print(health.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def run_mode(mode: str, calls: int, seconds: float) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix="metrics-bench-")
    serve = subprocess.Popen([sys.executable, "-c", SERVE, str(REPO), root, str(calls), mode], stdout=subprocess.PIPE,
                             text=True)
    dirs = [serve.stdout.readline().strip() for _ in range(calls)]
    port = int(serve.stdout.readline())
    children = []
    for path in dirs:
        env = dict(os.environ)
        if mode == "on":
            env["PROMETHEUS_MULTIPROC_DIR"] = path
        children.append(subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), mode], env=env,
                                         stdout=subprocess.PIPE, text=True))
    scrape_ms: list[float] = []
    try:
        for c in children:  # imports and start-up are not the steady cost
            assert c.stdout.readline().strip() == "ready", "a call process did not start"
        time.sleep(2.0)
        t0 = time.monotonic()
        p0, c0 = cpu_s(serve.pid), sum(cpu_s(c.pid) for c in children)
        while time.monotonic() - t0 < seconds:
            tick = time.monotonic()
            if mode == "on":
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read()
                scrape_ms.append((time.monotonic() - tick) * 1000)
                assert b"voice_agent_turn_latency_seconds_count" in body, body[:3000]
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        elapsed = time.monotonic() - t0
        p1, c1 = cpu_s(serve.pid), sum(cpu_s(c.pid) for c in children)
    finally:
        for c in children:
            c.kill()
            c.wait()
        serve.kill()
        serve.wait()
        subprocess.run(["rm", "-rf", root], check=False)
    scrape_ms.sort()
    return {"serve": (p1 - p0) / elapsed * 100, "calls": (c1 - c0) / elapsed * 100,
            "scrape_ms": scrape_ms[len(scrape_ms) // 2] if scrape_ms else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows: list[tuple[int, str, dict[str, float]]] = []
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            rows.append((r + 1, mode, run_mode(mode, args.calls, args.seconds)))
    print(f"\n{args.calls} calls, {args.seconds:.0f} s per run, scraped every 1 s when on; CPU in % of one core; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'round':>5} {'mode':>4} {'serve %':>8} {'calls %':>8} {'total %':>8} {'scrape ms':>9}")
    for r, mode, x in rows:
        print(f"{r:>5} {mode:>4} {x['serve']:>8.3f} {x['calls']:>8.3f} {x['serve'] + x['calls']:>8.3f} "
              f"{x['scrape_ms']:>9.2f}")
    for r in range(1, args.rounds + 1):
        on = next(x for rr, m, x in rows if rr == r and m == "on")
        off = next(x for rr, m, x in rows if rr == r and m == "off")
        print(f"round {r}: metrics cost {on['serve'] + on['calls'] - off['serve'] - off['calls']:+.3f} % of a core "
              f"(serve {on['serve'] - off['serve']:+.3f}, calls {on['calls'] - off['calls']:+.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
