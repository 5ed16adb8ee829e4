"""CPU scheduling of the worker, in one place (``AUDIO_PRIORITY``).

On a busy host the published track must not starve, and the audio thread needs the GIL
too. So in ``realtime`` mode the whole worker runs at real-time round-robin priority, in
three levels:

* the audio thread (``mixer.Mixer``'s writer): ``SCHED_RR`` 12;
* LiveKit's media threads (WebRTC, the SDK's Rust runtimes): ``SCHED_RR`` 10. They start
  on LiveKit's first call and inherit the scheduling of the thread that makes it, so the
  writer makes that call at level 10 and only then moves itself above them;
* the event loop (the main thread, and every thread it starts): ``SCHED_RR`` 5, because a
  GIL holder preempted by ordinary processes stalls the audio thread (measured: 100-200 ms
  with several workers on one host).

``nice`` gives the process nice -10 instead, ``normal`` leaves everything alone. Both
real-time and nice need ``CAP_SYS_NICE`` (root, or the systemd unit's
``AmbientCapabilities=``); without it every call here quietly falls back.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("scheduling")

MODES = ("realtime", "nice", "normal")
AUDIO_THREAD_RR = 12
MEDIA_THREADS_RR = 10
EVENT_LOOP_RR = 5
NICE = -10


def raise_main_thread(mode: str) -> str:
    """The event loop's thread (call it first thing in ``main``: threads started later
    inherit it). Returns what it got: ``SCHED_RR``, ``nice -10`` or ``normal``."""
    if mode == "normal":
        return "normal"
    if mode == "realtime":
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(EVENT_LOOP_RR))
            return "SCHED_RR"
        except (OSError, AttributeError):
            pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
        return f"nice {NICE}"
    except OSError:
        log.debug("running at normal CPU priority (no CAP_SYS_NICE)")
        return "normal"


def raise_audio_thread(mode: str) -> str:
    """The calling (audio) thread, before it makes LiveKit's first call: at the media
    threads' level, which they inherit. Returns ``SCHED_RR``, ``nice -10`` or ``normal``."""
    tid = threading.get_native_id()
    if mode == "normal":
        return "normal"
    if mode == "realtime":
        try:
            os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(MEDIA_THREADS_RR))
            return "SCHED_RR"
        except (OSError, AttributeError):
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NICE)
        return f"nice {NICE}"
    except (OSError, AttributeError):
        return "normal"


def audio_thread_above_media(got: str) -> None:
    """After LiveKit's first call: the audio thread moves above the media threads it
    started, so a busy media thread cannot hold a core for a whole round-robin slice
    (100 ms) before the audio thread runs."""
    if got != "SCHED_RR":
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_RR, os.sched_param(AUDIO_THREAD_RR))
    except OSError:
        pass


def sdk_runtime_threads(n: int) -> None:
    """Worker threads for the LiveKit SDK's Rust runtime (tokio reads ``TOKIO_WORKER_THREADS``
    when the SDK starts it, at its first call: call this before). Its default is one per core,
    but a call's SDK work (the microphone stream, requests and their callbacks, captions,
    state) is a few hundredths of a core, and a second idle worker is woken to steal every
    task the first gets: on the 2-core bench VM one thread cost 0.006 cores a call less (the
    runtime 0.012 against 0.018: README, "Latency and benchmarks"). Not a scheduling policy: the same in
    every AUDIO_PRIORITY mode."""
    os.environ["TOKIO_WORKER_THREADS"] = str(n)


def name_thread(name: str) -> None:
    """The calling thread's OS name (Linux comm, 15 bytes), so per-thread CPU figures
    (``/proc/<pid>/task``, ``top -H``) can tell it apart; Python 3.11 does not set it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
