"""Transcripts for the frontend, on both channels LiveKit's frontends read (livekit-agents
sends both): ``lk.transcription`` text streams (the Agents Playground, agent-starter-react,
components-js' ``useSessionMessages``) and LiveKit transcription packets
(``publish_transcription``: ``useVoiceAssistant().agentTranscriptions``,
``useTrackTranscription``, the custom frontends built on them). Both carry the same segment
ids, the same text and the same final flags.

User text goes out with the user's identity and microphone track (each interim update is
a new stream of the same segment, carrying the full text so far; a packet carries the full
text too); agent text goes out word by word as its audio is actually played, in one stream
per reply that is closed final (and a packet per update, with the text shown so far), and
cut where an interruption cut the audio; once it is closed, its whole text is restated in a
final stream of the same segment (see ``_restate_final``). A notice (the agent cannot answer: call.TellUser)
is an agent caption of its own. One task writes everything, in order.

The writer does not poll: it sleeps until the next word's audio is due, computed from how
much of the reply has been handed to the output and how much is still queued (which plays
out in real time), and is woken by whatever changes that: new text, new reply audio,
playback starting or stopping, a reply done or cut.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from audio_output import AudioOutput
from bridge import wait_event
from logs import one_line
from pcm import SAMPLE_RATE
from room import RoomLink

log = logging.getLogger("worker")

TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_FINAL = "lk.transcription_final"
ATTR_TRACK = "lk.transcribed_track_id"
ATTR_SEGMENT = "lk.segment_id"


def _attributes(final: bool, segment: str, track_sid: str | None) -> dict[str, str]:
    """A caption stream's attributes, as livekit-agents sends them."""
    attrs = {ATTR_FINAL: "true" if final else "false", ATTR_SEGMENT: segment}
    if track_sid:
        attrs[ATTR_TRACK] = track_sid
    return attrs


def _packet(identity: str, track_sid: str, segment: str, text: str, final: bool) -> Any:
    """The same caption as a LiveKit transcription packet (rtc.Transcription)."""
    from livekit import rtc

    return rtc.Transcription(participant_identity=identity, track_sid=track_sid, segments=[
        rtc.TranscriptionSegment(id=segment, text=text, start_time=0, end_time=0, language="", final=final)])


@dataclass
class _AgentSegment:
    """The caption of one reply: words with the sample position where their audio starts."""

    reply_id: str
    segment_id: str
    words: list[tuple[int, str]] = field(default_factory=list)
    shown: int = 0
    text: str = ""  # what has been shown
    writer: Any = None
    done: bool = False  # reply.done seen: flush once the audio has played
    cut: int | None = None  # interrupted: nothing past this sample is ever shown
    created: float = field(default_factory=time.monotonic)


