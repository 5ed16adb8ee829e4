"""The call's decisions, as a pure state machine: everything that affects when the
agent is listening, thinking or speaking, when a Voice Agent session starts and ends,
when the thinking cue plays, what barge-in drops and when the agent hangs up, lives here.

Sans-I/O, like ``bridge.Protocol`` and h11: ``Call.handle(event, now)`` takes one typed
event (a user joined or left, a Voice Agent API event from bridge.py, playback started or
stopped, a tool started or finished, a timer fired, a hang-up was asked for) and the time,
and returns the actions to carry out, in order. It never awaits, reads no clock and
touches no socket: worker.py feeds it and performs its actions (the mixer, the room link,
the bridge, timers). ``Call.state`` is the agent state the frontend is shown
(``lk.agent.state``).

The states (``AgentState``): ``initializing`` while no call is open (nobody the agent could
talk to is in the room); from the moment a user is there, the call takes input and the agent
is ``listening`` (LiveKit's own agents do the same, microphone or not), even while its Voice
Agent session is still connecting: what the user says meanwhile is buffered, not lost, and a
user kept waiting on an unreachable service is told so (``TellUser``). Then ``speaking``
while a reply is being heard (or stalls mid-way), ``thinking`` from the user's end of turn
(spoken or typed) until the reply is heard, and while a tool runs; ``listening`` otherwise.
A session the service ends by itself (its 3-hour limit, an unrecoverable error) is replaced
while a user is still in the room: no second greeting, the conversation so far carried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from bridge import (
    ReplyAudio,
    ReplyDone,
    ReplyInterrupted,
    ReplyStarted,
    SessionLost,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolResultSent,
)


class AgentState(str, enum.Enum):
    INITIALIZING = "initializing"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


class Timer(str, enum.Enum):
    IDLE = "idle"  # the last user left: end the session after IDLE_TIMEOUT_S
    HANG_UP_GRACE = "hang-up grace"  # quiet this long after end_call: nothing more to say
    RESTORED_BED = "restored bed"  # a bed restored at start whose call nobody rejoins
    SERVICE_WAIT = "service wait"  # a user has been waiting this long on a session that is not ready
    RESTART = "restart"  # the service ended the session by itself: start its replacement then


class Notice(str, enum.Enum):
    """What the user is told, in the agent's captions, when the agent cannot answer."""

    SERVICE_UNREACHABLE = "service unreachable"  # no session ready for Settings.service_wait_s


# --- events in (besides bridge.py's) ----------------------------------------------------------


@dataclass(frozen=True)
class UserJoined:
    """A participant the agent talks to (a user: standard, SIP or connector, or USER_IDENTITY)
    is in the room, microphone or not (reported again after a rejoin: harmless)."""

    identity: str


@dataclass(frozen=True)
class UserLeft:
    """A user left the room."""

    identity: str


@dataclass(frozen=True)
class RoomJoined:
    """The agent is in the room (again, after a rejoin). ``restored_bed``: a bed of an earlier
    run of this room was restored at start."""

    restored_bed: bool = False


@dataclass(frozen=True)
class RoomLeft:
    """The agent is out of the room (a disconnect): every bridged microphone is gone."""


@dataclass(frozen=True)
class SessionClosed:
    """The call's Voice Agent client stopped (ended, or failed). ``by_service``: the service
    ended the session by itself (``session.ended`` that we did not ask for: its 3-hour limit,
    an unrecoverable error on its side)."""

    by_service: bool = False


@dataclass(frozen=True)
class TextTyped:
    """A user typed ``text`` in the frontend's chat (read and checked by the room link)."""

    sender: str
    text: str


@dataclass(frozen=True)
class PlaybackStarted:
    """A reply's first sample is being heard."""

    reply_id: str


@dataclass(frozen=True)
class PlaybackStopped:
    """Reply audio stopped being heard: the reply ran out (it ended, or the API is late with
    the rest), or was interrupted."""


@dataclass(frozen=True)
class ToolStarted:
    call_id: str
    name: str


