"""The agent's link to its LiveKit room: joining and rejoining, the published track, which
participants are users and their microphones, text typed in the frontend, and the agent
state attribute. Everything that arrives from the room arrives here first.

The link decides nothing about the call: it reports users coming and going to the call
state machine as typed events (``call.UserJoined``, ``UserLeft``, ``RoomJoined``,
``RoomLeft``), hands microphone audio and chat to the callables it was given, and shows
the agent state it is told to show.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import backoff
import call
import control
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
MAX_CHAT_CHARS = 4000
MAX_CHAT_BYTES = 4 * MAX_CHAT_CHARS  # UTF-8: at most 4 bytes a character
CHAT_PER_MINUTE, CHAT_BURST = 20.0, 5
MAX_MIXED_INPUTS = 16  # MIX_PARTICIPANTS=1: microphones mixed at most

Spawn = Callable[..., "asyncio.Task[Any]"]  # spawn(coro, name, isolated=False): a task its owner awaits or cancels


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
                 on_event: Callable[[call.Event], None], send_audio: Callable[[bytes], None],
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
        self._disconnected = asyncio.Event()
        self._disconnect_reason: int | None = None
        self.inputs: dict[str, _Input] = {}  # identity -> the microphone we bridge
        self._room_mixer: Any = None  # rtc.AudioMixer when MIX_PARTICIPANTS=1
        self._shown_state = ""
        self._state_lock = asyncio.Lock()
        self._want_state = ""
        self._input_errors = LogLimiter()  # refusals of what participants send
        self._chat_rate = control.RateLimiter(CHAT_PER_MINUTE, CHAT_BURST)

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
        the agent's identity is the one case reported as a failure."""
        from livekit import rtc

        reason = self._disconnect_reason
        name = rtc.DisconnectReason.Name(reason).lower() if reason is not None else "unknown"
        if reason == rtc.DisconnectReason.DUPLICATE_IDENTITY:
            raise FatalError(EXIT_DUPLICATE_IDENTITY, f"another participant joined room {self.cfg.room_name} as "
                                                      f"{self.cfg.agent_identity!r} (duplicate identity)")
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
        room.on("track_subscribed", lambda track, pub, p: self._scan_participants())
        room.on("track_unsubscribed", self._on_track_unsubscribed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("reconnecting", lambda: log.warning("LiveKit connection interrupted; resuming"))
        room.on("reconnected", lambda: log.info("LiveKit connection resumed"))
        room.register_text_stream_handler(TOPIC_CHAT, self._on_chat)

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
                                    rtc.ParticipantKind.PARTICIPANT_KIND_SIP)

    def _scan_participants(self) -> None:
        """(Re)consider every subscribed microphone. Idempotent: safe to call after any
        room event, including the ones the SDK re-emits after a reconnect."""
        from livekit import rtc

        room = self.room
        if room is None:
            return
        for p in room.remote_participants.values():
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
                self._attach(p.identity, track)

    def _attach(self, identity: str, track: Any) -> None:
        from livekit import rtc

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
            inp.task = self._spawn(self._pump(stream, identity), f"mic-{identity}", isolated=True)
            log.info("bridging the microphone of %s", identity)
        self._on_event(call.UserJoined(identity))

    def _room_mix(self) -> Any:
        from livekit import rtc

        if self._room_mixer is None:
            self._room_mixer = rtc.AudioMixer(SAMPLE_RATE, 1, blocksize=SAMPLE_RATE // 50, stream_timeout_ms=40)
            self._spawn(self._pump(self._room_mixer, None), "mic-mix")
        return self._room_mixer

    async def _pump(self, source: Any, identity: str | None) -> None:
        try:
            async for item in source:
                frame = getattr(item, "frame", item)  # AudioStream events, or the room mixer's frames
                self._send_audio(bytes(frame.data))
        finally:
            if identity is not None:
                await source.aclose()

    def _on_track_unsubscribed(self, track: Any, publication: Any, participant: Any) -> None:
        inp = self.inputs.get(participant.identity)
        if inp is not None and inp.track_sid == track.sid:
            self._departed(participant.identity)

    def _on_participant_disconnected(self, participant: Any) -> None:
        if participant.identity in self.inputs:
            log.info("%s left", participant.identity)
            self._departed(participant.identity)

    def _departed(self, identity: str) -> None:
        self._release_input(identity)
        self._scan_participants()  # the next user, if someone is waiting
        if identity not in self.inputs:
            self._on_event(call.UserLeft(identity))

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
        """The (first) bridged user's identity."""
        return next(iter(self.inputs), None)

    # -- text typed in the frontend --

    def _on_chat(self, reader: Any, sender: str) -> None:
        """Who sent it and how big it says it is are checked before a byte is read."""
        refusal = None
        if sender not in self.inputs:
            refusal = "not the bridged user"
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


async def _frames(stream: Any) -> Any:
    """AudioStream events -> frames, for rtc.AudioMixer."""
    async for event in stream:
        yield event.frame

