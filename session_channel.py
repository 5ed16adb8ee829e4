"""The agent session channel: ``lk.agent.session``, what the Agents Playground's debug panel
talks over (livekit-agents: ``voice/remote_session.py``).

Byte streams in both directions, each one ``livekit.protocol.agent_pb.agent_session``
``AgentSessionMessage``. The frontend sends ``SessionRequest``s to the agent (the Playground
asks for RTC stats every 5 s, for its uplink latency) and reads the ``SessionResponse`` with
the same ``request_id``, and ``AgentSessionEvent``s for its event log. This module answers
``ping``, ``get_rtc_stats`` (the room's WebRTC stats, as livekit-agents sends them),
``get_session_state`` and ``get_framework_info``, and answers anything else with an error
(so nobody waits for a timeout); and it sends the events it knows (agent state, user state,
the user's transcripts, the conversation's messages) to the participants that asked it
something. A request is input from a participant like any other: only users of the call,
its size checked before a byte is read and read with a cap, rate-limited, a malformed one
dropped with one log line (rate-limited); answering never logs a line.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from typing import Any, Callable

import control
from logs import LogLimiter, one_line

log = logging.getLogger("worker")

TOPIC = "lk.agent.session"
MAX_REQUEST_BYTES = 64 * 1024
REQUESTS_PER_MINUTE, REQUESTS_BURST = 60.0, 10
MAX_LISTENERS = 8  # participants sent events at once
SDK = "livekit-assemblyai-voice-agent-bridge"
SDK_VERSION = "1"

_AGENT_STATES = {"initializing": "AS_INITIALIZING", "listening": "AS_LISTENING", "thinking": "AS_THINKING",
                 "speaking": "AS_SPEAKING"}


def _pb() -> Any:
    from livekit.protocol.agent_pb import agent_session

    return agent_session


def _timestamp(at: float | None = None) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


class SessionChannel:
    """See the module's docstring. ``room()``: the joined rtc.Room or None; ``is_user``: a
    user of the call; ``agent_state()``: what lk.agent.state shows; ``spawn(coro, name,
    isolated=True)``: the owner's task spawner."""

    def __init__(self, *, room: Callable[[], Any], is_user: Callable[[str], bool],
                 agent_state: Callable[[], str], agent_identity: str, spawn: Callable[..., Any]) -> None:
        self._room = room
        self._is_user = is_user
        self._agent_state = agent_state
        self._agent_identity = agent_identity
        self._spawn = spawn
        self._rate = control.RateLimiter(REQUESTS_PER_MINUTE, REQUESTS_BURST)
        self._errors = LogLimiter()
        self._listeners: dict[str, None] = {}  # who asked something: they get the events
        self._outbox: collections.deque[tuple[Any, list[str]]] = collections.deque(maxlen=64)
        self._sender: Any = None  # the task sending the outbox, in order
        self._shown_state = "initializing"
        self._user_state = "listening"
        self.started_at = time.time()
        self.counters = {"requests": 0, "refused": 0, "malformed": 0, "events": 0}

    def register(self, room: Any) -> None:
        """On every joined room (a rejoin is a new Room)."""
        room.register_byte_stream_handler(TOPIC, self._on_stream)

    # -- requests --

    def _on_stream(self, reader: Any, sender: str) -> None:
        refusal = None
        if not self._is_user(sender):
            refusal = "not a user of this call"
        elif (reader.info.size or 0) > MAX_REQUEST_BYTES:
            refusal = f"{reader.info.size} bytes, over the {MAX_REQUEST_BYTES}-byte limit"
        elif not self._rate.allow(sender):
            refusal = "too many requests"
        if refusal is not None:
            _close(reader)
            self.counters["refused"] += 1
            if self._errors.allow(f"refused:{sender}"):
                log.info("ignoring %s messages from %s (%s)", TOPIC, _printable(sender), refusal)
            return
        self._spawn(self._read(reader, sender), "session-channel", isolated=True)

    async def _read(self, reader: Any, sender: str) -> None:
        from google.protobuf.message import DecodeError
        from livekit import rtc

        data = bytearray()
        try:
            async for chunk in reader:
                if len(data) + len(chunk) > MAX_REQUEST_BYTES:
                    _close(reader)
                    raise ValueError(f"over the {MAX_REQUEST_BYTES}-byte limit")
                data += chunk
            msg = _pb().AgentSessionMessage()
            msg.ParseFromString(bytes(data))
        except (rtc.StreamError, DecodeError, ValueError) as e:
            self.counters["malformed"] += 1
            if self._errors.allow(f"malformed:{sender}"):
                log.info("ignoring an %s message from %s (%s)", TOPIC, _printable(sender), one_line(e)[:160])
            return
        if msg.WhichOneof("message") != "request":
            return  # audio of the console transport, or our own kind of message: not for us
        self.counters["requests"] += 1
        self._listen(sender)
        response = await self._respond(msg.request)
        await self._send(_pb().AgentSessionMessage(response=response), [sender])

    async def _respond(self, req: Any) -> Any:
        pb = _pb()
        kind = req.WhichOneof("request")
        resp = pb.SessionResponse(request_id=req.request_id)
        if kind == "ping":
            resp.pong.SetInParent()
        elif kind == "get_rtc_stats":
            publisher, subscriber = await self._rtc_stats()
            resp.get_rtc_stats.publisher_stats.extend(publisher)
            resp.get_rtc_stats.subscriber_stats.extend(subscriber)
            resp.get_rtc_stats.SetInParent()
        elif kind == "get_session_state":
            state = resp.get_session_state
            state.agent_state = getattr(pb, _AGENT_STATES.get(self._agent_state(), "AS_LISTENING"))
            state.user_state = pb.US_SPEAKING if self._user_state == "speaking" else pb.US_LISTENING
            state.agent_id = self._agent_identity
            state.created_at.CopyFrom(_timestamp(self.started_at))
        elif kind == "get_framework_info":
            resp.get_framework_info.sdk = SDK
            resp.get_framework_info.sdk_version = SDK_VERSION
        else:
            resp.error = f"{kind or 'this request'} is not supported by this agent"
        return resp

    async def _rtc_stats(self) -> tuple[list[Any], list[Any]]:
        """The room's WebRTC stats as google.protobuf.Struct lists (what livekit-agents sends
        and the Playground parses: candidate pairs' round-trip time, the jitter buffer)."""
        from google.protobuf.json_format import MessageToDict
        from google.protobuf.struct_pb2 import Struct

        room = self._room()
        if room is None or not room.isconnected():
            return [], []
        try:
            stats = await room.get_rtc_stats()
        except Exception as e:  # noqa: BLE001 - no stats is an empty answer, not a failure
            log.debug("no RTC stats: %s", one_line(e))
            return [], []

        def structs(items: list[Any]) -> list[Any]:
            out = []
            for item in items:
                s = Struct()
                s.update(MessageToDict(item))
                out.append(s)
            return out

        return structs(stats.publisher_stats), structs(stats.subscriber_stats)

    # -- events --

    def _listen(self, identity: str) -> None:
        self._listeners.pop(identity, None)
        self._listeners[identity] = None
        while len(self._listeners) > MAX_LISTENERS:
            self._listeners.pop(next(iter(self._listeners)))

    def agent_state(self, state: str) -> None:
        old, self._shown_state = self._shown_state, state
        if old == state:
            return
        pb = _pb()
        self._event(pb.AgentSessionEvent(agent_state_changed=pb.AgentSessionEvent.AgentStateChanged(
            old_state=getattr(pb, _AGENT_STATES.get(old, "AS_LISTENING")),
            new_state=getattr(pb, _AGENT_STATES.get(state, "AS_LISTENING")))))

    def user_speaking(self, speaking: bool) -> None:
        new = "speaking" if speaking else "listening"
        old, self._user_state = self._user_state, new
        if old == new:
            return
        pb = _pb()
        states = {"speaking": pb.US_SPEAKING, "listening": pb.US_LISTENING}
        self._event(pb.AgentSessionEvent(user_state_changed=pb.AgentSessionEvent.UserStateChanged(
            old_state=states[old], new_state=states[new])))

    def user_transcript(self, text: str, final: bool) -> None:
        pb = _pb()
        self._event(pb.AgentSessionEvent(user_input_transcribed=pb.AgentSessionEvent.UserInputTranscribed(
            transcript=text[:4000], is_final=final)))
        if final:
            self.message("user", text)

    def message(self, role: str, text: str, interrupted: bool = False) -> None:
        """A message of the conversation: what the user said or typed, what the agent said."""
        pb = _pb()
        item = pb.ChatContext.ChatItem(message=pb.ChatMessage(
            id=f"item_{secrets.token_hex(6)}", role=pb.USER if role == "user" else pb.ASSISTANT,
            content=[pb.ChatMessage.ChatContent(text=text[:4000])], interrupted=interrupted,
            created_at=_timestamp()))
        self._event(pb.AgentSessionEvent(conversation_item_added=pb.AgentSessionEvent.ConversationItemAdded(
            item=item)))

    def _event(self, event: Any) -> None:
        room = self._room()
        listeners = [i for i in self._listeners if self._is_user(i)]
        if room is None or not listeners:
            return
        event.created_at.CopyFrom(_timestamp())
        self.counters["events"] += 1
        self._outbox.append((_pb().AgentSessionMessage(event=event), listeners))
        if self._sender is None or self._sender.done():
            self._sender = self._spawn(self._drain(), "session-channel", isolated=True)

    async def _drain(self) -> None:
        while self._outbox:
            msg, to = self._outbox.popleft()
            await self._send(msg, to)

    async def _send(self, msg: Any, to: list[str]) -> None:
        room = self._room()
        if room is None or not room.isconnected():
            return
        try:
            writer = await room.local_participant.stream_bytes(
                name=f"AS_{secrets.token_hex(6)}", topic=TOPIC, destination_identities=to)
            await writer.write(msg.SerializeToString())
            await writer.aclose()
        except Exception as e:  # noqa: BLE001 - the asker may have left; the call goes on
            log.debug("could not send an %s message: %s", TOPIC, one_line(e))


def _close(reader: Any) -> None:
    try:
        reader.close()
    except Exception:  # noqa: BLE001
        pass


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(text))[:64]
