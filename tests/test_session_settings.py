"""The Voice Agent session settings: each variable reaches the first session.update (and the
stand-in, faithful to the service, accepts it), bad values are one line and exit 2, AGENT_ID
sends its id alone, SESSION_EXTRA is merged and never logged, and the promised Python versions
are the same everywhere."""

from __future__ import annotations

import logging
import re

import pytest

import bridge
import config
import worker
from harness import REPO
from standin import VOICES, validate_update
from test_config import REQUIRED, run_worker

TOOLS = [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}]


def first_update(env: dict[str, str]) -> dict:
    cfg = config.load_config({**REQUIRED, **env})
    message = config.session_settings(cfg, TOOLS).update_payload(with_greeting=True)
    assert message["type"] == "session.update"
    return message["session"]


def test_every_session_setting_round_trips_into_the_first_update():
    session = first_update({
        "VOICE": VOICES[0], "VOICE_VOLUME": "35", "KEYTERMS": "LiveKit, AssemblyAI", "TURN_PROFILE": "standard",
        "INTERRUPTION_DELAY_MS": "250", "VAD_THRESHOLD": "0.4", "TRANSCRIPTION_MODE": "min_latency",
        "TRANSCRIPTION_PROMPT": "Order numbers look like A1001.", "LANGUAGE_CODES": "en, es,pt-BR,en",
        "TOOL_TIMEOUT_S": "30", "TOOL_EXECUTION_MODE": "hold",
        "SESSION_EXTRA": '{"input": {"voice_focus": "far-field", "continuous_partials": true}}',
    })
    assert session["output"] == {"format": {"encoding": "audio/pcm"}, "voice": VOICES[0], "volume": 35.0}
    assert session["input"] == {
        "format": {"encoding": "audio/pcm"}, "keyterms": ["LiveKit", "AssemblyAI"],
        "turn_detection": {"min_silence": 600, "max_silence": 1500, "vad_threshold": 0.4, "interruption_delay": 250},
        "transcription_mode": "min_latency", "transcription_prompt": "Order numbers look like A1001.",
        "language_codes": ["en", "es", "pt-BR"], "voice_focus": "far-field", "continuous_partials": True}
    assert session["tools"] == [{**TOOLS[0], "timeout_seconds": 35, "execution_mode": "hold"}]
    validate_update(session, {}, ready=False, voices=VOICES, known_agents={})  # what the service accepts


def test_session_extra_passes_fields_this_version_does_not_know():
    session = first_update({"TURN_PROFILE": "fast",
                            "SESSION_EXTRA": '{"input": {"turn_detection": {"new_knob": 3}}, "later": [1], '
                                             '"output": {"speed": 1.1}}'})
    assert session["input"]["turn_detection"] == {"new_knob": 3, "min_silence": 300}
    assert session["later"] == [1] and session["output"]["speed"] == 1.1
    assert session["output"]["format"] == {"encoding": "audio/pcm"}, "merged beside ours, not instead"


def test_defaults_add_nothing_but_the_tool_timeout():
    session = first_update({})
    assert session["input"] == {"format": {"encoding": "audio/pcm"}}
    assert session["output"] == {"format": {"encoding": "audio/pcm"}}
    assert session["tools"] == [{**TOOLS[0], "timeout_seconds": 25}], "TOOL_TIMEOUT_S 20 + 5: ours answers first"


