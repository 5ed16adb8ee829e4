"""rescue.RescuePlanner, the sans-I/O core of the fleet's room rescue: which rooms are lost,
which are only slow, which are not wanted any more; and the signed session record."""

from __future__ import annotations

import dataclasses

import rescue
from rescue import DispatchView, PlannerSettings, RescuePlanner, RoomView, UserView, Verdict

SECRET = "s" * 32
T0 = 1_800_000_000.0


def planner(**kw) -> RescuePlanner:
    return RescuePlanner(PlannerSettings(secret=SECRET, worker_id="me", **kw))


def room(*, users=("user",), agent=False, dispatches=None, attrs=None, name="r", sid="RM_r") -> RoomView:
    if dispatches is None:
        dispatches = (DispatchView("AD_1", "", T0),)
    return RoomView(name, sid, tuple(UserView(u, dict(attrs or {})) for u in users), agent, tuple(dispatches))


def look_twice(p: RescuePlanner, r: RoomView, at: float) -> rescue.Decision:
    p.observe(r, at)
    return p.observe(r, at + p.s.confirm_s)


def test_an_unplaced_job_is_rescued_after_the_placement_grace_and_two_looks():
    p = planner()
    assert p.observe(room(), T0 + 1).verdict is Verdict.WAITING  # the server may still be placing it
    assert p.observe(room(), T0 + 5).verdict is Verdict.LOST  # once: not yet
    d = p.observe(room(), T0 + 6)
    assert d.verdict is Verdict.RESCUE and d.kind == rescue.RESCUE_UNPLACED and d.dispatch.id == "AD_1"


def test_a_call_whose_agent_was_seen_and_is_gone_is_lost_at_once():
    p = planner()
    job = (DispatchView("AD_1", "", T0, job_started_at=(T0 + 0.3,)),)
    assert p.observe(room(agent=True, dispatches=job), T0 + 2).verdict is Verdict.SERVED
    d = look_twice(p, room(dispatches=job), T0 + 3)
    assert d.verdict is Verdict.RESCUE and d.kind == rescue.RESCUE_LOST


def test_a_placed_job_whose_agent_is_not_there_yet_gets_the_start_grace():
    p = planner()
    job = (DispatchView("AD_1", "", T0, job_started_at=(T0 + 0.3,)),)
    assert look_twice(p, room(dispatches=job), T0 + 2).verdict is Verdict.WAITING
    assert look_twice(p, room(dispatches=job), T0 + 11).verdict is Verdict.RESCUE


def test_rooms_without_our_dispatch_or_without_a_user_are_not_wanted():
    p = planner(agent_name="sales")
    other = (DispatchView("AD_1", "", T0),)  # automatic dispatch's: not ours under explicit dispatch
    assert look_twice(p, room(dispatches=other), T0 + 10).verdict is Verdict.NOT_WANTED
    assert look_twice(p, room(dispatches=()), T0 + 10).verdict is Verdict.NOT_WANTED  # deleted: the call ended
    ours = (DispatchView("AD_2", "sales", T0),)
    assert look_twice(p, room(users=(), dispatches=ours), T0 + 10).verdict is Verdict.NOT_WANTED
    assert look_twice(p, room(dispatches=ours), T0 + 10).verdict is Verdict.RESCUE


def test_a_fresh_claim_of_another_host_holds_the_others_back_until_it_is_stale():
    p = planner()
    claimed = {rescue.CLAIM_ATTRIBUTE: f"other {int((T0 + 9) * 1000)}"}
    assert look_twice(p, room(attrs=claimed), T0 + 10).verdict is Verdict.WAITING
    assert look_twice(p, room(attrs=claimed), T0 + 20).verdict is Verdict.RESCUE
    mine = {rescue.CLAIM_ATTRIBUTE: f"me {int((T0 + 9) * 1000)}"}
    assert look_twice(p, room(attrs=mine), T0 + 30).verdict is Verdict.RESCUE


