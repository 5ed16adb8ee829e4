"""The caption writer wakes when a word's audio is due, computed from the audio clock, and
otherwise waits to be woken: no polling (captions.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from captions import Captions
from mixer import ReplyStats

RATE = 24000


@dataclass
class FakeLink:
    connected: bool = True
    room: object = None
    track_sid: str | None = "TR_agent"


class FakeOutput:
    def __init__(self) -> None:
        self.stats: dict[str, ReplyStats] = {}

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        return self.stats.get(reply_id)


def captions() -> tuple[Captions, FakeOutput, FakeLink]:
    out, link = FakeOutput(), FakeLink()
    return Captions(link, out, "voice-agent"), out, link  # type: ignore[arg-type]


def test_nothing_open_waits_to_be_woken():
    c, _, _ = captions()
    assert c._next_wake_s() is None


def test_a_word_already_played_is_due_now_and_the_next_when_its_audio_plays():
    c, out, _ = captions()
    c.agent_word("r1", "Hello", 0)
    c.agent_word("r1", " there", RATE // 2)
    out.stats["r1"] = ReplyStats("r1", received=RATE, played=RATE // 10)
    assert c._next_wake_s() == 0.0
    c._agent["r1"].shown = 1  # what the writer's tick does
    assert c._next_wake_s() == pytest.approx(0.4), "0.5 s into the reply, 0.1 s played"


def test_a_word_beyond_the_audio_received_is_looked_at_when_that_audio_has_played():
    c, out, _ = captions()
    c.agent_word("r1", "late", 2 * RATE)
    out.stats["r1"] = ReplyStats("r1", received=RATE // 2, played=RATE // 4)
    assert c._next_wake_s() == pytest.approx(0.25)


def test_a_stalled_reply_waits_for_its_audio():
    c, out, _ = captions()
    c.agent_word("r1", "word", RATE)
    out.stats["r1"] = ReplyStats("r1", received=RATE // 2, played=RATE // 2)
    due = c._next_wake_s()
    assert due is not None and due > 60, "only the staleness bound: no audio is queued"


def test_a_done_reply_closes_when_its_audio_has_played_and_a_cut_one_at_once():
    c, out, _ = captions()
    c.agent_word("r1", "all", 0)
    c._agent["r1"].shown = 1
    c.agent_done("r1")
    out.stats["r1"] = ReplyStats("r1", received=RATE, played=RATE // 2)
    assert c._next_wake_s() == pytest.approx(0.5)
    c.agent_word("r2", "cut", RATE)
    c.agent_done("r2", cut_at=RATE // 4)
    out.stats["r2"] = ReplyStats("r2", received=RATE, played=RATE // 4)
    assert c._next_wake_s() == pytest.approx(0.5), "r2's word is past the cut: never due"


def test_words_due_while_the_room_is_away_are_looked_at_again_soon():
    c, out, link = captions()
    link.connected = False
    c.agent_word("r1", "Hello", 0)
    assert c._next_wake_s() == Captions.RETRY_S


def test_new_text_and_audio_wake_the_writer():
    c, _, _ = captions()
    c._wake.clear()
    c.agent_word("r1", "Hi", 0)
    assert c._wake.is_set()
    c._wake.clear()
    c.wake()
    assert c._wake.is_set()