def test_a_stored_agent_sends_only_its_id_and_the_rest_is_reported_as_ignored(caplog):
    cfg = config.load_config({**REQUIRED, "AGENT_ID": "agent_123", "VOICE": "james", "GREETING": "Hi",
                              "TRANSCRIPTION_MODE": "balanced", "KEYTERMS": "x"})
    settings = config.session_settings(cfg, TOOLS)
    assert settings.update_payload(with_greeting=True) == {"type": "session.update",
                                                           "session": {"agent_id": "agent_123"}}
    assert config.ignored_by_agent(cfg) == ["GREETING", "VOICE", "KEYTERMS", "TRANSCRIPTION_MODE"]
    caplog.set_level(logging.INFO, logger="worker")
    config.log_session_config(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == "AGENT_ID is set, so these are ignored: GREETING, VOICE, KEYTERMS, TRANSCRIPTION_MODE"


def test_session_extra_is_logged_by_field_never_by_value(caplog):
    token = "sk-live-do-not-log-7f3a9c"
    cfg = config.load_config({**REQUIRED, "SESSION_EXTRA": '{"webhook": {"token": "%s"}, "input": '
                                                           '{"voice_focus": "near-field"}}' % token})
    caplog.set_level(logging.INFO, logger="worker")
    config.log_session_config(cfg)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "webhook.token" in line and "input.voice_focus" in line and token not in line
    assert token in cfg.secrets, "and a log line that happened to contain it would be redacted"


@pytest.mark.parametrize("env, message", [
    ({"VOICE_VOLUME": "101"}, "VOICE_VOLUME must be between 0 and 100"),
    ({"INTERRUPTION_DELAY_MS": "1001"}, "INTERRUPTION_DELAY_MS must be between 0 and 1000"),
    ({"INTERRUPTION_DELAY_MS": "-5"}, "INTERRUPTION_DELAY_MS must be between 0 and 1000"),
    ({"TRANSCRIPTION_MODE": "fast"}, "TRANSCRIPTION_MODE must be one of min_latency, balanced, max_accuracy"),
    ({"TRANSCRIPTION_PROMPT": "x" * 1751}, "TRANSCRIPTION_PROMPT must be at most 1750 characters"),
    ({"LANGUAGE_CODES": "english"}, "LANGUAGE_CODES must be comma-separated language codes"),
    ({"TOOL_TIMEOUT_S": "296"}, "TOOL_TIMEOUT_S must be between 0.1 and 295"),
    ({"TOOL_EXECUTION_MODE": "async"}, "TOOL_EXECUTION_MODE must be one of interactive, hold"),
    ({"AGENT_ID": "my agent"}, "AGENT_ID must be 1-128 characters without spaces"),
    ({"SESSION_EXTRA": "[1, 2]"}, "SESSION_EXTRA must be a JSON object ({...}), got a JSON list"),
    ({"SESSION_EXTRA": '{"input": {"voice_focus": '}, "SESSION_EXTRA must be a JSON object"),
    ({"SESSION_EXTRA": '{"input": 5}'}, "SESSION_EXTRA input must be a JSON object"),
    ({"SESSION_EXTRA": '{"output": {"voice": "james"}}'}, "SESSION_EXTRA sets output.voice, which has a setting of "
                                                           "its own: use VOICE"),
    ({"SESSION_EXTRA": '{"input": {"turn_detection": {"min_silence": 9}}}'}, "use MIN_SILENCE_MS"),
    ({"SESSION_EXTRA": '{"greeting": "hi"}'}, "use GREETING"),
    ({"SESSION_EXTRA": '{"input": {"format": {"encoding": "audio/pcmu"}}}'}, "the bridge streams 24 kHz PCM"),
])
def test_bad_session_settings_are_one_line_exit_2(env, message):
    r = run_worker({**REQUIRED, **env})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], f"more than one line: {r.stderr!r}"
    assert message in r.stderr and "Traceback" not in r.stderr


def test_a_session_extra_error_never_echoes_the_value():
    secret = "sk-live-secret-4411"
    r = run_worker({**REQUIRED, "SESSION_EXTRA": '{"token": "%s"' % secret})
    assert r.returncode == 2 and "SESSION_EXTRA" in r.stderr and secret not in r.stderr


def test_every_promised_python_is_said_and_checked_the_same_everywhere():
    """README, scripts/setup, scripts/test-pythons and `check` (worker.MIN_PYTHON) agree."""
    minimum = ".".join(map(str, worker.MIN_PYTHON))
    readme = (REPO / "README.md").read_text()
    setup = (REPO / "scripts" / "setup").read_text()
    pythons = (REPO / "scripts" / "test-pythons").read_text()
    promised = re.search(r"^PROMISED=\(([^)]*)\)", pythons, re.M).group(1).split()
    assert promised[0] == minimum and promised == sorted(promised, key=lambda v: tuple(map(int, v.split("."))))
    assert f"Python ≥ {minimum} (tested with {', '.join(promised[:-1])} and {promised[-1]})" in readme
    assert "3.10" not in readme
    assert f"sys.version_info >= ({minimum.replace('.', ', ')})" in setup and f"Python >= {minimum}" in setup
    assert bridge.wait_event is not None  # bridge imports under every promised version (asyncio.timeout)
