"""Shared fixtures: the real livekit-server (one per test session, on loopback)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from harness import LiveKitServer, find_server_binary


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    binary = find_server_binary()
    if binary is None:
        # Never a skip: the README's test command builds it (scripts/test).
        pytest.fail("livekit-server not found: run ./scripts/test (it builds livekit-server v1.13.5 into "
                    ".tools/bin), or set LIVEKIT_SERVER_BIN")
    if os.environ.get("CI") and not os.environ.get("VOICE_AGENT_TEST_IP"):
        pytest.fail("under CI the tests run in their own network namespace: use ./scripts/test "
                    "(it sets VOICE_AGENT_TEST_IP inside `unshare --net`)")
    server = LiveKitServer(binary, tmp_path_factory.mktemp("livekit"))
    server.start()
    yield server
    server.stop()


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
