"""Serve mode's promise, kept by the fleet itself: every room with a user gets exactly one agent.

livekit-server drops a job it could not place (every host full or busy at that moment) and,
self-hosted, never re-dispatches the calls of a host that died (livekit/agents#1472). So each
serve host also looks at the rooms itself (LiveKit's RoomService and AgentDispatchService, no
store of ours) and, while it has room, serves those that want the agent and lack it. See
docs/fleet.md for the whole story; in short:

* **Wanted**: the room has a dispatch for our agent name (automatic dispatch: the server's
  default one, name ""; explicit: the rooms that asked for AGENT_NAME). A call that ends on
  purpose (end_call, hang-up, its users gone) deletes its room's dispatch before it leaves,
  and an operator closes a room by deleting the room or its dispatch: either way the room
  is no longer wanted, and nobody brings the agent back.
* **Lost**: a user is there, no participant has the agent's identity, and either the
  dispatch never got a job (``placement_grace_s`` after it was made) or its call is gone:
  the agent was seen and is not any more, or its job started ``start_grace_s`` ago and its
  agent never came. Seen so on two looks ``confirm_s`` apart, so a transient state (an
  agent reconnecting, a call just handing over) is not taken for a loss.
* **Exactly one agent**: every agent of the fleet joins with the same identity, and
  LiveKit keeps one participant per identity in a room (a second join replaces the first),
  so two agents are never in a room at once, by the server's own rule. To keep even that
  replacement rare, a host claims a room before serving it (an attribute on its user, with
  the host's worker id and the time), waits ``claim_settle_s``, and serves it only if the
  newest claim is still its own; hosts that see a fresh claim of another leave the room
  alone for ``claim_ttl_s``.
* **Ghosts**: a machine that dies whole says no goodbye, and the server lists its agents for
  about 20 s more (until WebRTC gives up on them). So every host keeps a beacon, a room of its
  own (``voice-agent-host.<host id>``, no participant, never dispatched) whose metadata it
  rewrites every second, and its agents carry ``voice_agent.host``. A host whose beacon has not
  changed for ``ghost_after_s`` (by the looker's own clock: no clock skew between machines
  matters) is dead, and its agents are taken for absent: the new agent's join replaces the
  ghost (one identity).
* **Resumed**: a call writes its Voice Agent session id on its users' attributes, signed
  (HMAC with the LiveKit API secret, bound to the room), so the call that takes over can
  resume the session within the API's 30 s window; a user cannot point it at another
  room's session.

``RescuePlanner`` is the sans-I/O core (room listings and the time in, verdicts out);
``Rescuer`` is the loop that lists rooms and launches calls through ``WorkerCore.rescue``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("rescue")

SESSION_ATTRIBUTE = "voice_agent.session"  # "<session_id>.<signature>" on the users of a call
CLAIM_ATTRIBUTE = "voice_agent.claim"  # "<host id> <unix ms>": a host is taking the room on
HOST_ATTRIBUTE = "voice_agent.host"  # on each agent: the host id of the serve process running it
BEACON_PREFIX = "voice-agent-host."  # + host id: the room whose metadata says the host is alive
# A beacon room's own dispatch: a name no worker has, so creating it never dispatches an agent
# (a room created without one gets the automatic dispatch).
BEACON_AGENT_NAME = "voice-agent-beacon"

RESCUE_UNPLACED = "unplaced"  # the job was never placed: the user has not heard the agent yet
RESCUE_LOST = "lost"  # the call was lost with its host (or handed over by it)

USER_KINDS = (0, 3, 7)  # ParticipantInfo.Kind STANDARD, SIP, CONNECTOR: users, as livekit-agents counts them


# --- the session record -----------------------------------------------------------------------------


def _signature(secret: str, room: str, session_id: str) -> str:
    return hmac.new(secret.encode(), f"{room}\n{session_id}".encode(), hashlib.sha256).hexdigest()[:32]


def session_record(secret: str, room: str, session_id: str) -> str:
    return f"{session_id}.{_signature(secret, room, session_id)}"


def read_session_record(secret: str, room: str, value: str) -> str | None:
    """The session id of a record written for this room with this secret, else None."""
    session_id, _, sig = value.rpartition(".")
    if not session_id or not hmac.compare_digest(sig, _signature(secret, room, session_id)):
        return None
    return session_id


def _claim(value: str) -> tuple[str, float] | None:
    worker, _, ms = value.partition(" ")
    try:
        return worker, int(ms) / 1000
    except ValueError:
        return None


# --- what the server says of a room --------------------------------------------------------------------


@dataclass(frozen=True)
class UserView:
    identity: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DispatchView:
    id: str
    agent_name: str
    created_at: float  # unix seconds
    job_started_at: tuple[float, ...] = ()  # unix seconds, one per job the server placed
    metadata: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoomView:
    name: str
    sid: str
    users: tuple[UserView, ...]
    agent_present: bool
    dispatches: tuple[DispatchView, ...]
    agent_host: str = ""  # the agent's HOST_ATTRIBUTE


class Verdict(enum.Enum):
    NOT_WANTED = "not wanted"  # no dispatch for us, or no user
    SERVED = "served"
    WAITING = "waiting"  # placement or a start may still be on its way, or another host claimed it
    LOST = "lost"  # lost once: confirm it on a later look
    RESCUE = "rescue"  # lost on two looks: serve it


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    kind: str = ""  # RESCUE_UNPLACED or RESCUE_LOST, with RESCUE
    dispatch: DispatchView | None = None
    session_id: str | None = None  # a signed session record found on the room's users


@dataclass(frozen=True)
class PlannerSettings:
    agent_name: str = ""
    secret: str = ""  # LIVEKIT_API_SECRET: what session records are signed with
    worker_id: str = ""
    placement_grace_s: float = 4.0  # the server places a job in under 3.5 s (psrpc's 3 s timeout)
    start_grace_s: float = 10.0  # a placed job's agent is in its room within this
    confirm_s: float = 1.0
    claim_ttl_s: float = 10.0
    max_rescues: int = 3  # of one room by this host ...
    rescue_window_s: float = 600.0  # ... within this long: a room whose calls keep failing is let go


class RescuePlanner:
    """Turns looks at rooms into decisions. No I/O, no clock: ``now`` is unix seconds."""

    def __init__(self, settings: PlannerSettings) -> None:
        self.s = settings
        self._seen_agent: set[str] = set()  # room sids where an agent was seen
        self._lost_since: dict[str, float] = {}
        self._rescues: dict[str, list[float]] = {}

    def session_of(self, room: RoomView) -> str | None:
        for user in room.users:
            value = user.attributes.get(SESSION_ATTRIBUTE, "")
            sid = read_session_record(self.s.secret, room.name, value) if value else None
            if sid:
                return sid
        return None

    def claimed_by_other(self, room: RoomView, now: float) -> bool:
        newest = self.newest_claim(room)
        return newest is not None and newest[0] != self.s.worker_id and now - newest[1] < self.s.claim_ttl_s

    def newest_claim(self, room: RoomView) -> tuple[str, float] | None:
        claims = [c for u in room.users if (c := _claim(u.attributes.get(CLAIM_ATTRIBUTE, ""))) is not None]
        return max(claims, key=lambda c: c[1]) if claims else None

    def observe(self, room: RoomView, now: float, dead_hosts: frozenset[str] = frozenset()) -> Decision:
        """``dead_hosts``: hosts whose beacon stopped (HostWatch): their agents are ghosts."""
        ghost = room.agent_present and bool(room.agent_host) and room.agent_host in dead_hosts
        if ghost:
            room = dataclasses.replace(room, agent_present=False)
            self._seen_agent.add(room.sid)  # it had an agent: a lost call
        decision = self._judge(room, now)
        if decision.verdict is not Verdict.LOST:
            self._lost_since.pop(room.sid, None)
            return decision
        since = self._lost_since.setdefault(room.sid, now)
        if now - since < self.s.confirm_s and not ghost:  # a stopped beacon is seconds of looks already
            return decision
        recent = [t for t in self._rescues.get(room.sid, []) if now - t < self.s.rescue_window_s]
        if len(recent) >= self.s.max_rescues:
            if len(recent) == self.s.max_rescues:
                log.warning("room %s lost its agent %d times within %.0f s: not rescuing it again", room.name,
                            len(recent), self.s.rescue_window_s)
                recent.append(now)  # said once
                self._rescues[room.sid] = recent
            return Decision(Verdict.WAITING)
        return dataclasses.replace(decision, verdict=Verdict.RESCUE)

    def rescued(self, room: RoomView, now: float) -> None:
        self._lost_since.pop(room.sid, None)
        self._rescues.setdefault(room.sid, []).append(now)

    def forget(self, live_sids: set[str]) -> None:
        """Rooms that are gone."""
        self._seen_agent.intersection_update(live_sids)
        for d in (self._lost_since, self._rescues):
            for sid in [s for s in d if s not in live_sids]:
                del d[sid]

    def _judge(self, room: RoomView, now: float) -> Decision:
        ours = [d for d in room.dispatches if d.agent_name == self.s.agent_name]
        if not ours or not room.users:
            return Decision(Verdict.NOT_WANTED)
        if room.agent_present:
            self._seen_agent.add(room.sid)
            return Decision(Verdict.SERVED)
        newest = max(ours, key=lambda d: d.created_at)
        started = [t for d in ours for t in d.job_started_at]
        session_id = self.session_of(room)
        if self.claimed_by_other(room, now):
            return Decision(Verdict.WAITING)
        if room.sid in self._seen_agent or session_id is not None:
            return Decision(Verdict.LOST, RESCUE_LOST, newest, session_id)
        if started:
            if now - max(started) < self.s.start_grace_s:
                return Decision(Verdict.WAITING)
            return Decision(Verdict.LOST, RESCUE_LOST, newest, session_id)
        if now - newest.created_at < self.s.placement_grace_s:
            return Decision(Verdict.WAITING)
        return Decision(Verdict.LOST, RESCUE_UNPLACED, newest, session_id)


class HostWatch:
    """Which hosts are dead: their beacon's metadata (the beat's unix ms) has not changed for
    ``ghost_after_s`` of our own clock, so clock skew between machines does not matter. A host
    we have not watched that long yet (we just started) is judged by the beat's own time, with
    ``skew_s`` of slack for the clocks."""

    def __init__(self, me: str, ghost_after_s: float = 5.0, skew_s: float = 3.0) -> None:
        self.me, self.ghost_after_s, self.skew_s = me, ghost_after_s, skew_s
        self._beats: dict[str, tuple[str, float, float]] = {}  # host -> (metadata, changed at, first seen)

    def update(self, beacons: Mapping[str, str], now: float) -> None:
        """``beacons``: host id -> its beacon room's metadata, as listed now (monotonic ``now``)."""
        for host, meta in beacons.items():
            seen = self._beats.get(host)
            if seen is None:
                self._beats[host] = (meta, now, now)
            elif seen[0] != meta:
                self._beats[host] = (meta, now, seen[2])
        for host in [h for h in self._beats if h not in beacons]:
            del self._beats[host]  # its beacon room is gone (a clean stop deletes it)

    def dead(self, now: float, wall: float) -> frozenset[str]:
        out = set()
        for host, (meta, changed, first) in self._beats.items():
            if host == self.me:
                continue
            if now - first > self.ghost_after_s:
                if now - changed > self.ghost_after_s:
                    out.add(host)
            elif meta.isdigit() and wall - int(meta) / 1000 > self.ghost_after_s + self.skew_s:
                out.add(host)
        return frozenset(out)


