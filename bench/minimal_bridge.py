#!/usr/bin/env python3
"""The minimal bridge: the benchmark's baseline for what a call costs without a mixer.

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... ROOM_NAME=... \
    ASSEMBLYAI_API_KEY=... VOICE_AGENT_URL=... python bench/minimal_bridge.py

Written the way the provider's LiveKit tutorial does it, and no further: one file, one
bare ``websockets`` loop, no reconnect, no resume, no tools, no captions, no agent state, no
ambient bed, no mixer. It joins the room as the agent, forwards the first user's microphone
(``rtc.AudioStream`` at 24 kHz with the SDK's default frame size, sent as 50 ms
``input.audio`` messages once the session is ready), and captures every ``reply.audio``
chunk straight into an ``rtc.AudioSource`` with the SDK's default 1000 ms queue. Barge-in:
when the service says a reply was interrupted (``transcript.agent {interrupted: true}`` or
``reply.done {status: "interrupted"}``, whichever comes first, the trigger the worker's
default ``BARGE_IN=interrupted`` uses), ``clear_queue()``, and later audio of that reply is
dropped.

It exists only so ``bench/e2e_bench.py`` can measure our worker against it in the same run
(``bench/README.md`` says why it does not reuse ``bridge.py``). It prints ``ready: in room``
once its track is published, which is what the bench waits for. Not for production.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import websockets
from livekit import api, rtc

RATE = 24000
SEND_BYTES = RATE * 2 // 20  # 50 ms of 16-bit mono per input.audio message


async def main() -> None:
    env = os.environ
    room_name = env.get("ROOM_NAME", "voice-agent-demo")
    identity = env.get("AGENT_IDENTITY", "voice-agent")
    token = (api.AccessToken(env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"])
             .with_identity(identity).with_name(identity).with_kind("agent")
             .with_grants(api.VideoGrants(room_join=True, room=room_name, can_publish=True, can_subscribe=True))
             .to_jwt())

    ws = await websockets.connect(env.get("VOICE_AGENT_URL", "wss://agents.assemblyai.com/v1/ws"),
                                  additional_headers={"Authorization": f"Bearer {env['ASSEMBLYAI_API_KEY']}"})
    await ws.send(json.dumps({"type": "session.update", "session": {
        "system_prompt": env.get("SYSTEM_PROMPT", "You are a friendly assistant."),
        "input": {"format": {"encoding": "audio/pcm"}},
        "output": {"format": {"encoding": "audio/pcm"}},
    }}))
    ready = asyncio.Event()

    room = rtc.Room()
    source = rtc.AudioSource(RATE, 1)  # the SDK default: a 1000 ms queue
    track = rtc.LocalAudioTrack.create_audio_track("agent-audio", source)
    mic_tasks: set[asyncio.Task] = set()

    async def forward_mic(remote: rtc.Track) -> None:
        stream = rtc.AudioStream.from_track(track=remote, sample_rate=RATE, num_channels=1)
        pending = b""
        async for event in stream:
            if not ready.is_set():
                continue
            pending += bytes(event.frame.data)
            if len(pending) >= SEND_BYTES:
                await ws.send(json.dumps({"type": "input.audio", "audio": base64.b64encode(pending).decode()}))
                pending = b""

    @room.on("track_subscribed")
    def on_track(remote: rtc.Track, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant):
        if remote.kind == rtc.TrackKind.KIND_AUDIO and not mic_tasks:
            task = asyncio.create_task(forward_mic(remote))
            mic_tasks.add(task)

    await room.connect(env["LIVEKIT_URL"], token)
    await room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    print("ready: in room", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def receive() -> None:
        interrupted: set[str] = set()
        carry = b""
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "session.ready":
                ready.set()
            elif kind == "reply.audio":
                if msg.get("reply_id") in interrupted:
                    continue
                pcm = carry + base64.b64decode(msg["data"])
                pcm, carry = (pcm[:-1], pcm[-1:]) if len(pcm) % 2 else (pcm, b"")
                if pcm:
                    await source.capture_frame(rtc.AudioFrame(pcm, RATE, 1, len(pcm) // 2))
            elif (kind == "transcript.agent" and msg.get("interrupted")) or \
                    (kind == "reply.done" and msg.get("status") == "interrupted"):
                if msg.get("reply_id") not in interrupted:
                    interrupted.add(msg.get("reply_id"))
                    source.clear_queue()
                    carry = b""

    receiver = asyncio.create_task(receive())
    await asyncio.wait({receiver, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    receiver.cancel()
    for task in mic_tasks:
        task.cancel()
    try:
        await asyncio.wait_for(ws.send(json.dumps({"type": "session.end"})), 1)
    except Exception:  # noqa: BLE001 - the socket may be gone already
        pass
    await ws.close()
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
