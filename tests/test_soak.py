"""Soak: continuous turns (with barge-ins) for SOAK_MINUTES (default 2; the full run is
`SOAK_MINUTES=30 ./scripts/test tests/test_soak.py -s`). RSS, tasks, threads and streams are
sampled over time and must show no growth trend; the table is printed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from harness import ASSEMBLYAI_KEY, RoomUser, WorkerProcess, tone, wait_until, worker_env, write_wav
from standin import StandIn, StandInOptions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOAK_MINUTES = float(os.environ.get("SOAK_MINUTES", "2"))


async def sample(worker: WorkerProcess) -> dict:
    before = worker.output().count('"msg": "counters"')
    worker.signal(signal.SIGUSR1)
    await wait_until(lambda: worker.output().count('"msg": "counters"') > before, 10, "the counters")
    return [json.loads(x) for x in worker.output().splitlines() if '"msg": "counters"' in x][-1]


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


async def test_soak_no_growth(livekit_server, room_name, tmp_path):
    standin = StandIn(StandInOptions(api_key=ASSEMBLYAI_KEY, reply_seconds=1.2, default_min_silence_ms=400))
    await standin.start()
    bed = write_wav(tmp_path / "bed.wav", tone(300, 1.0, amplitude=0.5, fade_ms=0))
    worker = WorkerProcess(worker_env(livekit_server, standin.url, room_name, AMBIENT_SOUND=str(bed), GREETING="",
                                      LOG_FORMAT="json", LOG_LEVEL="info"), tmp_path / "w").start()
    user = RoomUser(livekit_server, room_name)
    rows: list[dict] = []
    try:
        await user.join()
        await standin.wait_for(lambda: standin.sessions and standin.sessions[0].ready_at, 15, "the session")
        t0 = time.monotonic()
        end = t0 + SOAK_MINUTES * 60
        next_sample = t0
        turn = 0
        while time.monotonic() < end:
            turn += 1
            user.say(tone(450, 0.6, amplitude=0.6))
            # Every fourth turn the user talks over the reply (a barge-in).
            await asyncio.sleep(2.2 if turn % 4 else 1.5)
            if turn % 4 == 0:
                user.say(tone(450, 0.5, amplitude=0.6))
                await asyncio.sleep(2.0)
            if time.monotonic() >= next_sample:
                c = await sample(worker)
                rows.append({"t_min": round((time.monotonic() - t0) / 60, 2), "rss_mb": round(c["rss_kb"] / 1024, 1),
                             "tasks": c["tasks"], "owned": c["owned_tasks"], "threads": c["threads"],
                             "captions": c["caption_segments"], "underruns": c["mixer"]["underruns"],
                             "turns": len(standin.sessions[-1].events("transcript.user"))})
                next_sample = time.monotonic() + max(10.0, SOAK_MINUTES * 60 / 12)
        print("\nsoak: " + ", ".join(f"{k}" for k in rows[0]))
        for r in rows:
            print("soak: " + ", ".join(str(v) for v in r.values()))
        assert worker.alive
        assert rows[-1]["turns"] >= turn * 0.8, "turns were lost"
        # No growth trend: the last third against the first third (after a warm-up sample).
        body = rows[1:]
        third = max(1, len(body) // 3)
        first, last = body[:third], body[-third:]
        for key, slack in (("tasks", 3), ("owned", 3), ("threads", 1), ("captions", 2)):
            assert max(r[key] for r in last) <= max(r[key] for r in first) + slack, f"{key} grew: {rows}"
        rss_first, rss_last = median([r["rss_mb"] for r in first]), median([r["rss_mb"] for r in last])
        assert rss_last <= rss_first * 1.10 + 8, f"RSS grew from {rss_first} MB to {rss_last} MB: {rows}"
    finally:
        worker.kill()
        await user.leave()
        await standin.stop()