# --- the loop -------------------------------------------------------------------------------------------


def room_view(room: Any, participants: Sequence[Any], dispatches: Sequence[Any], agent_identity: str) -> RoomView:
    """A RoomView from livekit.protocol's Room, ParticipantInfo and AgentDispatch messages."""
    users = tuple(UserView(p.identity, dict(p.attributes)) for p in participants
                  if p.kind in USER_KINDS and p.identity != agent_identity)
    agent = next((p for p in participants if p.identity == agent_identity), None)
    return RoomView(
        name=room.name, sid=room.sid, users=users, agent_present=agent is not None,
        agent_host=agent.attributes.get(HOST_ATTRIBUTE, "") if agent is not None else "",
        dispatches=tuple(DispatchView(d.id, d.agent_name, d.state.created_at / 1e9,
                                      tuple(j.state.started_at / 1e9 for j in d.state.jobs if j.state.started_at),
                                      d.metadata, dict(d.attributes)) for d in dispatches))


@dataclass
class _Seen:
    participants: int
    verdict: Verdict
    at: float
    agent_host: str = ""


class Rescuer:
    """Every ``interval_s`` while this host takes calls: list the rooms, look closer at those
    that may lack their agent, and launch a call for each confirmed lost one (claimed first).

    ``can_take()``: how many more calls this host takes now (0: none); ``busy_rooms()``: rooms
    it already has a call in; ``launch(room_view, decision)``: start the call, True if it did."""

    RECHECK_S = 8.0  # a served room whose participant count did not change is looked at again after this
    SURVEY_TIMEOUT_S = 15.0
    BEAT_S = 1.0  # the beacon's period
    BEACON_EMPTY_TIMEOUT_S = 600  # the server closes a beacon room this long after it was made; we make it again

    def __init__(self, api: Callable[[], Any], planner: RescuePlanner, *, agent_identity: str, interval_s: float,
                 can_take: Callable[[], int], busy_rooms: Callable[[], set[str]],
                 launch: Callable[[RoomView, Decision], bool], claim_settle_s: float = 0.3,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.api, self.planner = api, planner
        self.agent_identity = agent_identity
        self.interval_s = interval_s
        self.can_take, self.busy_rooms, self.launch = can_take, busy_rooms, launch
        self.claim_settle_s = claim_settle_s
        self._sleep = sleep
        self._seen: dict[str, _Seen] = {}
        self.watch = HostWatch(planner.s.worker_id)
        self.beacon = BEACON_PREFIX + planner.s.worker_id
        self.surveys = 0
        self.errors = 0

    async def run(self) -> None:
        """Beat every BEAT_S and, apart (a long survey must never delay a beat: others would
        take this host for dead), survey every ``interval_s`` while this host takes calls; the
        beacon room goes when the loop is cancelled (a clean stop)."""
        async with self.api() as lk:
            beating = asyncio.create_task(self._every(lk, "beat", self.BEAT_S, self._beat), name="rescue-beat")
            try:
                await self._every(lk, "survey", self.interval_s, self.survey, when=self.can_take)
            finally:
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                await self._drop_beacon(lk)

    async def _every(self, lk: Any, what: str, period_s: float, step: Callable[[Any], Awaitable[None]],
                     when: Callable[[], object] = lambda: True) -> None:
        failing = False
        while True:
            await self._sleep(period_s * (0.8 + 0.4 * (os.urandom(1)[0] / 255)))  # hosts out of step
            if not when():
                continue
            try:
                async with asyncio.timeout(self.SURVEY_TIMEOUT_S):  # a server that hangs must not stall us
                    await step(lk)
                if failing:
                    log.info("the room %s works again", what)
                failing = False
            except Exception as e:  # the server API unreachable, a 5xx, a timeout: tried again next time
                self.errors += 1
                if not failing:
                    log.warning("room %s failed (%s: %s); retrying", what, type(e).__name__, str(e)[:200])
                failing = True

    async def _beat(self, lk: Any) -> None:
        from livekit import api

        meta = str(int(time.time() * 1000))
        try:
            await lk.room.update_room_metadata(api.UpdateRoomMetadataRequest(room=self.beacon, metadata=meta))
        except api.TwirpError as e:
            if e.code != "not_found":
                raise
            await lk.room.create_room(api.CreateRoomRequest(
                name=self.beacon, metadata=meta, empty_timeout=self.BEACON_EMPTY_TIMEOUT_S,
                agents=[api.RoomAgentDispatch(agent_name=BEACON_AGENT_NAME)]))

    async def _drop_beacon(self, lk: Any) -> None:
        from livekit import api

        try:
            async with asyncio.timeout(2.0):
                await lk.room.delete_room(api.DeleteRoomRequest(room=self.beacon))
        except Exception as e:  # the server gone, most often: the beacon room closes on its own
            log.debug("could not delete beacon room %s: %s", self.beacon, str(e)[:200])

    async def survey(self, lk: Any) -> None:
        from livekit import api

        self.surveys += 1
        rooms = (await lk.room.list_rooms(api.ListRoomsRequest())).rooms
        now = time.monotonic()
        self.watch.update({r.name[len(BEACON_PREFIX):]: r.metadata for r in rooms if r.name.startswith(BEACON_PREFIX)},
                          now)
        dead = self.watch.dead(now, time.time())
        rooms = [r for r in rooms if not r.name.startswith(BEACON_PREFIX)]
        self.planner.forget({r.sid for r in rooms})
        for sid in [s for s in self._seen if s not in {r.sid for r in rooms}]:
            del self._seen[sid]
        busy = self.busy_rooms()
        lost = []
        for r in rooms:
            if r.num_participants == 0 or r.name in busy or not self.can_take():
                continue
            seen = self._seen.get(r.sid)
            if (seen is not None and seen.participants == r.num_participants and now - seen.at < self.RECHECK_S
                    and seen.verdict in (Verdict.SERVED, Verdict.NOT_WANTED) and seen.agent_host not in dead):
                continue
            view = await self._look(lk, r)
            if view is None:
                continue
            decision = self.planner.observe(view, time.time(), dead)
            if seen is None or seen.verdict is not decision.verdict:
                log.debug("room %s: %s%s", r.name, decision.verdict.value,
                          " (its agent's host is dead)" if view.agent_host in dead else "")
            self._seen[r.sid] = _Seen(r.num_participants, decision.verdict, now, view.agent_host)
            if decision.verdict is Verdict.RESCUE:
                lost.append((r, view, decision))
        # Claimed together (each claim waits claim_settle_s, and a dead host leaves many rooms),
        # but no more than this host can take: a claim holds the other hosts back.
        lost = lost[:self.can_take()]
        await asyncio.gather(*(self._claim_and_launch(lk, r, view, decision, dead) for r, view, decision in lost))

    async def _look(self, lk: Any, room: Any) -> RoomView | None:
        from livekit import api

        try:
            parts = (await lk.room.list_participants(api.ListParticipantsRequest(room=room.name))).participants
            dispatches = await lk.agent_dispatch.list_dispatch(room_name=room.name)
        except Exception as e:  # the room closed between the two calls, most likely
            log.debug("cannot look at room %s: %s", room.name, str(e)[:200])
            return None
        return room_view(room, parts, dispatches, self.agent_identity)

    async def _claim_and_launch(self, lk: Any, room: Any, view: RoomView, decision: Decision,
                                dead: frozenset[str]) -> None:
        from livekit import api

        me = self.planner.s.worker_id
        try:
            await lk.room.update_participant(api.UpdateParticipantRequest(
                room=view.name, identity=view.users[0].identity,
                attributes={CLAIM_ATTRIBUTE: f"{me} {int(time.time() * 1000)}"}))
        except Exception as e:
            log.debug("cannot claim room %s: %s", view.name, str(e)[:200])
            return
        await self._sleep(self.claim_settle_s)
        again = await self._look(lk, room)
        if again is None or not again.users or (again.agent_present and again.agent_host not in dead):
            return
        newest = self.planner.newest_claim(again)
        if newest is None or newest[0] != me:
            log.info("room %s: another host claimed it; leaving it to that host", view.name)
            return
        if self.can_take() and self.launch(again, decision):
            self.planner.rescued(again, time.time())
            return
        try:  # full meanwhile: let the others have it now rather than after claim_ttl_s
            await lk.room.update_participant(api.UpdateParticipantRequest(
                room=view.name, identity=view.users[0].identity, attributes={CLAIM_ATTRIBUTE: ""}))
        except Exception as e:
            log.debug("cannot release the claim on room %s: %s", view.name, str(e)[:200])