def test_a_signed_session_record_is_found_and_a_forged_or_foreign_one_is_not():
    p = planner()
    good = rescue.session_record(SECRET, "r", "sess_1")
    d = look_twice(p, room(attrs={rescue.SESSION_ATTRIBUTE: good}), T0 + 10)
    assert d.verdict is Verdict.RESCUE and d.kind == rescue.RESCUE_LOST and d.session_id == "sess_1"
    # A user who copies another room's record, or makes one up, does not steer us into that session.
    foreign = rescue.session_record(SECRET, "another-room", "sess_2")
    assert rescue.read_session_record(SECRET, "r", foreign) is None
    assert rescue.read_session_record(SECRET, "r", "sess_3.0123456789abcdef0123456789abcdef") is None
    assert rescue.read_session_record("other-secret", "r", good) is None
    assert planner().session_of(room(attrs={rescue.SESSION_ATTRIBUTE: "sess_2.forged"})) is None


def test_a_room_that_keeps_losing_its_agent_is_let_go_after_three_rescues():
    p = planner()
    t = T0 + 10
    for _ in range(3):
        d = look_twice(p, room(), t)
        assert d.verdict is Verdict.RESCUE
        p.rescued(room(), t)
        t += 30
    assert look_twice(p, room(), t).verdict is Verdict.WAITING
    assert look_twice(p, room(), t + 700).verdict is Verdict.RESCUE  # the window passed


def test_rooms_that_are_gone_are_forgotten():
    p = planner()
    p.observe(room(agent=True), T0 + 1)
    p.forget(set())
    # Without the memory of its agent, the room is judged by its dispatch alone (unplaced).
    assert look_twice(p, room(), T0 + 10).kind == rescue.RESCUE_UNPLACED


def test_an_agent_whose_host_stopped_beating_is_a_ghost_and_its_room_is_rescued_at_once():
    p = planner()
    job = (DispatchView("AD_1", "", T0, job_started_at=(T0 + 0.3,)),)
    ghost = dataclasses.replace(room(agent=True, dispatches=job), agent_host="h1")
    assert p.observe(ghost, T0 + 30).verdict is Verdict.SERVED
    d = p.observe(ghost, T0 + 31, frozenset({"h1"}))
    assert d.verdict is Verdict.RESCUE and d.kind == rescue.RESCUE_LOST
    # Another host's death says nothing of this agent's.
    assert planner().observe(ghost, T0 + 31, frozenset({"h2"})).verdict is Verdict.SERVED


def test_a_host_is_dead_once_its_beacon_has_not_changed_for_ghost_after_s_of_our_own_clock():
    w = rescue.HostWatch("me", ghost_after_s=5.0)
    wall = T0  # the beats' own times: a watched host is judged by our clock alone
    w.update({"h1": "1000", "me": "1000"}, 100.0)
    w.update({"h1": "2000", "me": "1000"}, 103.0)  # h1 beats; our own beacon is never judged
    assert w.dead(107.0, wall) == frozenset()
    w.update({"h1": "2000", "me": "1000"}, 108.5)
    assert w.dead(108.5, wall) == frozenset({"h1"})
    w.update({"h1": "3000"}, 109.0)  # alive again (a stall, not a death), and our beacon's room is gone
    assert w.dead(109.0, wall) == frozenset()


def test_a_host_we_just_met_is_judged_by_its_beats_own_time_with_slack_for_the_clocks():
    w = rescue.HostWatch("me", ghost_after_s=5.0, skew_s=3.0)
    beat_ms = str(int(T0 * 1000))
    w.update({"old": beat_ms, "fresh": str(int((T0 + 9) * 1000))}, 50.0)
    assert w.dead(50.0, T0 + 7.5) == frozenset()  # 7.5 s old: within 5 s + 3 s of slack
    assert w.dead(50.5, T0 + 8.5) == frozenset({"old"})
    assert "fresh" not in w.dead(54.0, T0 + 12.0)
