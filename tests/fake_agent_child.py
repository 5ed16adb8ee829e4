#!/usr/bin/env python3
"""A stand-in for one call (``python worker.py job`` in phase 2), for the dispatch tests and
the dispatch bench: what ``dispatch.py`` runs per job when ``SERVE_JOB_COMMAND`` points here.

It does what the real job mode must do around the call, with a tone instead of a
conversation:

* reads the job from stdin (``dispatch.read_job``) and binds itself to its parent
  (``dispatch.bind_to_parent``: the hand-over signal when the parent dies, hard exit if that is
  ignored);
* joins ``job.url`` with ``job.token`` (identity, name, kind and ``lk.agent_name`` come
  from the token the server minted), publishes a MICROPHONE track playing a tone, sets
  ``lk.agent.state`` to ``listening``;
* tells its parent ``READY=1`` on $NOTIFY_SOCKET once in the room, ``WATCHDOG=1`` while alive;
* ends the call (leaves, exit 0) on SIGTERM, when the room is closed or it is removed, or
  when the last user has been gone ``idle_s`` (as the worker ends a call after its idle
  timeout). Never prints the token.

Test knobs, from ``FAKE_<NAME>`` variables or the job metadata ``{"fake": {...}}``
(metadata wins): ``idle_s`` (2), ``silent`` (no track: presence only, for the fleet bench), ``exit_after_s``, ``crash_after_s`` (exit ``crash_code``,
default 1, without leaving), ``ignore_sigterm``, ``no_ready``, ``hang_after_s`` (the event loop stops: no more
watchdog pings). Attributes it sets for the tests: ``fake.tag`` (``--tag``), ``fake.job_id``,
``fake.metadata``, ``fake.pid``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import dispatch  # noqa: E402
import systemd  # noqa: E402

RATE = 24000


def knobs(job: dispatch.JobSpec) -> dict:
    out: dict = {"idle_s": 2.0}
    for name in ("idle_s", "exit_after_s", "crash_after_s", "hang_after_s", "crash_code"):
        v = os.environ.get(f"FAKE_{name.upper()}")
        if v:
            out[name] = float(v)
    for name in ("ignore_sigterm", "no_ready", "silent"):
        if os.environ.get(f"FAKE_{name.upper()}") == "1":
            out[name] = True
    try:
        meta = json.loads(job.metadata) if job.metadata else {}
        if isinstance(meta, dict) and isinstance(meta.get("fake"), dict):
            out.update(meta["fake"])
    except ValueError:
        pass
    return out


def say(msg: str) -> None:
    print(f"fake-agent[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


async def run(job: dispatch.JobSpec, k: dict, tag: str, tone_hz: float) -> int:
    from livekit import rtc

    notifier = systemd.SystemdNotifier()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str]] = loop.create_future()

    def end(code: int, why: str) -> None:
        if not done.done():
            done.set_result((code, why))

    if k.get("ignore_sigterm"):
        loop.add_signal_handler(signal.SIGTERM, lambda: say("SIGTERM ignored (test knob)"))
        loop.add_signal_handler(dispatch.HANDOVER_SIGNAL, lambda: say("hand-over signal ignored (test knob)"))
    else:
        loop.add_signal_handler(signal.SIGTERM, end, 0, "SIGTERM")
        # The host is going away (dispatch.HANDOVER_SIGNAL): a tone has nothing to hand over.
        loop.add_signal_handler(dispatch.HANDOVER_SIGNAL, end, 0, "hand-over")
    loop.add_signal_handler(signal.SIGINT, end, 0, "SIGINT")

    room = rtc.Room()
    users_seen = False
    last_user = time.monotonic()

    @room.on("disconnected")
    def on_disconnected(reason: object) -> None:
        end(0, f"disconnected ({reason})")

    t0 = time.monotonic()
    await room.connect(job.url, job.token)
    source = rtc.AudioSource(RATE, 1, queue_size_ms=100)
    if not k.get("silent"):
        track = rtc.LocalAudioTrack.create_audio_track("agent", source)
        await room.local_participant.publish_track(track, rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_MICROPHONE))
    await room.local_participant.set_attributes({
        "lk.agent.state": "listening", "fake.tag": tag, "fake.job_id": job.job_id,
        "fake.metadata": job.metadata[:1000], "fake.pid": str(os.getpid()),
    })
    say(f"in room {job.room} as {room.local_participant.identity} ({job.job_id}, {time.monotonic() - t0:.2f} s)")
    if not k.get("no_ready"):
        notifier.notify("READY=1", f"STATUS=in room {job.room}")

    async def tone() -> None:
        n = RATE // 100
        phase = 0
        while True:
            t = (np.arange(n) + phase) / RATE
            phase += n
            x = (0.3 * 32767 * np.sin(2 * math.pi * tone_hz * t)).astype(np.int16)
            await source.capture_frame(rtc.AudioFrame(x.tobytes(), RATE, 1, n))

    async def watchdog() -> None:
        interval = notifier.watchdog_s / 2 if notifier.watchdog_s else 1.0
        while True:
            if notifier.watchdog_s:
                notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def supervise() -> None:
        nonlocal users_seen, last_user
        started = time.monotonic()
        while True:
            now = time.monotonic()
            users = [p for p in room.remote_participants.values()
                     if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT]
            if users:
                users_seen, last_user = True, now
            elif users_seen and now - last_user > float(k["idle_s"]):
                end(0, "the user left")
            if "exit_after_s" in k and now - started > float(k["exit_after_s"]):
                end(0, "exit_after_s")
            if "crash_after_s" in k and now - started > float(k["crash_after_s"]):
                say("crashing (test knob)")
                os._exit(int(k.get("crash_code", 1)))
            if "hang_after_s" in k and now - started > float(k["hang_after_s"]):
                say("hanging (test knob)")
                while True:
                    time.sleep(1)
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(c) for c in ((watchdog(), supervise()) if k.get("silent")
                                              else (tone(), watchdog(), supervise()))]
    code, why = await done
    say(f"ending the call: {why}")
    for t in tasks:
        t.cancel()
    try:
        await asyncio.wait_for(room.local_participant.set_attributes({"lk.agent.state": "idle"}), 1)
    except Exception:
        pass
    try:
        await asyncio.wait_for(room.disconnect(), 3)
    except Exception:
        pass
    return code


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--tone", type=float, default=440.0)
    args = ap.parse_args()
    job = dispatch.read_job()
    dispatch.bind_to_parent(job.parent_pid, job.stop_timeout_s)
    return asyncio.run(run(job, knobs(job), args.tag, args.tone))


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)
