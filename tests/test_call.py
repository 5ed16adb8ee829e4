"""The call's decisions without LiveKit, a socket or a clock: typed events in, the agent
state and actions out (call.py), the way test_protocol.py tests the protocol."""

from __future__ import annotations

import pytest

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
from call import (
    AgentState,
    Call,
    CallSettings,
    CancelTimer,
    DropReply,
    EndCall,
    ForgetRestoredBed,
    HangUp,
    HangUpRequested,
    LogTurn,
    PlaybackStarted,
    PlaybackStopped,
    PlayReply,
    RoomJoined,
    RoomLeft,
    SessionClosed,
    ShowState,
    StartSession,
    StartThinking,
    StartTimer,
    StopThinking,
    Timer,
    TimerFired,
    ToolFinished,
    ToolStarted,
    UserJoined,
    UserLeft,
)

LISTENING, THINKING, SPEAKING, INITIALIZING = (AgentState.LISTENING, AgentState.THINKING, AgentState.SPEAKING,
                                               AgentState.INITIALIZING)


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def shown(actions: list) -> list[AgentState]:
    return [a.state for a in of(actions, ShowState)]


def in_call(**settings: float) -> Call:
    """A call whose user is in the room and whose session is ready."""
    c = Call(CallSettings(**settings))
    c.handle(RoomJoined(), 0.0)
    c.handle(UserJoined("alice"), 0.0)
    c.handle(SessionReady("S1", False), 0.0)
    return c


def feed(c: Call, *events: object, now: float = 0.0) -> list:
    out: list = []
    for e in events:
        out += c.handle(e, now)  # type: ignore[arg-type]
    return out


# --- the session follows the users -------------------------------------------------------------


def test_the_first_user_starts_the_first_call_with_the_bed_picked_at_start():
    c = Call()
    assert shown(c.handle(RoomJoined(), 0.0)) == [INITIALIZING]
    assert c.handle(UserJoined("alice"), 0.0) == [StartSession(1, new_bed=False)]
    assert c.state is INITIALIZING, "not listening before the session is ready"
    assert shown(c.handle(SessionReady("S1", False), 0.1)) == [LISTENING]


def test_a_second_user_or_the_same_user_again_starts_nothing():
    c = in_call()
    assert c.handle(UserJoined("bob"), 1.0) == []
    assert c.handle(UserJoined("alice"), 2.0) == []  # a new track of the same user
    assert c.calls == 1


def test_the_last_user_leaving_starts_the_idle_timer_and_a_return_cancels_it():
    c = in_call(idle_timeout_s=30.0)
    c.handle(UserJoined("bob"), 0.0)
    assert c.handle(UserLeft("alice"), 1.0) == []  # bob is still there
    assert c.handle(UserLeft("bob"), 2.0) == [StartTimer(Timer.IDLE, 30.0)]
    assert c.handle(UserLeft("bob"), 2.5) == [], "one timer at a time"
    assert c.handle(UserJoined("bob"), 3.0) == [CancelTimer(Timer.IDLE)]
    assert c.calls == 1, "a user back within the idle timeout continues the same call"


def test_the_idle_timer_ends_the_call_only_if_nobody_came_back():
    c = in_call()
    c.handle(UserLeft("alice"), 0.0)
    assert c.handle(TimerFired(Timer.IDLE), 30.0) == [EndCall("idle")]
    c = in_call()
    c.handle(UserLeft("alice"), 0.0)
    c.handle(UserJoined("alice"), 1.0)
    assert c.handle(TimerFired(Timer.IDLE), 30.0) == [], "a timer that fired as it was cancelled does nothing"


def test_the_next_user_after_a_call_ended_starts_a_new_call_with_a_new_bed():
    c = in_call()
    c.handle(UserLeft("alice"), 0.0)
    c.handle(TimerFired(Timer.IDLE), 30.0)
    assert shown(c.handle(SessionClosed(), 31.0)) == [INITIALIZING]
    assert c.handle(UserJoined("bob"), 40.0) == [StartSession(2, new_bed=True)]


def test_no_idle_timer_without_a_session():
    c = Call()
    c.handle(RoomJoined(), 0.0)
    c.handle(UserJoined("alice"), 0.0)
    c.handle(SessionClosed(), 1.0)  # the session failed
    assert c.handle(UserLeft("alice"), 2.0) == []


def test_a_disconnect_forgets_the_users_without_starting_the_idle_timer():
    c = in_call()
    assert c.handle(RoomLeft(), 1.0) == []
    assert c.users == set()
    assert c.handle(UserJoined("alice"), 2.0) == [], "rejoined: the same call goes on"