class Captions:
    """See the module's docstring. The ``user``/``agent_*`` methods are called from bridge
    events and never block; ``run()`` is the writer task."""

    RETRY_S = 0.05  # words due while the room is not connected: looked at again this often
    MAX_CHARS = 4000  # a caption longer than this shows its end
    MAX_WORDS = 2000  # words held for one agent caption
    MAX_SEGMENTS = 16  # agent captions open at once; the oldest is closed first
    STALE_S = 120.0  # an agent caption open this long is closed

    def __init__(self, link: RoomLink, output: AudioOutput, agent_identity: str) -> None:
        self.link = link
        self.output = output
        self.agent_identity = agent_identity
        # User captions waiting to go out, oldest segment first. A newer text of the same
        # segment replaces a waiting one: a flood of interim updates costs one stream.
        self._pending: collections.OrderedDict[str, tuple[Any, ...]] = collections.OrderedDict()
        self._wake = asyncio.Event()
        self._agent: dict[str, _AgentSegment] = {}
        self._user_segment: dict[str, str] = {}  # item_id -> segment id (insertion ordered)
        self._turn = 0
        self._notices: collections.deque[str] = collections.deque(maxlen=4)
        self._notice_count = 0

    @property
    def open_segments(self) -> int:
        return len(self._agent)

    def wake(self) -> None:
        """Something the writer waits on changed: reply audio arrived, playback started or
        stopped."""
        self._wake.set()

    # -- called from bridge events (never block) --

    def user(self, identity: str, track_sid: str | None, item_id: str | None, text: str, final: bool) -> None:
        key = (item_id or f"turn-{self._turn}")[:128]
        segment = self._user_segment.setdefault(key, f"SG_{key}")
        while len(self._user_segment) > self.MAX_SEGMENTS:  # item ids that never got a final text
            self._user_segment.pop(next(iter(self._user_segment)))
        if final:
            self._user_segment.pop(key, None)
            self._turn += 1
        if len(text) > self.MAX_CHARS:
            text = "\u2026" + text[-self.MAX_CHARS:]
        self._pending[segment] = (identity, track_sid, segment, text, final)
        self._wake.set()

    def notice(self, text: str) -> None:
        """Show ``text`` as something the agent says, at once and final (it is not spoken)."""
        self._notices.append(text[:self.MAX_CHARS])
        self._wake.set()

    def agent_word(self, reply_id: str, text: str, position: int) -> None:
        seg = self._segment(reply_id)
        if seg.cut is None and len(seg.words) < self.MAX_WORDS:
            seg.words.append((position, text[:200]))
            self._wake.set()

    def agent_text(self, reply_id: str, text: str, received: int) -> None:
        """The full reply text. Used only if no word-level deltas came: words are then
        spread over the reply's audio in proportion to their place in the text."""
        seg = self._segment(reply_id)
        if seg.words or not text.strip():
            return
        offset = 0
        for word in text.split():
            at = text.index(word, offset)
            seg.words.append((int(received * at / max(1, len(text))), (" " if at else "") + word))
            offset = at + len(word)
        self._wake.set()

    def agent_done(self, reply_id: str, cut_at: int | None = None) -> None:
        seg = self._segment(reply_id)
        seg.done = True
        if cut_at is not None and seg.cut is None:
            seg.cut = cut_at
        self._wake.set()

    def all_done(self) -> None:
        for seg in self._agent.values():
            seg.done = True
        self._wake.set()

    def _segment(self, reply_id: str) -> _AgentSegment:
        seg = self._agent.get(reply_id)
        if seg is None:
            for old in list(self._agent.values())[:max(0, len(self._agent) - self.MAX_SEGMENTS + 1)]:
                old.done = True  # closed (with what was shown) on the next tick
                old.cut = -1  # nothing more is shown
            seg = self._agent[reply_id] = _AgentSegment(reply_id, f"SG_{reply_id[:128]}")
        return seg

    # -- the writer task --

    async def run(self) -> None:
        while True:
            await wait_event(self._wake, self._next_wake_s())
            self._wake.clear()
            try:
                while self._notices:
                    await self._publish_notice(self._notices.popleft())
                while self._pending:
                    _, args = self._pending.popitem(last=False)
                    await self._publish_user(*args)
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # captions are best effort: never take the call down
                log.warning("could not publish a caption: %s", one_line(e))

    async def _publish_user(self, identity: str, track_sid: str | None, segment: str, text: str, final: bool) -> None:
        if not self.link.connected:
            return
        lp = self.link.room.local_participant
        if track_sid:  # a packet belongs to a track
            await lp.publish_transcription(_packet(identity, track_sid, segment, text, final))
        writer = await lp.stream_text(
            topic=TOPIC_TRANSCRIPTION, sender_identity=identity, attributes=_attributes(final, segment, track_sid))
        await writer.write(text)
        await writer.aclose()

    async def _publish_notice(self, text: str) -> None:
        if not self.link.connected:
            return
        self._notice_count += 1
        segment = f"SG_notice_{self._notice_count}"
        lp = self.link.room.local_participant
        if self.link.track_sid:
            await lp.publish_transcription(_packet(self.agent_identity, self.link.track_sid, segment, text, True))
        writer = await lp.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=self.agent_identity,
                                      attributes=_attributes(True, segment, self.link.track_sid))
        await writer.write(text)
        await writer.aclose()

    async def _tick(self) -> None:
        for rid, seg in list(self._agent.items()):
            st = self.output.reply_stats(rid)
            played = st.played if st is not None else 0
            received = st.received if st is not None else 0
            limit = played if seg.cut is None else min(played, seg.cut)
            finished = seg.done and (seg.cut is not None or played >= received)
            if finished and seg.cut is None:
                limit = 1 << 62  # all audio played: show the rest of the text
            stale = time.monotonic() - seg.created > self.STALE_S
            due = [w for w in seg.words[seg.shown:] if w[0] <= limit]
            if self.link.connected and (due or (finished and seg.writer is None and seg.shown < len(seg.words))):
                await self._show(seg, due)
            if finished or stale:
                if seg.writer is not None:
                    await seg.writer.aclose(attributes=_attributes(True, seg.segment_id, self.link.track_sid))
                    if self.link.connected:
                        await self._restate_final(seg)
                del self._agent[rid]

    async def _restate_final(self, seg: _AgentSegment) -> None:
        """The reply's caption is over: its final text on both channels. The paced stream was
        closed final (in its trailer), but components-js only looks at a stream's attributes
        when text arrives, so useSessionMessages() would show it final only once some other
        caption came: the whole text once more, in a stream of the same segment (which
        replaces the text, as every caption update does) whose header says final."""
        lp = self.link.room.local_participant
        if self.link.track_sid:
            await lp.publish_transcription(_packet(self.agent_identity, self.link.track_sid, seg.segment_id,
                                                   seg.text, True))
        if seg.text:
            writer = await lp.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=self.agent_identity,
                                          attributes=_attributes(True, seg.segment_id, self.link.track_sid))
            await writer.write(seg.text)
            await writer.aclose()

    def _next_wake_s(self) -> float | None:
        """Seconds until something is due by the audio clock (None: nothing until woken)."""
        soonest: float | None = None
        now = time.monotonic()
        for seg in self._agent.values():
            st = self.output.reply_stats(seg.reply_id)
            played = st.played if st is not None else 0
            queued = (st.received - played) if st is not None else 0
            due = seg.created + self.STALE_S - now
            if seg.shown < len(seg.words):
                at = seg.words[seg.shown][0]
                if at <= (played if seg.cut is None else min(played, seg.cut)):
                    due = 0.0 if self.link.connected else self.RETRY_S
                elif queued > 0 and (seg.cut is None or at <= seg.cut):
                    # The queued audio plays out in real time: the word's start, or the end of
                    # what has arrived so far (then look again).
                    due = min(due, (min(at, played + queued) - played) / SAMPLE_RATE)
            if seg.done and seg.cut is None and queued > 0:
                due = min(due, queued / SAMPLE_RATE)  # all heard: the rest of the text, then close
            soonest = due if soonest is None else min(soonest, due)
        return None if soonest is None else max(0.0, soonest)

    async def _show(self, seg: _AgentSegment, due: list[tuple[int, str]]) -> None:
        if seg.writer is None and due:
            seg.writer = await self.link.room.local_participant.stream_text(
                topic=TOPIC_TRANSCRIPTION, sender_identity=self.agent_identity,
                attributes=_attributes(False, seg.segment_id, self.link.track_sid))
        if due:
            words = "".join(text for _, text in due)
            await seg.writer.write(words)
            seg.shown += len(due)
            seg.text = (seg.text + words)[-self.MAX_CHARS:]
            if self.link.track_sid:
                await self.link.room.local_participant.publish_transcription(
                    _packet(self.agent_identity, self.link.track_sid, seg.segment_id, seg.text, False))
