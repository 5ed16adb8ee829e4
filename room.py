"""The agent's link to its LiveKit room: joining and rejoining, the published track, which
participants are users and their microphones, the pre-connect recording of a microphone,
text typed in the frontend, and the agent state attribute. Everything that arrives from the
room arrives here first.

The link decides nothing about the call: it reports users coming and going to the call
state machine as typed events (``call.UserJoined``, ``UserLeft``, ``RoomJoined``,
``RoomLeft``), hands microphone audio and chat to the callables it was given, and shows
the agent state it is told to show.

A user is a participant the agent talks to: standard, SIP and connector participants (as
livekit-agents has it), never another agent; only ``USER_IDENTITY`` when it is set. A user
is reported when they are in the room, microphone or not (a text-only user is a user too);
which microphone is bridged is this module's business alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import backoff
import call
import control
import preconnect
from config import Config
from exits import (
    EXIT_DUPLICATE_IDENTITY,
    EXIT_LIVEKIT_AUTH,
    EXIT_LIVEKIT_UNREACHABLE,
    EXIT_ROOM_DELETED,
    FatalError,
)
from logs import LogContext, LogLimiter, one_line
from pcm import SAMPLE_RATE
from tokens import mint_token, server_api

log = logging.getLogger("worker")

AGENT_STATE = "lk.agent.state"
TOPIC_CHAT = "lk.chat"
TOPIC_LEGACY_CHAT = "lk-chat-topic"  # data packets, frontends before components-react 2.9
MAX_CHAT_CHARS = 4000
MAX_CHAT_BYTES = 4 * MAX_CHAT_CHARS  # UTF-8: at most 4 bytes a character
MAX_LEGACY_CHAT_BYTES = 6 * MAX_CHAT_CHARS + 1024  # the same text as a JSON string (escapes) with its fields
CHAT_PER_MINUTE, CHAT_BURST = 20.0, 5
MAX_MIXED_INPUTS = 16  # MIX_PARTICIPANTS=1: microphones mixed at most

Spawn = Callable[..., "asyncio.Task[Any]"]  # spawn(coro, name, isolated=False): a task its owner awaits or cancels
SendAudio = Callable[[bytes, bool], None]  # send_audio(pcm, held): see bridge.VoiceAgentClient.send_audio


@dataclass
class _Input:
    identity: str
    track_sid: str
    stream: Any  # rtc.AudioStream
    task: asyncio.Task[None] | None = None  # its pump (single-user mode)
    mix_source: Any = None  # what was added to the room mixer (MIX_PARTICIPANTS=1)


class RoomLink:
    """One room, joined as the agent (see the module's docstring). ``run()`` joins and
    rejoins until ``stop`` is set; it raises FatalError for what a rejoin cannot fix."""

    def __init__(self, cfg: Config, log_ctx: LogContext, *, spawn: Spawn, stop: asyncio.Event,
                 on_event: Callable[[call.Event], None], send_audio: SendAudio,
                 on_chat: Callable[[str, str], Awaitable[None]], job: Any = None) -> None:
        self.cfg = cfg
        # Job mode (serve): a dispatched job (dispatch.JobSpec) whose URL and token join the
        # room, once: ``run()`` returns when the agent is out of the room, never rejoins.
        self.job = job
        self.log_ctx = log_ctx
        self._spawn = spawn
        self._stop = stop
        self._on_event = on_event
        self._send_audio = send_audio
        self._on_chat_text = on_chat
        self.room: Any = None  # rtc.Room while joined
        self.track_sid: str | None = None  # the agent's published track
        self.joined = asyncio.Event()  # set once, at the first join
        self.hung_up = False  # we ended the call ourselves: the disconnect that follows is expected
        # Job mode: another agent of the fleet joined with our identity and took the call over
        # (rescue.py): this process leaves the session to it.
        self.replaced = False
        self._disconnected = asyncio.Event()
        self._disconnect_reason: int | None = None
        self.inputs: dict[str, _Input] = {}  # identity -> the microphone we bridge
        self.present: set[str] = set()  # the users in the room (reported to the call)
        self._room_mixer: Any = None  # rtc.AudioMixer when MIX_PARTICIPANTS=1
        self._shown_state = ""
        self._state_lock = asyncio.Lock()
        self._want_state = ""
        self._input_errors = LogLimiter()  # refusals of what participants send
        self._chat_rate = control.RateLimiter(CHAT_PER_MINUTE, CHAT_BURST)
        self._chat_ids: dict[str, None] = {}  # ids of recent lk.chat streams (a legacy copy is not a second message)
        self.preconnect = preconnect.PreConnectAudio(spawn=spawn, is_user=self.is_user,
                                                     own_microphone=self._own_microphone)

    @property
    def connected(self) -> bool:
        return self.room is not None and self.room.isconnected()

    # -- joining and rejoining --

    async def run(self, track: Any, on_joined: Callable[[Any], None], restored_bed: bool = False) -> None:
        """Join, publish ``track``, then rejoin after a full disconnect, until stopped.
        ``on_joined(room)`` runs after every join (the control API registers there)."""
        from livekit import rtc

        retry = backoff.Backoff(0.5, 10.0, self.cfg.reconnect_give_up_s)
        while not self._stop.is_set():
            room = await self._join(retry)
            if room is None:
                continue
            retry.succeeded()
            pub = await room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            self.track_sid = pub.sid
            on_joined(room)
            first = not self.joined.is_set()
            self.joined.set()
            self._shown_state = ""
            self._on_event(call.RoomJoined(restored_bed and first))
            self._scan_participants()
            await self._disconnected.wait()
            self._release_all_inputs()
            self.present.clear()
            self.preconnect.clear()
            self._on_event(call.RoomLeft())
            if self._stop.is_set():
                break
            if self.job is not None:
                self._job_left()
                return
            await self._after_disconnect()

    async def _join(self, retry: backoff.Backoff) -> Any:
        """A connected room, or None after a failed attempt (retried after its backoff)."""
        from livekit import rtc

        room = rtc.Room()
        self._wire(room)
        if self.job is not None:  # the server minted it for this job (and the log redacts it)
            url, token = self.job.url, self.job.token
        else:
            url, token = self.cfg.livekit_url, mint_token(self.cfg, self.cfg.agent_identity, kind="agent",
                                                          name="Voice Agent")
            self.log_ctx.add_secret(token)
        try:
            await room.connect(url, token, rtc.RoomOptions(auto_subscribe=True))
        except rtc.ConnectError as e:
            msg = self.log_ctx.one_line(e)
            if any(s in msg.lower() for s in ("401", "unauthorized", "invalid token", "signature", "invalid api key")):
                raise FatalError(EXIT_LIVEKIT_AUTH,
                                 f"LiveKit rejected LIVEKIT_API_KEY/LIVEKIT_API_SECRET ({msg})") from None
            delay = retry.failed()
            if delay is None:
                raise FatalError(EXIT_LIVEKIT_UNREACHABLE,
                                 f"cannot join LiveKit at {self.cfg.livekit_url}: {msg}") from None
            log.warning("cannot join LiveKit at %s (%s); retrying in %.1f s", self.cfg.livekit_url, msg, delay)
            await asyncio.sleep(delay)
            return None
        self.room = room
        self._disconnected.clear()
        log.info("joined room %s as %s", self.cfg.room_name, self.cfg.agent_identity)
        return room

    def _job_left(self) -> None:
        """Job mode: out of the room means the call is over (it ended, the room closed or
        was deleted, the agent was removed, a full disconnect). Never rejoin: the server
        forgot the job, and a rejoin would recreate a closed room, which dispatches a second
        agent with the same identity (each kicking the other out). Another participant with
        the agent's identity is another agent of the fleet taking the call over: ``replaced``."""
        from livekit import rtc

        reason = self._disconnect_reason
        name = rtc.DisconnectReason.Name(reason).lower() if reason is not None else "unknown"
        if reason == rtc.DisconnectReason.DUPLICATE_IDENTITY:
            self.replaced = True
            log.info("out of room %s: another agent joined as %r and takes the call over", self.cfg.room_name,
                     self.cfg.agent_identity)
            return
        log.info("out of room %s (%s): the call is over", self.cfg.room_name, name)

    async def _after_disconnect(self) -> None:
        from livekit import rtc

        reason = self._disconnect_reason
        if self.hung_up:
            self.hung_up = False
            await self._wait_for_empty_room()
            return
        if reason == rtc.DisconnectReason.DUPLICATE_IDENTITY:
            raise FatalError(EXIT_DUPLICATE_IDENTITY,
                             f"another participant joined room {self.cfg.room_name} as "
                             f"{self.cfg.agent_identity!r}; this worker was disconnected (duplicate identity)")
        if reason in (rtc.DisconnectReason.ROOM_DELETED, rtc.DisconnectReason.PARTICIPANT_REMOVED):
            raise FatalError(EXIT_ROOM_DELETED,
                             f"removed from room {self.cfg.room_name} ({rtc.DisconnectReason.Name(reason).lower()})")
        if reason == rtc.DisconnectReason.ROOM_CLOSED:
            # What livekit-server does to a room only the agent is in, after its empty timeout
            # (5 min by default): routine for an idle worker, not a fault to page anyone about.
            log.info("the server closed the room (ROOM_CLOSED: nobody but the agent was in it); rejoining")
        else:
            log.warning("disconnected from the room (%s); rejoining",
                        rtc.DisconnectReason.Name(reason) if reason is not None else "unknown")
        await asyncio.sleep(0.5)

    async def _wait_for_empty_room(self) -> None:
        """After hanging up, be back for the next call: rejoin once nobody from this call
        is left in the room (at once after delete_room: the room is gone)."""
        from livekit import api

        while not self._stop.is_set():
            try:
                async with server_api(self.cfg) as lk:
                    res = await lk.room.list_participants(api.ListParticipantsRequest(room=self.cfg.room_name))
                if not any(p.identity != self.cfg.agent_identity for p in res.participants):
                    break
            except Exception as e:
                if "not_found" in str(e).lower() or "404" in str(e):
                    break
                log.debug("cannot list the room's participants yet: %s", one_line(e))
            await asyncio.sleep(2.0)
        log.info("call ended; rejoining %s for the next one", self.cfg.room_name)

    def _wire(self, room: Any) -> None:
        self._disconnect_reason = None

        def on_disconnected(reason: int) -> None:
            self._disconnect_reason = reason
            self._disconnected.set()

        room.on("disconnected", on_disconnected)
        room.on("participant_connected", lambda p: self._scan_participants())
        room.on("track_subscribed", lambda track, pub, p: self._scan_participants())
        room.on("track_unsubscribed", self._on_track_unsubscribed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("data_received", self._on_data)
        room.on("reconnecting", lambda: log.warning("LiveKit connection interrupted; resuming"))
        room.on("reconnected", lambda: log.info("LiveKit connection resumed"))
        room.register_text_stream_handler(TOPIC_CHAT, self._on_chat)
        room.register_byte_stream_handler(preconnect.TOPIC, self.preconnect.on_stream)

    async def leave(self) -> None:
        if self.connected:
            await self.room.disconnect()

    # -- the agent state attribute --

    def show_state(self, state: str) -> None:
        """Publish ``state`` as lk.agent.state (in the background; the newest wins)."""
        self._want_state = state
        if self.room is not None and state != self._shown_state:
            self._spawn(self._publish_state(), "agent-state")

    async def _publish_state(self) -> None:
        # One update at a time, re-reading the wanted state once in: two set_attributes in
        # flight can complete out of order and leave the older state published.
        async with self._state_lock:
            while True:
                state = self._want_state
                if state == self._shown_state or not self.connected:
                    return
                try:
                    await self.room.local_participant.set_attributes({AGENT_STATE: state})
                    self._shown_state = state
                    log.debug("%s -> %s", AGENT_STATE, state)
                except Exception as e:  # state is cosmetic; never fatal
                    self._shown_state = ""
                    log.debug("could not set %s=%s: %s", AGENT_STATE, state, e)
                    return

    # -- users and their microphones --

    def _eligible(self, participant: Any) -> bool:
        from livekit import rtc

        if participant.identity == self.cfg.agent_identity:
            return False
        if self.cfg.user_identity:
            return participant.identity == self.cfg.user_identity
        return participant.kind in (rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
                                    rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
                                    rtc.ParticipantKind.PARTICIPANT_KIND_CONNECTOR)

    def _is_user(self, participant: Any) -> bool:
        """A user of the call. An operator (CONTROL_IDENTITIES) in the room to drive the control
        API is not one, unless they publish a microphone (then they talk to the agent)."""
        from livekit import rtc

        if not self._eligible(participant):
            return False
        if participant.identity not in self.cfg.control_identities or participant.identity == self.cfg.user_identity:
            return True
        return any(pub.source == rtc.TrackSource.SOURCE_MICROPHONE for pub in participant.track_publications.values())

    def is_user(self, identity: str) -> bool:
        """Whether ``identity`` is a user in the room now (what the room says, not what has
        been reported yet: a stream can arrive while the agent is still joining)."""
        room = self.room
        p = room.remote_participants.get(identity) if room is not None else None
        return p is not None and self._is_user(p)

    def _own_microphone(self, identity: str, track_sid: str) -> bool:
        from livekit import rtc

        room = self.room
        p = room.remote_participants.get(identity) if room is not None else None
        pub = p.track_publications.get(track_sid) if p is not None else None
        return pub is not None and pub.source == rtc.TrackSource.SOURCE_MICROPHONE

    def _scan_participants(self) -> None:
        """(Re)consider every user and every subscribed microphone. Idempotent: safe to call
        after any room event, including the ones the SDK re-emits after a reconnect."""
        from livekit import rtc

        room = self.room
        if room is None:
            return
        for p in list(room.remote_participants.values()):
            if self._is_user(p) and p.identity not in self.present:
                self.present.add(p.identity)
                log.info("%s is in the room", p.identity)
                self._on_event(call.UserJoined(p.identity))
        for p in list(room.remote_participants.values()):
            if not self._eligible(p):
                continue
            for pub in p.track_publications.values():
                track = pub.track
                if track is None or track.kind != rtc.TrackKind.KIND_AUDIO \
                        or pub.source != rtc.TrackSource.SOURCE_MICROPHONE:
                    continue
                current = self.inputs.get(p.identity)
                if current is not None and current.track_sid == track.sid:
                    continue  # already bridged
                if current is None and self.inputs and not self.cfg.mix_participants:
                    continue  # someone else is the user
                if current is None and len(self.inputs) >= MAX_MIXED_INPUTS:
                    continue  # a meeting this big is not one conversation; never unbounded
                self._attach(p, pub, track)

    def _attach(self, participant: Any, publication: Any, track: Any) -> None:
        from livekit import rtc

        identity = participant.identity
        self._release_input(identity)
        # 50 ms frames (one input.audio message each): a fifth of the SDK round trips of
        # 10 ms frames, no added delay. The room mixer (MIX_PARTICIPANTS) needs 10 ms ones.
        stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1,
                                            frame_size_ms=10 if self.cfg.mix_participants else 50)
        inp = _Input(identity, track.sid, stream)
        self.inputs[identity] = inp
        if self.cfg.mix_participants:
            inp.mix_source = _frames(stream)
            self._room_mix().add_stream(inp.mix_source)
            log.info("mixing the microphone of %s (%d in the mix)", identity, len(self.inputs))
        else:
            recording = self.preconnect.expected(participant, publication)
            inp.task = self._spawn(self._pump(stream, identity, track.sid if recording else None),
                                   f"mic-{identity}", isolated=True)
            log.info("bridging the microphone of %s%s", identity, " (with its pre-connect audio)" if recording else "")

    def _room_mix(self) -> Any:
        from livekit import rtc

        if self._room_mixer is None:
            self._room_mixer = rtc.AudioMixer(SAMPLE_RATE, 1, blocksize=SAMPLE_RATE // 50, stream_timeout_ms=40)
            self._spawn(self._pump(self._room_mixer, None), "mic-mix")
        return self._room_mixer

    async def _pump(self, source: Any, identity: str | None, recorded_track: str | None = None) -> None:
        """Microphone audio to the session. With ``recorded_track`` (its frontend recorded it
        before the agent was there), the recording goes first: the live frames queue in the
        stream meanwhile and follow it, without a gap or an overlap, and all of it is sent
        as held audio (see bridge.InputPacer) until the live audio is the present again."""
        try:
            held_s = 0.0
            if recorded_track is not None:
                started = time.monotonic()
                pcm = await self.preconnect.take(recorded_track)
                if pcm:
                    self._send_audio(pcm, True)
                held_s = time.monotonic() - started + 0.1  # the live audio that queued meanwhile
            async for item in source:
                frame = getattr(item, "frame", item)  # AudioStream events, or the room mixer's frames
                data = bytes(frame.data)
                if held_s > 0:
                    held_s -= len(data) / (2 * SAMPLE_RATE)
                self._send_audio(data, held_s > 0)
        finally:
            if identity is not None:
                await source.aclose()

    def _on_track_unsubscribed(self, track: Any, publication: Any, participant: Any) -> None:
        inp = self.inputs.get(participant.identity)
        if inp is not None and inp.track_sid == track.sid:
            self._departed(participant.identity)

    def _on_participant_disconnected(self, participant: Any) -> None:
        identity = participant.identity
        if identity in self.inputs:
            self._departed(identity)
        if identity in self.present:
            self.present.discard(identity)
            log.info("%s left", identity)
            self._on_event(call.UserLeft(identity))

    def _departed(self, identity: str) -> None:
        """The microphone we bridged is gone (its user left, or stopped publishing it)."""
        self._release_input(identity)
        self._scan_participants()  # the next microphone, if someone is waiting

    def _release_input(self, identity: str) -> None:
        inp = self.inputs.pop(identity, None)
        if inp is None:
            return
        if inp.task is not None:
            inp.task.cancel()  # the pump closes its stream
        else:
            self._room_mixer.remove_stream(inp.mix_source)
            self._spawn(inp.stream.aclose(), "mic-close")

    def _release_all_inputs(self) -> None:
        for identity in list(self.inputs):
            self._release_input(identity)

    def caption_speaker(self) -> tuple[str, str | None] | None:
        """The user captions are attributed to (identity, microphone track), if one."""
        if len(self.inputs) != 1:
            return None  # nobody, or a mix of several people: no single speaker to attribute
        inp = next(iter(self.inputs.values()))
        return inp.identity, inp.track_sid

    def user(self) -> str | None:
        """The (first) bridged user's identity, else a user in the room without a microphone."""
        return next(iter(self.inputs), None) or next(iter(sorted(self.present)), None)

    # -- text typed in the frontend --

    def _on_chat(self, reader: Any, sender: str) -> None:
        """Who sent it and how big it says it is are checked before a byte is read. Any user
        of the call may type, microphone or not."""
        self._chat_ids[str(reader.info.stream_id)[:128]] = None
        while len(self._chat_ids) > 64:
            self._chat_ids.pop(next(iter(self._chat_ids)))
        refusal = None
        if not self.is_user(sender):
            refusal = "not a user of this call"
        elif (reader.info.size or 0) > MAX_CHAT_BYTES:
            refusal = f"{reader.info.size} bytes, over the {MAX_CHAT_BYTES}-byte limit"
        elif not self._chat_rate.allow(sender):
            refusal = "too many messages"
        if refusal is not None:
            reader.close()
            if self._input_errors.allow(f"chat:{sender}"):
                log.info("ignoring chat from %s (%s)", sender[:64], refusal)
            return
        self._spawn(self._read_chat(reader, sender), "chat", isolated=True)

    async def _read_chat(self, reader: Any, sender: str) -> None:
        """Read with a cap: a stream that grows past it (whatever its header said) is closed
        and dropped. The text goes to ``on_chat``."""
        from livekit import rtc

        parts: list[str] = []
        size = 0
        try:
            async for chunk in reader:
                size += len(chunk.encode())
                if size > MAX_CHAT_BYTES:
                    reader.close()
                    log.info("ignoring chat from %s (over %d bytes)", sender[:64], MAX_CHAT_BYTES)
                    return
                parts.append(chunk)
        except rtc.StreamError as e:  # aborted by its sender, or cut by a disconnect
            log.info("chat from %s was not completed (%s)", sender[:64], one_line(e))
            return
        text = "".join(parts).strip()
        if not text:
            return
        if len(text) > MAX_CHAT_CHARS:
            log.warning("chat message from %s truncated to %d characters", sender[:64], MAX_CHAT_CHARS)
            text = text[:MAX_CHAT_CHARS]
        await self._on_chat_text(sender, text)

    def _on_data(self, packet: Any) -> None:
        """Chat from frontends older than components-react 2.9: a data packet on
        ``lk-chat-topic`` holding ``{"id", "timestamp", "message"}``. Newer ones send every
        message twice, as an lk.chat stream and as such a packet marked ``ignoreLegacy``
        (or with the stream's id): that copy is not a second message. Checked as lk.chat
        is: the sender, the size, the same rate limit."""
        if packet.topic != TOPIC_LEGACY_CHAT:
            return
        sender = packet.participant.identity if packet.participant is not None else ""
        refusal = None
        message = None
        if not self.is_user(sender):
            refusal = "not a user of this call"
        elif len(packet.data) > MAX_LEGACY_CHAT_BYTES:
            refusal = f"{len(packet.data)} bytes, over the {MAX_LEGACY_CHAT_BYTES}-byte limit"
        else:
            try:
                body = json.loads(bytes(packet.data).decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("message"), str):
                refusal = "not a chat message"
            elif body.get("ignoreLegacy") is True or str(body.get("id", ""))[:128] in self._chat_ids:
                return  # the copy of an lk.chat stream
            else:
                message = body["message"]
        if refusal is None and not self._chat_rate.allow(sender):
            refusal = "too many messages"
        if refusal is not None or message is None:
            if self._input_errors.allow(f"chat:{sender}"):
                log.info("ignoring chat from %s (%s)", sender[:64], refusal)
            return
        text = message.strip()[:MAX_CHAT_CHARS]
        if text:
            self._spawn(self._on_chat_text(sender, text), "chat", isolated=True)


async def _frames(stream: Any) -> Any:
    """AudioStream events -> frames, for rtc.AudioMixer."""
    async for event in stream:
        yield event.frame