def test_a_session_left_open_by_a_disconnect_ends_if_nobody_is_there_after_the_rejoin():
    """Bug: the users are forgotten at a disconnect without starting the idle timer, so a call
    whose user left while the agent was away kept its (billed) session open for good."""
    c = in_call(idle_timeout_s=30.0)
    c.handle(RoomLeft(), 1.0)
    assert of(c.handle(RoomJoined(), 5.0), StartTimer) == [StartTimer(Timer.IDLE, 30.0)]
    assert c.handle(TimerFired(Timer.IDLE), 35.0) == [EndCall("idle")]
    c = in_call(idle_timeout_s=30.0)
    c.handle(RoomLeft(), 1.0)
    c.handle(RoomJoined(), 5.0)
    assert c.handle(UserJoined("alice"), 5.0) == [CancelTimer(Timer.IDLE)], "the user is still there"


def test_a_restored_bed_is_forgotten_if_nobody_comes_back_within_the_idle_timeout():
    c = Call(CallSettings(idle_timeout_s=30.0))
    assert c.handle(RoomJoined(restored_bed=True), 0.0) == [StartTimer(Timer.RESTORED_BED, 30.0), ShowState(INITIALIZING)]
    assert of(c.handle(RoomJoined(restored_bed=True), 5.0), StartTimer) == [], "a rejoin does not restart it"
    assert c.handle(TimerFired(Timer.RESTORED_BED), 30.0) == [ForgetRestoredBed()]
    c = Call(CallSettings(idle_timeout_s=30.0))
    c.handle(RoomJoined(restored_bed=True), 0.0)
    c.handle(UserJoined("alice"), 10.0)
    assert c.handle(TimerFired(Timer.RESTORED_BED), 30.0) == [], "the call it belongs to came back"


# --- turns: listening, thinking, speaking -----------------------------------------------------------


def test_a_turn_thinking_then_speaking_then_listening():
    c = in_call()
    out = c.handle(SpeechStopped(), 10.0)
    assert out == [StartThinking(), ShowState(THINKING)]
    c.handle(ReplyStarted("r1"), 10.3)
    out = c.handle(ReplyAudio("r1", b"\0\0"), 10.5)
    assert out == [LogTurn(1, pytest.approx(500.0)), PlayReply("r1", b"\0\0")]
    assert c.state is THINKING, "thinking until the reply is heard, not merely received"
    assert c.handle(ReplyAudio("r1", b"\1\0"), 10.6) == [PlayReply("r1", b"\1\0")], "one latency line a turn"
    assert shown(c.handle(PlaybackStarted("r1"), 10.6)) == [SPEAKING]
    assert shown(c.handle(ReplyDone("r1", "completed"), 11.0)) == [SPEAKING], "its audio is still playing"
    assert shown(c.handle(PlaybackStopped(), 12.0)) == [LISTENING]
    assert c.turns == 1


def test_a_stall_mid_reply_is_still_speaking():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"))
    assert shown(c.handle(PlaybackStopped(), 1.0)) == [SPEAKING], "the API is late with the rest of r1"
    assert shown(c.handle(ReplyDone("r1", "completed"), 1.2)) == [LISTENING], "its audio had all been played"


def test_the_user_speaking_stops_the_thinking_cue():
    c = in_call()
    c.handle(SpeechStopped(), 1.0)
    assert c.handle(SpeechStarted(), 1.5) == [StopThinking(), ShowState(LISTENING)]
    out = c.handle(ReplyAudio("r1", b"\0\0"), 2.0)
    assert of(out, LogTurn) == [], "no turn latency once the user spoke again"


def test_barge_in_drops_the_reply():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"))
    assert c.handle(ReplyInterrupted("r1", "interrupted by the user"), 1.0) == [
        DropReply("r1", "interrupted by the user")]
    assert shown(c.handle(PlaybackStopped(), 1.01)) == [SPEAKING], "r1 is not done yet"
    assert shown(c.handle(ReplyDone("r1", "interrupted"), 1.2)) == [LISTENING]


def test_a_lost_session_abandons_the_reply_in_flight():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"), PlaybackStopped())
    assert shown(c.handle(SessionLost(), 1.0)) == [LISTENING], "nothing is playing: no reply will finish it"
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"))
    assert shown(c.handle(SessionLost(), 1.0)) == [SPEAKING], "its queued audio still plays out"
    assert shown(c.handle(PlaybackStopped(), 2.0)) == [LISTENING]


