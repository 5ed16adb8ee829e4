"""Debian's real ``prometheus`` server for tests: started on a loopback port, scraping the
targets given every second, its data in a temporary directory; asked through its HTTP API
(``GET /api/v1/query``). ``./scripts/setup --metrics`` installs it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from harness import free_port

BINARY = "prometheus"


def find_prometheus() -> str | None:
    return shutil.which(BINARY) or (BINARY if Path("/usr/bin/prometheus").exists() else None)


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], scrape_interval_s: float = 1.0) -> None:
        self.workdir = workdir
        self.targets = targets
        self.interval = scrape_interval_s
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> "Prometheus":
        binary = find_prometheus()
        assert binary, "Debian's prometheus is not installed: run ./scripts/setup --metrics"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        interval = f"{int(self.interval * 1000)}ms"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "voice-agent", "scrape_interval": interval, "scrape_timeout": interval,
                                "static_configs": [{"targets": self.targets}]}],
        }))
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready within {timeout:.0f} s:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body.get("status") == "success", f"prometheus refused the query {expr!r}: {body}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an expression that yields one series; None if it yields none."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} yields {len(result)} series, not one"
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        with urllib.request.urlopen(self.url + "/api/v1/targets", timeout=5) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


def finite(result: list[dict]) -> bool:
    """A query result with at least one series, every value a number (not NaN)."""
    return bool(result) and all(not math.isnan(float(s["value"][1])) for s in result)