@dataclass(frozen=True)
class ToolFinished:
    call_id: str


@dataclass(frozen=True)
class HangUpRequested:
    """A tool asked to end the call (``call_id``: that tool call, whose result goes out first)."""

    reason: str
    call_id: str | None = None


@dataclass(frozen=True)
class TimerFired:
    timer: Timer


Event = Union[UserJoined, UserLeft, RoomJoined, RoomLeft, SessionClosed, TextTyped, PlaybackStarted, PlaybackStopped,
              ToolStarted, ToolFinished, HangUpRequested, TimerFired, SessionReady, SessionLost, SpeechStarted,
              SpeechStopped, ReplyStarted, ReplyAudio, ReplyInterrupted, ReplyDone, ToolResultSent]


# --- actions out ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShowState:
    """Show ``state`` as the agent state (if it is not what the room shows already)."""

    state: AgentState


@dataclass(frozen=True)
class StartSession:
    """Open a Voice Agent session (with the greeting): call number ``call``. ``new_bed``: pick
    this call's ambient (the first call's was picked at start). ``replacement``: the same call
    goes on after the service ended its session: no greeting, the conversation so far carried
    (as after a resume that failed)."""

    call: int
    new_bed: bool
    replacement: bool = False


@dataclass(frozen=True)
class SendText:
    """Send typed text to the session as the user's turn. ``interrupt``: the reply the service
    is sending, cut for it (its late audio and words are dropped)."""

    text: str
    interrupt: str | None = None


@dataclass(frozen=True)
class TellUser:
    """Tell the users in the room (the agent's captions) what keeps the agent from answering."""

    notice: Notice


@dataclass(frozen=True)
class EndCall:
    """End the session (session.end) and the call: its runtime bed goes with it."""

    reason: str


@dataclass(frozen=True)
class StartThinking:
    """Start a thinking cue (a new pick from THINKING_SOUND)."""


@dataclass(frozen=True)
class StopThinking:
    pass


@dataclass(frozen=True)
class PlayReply:
    reply_id: str
    pcm: bytes


@dataclass(frozen=True)
class DropReply:
    """Barge-in: drop every queued sample of the reply, and cut its caption where it was heard."""

    reply_id: str
    reason: str


@dataclass(frozen=True)
class LogTurn:
    """The turn's first reply audio came ``latency_ms`` after the user's end of turn."""

    turn: int
    latency_ms: float


@dataclass(frozen=True)
class StartTimer:
    timer: Timer
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True)
class HangUp:
    """Nothing more is being said: wait until every reply sample has been heard, then end
    the call for everyone (END_CALL_ACTION)."""

    reason: str


@dataclass(frozen=True)
class ForgetRestoredBed:
    """Nobody came back to the call a restored bed belonged to: that call is over."""


Action = Union[ShowState, StartSession, SendText, TellUser, EndCall, StartThinking, StopThinking, PlayReply,
               DropReply, LogTurn, StartTimer, CancelTimer, HangUp, ForgetRestoredBed]

# Events after which the agent state is (re)shown: what moved the state before this module
# existed. A reply's audio is not one (thinking turns into speaking once it is heard). Any
# other event is followed by ShowState when it changed the state.
_SHOW_STATE_AFTER = (RoomJoined, SessionClosed, PlaybackStarted, PlaybackStopped, ToolStarted, ToolFinished,
                     SessionReady, SessionLost, SpeechStarted, SpeechStopped, ReplyDone)


@dataclass
class CallSettings:
    idle_timeout_s: float = 30.0
    hang_up_grace_s: float = 2.0  # end_call: quiet this long (no reply in flight or heard) first
    end_call_tool: str = "end_call"  # no thinking cue while it runs
    # A user waiting this long on a session that is not ready (connecting, reconnecting, being
    # replaced) is told the service cannot be reached. It normally answers in well under 1 s.
    service_wait_s: float = 5.0
    # Typed text while the agent speaks interrupts it, as the user's voice does (off when the
    # user may not interrupt: INTERRUPT_RESPONSE=0).
    chat_interrupts: bool = True
    # A session the service ended by itself is replaced at once if it lasted this long; one
    # that ends sooner (the service ends every session at once) is replaced after a delay
    # doubling from restart_delay_s up to restart_max_delay_s.
    stable_session_s: float = 60.0
    restart_delay_s: float = 2.0
    restart_max_delay_s: float = 30.0


