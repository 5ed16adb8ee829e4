"""Shared fixtures: the real livekit-server (one per test session, on loopback), and a
two-node cluster of it with Redis (one per test module that asks for it)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from harness import LiveKitCluster, LiveKitServer, find_redis_binary, find_server_binary


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    binary = _server_binary()  # never a skip: the README's test command builds it (scripts/test)
    if os.environ.get("CI") and not os.environ.get("VOICE_AGENT_TEST_IP"):
        pytest.fail("under CI the tests run in their own network namespace: use ./scripts/test "
                    "(it sets VOICE_AGENT_TEST_IP inside `unshare --net`)")
    server = LiveKitServer(binary, tmp_path_factory.mktemp("livekit"))
    server.start()
    yield server
    server.stop()


def _server_binary() -> str:
    binary = find_server_binary()
    if binary is None:
        pytest.fail("livekit-server not found: run ./scripts/test (it builds livekit-server v1.13.5 into "
                    ".tools/bin), or set LIVEKIT_SERVER_BIN")
    return binary


@pytest.fixture(scope="module")
def livekit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitCluster]:
    """Two livekit-server nodes sharing one Redis: ``.nodes[i]`` are LiveKitServer objects
    (their ``url`` is where a client or a serve process connects), ``.redis`` the RedisServer."""
    if find_redis_binary() is None:
        # Never a skip, as for the server: scripts/test installs it (./scripts/setup --fleet).
        pytest.fail("redis-server not found: run ./scripts/test (./scripts/setup --fleet installs Debian's "
                    "redis-server), or set REDIS_SERVER_BIN")
    cluster = LiveKitCluster(_server_binary(), tmp_path_factory.mktemp("cluster"), nodes=2)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def room_name(request: pytest.FixtureRequest) -> str:
    """A room of the test's own, so tests never hear each other."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", request.node.name)[:60]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failure, attach the log of every worker the test started (the flaky ones are
    the ones whose logs we need)."""
    from harness import WorkerProcess

    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, worker in enumerate(WorkerProcess.started):
            report.sections.append((f"worker {i} log", worker.output()[-6000:]))
    if report.when == "teardown":
        WorkerProcess.started.clear()