def test_the_session_closing_resets_the_turn():
    c = in_call()
    feed(c, SpeechStopped(), ReplyStarted("r1"), PlaybackStarted("r1"))
    assert shown(c.handle(SessionClosed(), 1.0)) == [INITIALIZING]
    assert (c.playing, c.current_reply, c.turn_ended_at) == (None, None, None)


def test_a_resumed_session_is_not_initializing_again():
    c = in_call()
    assert shown(c.handle(SessionLost(), 1.0)) == [LISTENING]
    assert shown(c.handle(SessionReady("S1", True), 2.0)) == [LISTENING]


# --- tools ------------------------------------------------------------------------------------------


def test_a_tool_running_is_thinking_with_the_cue():
    c = in_call()
    assert c.handle(ToolStarted("c1", "lookup_order"), 1.0) == [StartThinking(), ShowState(THINKING)]
    c.handle(ToolStarted("c2", "lookup_order"), 1.0)
    assert shown(c.handle(ToolFinished("c1"), 2.0)) == [THINKING], "c2 still runs"
    assert shown(c.handle(ToolFinished("c2"), 3.0)) == [LISTENING]


def test_end_call_is_thinking_without_a_cue():
    c = in_call()
    assert c.handle(ToolStarted("c1", "end_call"), 1.0) == [ShowState(THINKING)]


# --- hang-up ------------------------------------------------------------------------------------------


def test_hang_up_waits_for_the_tool_result_then_for_quiet():
    c = in_call(hang_up_grace_s=2.0)
    feed(c, ReplyStarted("r1"), ToolStarted("c1", "end_call"))
    assert c.handle(HangUpRequested("the agent ended the call", "c1"), 1.0) == []
    assert c.handle(ToolFinished("c1"), 1.0) == [ShowState(LISTENING)]
    assert of(c.handle(ReplyDone("r1", "completed"), 1.1), StartTimer) == [], "the result is not out yet"
    assert c.handle(ToolResultSent("c1", True), 1.1) == [StartTimer(Timer.HANG_UP_GRACE, 2.0)]
    # The agent says goodbye after the result: the grace starts again once it has been heard.
    assert c.handle(ReplyStarted("r2"), 1.5) == [CancelTimer(Timer.HANG_UP_GRACE)]
    feed(c, ReplyAudio("r2", b"\0\0"), PlaybackStarted("r2"), ReplyDone("r2", "completed"))
    assert c.handle(TimerFired(Timer.HANG_UP_GRACE), 3.1) == [], "a cancelled timer is ignored"
    assert of(c.handle(PlaybackStopped(), 4.0), StartTimer) == [StartTimer(Timer.HANG_UP_GRACE, 2.0)]
    assert c.handle(TimerFired(Timer.HANG_UP_GRACE), 6.0) == [HangUp("the agent ended the call")]
    assert c.hang_up is None


def test_hang_up_goes_on_when_the_result_is_dropped_or_the_session_closes():
    c = in_call()
    c.handle(HangUpRequested("bye", "c1"), 0.0)
    assert c.handle(ToolResultSent("c1", False), 0.1) == [StartTimer(Timer.HANG_UP_GRACE, 2.0)]
    c = in_call()
    c.handle(HangUpRequested("bye", "c1"), 0.0)
    assert of(c.handle(SessionClosed(), 0.1), StartTimer) == [StartTimer(Timer.HANG_UP_GRACE, 2.0)]


def test_reply_audio_restarts_the_hang_up_grace():
    c = in_call()
    c.handle(HangUpRequested("bye"), 0.0)
    assert c.hang_up is not None and c.hang_up.timer_running
    assert c.handle(ReplyAudio("r9", b"\0\0"), 1.0) == [
        PlayReply("r9", b"\0\0"), CancelTimer(Timer.HANG_UP_GRACE), StartTimer(Timer.HANG_UP_GRACE, 2.0)]


def test_a_second_hang_up_request_while_one_is_pending_changes_nothing():
    c = in_call()
    c.handle(HangUpRequested("first", "c1"), 0.0)
    c.handle(HangUpRequested("second", "c2"), 0.1)
    assert c.handle(ToolResultSent("c2", True), 0.2) == []
    c.handle(ToolResultSent("c1", True), 0.3)
    assert c.handle(TimerFired(Timer.HANG_UP_GRACE), 2.3) == [HangUp("first")]


# --- the seam is typed ---------------------------------------------------------------------------------


def test_anything_but_a_call_event_is_a_type_error():
    with pytest.raises(TypeError):
        Call().handle("user joined", 0.0)  # type: ignore[arg-type]