@dataclass
class _HangUp:
    reason: str
    awaiting_result: str | None  # the tool call whose result goes out first
    timer_running: bool = False


@dataclass
class Call:
    """One room's calls, one after another: the users in it, the session, the replies being
    heard, the tools running, the hang-up. See the module's docstring."""

    settings: CallSettings = field(default_factory=CallSettings)
    users: set[str] = field(default_factory=set)
    calls: int = 0  # calls started so far
    turns: int = 0  # turns answered so far (first reply audio after an end of turn)
    session_open: bool = False  # the call is open: a Voice Agent client runs (or its replacement is due)
    session_ready_once: bool = False  # ... and its session has been ready at least once
    session_ready: bool = False  # ... and is ready now (not connecting, not reconnecting)
    ready_at: float | None = None  # when the current session got ready
    waiting_on_service: bool = False  # the SERVICE_WAIT timer runs
    told_unreachable: bool = False  # the users were told, in this outage
    restart_pending: bool = False  # the RESTART timer runs
    quick_restarts: int = 0  # replacements in a row of sessions that did not last
    current_reply: str | None = None  # the reply the service is sending (started, not done)
    playing: str | None = None  # the reply being spoken (audible, or stalled mid-way)
    audible: bool = False  # reply audio is being heard right now
    turn_ended_at: float | None = None  # the user's end of turn, until the reply's first audio
    thinking_since_turn: bool = False  # from the user's end of turn until the reply is heard
    tools: set[str] = field(default_factory=set)  # call ids of the tools running
    idle_timer: bool = False
    hang_up: _HangUp | None = None
    restored_bed_pending: bool = False

    @property
    def state(self) -> AgentState:
        if not self.session_open:
            return AgentState.INITIALIZING
        if self.playing is not None:
            return AgentState.SPEAKING
        if self.thinking_since_turn or self.tools:
            return AgentState.THINKING
        return AgentState.LISTENING

    def handle(self, event: Event, now: float) -> list[Action]:
        before = self.state
        out = self._dispatch(event, now)
        if self.hang_up is not None:
            out += self._hang_up_step(event)
        if isinstance(event, _SHOW_STATE_AFTER) or self.state is not before:
            out.append(ShowState(self.state))
        return out

    # Over 60 lines on purpose: one case per event, so that every transition of the call is
    # read in one place (h11's _state.py does the same); the longer cases are methods below.
    def _dispatch(self, event: Event, now: float) -> list[Action]:  # noqa: C901 - one case per event
        match event:
            case UserJoined(identity):
                return self._user_joined(identity)
            case UserLeft(identity):
                self.users.discard(identity)
                return self._maybe_start_idle_timer()
            case RoomJoined(restored_bed):
                out: list[Action] = []
                if restored_bed and not self.restored_bed_pending and self.calls == 0:
                    self.restored_bed_pending = True
                    out.append(StartTimer(Timer.RESTORED_BED, self.settings.idle_timeout_s))
                # Back after a disconnect with the session open: if nobody is found in the room
                # (the users are reported right after this), the call ends after the timeout.
                return out + self._maybe_start_idle_timer()
            case RoomLeft():
                self.users.clear()  # the idle timer waits for a departure seen in the room
                return []
            case SessionReady():
                self.session_ready_once = self.session_ready = True
                self.ready_at = now
                self.told_unreachable = False
                return self._stop_waiting_on_service()
            case SessionClosed(by_service):
                return self._session_closed(by_service, now)
            case SessionLost():
                # The reply in flight is abandoned: the state follows the audio still queued,
                # not a reply that will never be "done".
                self.current_reply = None
                self.session_ready = False
                if not self.audible:
                    self.playing = None
                return self._wait_on_service()
            case TextTyped(_, text):
                return self._text_typed(text, now)
            case SpeechStarted():
                self.turn_ended_at = None
                self.thinking_since_turn = False
                return [StopThinking()]
            case SpeechStopped():
                self.turn_ended_at = now
                self.thinking_since_turn = True
                return [StartThinking()]
            case ReplyStarted(reply_id):
                self.current_reply = reply_id
                return []
            case ReplyAudio(reply_id, pcm):
                return self._reply_audio(reply_id, pcm, now)
            case ReplyInterrupted(reply_id, reason):
                return [DropReply(reply_id, reason)]
            case ReplyDone(reply_id):
                if self.current_reply == reply_id:
                    self.current_reply = None
                if not self.audible and self.playing == reply_id:
                    self.playing = None  # its audio had already finished playing
                return []
            case PlaybackStarted(reply_id):
                self.playing, self.audible = reply_id, True
                self.turn_ended_at = None
                self.thinking_since_turn = False
                return []
            case PlaybackStopped():
                self.audible = False
                if self.current_reply is None or self.current_reply != self.playing:
                    self.playing = None  # the reply is over; else a stall mid-reply: still speaking
                return []
            case ToolStarted(call_id, name):
                self.tools.add(call_id)
                return [] if name == self.settings.end_call_tool else [StartThinking()]
            case ToolFinished(call_id):
                self.tools.discard(call_id)
                return []
            case HangUpRequested(reason, call_id):
                if self.hang_up is None:
                    self.hang_up = _HangUp(reason, call_id)
                return []
            case TimerFired(timer):
                return self._timer_fired(timer)
            case ToolResultSent():
                return []
        raise TypeError(f"not a call event: {event!r}")

    # -- users and the session --

    def _user_joined(self, identity: str) -> list[Action]:
        self.users.add(identity)
        out: list[Action] = []
        if self.idle_timer:
            self.idle_timer = False
            out.append(CancelTimer(Timer.IDLE))
        if self.session_open:
            return out
        self.calls += 1
        self.session_open, self.session_ready_once, self.session_ready = True, False, False
        self.quick_restarts = 0
        return out + [StartSession(self.calls, new_bed=self.calls > 1)] + self._wait_on_service()

    def _maybe_start_idle_timer(self) -> list[Action]:
        if self.users or self.idle_timer or not self.session_open:
            return []
        self.idle_timer = True
        return [StartTimer(Timer.IDLE, self.settings.idle_timeout_s)]

    def _wait_on_service(self) -> list[Action]:
        """A user is waiting on a session that is not ready: if that lasts, they are told."""
        if self.waiting_on_service:
            return []
        self.waiting_on_service = True
        return [StartTimer(Timer.SERVICE_WAIT, self.settings.service_wait_s)]

    def _stop_waiting_on_service(self) -> list[Action]:
        if not self.waiting_on_service:
            return []
        self.waiting_on_service = False
        return [CancelTimer(Timer.SERVICE_WAIT)]

    def _session_closed(self, by_service: bool, now: float) -> list[Action]:
        lasted = now - self.ready_at if self.session_ready and self.ready_at is not None else 0.0
        self.session_ready = False
        self.ready_at = None
        self.current_reply = self.playing = self.turn_ended_at = None
        self.thinking_since_turn = False
        if by_service and self.session_open and self.users and self.hang_up is None:
            # The service ended the session by itself while someone is still here: the call
            # goes on in a replacement session. One that did not last is replaced ever later.
            if lasted >= self.settings.stable_session_s:
                self.quick_restarts = 0
            delay = 0.0 if self.quick_restarts == 0 else min(
                self.settings.restart_max_delay_s, self.settings.restart_delay_s * 2 ** (self.quick_restarts - 1))
            self.quick_restarts += 1
            out = self._wait_on_service()
            if delay == 0.0:
                return [StartSession(self.calls, new_bed=False, replacement=True)] + out
            self.restart_pending = True
            return [StartTimer(Timer.RESTART, delay)] + out
        self.session_open = self.session_ready_once = False
        out = self._stop_waiting_on_service()
        if self.restart_pending:
            self.restart_pending = False
            out.append(CancelTimer(Timer.RESTART))
        return out

    def _timer_fired(self, timer: Timer) -> list[Action]:
        if timer is Timer.IDLE:
            self.idle_timer = False
            if self.users:
                return []
            if self.restart_pending:  # no session to end: the call ends here
                self.restart_pending = False
                self.session_open = self.session_ready_once = False
                return [CancelTimer(Timer.RESTART), *self._stop_waiting_on_service(), EndCall("idle")]
            return [EndCall("idle")]
        if timer is Timer.SERVICE_WAIT:
            self.waiting_on_service = False
            if self.session_open and not self.session_ready and self.users and not self.told_unreachable:
                self.told_unreachable = True
                return [TellUser(Notice.SERVICE_UNREACHABLE)]
            return []
        if timer is Timer.RESTART:
            if not self.restart_pending:
                return []
            self.restart_pending = False
            return [StartSession(self.calls, new_bed=False, replacement=True)]
        if timer is Timer.RESTORED_BED:
            self.restored_bed_pending = False
            return [ForgetRestoredBed()] if self.calls == 0 else []
        if timer is Timer.HANG_UP_GRACE and self.hang_up is not None and self.hang_up.timer_running:
            reason, self.hang_up = self.hang_up.reason, None
            return [HangUp(reason)]
        return []

    # -- typed text: the user's turn, and an interruption of what the agent is saying --

    def _text_typed(self, text: str, now: float) -> list[Action]:
        if not self.session_open or self.restart_pending:
            # No session to take it (the worker says the text is dropped): no turn to think about.
            return [SendText(text, None)]
        out: list[Action] = []
        interrupt = None
        if self.settings.chat_interrupts:
            # As barge-in: what is being said stops at once, the rest of the reply is dropped.
            for reply_id in dict.fromkeys(r for r in (self.current_reply, self.playing) if r is not None):
                out.append(DropReply(reply_id, "typed text"))
            interrupt, self.current_reply = self.current_reply, None
            if not self.audible:
                self.playing = None  # stalled mid-reply: nothing more of it will be heard
        out.append(SendText(text, interrupt))
        # Typed, the turn is over at once: thinking (with the cue) until the answer is heard.
        self.turn_ended_at = now
        self.thinking_since_turn = True
        out.append(StartThinking())
        return out

    # -- replies --

    def _reply_audio(self, reply_id: str, pcm: bytes, now: float) -> list[Action]:
        out: list[Action] = []
        if self.turn_ended_at is not None:
            self.turns += 1
            out.append(LogTurn(self.turns, (now - self.turn_ended_at) * 1000))
            self.turn_ended_at = None
        out.append(PlayReply(reply_id, pcm))
        return out

    # -- hang-up: after the tool's result has gone out, once nothing has been said for a while --

    @property
    def _quiet(self) -> bool:
        return self.current_reply is None and self.playing is None

    def _hang_up_step(self, event: Event) -> list[Action]:
        h = self.hang_up
        assert h is not None
        if h.awaiting_result is not None:
            if not (isinstance(event, ToolResultSent) and event.call_id == h.awaiting_result) \
                    and not isinstance(event, SessionClosed):
                return []
            h.awaiting_result = None
        restart = isinstance(event, ReplyAudio)  # more reply audio: the grace starts again
        if h.timer_running and (restart or not self._quiet):
            h.timer_running = False
            out: list[Action] = [CancelTimer(Timer.HANG_UP_GRACE)]
        else:
            out = []
        if not h.timer_running and self._quiet:
            h.timer_running = True
            out.append(StartTimer(Timer.HANG_UP_GRACE, self.settings.hang_up_grace_s))
        return out
