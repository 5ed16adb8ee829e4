"""The audio output as the call side sees it: the contract worker.py and captions.py are
written against (``AudioOutput``), in the spirit of livekit-agents' room_io audio output
(capture, clear, ``wait_for_playout``, playback events), whatever mixes the audio.

``mixer.Mixer`` fulfils it: its playback events are typed, delivered on the caller's event
loop at the moment the audio is heard (leaves the source), and withdrawn if the frames they
belong to are mixed again before that (a barge-in, or a reply mixed into queued frames).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from mixer import PlaybackEvent, PlayoutDone, ReplyAudioStopped, ReplyStartedPlaying, ReplyStats

__all__ = ["AudioOutput", "PlaybackEvent", "PlayoutDone", "ReplyAudioStopped", "ReplyStartedPlaying", "ReplyStats"]


class AudioOutput(Protocol):
    """What the call needs of the audio output. Every method is called on the event loop."""

    def push_reply(self, reply_id: str, pcm: bytes) -> None:
        """Queue a chunk of the reply (PCM16 24 kHz mono); it plays after what is queued."""

    def interrupt(self, reply_id: str | None = None) -> ReplyStats | None:
        """Barge-in: drop the reply's queued audio now (a few-ms fade). Its stats."""

    def reply_stats(self, reply_id: str) -> ReplyStats | None:
        """Samples of the reply received and handed to the output so far."""

    async def wait_for_playout(self, reply_id: str | None = None) -> PlayoutDone:
        """Until every sample of the reply (``None``: of every reply) queued so far has been
        heard, or was dropped."""

    def add_listener(self, callback: Callable[[PlaybackEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on the running loop with each playback event, when it is heard.
        Returns the function that removes the listener."""

    def start_thinking(self, name: str, samples: np.ndarray, volume: float | None = None) -> Any:
        """Loop a thinking cue until the reply starts or ``stop_thinking``."""

    def stop_thinking(self) -> None: ...

    def play_cue(self, name: str, samples: np.ndarray, volume: float) -> Awaitable[bool]:
        """Play a one-shot cue; awaiting it gives True once it has played to its end, False
        if it was stopped."""
