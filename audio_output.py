"""The audio output as the call side sees it: the contract worker.py and captions.py are
written against (``AudioOutput``), in the spirit of livekit-agents' room_io audio output
(capture, clear, ``wait_for_playout``, playback events), whatever mixes the audio.

``MixerOutput`` fulfils it over today's ``mixer.Mixer``: it turns the mixer's playback
callbacks (strings and a delay, on the audio thread) into typed events delivered on the
event loop at the moment they are heard. Once mixer.py has typed events, ``add_listener``
and ``wait_for_playout`` itself (the performance engineer's work in flight), the adapter
becomes a re-export and the call side does not change.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union

import numpy as np

from mixer import ReplyStats


@dataclass(frozen=True)
class ReplyStartedPlaying:
    """A reply's first sample is being heard (``at``: the loop's ``time.monotonic()``)."""

    reply_id: str
    at: float


@dataclass(frozen=True)
class ReplyAudioStopped:
    """Reply audio stopped being heard: the reply ran out (it ended, or the API is late with
    the rest) or was interrupted."""

    reply_id: str | None
    at: float


PlaybackEvent = Union[ReplyStartedPlaying, ReplyAudioStopped]


class AudioOutput(Protocol):
    """What the call needs of the audio output. Every method is called on the event loop."""

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        """Queue a chunk of the reply (PCM16 24 kHz mono); it plays after what is queued."""

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        """Barge-in: drop the reply's queued audio now (a few-ms fade). Its stats."""

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        """Samples of the reply received and handed to the output so far."""

    async def wait_for_playout(self) -> None:
        """Until every reply sample queued so far has been heard (or dropped)."""

    def add_listener(self, callback: Callable[[PlaybackEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on the running loop with each playback event, when it is heard.
        Returns the function that removes the listener."""

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> Any:
        """Loop a thinking cue until the reply starts or ``stop_thinking``."""

    def stop_thinking(self) -> None: ...

    async def play_cue(self, name: str, samples: np.ndarray, volume: float) -> bool:
        """Play a one-shot cue; True once it has played to its end, False if stopped."""


class MixerOutput:
    """``AudioOutput`` over ``mixer.Mixer`` (see the module's docstring)."""

    def __init__(self, mixer: Any) -> None:
        self.mixer = mixer
        self._listeners: list[Callable[[PlaybackEvent], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        mixer.on_event = self._on_mixer_event

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        self.mixer.push_reply(reply_id, pcm)

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        return self.mixer.interrupt(reply_id)

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        return self.mixer.reply_stats(reply_id)

    async def wait_for_playout(self) -> None:
        await self.mixer.wait_reply_played()

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> Any:
        return self.mixer.start_thinking(name, samples, volume)

    def stop_thinking(self) -> None:
        self.mixer.stop_thinking()

    async def play_cue(self, name: str, samples: np.ndarray, volume: float) -> bool:
        return bool(await self.mixer.play_cue(name, samples, volume))

    def add_listener(self, callback: Callable[[PlaybackEvent], None]) -> Callable[[], None]:
        self._loop = asyncio.get_running_loop()
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def _on_mixer_event(self, name: str, reply_id: str | None, delay: float) -> None:
        """On the audio thread: a reply became audible, or reply audio stopped, ``delay``
        seconds from now (the output's queue ahead of it)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(loop.call_later, delay, self._deliver, name, reply_id)

    def _deliver(self, name: str, reply_id: str | None) -> None:
        loop = self._loop
        at = loop.time() if loop is not None else 0.0
        if name == "playing" and reply_id is not None:
            event: PlaybackEvent = ReplyStartedPlaying(reply_id, at)
        elif name == "idle":
            event = ReplyAudioStopped(reply_id, at)
        else:
            return
        for callback in list(self._listeners):
            callback(event)
