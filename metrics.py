"""Prometheus metrics and the call-end summary line.

* ``CallMetrics`` -- in the process that runs a call (``python worker.py`` or a serve
  process's ``python worker.py job``): the latency histograms, audio health, the Voice
  Agent API's connects and resumes, the event loop's lag, and the per-call figures behind
  the one JSON line logged when a call ends. Observed once per turn, reply or barge-in,
  and the mixer's counters read once a second: nothing on the audio path.
* ``ServeMetrics`` -- in the serve process: the worker's gauges (LiveKit Agents' names and
  meanings), the calls by outcome, and its children's figures. Each child writes its
  values to memory-mapped files (prometheus_client's multiprocess mode) in a directory of
  its own, inside a private temporary directory of this process; ``GET /metrics`` merges
  them. When a child exits, its counters and histograms are folded into this process's
  memory and its files deleted: its counts stay (a counter never goes backwards), its
  gauges are gone, and a scrape reads the files of live calls only, however many calls
  the host has served.
* ``MetricsServer`` -- ``GET /metrics`` for the single-room worker (``METRICS_PORT``); in
  serve mode the health endpoint serves it.

Series (labels are low-cardinality on purpose: no room, no identity, no session id):
``lk_agents_active_job_count``, ``lk_agents_worker_load``, ``lk_agents_child_process_count``
(serve), ``voice_agent_calls_total{outcome}`` (completed, failed, refused, recovered),
``voice_agent_rooms_recovered_total``, ``voice_agent_reply_latency_seconds``,
``voice_agent_turn_latency_seconds``, ``voice_agent_barge_in_seconds``,
``voice_agent_output_underruns_total``, ``voice_agent_output_queue_seconds``,
``voice_agent_api_connects_total{result}``, ``voice_agent_api_resumes_total{result}``,
``voice_agent_event_loop_lag_seconds{process}`` (call, serve).

Outcomes, each call counted once when it ends (serve mode: by the serve process, from the
child's exit): ``completed`` (exit 0), ``failed`` (crashed, killed, or exited with an error),
``recovered`` (a rescued room's job, ``JobSpec.rescue``, that ended well), ``refused`` (a job
the worker declined: full, draining; WorkerCore's refusal count). The single-room worker
counts its calls itself (completed, or failed when the process ends on an error).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import math
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from http_endpoint import Endpoint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it at import

# Buckets, seconds. Reply latency is our own queue plus the reply cushion (about 0.1-0.3 s);
# a turn is what the user waits for (the API's end of turn to the first word heard);
# barge-in is the fade plus what was queued (tens of ms).
REPLY_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
TURN_BUCKETS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
BARGE_IN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# How often the event-loop monitor wakes up; in a call it also reads the mixer's and the client's
# counters then (one wake-up a second for both: an idle loop's wake-ups are most of what metrics cost).
LAG_INTERVAL_S = 1.0
LAG_NAME, LAG_HELP = "voice_agent_event_loop_lag_seconds", "How late an event loop runs (process: call or serve)"

OUTCOMES = ("completed", "failed", "refused", "recovered")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (q in 0..100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


# --- in the call's process ------------------------------------------------------------------


def new_registry() -> "CollectorRegistry":
    """A registry of one call's series. Where the serve process collects them (its
    PROMETHEUS_MULTIPROC_DIR in our environment) the values live in its files whatever the
    registry; a registry of our own keeps two workers in one process (tests) apart."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


