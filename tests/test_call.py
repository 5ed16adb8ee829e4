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
    Notice,
    PlaybackStarted,
    PlaybackStopped,
    PlayReply,
    RoomJoined,
    RoomLeft,
    SendText,
    SessionClosed,
    ShowState,
    StartSession,
    StartThinking,
    StartTimer,
    StopThinking,
    TellUser,
    TextTyped,
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
    assert c.handle(UserJoined("alice"), 0.0) == [
        StartSession(1, new_bed=False), StartTimer(Timer.SERVICE_WAIT, 5.0), ShowState(LISTENING)]
    assert c.state is LISTENING, "issue 16: listening as soon as the call takes input, session ready or not"
    assert c.handle(SessionReady("S1", False), 0.1) == [CancelTimer(Timer.SERVICE_WAIT), ShowState(LISTENING)]


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
    assert c.handle(UserJoined("bob"), 40.0) == [
        StartSession(2, new_bed=True), StartTimer(Timer.SERVICE_WAIT, 5.0), ShowState(LISTENING)]


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


# --- issue 16: listening at once, a service that is slow, gone, or ends the session itself ---------


def test_a_user_without_a_microphone_is_a_user_and_the_agent_listens_before_the_session_is_ready():
    """UserJoined is presence (the room link reports participants, microphone or not): the call
    opens, the session starts and the frontend sees listening (useAgent fails the session if it
    does not see listening/thinking/speaking within 20 s)."""
    c = Call()
    c.handle(RoomJoined(), 0.0)
    out = c.handle(UserJoined("texter"), 0.0)
    assert of(out, StartSession) == [StartSession(1, new_bed=False)]
    assert shown(out) == [LISTENING] and not c.session_ready
    assert c.handle(SessionReady("S1", False), 3.0) == [CancelTimer(Timer.SERVICE_WAIT), ShowState(LISTENING)]


def test_a_user_kept_waiting_on_the_service_is_told_once():
    c = Call(CallSettings(service_wait_s=5.0))
    c.handle(RoomJoined(), 0.0)
    c.handle(UserJoined("alice"), 0.0)
    assert c.handle(TimerFired(Timer.SERVICE_WAIT), 5.0) == [TellUser(Notice.SERVICE_UNREACHABLE)]
    assert c.state is LISTENING, "still listening: what the user says is buffered"
    assert c.handle(TimerFired(Timer.SERVICE_WAIT), 10.0) == [], "once per outage"
    c.handle(SessionReady("S1", False), 12.0)
    # The next outage (a dropped socket that does not come back) is told again.
    assert of(c.handle(SessionLost(), 20.0), StartTimer) == [StartTimer(Timer.SERVICE_WAIT, 5.0)]
    assert c.handle(TimerFired(Timer.SERVICE_WAIT), 25.0) == [TellUser(Notice.SERVICE_UNREACHABLE)]


def test_nobody_is_told_when_the_session_got_ready_in_time_or_nobody_is_there():
    c = in_call()
    assert c.handle(TimerFired(Timer.SERVICE_WAIT), 5.0) == [], "a timer that fired as it was cancelled"
    c = Call()
    c.handle(UserJoined("alice"), 0.0)
    c.handle(UserLeft("alice"), 1.0)
    assert c.handle(TimerFired(Timer.SERVICE_WAIT), 5.0) == []
    c = in_call()
    c.handle(SessionLost(), 1.0)
    assert c.handle(SessionReady("S1", True), 1.5) == [CancelTimer(Timer.SERVICE_WAIT), ShowState(LISTENING)]


def test_a_session_the_service_ends_by_itself_is_replaced_while_a_user_is_there():
    c = in_call()
    c.handle(SessionReady("S1", False), 10.0)
    out = c.handle(SessionClosed(by_service=True), 10_810.0)  # the 3-hour limit
    assert out == [StartSession(1, new_bed=False, replacement=True), StartTimer(Timer.SERVICE_WAIT, 5.0),
                   ShowState(LISTENING)]
    assert c.state is LISTENING and c.calls == 1, "the same call goes on: no new bed, no greeting"
    assert c.handle(SessionReady("S2", False), 10_811.0) == [CancelTimer(Timer.SERVICE_WAIT), ShowState(LISTENING)]


def test_a_session_ended_by_us_or_by_the_service_with_nobody_left_is_not_replaced():
    c = in_call()
    assert of(c.handle(SessionClosed(by_service=False), 1.0), StartSession) == [], "we ended it (idle, shutdown)"
    assert c.state is INITIALIZING
    c = in_call()
    c.handle(UserLeft("alice"), 1.0)
    assert of(c.handle(SessionClosed(by_service=True), 2.0), StartSession) == []
    assert c.state is INITIALIZING
    c = in_call()
    c.handle(HangUpRequested("bye"), 1.0)
    assert of(c.handle(SessionClosed(by_service=True), 2.0), StartSession) == [], "the agent is hanging up"