class CallFigures:
    """What one call measured, for its summary line (seconds; no text, no names)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.reply: list[float] = []
        self.turn: list[float] = []
        self.barge_in: list[float] = []
        self.barge_ins = 0  # interruptions by the API (each is a barge-in; not all reach silence)
        self.underruns = 0
        self.connects = 0  # attempts to open a session (fresh), whatever their result
        self.resume_attempts = 0
        self.resumes = 0  # ... of which succeeded

    def line(self, now: float, outcome: str) -> dict[str, Any]:
        return {
            "event": "call_ended", "outcome": outcome, "duration_s": round(now - self.started, 1),
            "turns": len(self.turn),
            "turn_latency_p50_ms": _ms(percentile(self.turn, 50)), "turn_latency_p95_ms": _ms(percentile(self.turn, 95)),
            "reply_latency_p50_ms": _ms(percentile(self.reply, 50)),
            "reply_latency_p95_ms": _ms(percentile(self.reply, 95)),
            "barge_ins": self.barge_ins, "barge_in_p50_ms": _ms(percentile(self.barge_in, 50)),
            "underruns": self.underruns,
            # Every socket after the first was a reconnect: a resume attempt or a fresh session.
            "api_reconnects": max(0, self.connects + self.resume_attempts - 1), "api_resumes": self.resumes,
        }


class CallMetrics:
    """The call side. The worker tells it what the API said and what the mixer heard; it
    pairs them (turn end -> first reply heard, interruption -> reply silent) and keeps the
    Prometheus series and the figures of the call in progress. ``registry``: None for
    prometheus_client's default one (in a serve process's child: the multiprocess files);
    ``count_calls``: the single-room worker counts its calls itself (in serve mode the
    serve process does, from its children's exits)."""

    def __init__(self, registry: "CollectorRegistry | None" = None, *, count_calls: bool = False,
                 clock: Any = time.monotonic) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.clock = clock
        self.reply_latency = Histogram("voice_agent_reply_latency_seconds",
                                       "First reply audio received from the Voice Agent API to that audio leaving "
                                       "our track", buckets=REPLY_BUCKETS, registry=reg)
        self.turn_latency = Histogram("voice_agent_turn_latency_seconds",
                                      "The API's end of user speech to the first reply audio leaving our track",
                                      buckets=TURN_BUCKETS, registry=reg)
        self.barge_in = Histogram("voice_agent_barge_in_seconds",
                                  "The API's interruption of a reply to that reply silent at our track",
                                  buckets=BARGE_IN_BUCKETS, registry=reg)
        self.underruns = Counter("voice_agent_output_underruns", "Times the published track ran out of audio",
                                 registry=reg)
        # A serve host's figure is its emptiest call's (livemin): the one nearest to starving.
        self.queue = Gauge("voice_agent_output_queue_seconds", "Audio queued ahead of the listener in our track",
                           multiprocess_mode="livemin", registry=reg)
        self.connects = Counter("voice_agent_api_connects", "Voice Agent API session starts by result",
                                ["result"], registry=reg)
        self.resumes = Counter("voice_agent_api_resumes", "Voice Agent API session resumes by result",
                               ["result"], registry=reg)
        self.connects.labels("ok")  # shown (at 0) before the first attempt: a panel has a series to draw
        self.resumes.labels("ok")
        self.loop_lag = Histogram(LAG_NAME, LAG_HELP, ["process"], buckets=LAG_BUCKETS, registry=reg).labels("call")
        self.calls: Any = None
        if count_calls:
            self.calls = Counter("voice_agent_calls", "Calls by how they ended", ["outcome"], registry=reg)
            for outcome in OUTCOMES:
                self.calls.labels(outcome)  # every outcome shows, 0 until it happens
        self.active = Gauge("lk_agents_active_job_count", "Calls in progress", registry=reg) if count_calls else None
        self.figures: CallFigures | None = None
        self._turn_ended_at: float | None = None
        self._interrupted: dict[str, float] = {}  # reply -> when the API interrupted it
        self._underruns_seen = 0
        self._api_seen: dict[tuple[str, str], int] = {}
        self._api_source: Any = None

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -- the call --

    def call_started(self) -> None:
        if self.figures is None:
            self.figures = CallFigures(self.clock())
            if self.active is not None:
                self.active.set(1)

    def call_ended(self, outcome: str) -> dict[str, Any] | None:
        """The call's summary (None if no call was in progress); counts it where we count calls."""
        figures, self.figures = self.figures, None
        self._turn_ended_at = None
        self._interrupted.clear()
        if figures is None:
            return None
        if self.calls is not None:
            self.calls.labels(outcome).inc()
            self.active.set(0)
        return figures.line(self.clock(), outcome)

    # -- what the API said (on the event loop, when it arrives) --

    def speech_started(self) -> None:
        self._turn_ended_at = None  # the user speaks on: the turn has not ended

    def speech_stopped(self) -> None:
        self._turn_ended_at = self.clock()

    def reply_interrupted(self, reply_id: str) -> None:
        self._interrupted.setdefault(reply_id, self.clock())
        if len(self._interrupted) > 16:  # replies that were never heard: forget the oldest
            self._interrupted.pop(next(iter(self._interrupted)))
        if self.figures is not None:
            self.figures.barge_ins += 1

    # -- what the mixer heard (its playback events: when the audio left the source) --

    def reply_playing(self, reply_id: str, at: float, first_received_at: float | None) -> None:
        """A reply's first sample left the track at ``at``; ``first_received_at``: when its
        first audio arrived from the API (the mixer's reply stats)."""
        f = self.figures
        if first_received_at is not None and at >= first_received_at:
            self.reply_latency.observe(at - first_received_at)
            if f is not None:
                f.reply.append(at - first_received_at)
        turn_end = self._turn_ended_at
        # The turn's answer is the first reply whose audio came after the end of turn.
        if turn_end is not None and first_received_at is not None and first_received_at >= turn_end:
            self._turn_ended_at = None
            self.turn_latency.observe(at - turn_end)
            if f is not None:
                f.turn.append(at - turn_end)

    def reply_silent(self, reply_id: str | None, at: float, interrupted: bool) -> None:
        """Reply audio stopped leaving the track at ``at``."""
        since = self._interrupted.pop(reply_id, None) if reply_id is not None else None
        if interrupted and since is not None and at >= since:
            self.barge_in.observe(at - since)
            if self.figures is not None:
                self.figures.barge_in.append(at - since)

    # -- counters of the mixer and the API client, read once a second and at the end --

    def sync(self, underruns: int, queue_ms: float, client: Any = None) -> None:
        """``underruns``: the mixer's count so far; ``queue_ms``: audio queued ahead now;
        ``client``: the bridge.VoiceAgentClient of the session (its results per attempt)."""
        if underruns > self._underruns_seen:
            self.underruns.inc(underruns - self._underruns_seen)
            if self.figures is not None:
                self.figures.underruns += underruns - self._underruns_seen
            self._underruns_seen = underruns
        self.queue.set(max(0.0, queue_ms) / 1000)
        if client is not None:
            self.sync_api(client)

    def sync_api(self, client: Any) -> None:
        """Count the session attempts the client made since the last look (a new client,
        i.e. a replacement session, starts from zero)."""
        if client is not self._api_source:
            self._api_source, self._api_seen = client, {}
        for (kind, result), n in list(client.protocol.results.items()):
            new = n - self._api_seen.get((kind, result), 0)
            if new <= 0:
                continue
            self._api_seen[(kind, result)] = n
            (self.resumes if kind == "resume" else self.connects).labels(result).inc(new)
            f = self.figures
            if f is not None:
                if kind == "resume":
                    f.resume_attempts += new
                    f.resumes += new if result == "ok" else 0
                else:
                    f.connects += new


async def monitor_loop_lag(histogram: Any, interval_s: float = LAG_INTERVAL_S,
                           then: Callable[[], None] | None = None) -> None:
    """Observe how late this event loop wakes a sleeper (what a blocking call costs every
    other task of the process), every ``interval_s``; then call ``then``, if given."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, loop.time() - due))
        if then is not None:
            then()


# --- in the serve process --------------------------------------------------------------------


def _plain(metric: Any) -> Iterable[Any]:
    """A family's samples without ``_created`` (a child's start time means nothing merged)."""
    return (s for s in metric.samples if not s.name.endswith("_created"))


class ServeMetrics:
    """The serve process's ``/metrics``. ``attach(dispatcher)`` gives it the worker's state;
    the dispatcher calls ``job_started`` / ``job_exited`` and hands each child ``job_env``."""

    def __init__(self, root: str | None = None) -> None:
        # This process's own values live in memory: a PROMETHEUS_MULTIPROC_DIR inherited from
        # whoever started us would put them in files of a directory that is not ours.
        os.environ.pop(MULTIPROC_ENV, None)
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # Private to this process (mkdtemp: mode 0700), removed by close().
        self.root = root or tempfile.mkdtemp(prefix="voice-agent-metrics-")
        self._dirs: dict[str, str] = {}  # job id -> its child's directory
        self._seq = 0
        # Counters and histograms of children that have exited: family -> (type, help, {(sample, labels): value}).
        self._retired: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        self._dispatcher: Any = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.own = CollectorRegistry()  # this process's own series, merged into the scrape
        self.calls = Counter("voice_agent_calls", "Calls by how they ended", ["outcome"], registry=self.own)
        for outcome in ("completed", "failed", "recovered"):  # refused: the core's count (collect)
            self.calls.labels(outcome)
        self.rooms_recovered = Counter("voice_agent_rooms_recovered",
                                       "Rooms served after their job was lost or their host died", registry=self.own)
        # The serve process's own loop: it answers LiveKit's job offers, which wait 3 s at most.
        self.loop_lag = Histogram(LAG_NAME, LAG_HELP, ["process"], buckets=LAG_BUCKETS,
                                  registry=self.own).labels("serve")
        self.registry.register(self)

    def attach(self, dispatcher: Any) -> None:
        self._dispatcher = dispatcher

    # -- the children --

    def job_env(self, spec: Any) -> dict[str, str]:
        """The environment a job's call process gets: a metrics directory of its own."""
        path = self._dirs.get(spec.job_id)
        if path is None:
            self._seq += 1
            path = os.path.join(self.root, f"job-{self._seq}")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:  # the call matters more than its figures
                log.warning("job %s runs without metrics: cannot create %s: %s", spec.job_id, path, e.strerror or e)
                return {}
            self._dirs[spec.job_id] = path
        return {MULTIPROC_ENV: path}

    def job_started(self, spec: Any) -> None:
        if spec.rescue:
            self.rooms_recovered.inc()

    def job_exited(self, job_id: str, ok: bool, spec: Any = None) -> None:
        """A call process has exited: count the call, keep its counts, drop its gauges."""
        outcome = "failed" if not ok else "recovered" if spec is not None and spec.rescue else "completed"
        self.calls.labels(outcome).inc()
        path = self._dirs.pop(job_id, None)
        if path is not None:
            self._retire(path)

    def _retire(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(path, "*.db"))
        kept = [f for f in files if not os.path.basename(f).startswith("gauge_")]
        try:
            merged = list(MultiProcessCollector.merge(kept, accumulate=True)) if kept else []
        except (OSError, ValueError) as e:  # a file the child was killed while creating
            log.warning("could not read the metrics of an exited call: %s", e)
            merged = []
        for metric in merged:
            _, _, values = self._retired.setdefault(metric.name, (metric.type, metric.documentation, {}))
            for s in _plain(metric):
                key = (s.name, tuple(sorted(s.labels.items())))
                values[key] = values.get(key, 0.0) + s.value
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the scrape --

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.multiprocess import MultiProcessCollector

        d = self._dispatcher
        if d is not None:
            yield GaugeMetricFamily("lk_agents_active_job_count", "Calls in progress (their processes started)",
                                    value=d.core.job_count)
            yield GaugeMetricFamily("lk_agents_worker_load", "The load this worker reports to LiveKit (0-1)",
                                    value=d.core.load())
            yield GaugeMetricFamily("lk_agents_child_process_count", "Call processes running",
                                    value=len(d.supervisor.children))
        files: list[str] = []
        for path in list(self._dirs.values()):
            files += glob.glob(os.path.join(path, "*.db"))
        try:
            live = list(MultiProcessCollector.merge(files, accumulate=True)) if files else []
        except (OSError, ValueError) as e:
            log.warning("could not read a call's metrics: %s", e)
            live = []
        families: dict[str, Any] = {m.name: m for m in live}
        for m in families.values():
            m.samples = list(_plain(m))
        for name, (typ, doc, values) in self._retired.items():
            m = families.get(name)
            if m is None:
                m = families[name] = Metric(name, doc, typ)
            _add(m, ((s, labels, v) for (s, labels), v in values.items()))
        refused = sum(d.core.refused.values()) if d is not None else 0
        for m in self.own.collect():
            target = families.get(m.name)
            if target is None:
                target = families[m.name] = Metric(m.name, m.documentation, m.type)
            _add(target, ((s.name, tuple(sorted(s.labels.items())), s.value) for s in _plain(m)))
            if m.name == "voice_agent_calls":
                _add(target, [("voice_agent_calls_total", (("outcome", "refused"),), float(refused))])
        yield from families.values()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _add(metric: Any, samples: Iterable[tuple[str, tuple[tuple[str, str], ...], float]]) -> None:
    """Add values into a family's samples, matching on name and labels."""
    from prometheus_client.samples import Sample

    index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(metric.samples)}
    for name, labels, value in samples:
        i = index.get((name, labels))
        if i is None:
            index[(name, labels)] = len(metric.samples)
            metric.samples.append(Sample(name, dict(labels), value))
        else:
            s = metric.samples[i]
            metric.samples[i] = s._replace(value=s.value + value)


# --- the single-room worker's endpoint ----------------------------------------------------------


class MetricsServer(Endpoint):
    """``GET /metrics`` on ``host:port`` from ``render()`` (http_endpoint.Endpoint)."""

    def __init__(self, render: Any, host: str, port: int) -> None:
        super().__init__(lambda path: (200, render(), CONTENT_TYPE) if path == "/metrics"
                         else (404, b"not found\n", "text/plain"), host, port)

    async def start(self) -> None:
        await super().start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)