def test_a_service_that_ends_every_session_at_once_is_retried_ever_later():
    c = in_call(restart_delay_s=2.0, restart_max_delay_s=30.0, stable_session_s=60.0)
    assert of(c.handle(SessionClosed(by_service=True), 1.0), StartSession) == [
        StartSession(1, new_bed=False, replacement=True)], "the first replacement is at once"
    delays = []
    for i in range(6):
        c.handle(SessionReady(f"S{i}", False), 2.0)
        out = c.handle(SessionClosed(by_service=True), 3.0)
        assert of(out, StartSession) == []
        (timer,) = [a for a in out if isinstance(a, StartTimer) and a.timer is Timer.RESTART]
        delays.append(timer.seconds)
        assert c.state is LISTENING, "the call is still open"
        assert c.handle(TimerFired(Timer.RESTART), 3.0 + timer.seconds) == [
            StartSession(1, new_bed=False, replacement=True)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    c.handle(SessionReady("S9", False), 100.0)
    out = c.handle(SessionClosed(by_service=True), 200.0)
    assert of(out, StartSession) == [StartSession(1, new_bed=False, replacement=True)], "one that lasted: at once"


def test_everyone_leaving_while_a_replacement_is_due_ends_the_call():
    c = in_call()
    c.handle(SessionClosed(by_service=True), 1.0)
    c.handle(SessionReady("S2", False), 1.5)
    c.handle(SessionClosed(by_service=True), 2.0)  # quick: a replacement in 2 s
    assert c.restart_pending
    assert c.handle(UserLeft("alice"), 2.5) == [StartTimer(Timer.IDLE, 30.0)]
    out = c.handle(TimerFired(Timer.IDLE), 32.5)
    assert out == [CancelTimer(Timer.RESTART), CancelTimer(Timer.SERVICE_WAIT), EndCall("idle"),
                   ShowState(INITIALIZING)]
    assert c.handle(TimerFired(Timer.RESTART), 33.0) == []
    assert of(c.handle(UserJoined("bob"), 40.0), StartSession) == [StartSession(2, new_bed=True)]


# --- issue 16: typed text ----------------------------------------------------------------------------


def test_typed_text_while_listening_is_the_users_turn():
    c = in_call()
    out = c.handle(TextTyped("alice", "hello"), 1.0)
    assert out == [SendText("hello", None), StartThinking(), ShowState(THINKING)]
    out = c.handle(ReplyAudio("r1", b"\0\0"), 1.8)
    assert of(out, LogTurn) == [LogTurn(1, pytest.approx(800.0))], "its latency is a turn's latency"


def test_typed_text_with_no_session_to_take_it_is_not_a_turn():
    c = Call(CallSettings())
    assert c.handle(TextTyped("alice", "anyone?"), 0.5) == [SendText("anyone?", None)]
    c = in_call(restart_delay_s=2.0)
    c.handle(SessionClosed(by_service=True), 1.0)
    c.handle(SessionReady("S1", False), 2.0)
    c.handle(SessionClosed(by_service=True), 3.0)  # the replacement is due in 2 s: no session now
    assert c.handle(TextTyped("alice", "hello?"), 3.5) == [SendText("hello?", None)]
    assert c.state is LISTENING


def test_typed_text_while_the_agent_speaks_interrupts_it():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"))
    assert c.state is SPEAKING
    out = c.handle(TextTyped("alice", "stop, I meant tuesday"), 1.0)
    assert out == [DropReply("r1", "typed text"), SendText("stop, I meant tuesday", "r1"), StartThinking()]
    assert shown(c.handle(PlaybackStopped(), 1.01)) == [THINKING], "r1 is abandoned: not a stall"
    assert shown(c.handle(ReplyDone("r1", "completed"), 3.0)) == [THINKING], "the old reply's end changes nothing"
    feed(c, ReplyStarted("r2"), ReplyAudio("r2", b"\0\0"))
    assert shown(c.handle(PlaybackStarted("r2"), 3.5)) == [SPEAKING]


def test_typed_text_drops_a_reply_still_playing_after_the_service_finished_it():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"), ReplyDone("r1", "completed"))
    feed(c, ReplyStarted("r2"))  # the next reply is on its way while r1 is still heard
    out = c.handle(TextTyped("alice", "wait"), 1.0)
    assert of(out, DropReply) == [DropReply("r2", "typed text"), DropReply("r1", "typed text")]
    assert of(out, SendText) == [SendText("wait", "r2")]


def test_typed_text_does_not_interrupt_when_the_user_may_not_interrupt():
    c = in_call(chat_interrupts=False)
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"))
    out = c.handle(TextTyped("alice", "hello"), 1.0)
    assert of(out, DropReply) == [] and of(out, SendText) == [SendText("hello", None)]
    assert c.state is SPEAKING


def test_typed_text_during_a_stall_mid_reply_is_not_speaking_any_more():
    c = in_call()
    feed(c, ReplyStarted("r1"), ReplyAudio("r1", b"\0\0"), PlaybackStarted("r1"), PlaybackStopped())
    assert c.state is SPEAKING, "stalled mid-reply"
    assert shown(c.handle(TextTyped("alice", "hello?"), 1.0)) == [THINKING]


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
