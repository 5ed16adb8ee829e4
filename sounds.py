"""Sound assets: turn a file, bytes or a built-in name into one clean 24 kHz mono buffer.

Everything here is synchronous and CPU-bound: decode once per asset, then loop the result from
memory. From an event loop, decode in `decode_executor()`'s one thread, which runs at ordinary
priority even when the process is real-time (control.py does).

    sound = load("sounds/cafe.mp3", target_lufs=-30.0)   # or load("builtin:office", ...)
    sound.samples     # float32, mono, 24 kHz, nominal range [-1, 1], read-only
    sound.loudness_lufs

Pipeline: decode (WAV natively; MP3, AAC, FLAC, Ogg, Matroska/WebM, MP4/M4A and AIFF through
PyAV, imported lazily) -> downmix to mono -> resample once to 24 kHz -> measure loudness
(ITU-R BS.1770-4) -> optional gain to a target loudness, limited so peaks stay below 0.99.

Decoding treats every file as hostile (sounds are uploaded at run time, see control.py): the
container is recognised from its first bytes and only that one FFmpeg demuxer is used, with no
protocol, no nested file and no other demuxer or decoder allowed, so FFmpeg never probes among
its hundreds of formats (SDP, concat, HLS... would open sockets and local files). Rate, channels
and duration are checked from the headers before decoding and again as frames arrive, frames are
downmixed and resampled to 24 kHz as they come, and decoding stops as soon as the duration limit
is passed: memory follows the allowed duration at 24 kHz mono, not what the header claims.

Every failure a user can cause raises `SoundError`, whose message is one line naming the file
(or configuration entry) and the fix. The built-ins' synthesis is in builtin_sounds.py.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import math
import os
import random
import re
import shlex
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

from builtin_sounds import BUILTINS, DEFAULT_SECONDS, synthesise
from pcm import SAMPLE_RATE  # every sound is decoded to the one rate the process plays

__all__ = [
    "SAMPLE_RATE",
    "MAX_FILE_BYTES",
    "MAX_DURATION_S",
    "SoundError",
    "Sound",
    "load",
    "decode_bytes",
    "decode_wav",
    "sniff_format",
    "decode_executor",
    "run_in_background",
    "lower_thread_priority",
    "to_mono_24k",
    "integrated_loudness",
    "k_weighting_coefficients",
    "normalize",
    "make_seamless_loop",
    "Clip",
    "parse_clip_list",
    "pick_clip",
    "BUILTINS",
    "builtin",
    "Choice",
    "ClipBank",
]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 200_000_000
MAX_DURATION_S = 30 * 60
PEAK_CEILING = 0.99
BUILTIN_PREFIX = "builtin:"
_MIN_RATE, _MAX_RATE = 4000, 768000
_MAX_CHANNELS = 64
# Decoding work per second of audio, in samples over all channels: 7.1 at 96 kHz, stereo at
# 384 kHz. A header that asks for more (a 40 KB FLAC can declare 6 channels at 655 kHz) is refused
# before decoding; frames that exceed it mid-stream stop the decode.
_MAX_SAMPLES_PER_S = 768_000
_MAX_WAV_CHUNKS = 10_000
_FLOAT_LIMIT = 1e4  # float samples beyond +-80 dBFS are damage: clipped, so no sum overflows

_T = TypeVar("_T")


class SoundError(ValueError):
    """A sound asset cannot be used; str(e) is one user-facing line naming the asset and the fix."""


@dataclass(frozen=True, eq=False)
class Sound:
    """A decoded asset, ready to loop: float32 mono at `SAMPLE_RATE`, read-only.

    `loudness_lufs` is the integrated loudness (BS.1770-4) of the decoded material as it will be
    played (mono, 24 kHz) BEFORE normalisation; None when the material is silent. Note that for a
    stereo file whose channels are identical this reads 3 LU below a stereo meter, because the
    mono downmix is what we measure and play.
    """

    name: str
    samples: np.ndarray
    source_rate: int
    loudness_lufs: float | None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load(source: str, *, target_lufs: float | None = None, max_duration_s: float | None = None) -> Sound:
    """Load a file path or "builtin:<name>" as a `Sound`, optionally normalised to `target_lufs`.

    `max_duration_s` lowers the duration limit (MAX_DURATION_S) for files; it is enforced while
    decoding."""
    if source.lower().startswith(BUILTIN_PREFIX):
        samples = builtin(source)  # its errors quote `source` as written
        return _finish(
            BUILTIN_PREFIX + source[len(BUILTIN_PREFIX) :].strip().lower(), samples, SAMPLE_RATE, target_lufs
        )
    return decode_bytes(_read_file(source), name=source, target_lufs=target_lufs, max_duration_s=max_duration_s)


def decode_bytes(
    data: bytes, *, name: str = "upload", target_lufs: float | None = None, max_duration_s: float | None = None
) -> Sound:
    """Decode in-memory bytes to a `Sound`: WAV natively, the other allowed containers through PyAV.

    `max_duration_s` (at most MAX_DURATION_S) is checked against the headers before decoding and
    enforced while decoding: a longer file raises SoundError without being decoded to the end."""
    if not data:
        raise SoundError(f"{name}: the sound is empty (0 bytes); provide a WAV/MP3/OGG/FLAC file with audio")
    limit_s = _limit(max_duration_s)
    if len(data) > MAX_FILE_BYTES:
        raise SoundError(
            f"{name}: {len(data) / 1e6:.0f} MB is over the {MAX_FILE_BYTES / 1e6:.0f} MB limit; "
            f"shorten or convert it: {_ffmpeg_hint(name, trim=True, limit_s=limit_s)}"
        )
    kind = sniff_format(data)
    if kind == "wav":
        mono, rate = _wav_mono(data, name, limit_s)
        return _finish(name, to_mono_24k(mono, rate), rate, target_lufs, owned=True)
    if kind is None:
        raise SoundError(
            f"{name}: cannot decode this file: it is not WAV, MP3, AAC, FLAC, Ogg, WebM/Matroska, MP4/M4A or "
            f"AIFF (it starts with {bytes(data[:4])!r}); convert it: {_ffmpeg_hint(name)}"
        )
    mono, rate = _decode_with_av(data, name, kind, limit_s)
    return _finish(name, mono, rate, target_lufs, owned=True)


def _limit(max_duration_s: float | None) -> float:
    limit = float(MAX_DURATION_S)
    if max_duration_s is not None and math.isfinite(max_duration_s) and max_duration_s > 0:
        limit = min(limit, float(max_duration_s))
    return limit


def _finish(
    name: str, mono: np.ndarray, source_rate: int, target_lufs: float | None, *, owned: bool = False
) -> Sound:
    """Measure, normalise (gain only, peak-safe) and freeze a mono 24 kHz buffer; `owned`: the
    buffer is ours (just decoded, float32), so the gain is applied in place, without a copy."""
    loudness = integrated_loudness(mono, SAMPLE_RATE)
    measured = loudness if math.isfinite(loudness) else None
    gain_db = target_lufs - measured if target_lufs is not None and measured is not None else 0.0
    if owned and mono.dtype == np.float32 and mono.flags.writeable and mono.flags.c_contiguous:
        mono *= np.float32(_limited_gain(mono, gain_db, name))
        out = mono
    else:
        out = _apply_gain(mono, gain_db, name)
    out.setflags(write=False)
    return Sound(name=name, samples=out, source_rate=int(source_rate), loudness_lufs=measured)


def _read_file(path_text: str) -> bytes:
    path = Path(path_text).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SoundError(
            f"{path_text}: sound file not found (looked at {path.resolve()}); fix the path, "
            f"or use one of the built-ins: {_builtin_choices()}"
        ) from None
    except OSError as e:
        raise SoundError(
            f"{path_text}: cannot access the sound file ({e.strerror}); check the path and permissions"
        ) from None
    if path.is_dir():
        raise SoundError(f"{path_text}: is a directory, not a sound file; point to a file inside it")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read; /dev/zero never ends; both say size 0
        raise SoundError(f"{path_text}: is not a regular file (a pipe or a device); point to a sound file")
    if st.st_size == 0:
        raise SoundError(f"{path_text}: the sound file is empty (0 bytes); re-export or re-copy it")
    if st.st_size > MAX_FILE_BYTES:
        raise SoundError(
            f"{path_text}: {st.st_size / 1e6:.0f} MB is over the {MAX_FILE_BYTES / 1e6:.0f} MB limit; "
            f"shorten or convert it: {_ffmpeg_hint(path_text, trim=True)}"
        )
    try:
        data = path.read_bytes()
    except PermissionError:
        raise SoundError(
            f"{path_text}: permission denied reading the sound file; make it readable (chmod a+r)"
        ) from None
    except OSError as e:
        raise SoundError(
            f"{path_text}: cannot read the sound file ({e.strerror}); check the file and the disk"
        ) from None
    if len(data) > MAX_FILE_BYTES:  # it grew after stat()
        raise SoundError(
            f"{path_text}: {len(data) / 1e6:.0f} MB is over the {MAX_FILE_BYTES / 1e6:.0f} MB limit; "
            f"shorten or convert it: {_ffmpeg_hint(path_text, trim=True)}"
        )
    return data


def _ffmpeg_hint(name: str, *, trim: bool = False, limit_s: float | None = None) -> str:
    """The one-line conversion that always works: ffmpeg to 24 kHz mono WAV."""
    src = Path(name)
    stem = src.stem or "output"
    out = f"{stem}-24k.wav" if src.suffix.lower() == ".wav" else f"{stem}.wav"
    limit = f" -t {_seconds(_limit(limit_s))}" if trim else ""
    return f"ffmpeg -i {shlex.quote(name)} -ac 1 -ar {SAMPLE_RATE}{limit} {shlex.quote(out)}"


def _seconds(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{_seconds(seconds)} s"


def _check_duration(name: str, frames: int, rate: int, limit_s: float | None = None) -> None:
    """Refuse `frames` at `rate` when that is longer than the limit (MAX_DURATION_S by default)."""
    limit = _limit(limit_s)
    if frames > limit * rate:
        raise SoundError(
            f"{name}: {frames / rate / 60:.1f} min of audio is over the {_minutes(limit)} limit; "
            f"trim it: {_ffmpeg_hint(name, trim=True, limit_s=limit)}"
        )


def _too_long(name: str, limit_s: float) -> SoundError:
    """The same refusal while decoding, when the total is not known yet."""
    return SoundError(
        f"{name}: the audio is longer than the {_minutes(limit_s)} limit (stopped decoding there); "
        f"trim it: {_ffmpeg_hint(name, trim=True, limit_s=limit_s)}"
    )


# --------------------------------------------------------------------------------------------
# Which container: recognised from the first bytes, never left to FFmpeg's probing
# --------------------------------------------------------------------------------------------

# sniff_format() name -> the one FFmpeg demuxer allowed to read it.
_DEMUXERS: Mapping[str, str] = MappingProxyType(
    {
        "mp3": "mp3",  # MPEG audio layer I/II/III, with or without ID3v2
        "aac": "aac",  # ADTS
        "flac": "flac",
        "ogg": "ogg",  # Vorbis, Opus, FLAC in Ogg
        "matroska": "matroska",  # MKA, MKV, WebM
        "mov": "mov",  # MP4, M4A, MOV, 3GP
        "aiff": "aiff",  # AIFF, AIFF-C
    }
)
# Decoders allowed, by codec id; everything else (video, subtitles, exotic audio) is never opened.
_CODECS = frozenset(
    {"mp3", "mp2", "mp1", "aac", "flac", "vorbis", "opus", "alac"}
    | {f"pcm_{k}" for k in ("u8", "s8", "alaw", "mulaw")}
    | {f"pcm_{k}{e}" for k in ("s16", "s24", "s32", "f32", "f64") for e in ("le", "be")}
)
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


def sniff_format(data: bytes) -> str | None:
    """Recognise an audio container from its first bytes: "wav", a key of the allowed demuxers
    ("mp3", "aac", "flac", "ogg", "matroska", "mov", "aiff"), or None (not allowed)."""
    head = bytes(data[:12])
    if _looks_like_wav(head):
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if len(head) >= 8 and head[4:8] in _MOV_BOXES:
        return "mov"
    pos = 0
    for _ in range(4):  # ID3v2 tags (possibly several) before MPEG audio, ADTS or FLAC
        tag = bytes(data[pos : pos + 10])
        if len(tag) < 10 or tag[:3] != b"ID3" or any(b & 0x80 for b in tag[6:10]):
            break
        size = (tag[6] << 21) | (tag[7] << 14) | (tag[8] << 7) | tag[9]
        pos += 10 + size + (10 if tag[5] & 0x10 else 0)
    after = bytes(data[pos : pos + 4])
    if pos and after == b"fLaC":
        return "flac"
    if len(after) >= 2 and after[0] == 0xFF and after[1] & 0xE0 == 0xE0:
        layer = (after[1] >> 1) & 3
        if layer == 0:
            return "aac" if after[1] & 0xF6 == 0xF0 else None
        return "mp3"
    return "mp3" if pos else None  # an ID3 tag, then padding or junk: the MP3 demuxer resyncs


# --------------------------------------------------------------------------------------------
# Decoding off the event loop, at ordinary priority
# --------------------------------------------------------------------------------------------

_DECODE_NICE = 10
_DECODE_THREAD_NAME = "sound-decode"
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def lower_thread_priority() -> None:
    """Make the calling thread ordinary background work: SCHED_OTHER, nice >= 10.

    The worker runs real-time (SCHED_RR) when it may, and threads inherit their creator's
    policy, so a decoding thread started from the event loop would compete with the audio.
    Lowering is always allowed; errors (no such call on this OS) are ignored."""
    tid = threading.get_native_id()
    try:
        if os.sched_getscheduler(tid) != os.SCHED_OTHER:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < _DECODE_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, _DECODE_NICE)
    except (AttributeError, OSError):
        pass


def run_in_background(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call `fn` after lower_thread_priority(): for work handed to a thread, e.g.
    ``loop.run_in_executor(decode_executor(), run_in_background, sounds.load, path)``."""
    lower_thread_priority()
    return fn(*args, **kwargs)


def _init_decode_thread() -> None:
    lower_thread_priority()
    try:  # named in top/ps and in /proc/<pid>/task/*/comm
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(_DECODE_THREAD_NAME)
    except OSError:
        pass


def decode_executor() -> concurrent.futures.Executor:
    """The process's one decoding thread (created on first use, at ordinary priority): decodes
    queue there one at a time instead of competing for the CPU with the audio."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=_DECODE_THREAD_NAME, initializer=_init_decode_thread
            )
        return _executor


# --------------------------------------------------------------------------------------------
# WAV (RIFF/RIFX/RF64) parser
# --------------------------------------------------------------------------------------------

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_CODEC_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0x0002: "MS ADPCM",
        0x0006: "A-law",
        0x0007: "µ-law",
        0x0011: "IMA ADPCM",
        0x0031: "GSM 6.10",
        0x0050: "MPEG",
        0x0055: "MP3",
        0x00FF: "AAC",
        0x1610: "AAC",
        0xF1AC: "FLAC",
    }
)
_UNKNOWN_SIZE = 0xFFFFFFFF
_WAV_BLOCK_FRAMES = 1 << 16  # frames converted to float at a time when downmixing


@dataclass(frozen=True)
class _WavFormat:
    tag: int  # 1 = integer PCM, 3 = IEEE float (extensible already resolved)
    channels: int
    rate: int
    bytes_per_sample: int  # container size


def _looks_like_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and data[8:12] == b"WAVE"


def decode_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Decode a WAV file held in memory; returns (frames x channels float32, sample rate).

    Integer PCM 8/16/24/32-bit and IEEE float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE, RIFF
    (little-endian), RIFX (big-endian) and RF64. Unknown chunks are skipped, odd chunk sizes are
    padded, and a data size that is 0xFFFFFFFF (streaming writers) or larger than the file
    (truncated copy) means "everything until the end of the file". Any malformed header is a
    SoundError.
    """
    fmt, usable, endian, frames_count = _wav_layout(data, name, None)
    samples = _pcm_to_float(usable, fmt, endian)
    return samples.reshape(frames_count, fmt.channels), fmt.rate


def _wav_mono(data: bytes, name: str, limit_s: float) -> tuple[np.ndarray, int]:
    """Decode a WAV straight to mono float32 at its own rate, a block of frames at a time (no
    float copy of every channel of the whole file); the duration is checked first."""
    fmt, usable, endian, frames_count = _wav_layout(data, name, limit_s)
    mono = np.empty(frames_count, dtype=np.float32)
    frame_bytes = fmt.channels * fmt.bytes_per_sample
    weights = np.full(fmt.channels, 1.0 / fmt.channels, dtype=np.float32)
    for start in range(0, frames_count, _WAV_BLOCK_FRAMES):
        stop = min(frames_count, start + _WAV_BLOCK_FRAMES)
        block = _pcm_to_float(usable[start * frame_bytes : stop * frame_bytes], fmt, endian)
        if fmt.channels == 1:
            mono[start:stop] = block
        else:  # a matrix-vector product: the mean of the channels
            mono[start:stop] = block.reshape(stop - start, fmt.channels) @ weights
    return mono, fmt.rate


def _wav_layout(data: bytes, name: str, limit_s: float | None) -> tuple[_WavFormat, memoryview, str, int]:
    if not _looks_like_wav(data):
        raise SoundError(
            f"{name}: not a WAV file (no RIFF/WAVE header, starts with {bytes(data[:4])!r}); "
            f"convert it: {_ffmpeg_hint(name)}"
        )
    endian = ">" if data[:4] == b"RIFX" else "<"
    fmt, body = _wav_chunks(data, name, endian)
    frames_count = len(body) // (fmt.channels * fmt.bytes_per_sample)
    if frames_count == 0:
        raise SoundError(f"{name}: the WAV file contains no audio samples; re-export it with audio")
    _check_duration(name, frames_count, fmt.rate, limit_s)
    return fmt, body[: frames_count * fmt.channels * fmt.bytes_per_sample], endian, frames_count


def _damaged(name: str, what: str) -> SoundError:
    return SoundError(
        f"{name}: damaged or truncated WAV header ({what}); re-export it or convert it: {_ffmpeg_hint(name)}"
    )


def _wav_chunks(data: bytes, name: str, endian: str) -> tuple[_WavFormat, memoryview]:
    """Walk the chunk list; return the format and a view of the (possibly truncated) data."""
    view = memoryview(data)
    fmt: _WavFormat | None = None
    body: memoryview | None = None
    ds64_data_size: int | None = None
    rf64 = bytes(data[:4]) in (b"RF64", b"BW64")
    pos = 12
    for _ in range(_MAX_WAV_CHUNKS):
        if pos + 8 > len(data):
            break
        chunk_id = bytes(view[pos : pos + 4])
        (size,) = struct.unpack_from(endian + "I", data, pos + 4)
        start = pos + 8
        available = len(data) - start
        if chunk_id == b"ds64" and rf64:
            if size < 16 or available < 16:
                raise _damaged(name, "RF64 'ds64' chunk too short")
            (ds64_data_size,) = struct.unpack_from("<Q", data, start + 8)
        elif chunk_id == b"fmt ":
            fmt = _parse_fmt(view[start : start + min(size, available)], name, endian)
        elif chunk_id == b"data":
            if size == _UNKNOWN_SIZE and ds64_data_size is not None:
                size = ds64_data_size
            if size == _UNKNOWN_SIZE or size > available:
                if size != _UNKNOWN_SIZE:  # a cut-off copy: its audio plays, but say so
                    log.warning("%s: the WAV header says %d bytes of audio, the file has %d (a cut-off copy?): "
                                "using what is there", name, size, available)
                body = view[start:]
                break
            body = view[start : start + size]
            if fmt is not None:
                break
        pos = start + size + (size & 1)
    else:
        raise _damaged(name, f"more than {_MAX_WAV_CHUNKS} chunks")
    if fmt is None:
        raise _damaged(name, "no 'fmt ' chunk")
    if body is None:
        raise SoundError(f"{name}: the WAV file has no 'data' chunk (no audio); re-export it with audio")
    return fmt, body


def _parse_fmt(chunk: memoryview, name: str, endian: str) -> _WavFormat:
    if len(chunk) < 16:
        raise _damaged(name, "'fmt ' chunk too short")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from(endian + "HHIIHH", chunk, 0)
    if tag == _WAVE_EXTENSIBLE:
        if len(chunk) < 40:
            raise SoundError(
                f"{name}: damaged WAV header (WAVE_FORMAT_EXTENSIBLE without its sub-format); "
                f"convert it: {_ffmpeg_hint(name)}"
            )
        guid = bytes(chunk[24:40])
        sub = struct.unpack_from(endian + "H", guid, 0)[0]
        tag = sub if guid[2:] == _KSDATAFORMAT_TAIL else -1
    if tag not in (_WAVE_PCM, _WAVE_FLOAT):
        codec = _CODEC_NAMES.get(tag, f"format 0x{tag & 0xFFFF:04X}" if tag >= 0 else "unknown sub-format")
        raise SoundError(
            f"{name}: compressed WAV ({codec}) is not supported, only PCM or float WAV; "
            f"convert it: {_ffmpeg_hint(name)}"
        )
    if channels == 0 or channels > _MAX_CHANNELS:
        raise SoundError(f"{name}: WAV header says {channels} channels; the file is damaged, re-export it")
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise SoundError(
            f"{name}: WAV sample rate {rate} Hz is outside {_MIN_RATE}-{_MAX_RATE} Hz; "
            f"the header is damaged or the file is unusual, convert it: {_ffmpeg_hint(name)}"
        )
    size = _container_size(channels, block_align, bits)
    allowed = (1, 2, 3, 4) if tag == _WAVE_PCM else (4, 8)
    if size not in allowed:
        kind = "integer" if tag == _WAVE_PCM else "float"
        raise SoundError(f"{name}: {bits}-bit {kind} WAV is not supported; convert it: {_ffmpeg_hint(name)}")
    return _WavFormat(tag=tag, channels=channels, rate=rate, bytes_per_sample=size)


def _container_size(channels: int, block_align: int, bits: int) -> int:
    """Bytes per sample: trust block_align when it is consistent, else round the bit depth up."""
    if block_align and block_align % channels == 0:
        return block_align // channels
    return (bits + 7) // 8


def _pcm_to_float(raw: memoryview, fmt: _WavFormat, endian: str) -> np.ndarray:
    """Interleaved samples -> float32 in [-1, 1] (integer PCM) or as stored (float)."""
    size = fmt.bytes_per_sample
    if fmt.tag == _WAVE_FLOAT:
        values = np.frombuffer(raw, dtype=f"{endian}f{size}")
        values = np.clip(values, -_FLOAT_LIMIT, _FLOAT_LIMIT).astype(np.float32)  # +-inf clip too
        return np.nan_to_num(values, nan=0.0, copy=False)
    if size == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if size == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        lo, mid, hi = (b[:, 0], b[:, 1], b[:, 2]) if endian == "<" else (b[:, 2], b[:, 1], b[:, 0])
        ints = ((hi << 24) | (mid << 16) | (lo << 8)) >> 8  # arithmetic shift sign-extends
        return ints.astype(np.float32) / np.float32(1 << 23)
    ints = np.frombuffer(raw, dtype=f"{endian}i{size}")
    return (ints.astype(np.float64 if size == 4 else np.float32) / float(1 << (8 * size - 1))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The other allowed containers, through PyAV (lazy import)
# --------------------------------------------------------------------------------------------

_AV_TIMEOUT_S = 20.0  # FFmpeg's interrupt callback: opening, and each packet read
_AV_MAX_STREAMS = 32
_INT_FULL_SCALE: Mapping[str, float] = MappingProxyType({"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63})


def _import_av(name: str):  # returns the av module
    try:
        import av  # type: ignore[import-not-found]
    except ImportError:
        raise SoundError(
            f"{name}: not a WAV file, and decoding other formats (MP3, AAC, FLAC, OGG, Opus) needs PyAV, "
            f"which is not installed: run `pip install av`, or convert it once: {_ffmpeg_hint(name)}"
        ) from None
    return av


_decoder_names: str | None = None


def _allowed_decoders(av) -> str:  # av: the module
    """FFmpeg's decoder names for the allowed codec ids (e.g. mp3float, aac_fixed, libopus)."""
    global _decoder_names
    if _decoder_names is None:
        names = []
        for codec_name in sorted(av.codecs_available):
            try:
                codec = av.Codec(codec_name, "r")
            except Exception:  # an encoder only
                continue
            if codec.type == "audio" and codec.canonical_name in _CODECS:
                names.append(codec.name)
        _decoder_names = ",".join(names)
    return _decoder_names


def _refuse_io(url: str, flags: int, options: dict) -> Any:
    """PyAV's io_open hook: a demuxer that wants to open another file or URL gets an error."""
    raise PermissionError("this sound may not open other files")


def _av_open(av, data: bytes, demuxer: str) -> Any:  # av objects are untyped
    """Open `data` with exactly one demuxer, no probing, no protocol (the in-memory buffer is
    PyAV's own I/O, not a protocol), no nested file, no other demuxer, only the allowed decoders."""
    options = {
        "protocol_whitelist": "",  # rtp, udp, file, http...: none (an SDP would open UDP sockets)
        "format_whitelist": demuxer,  # nested demuxers (concat, HLS segments) would need another name
        "codec_whitelist": _allowed_decoders(av),  # what avformat_find_stream_info may open
        "max_streams": str(_AV_MAX_STREAMS),
    }
    if demuxer == "mov":  # never follow references to external media (FFmpeg's defaults, pinned)
        options.update(enable_drefs="0", use_absolute_path="0")
    return av.open(
        io.BytesIO(data),
        mode="r",
        format=demuxer,
        container_options=options,
        timeout=_AV_TIMEOUT_S,
        io_open=_refuse_io,
    )


def _decode_with_av(data: bytes, name: str, kind: str, limit_s: float) -> tuple[np.ndarray, int]:
    """Decode an allowed container's first audio stream to mono 24 kHz float32; returns
    (samples, source rate). Frames are downmixed and resampled as they arrive, and the limits
    are checked from the headers first and then against what is actually decoded."""
    av = _import_av(name)
    cannot = f"{name}: cannot decode this file (recognised as {kind.upper()}, but FFmpeg could not read it"
    try:
        container = _av_open(av, data, _DEMUXERS[kind])
    except Exception as e:  # PyAV raises many FFmpegError subclasses; all mean "unreadable"
        raise SoundError(f"{cannot}: {_short(e)}); check it plays, or convert it: {_ffmpeg_hint(name)}") from None
    try:
        stream = _pick_audio_stream(container, name)
        _probe(container, stream, name, kind, limit_s)
        sink = _Mono24k(av, name, limit_s)
        try:
            for frame in container.decode(stream):
                sink.add(frame)
        except SoundError:
            raise
        except Exception as e:
            if not sink.received:
                raise SoundError(
                    f"{cannot}: {_short(e)}); check it plays, or convert it: {_ffmpeg_hint(name)}"
                ) from None
            log.warning("%s: decoding stopped early (%s); using the %.2f s decoded so far", name, _short(e),
                        sink.seconds)
        mono = sink.finish()
    except SoundError:
        raise
    except Exception as e:  # anything else PyAV or a damaged stream can throw: still the user's file
        raise SoundError(f"{cannot}: {_short(e)}); check it plays, or convert it: {_ffmpeg_hint(name)}") from None
    finally:
        container.close()
    if mono.size == 0:
        raise SoundError(f"{name}: the file decodes to no audio samples; re-export it with audio")
    return mono, sink.source_rate


def _pick_audio_stream(container, name: str):  # av objects: untyped
    for stream in container.streams.audio:
        context = stream.codec_context
        if context is not None and context.codec.canonical_name in _CODECS:
            context.thread_count = 1  # decode on this (low-priority) thread only
            return stream
    if not container.streams.audio:
        raise SoundError(
            f"{name}: the file has no audio stream; use an audio file, or extract the audio: {_ffmpeg_hint(name)}"
        )
    codec = container.streams.audio[0].codec_context
    label = codec.codec.canonical_name if codec is not None else "an unknown codec"
    raise SoundError(
        f"{name}: its audio is {label}, which is not supported (MP3, AAC, FLAC, Vorbis, Opus, ALAC or PCM); "
        f"convert it: {_ffmpeg_hint(name)}"
    )


def _probe(container, stream, name: str, kind: str, limit_s: float) -> None:  # av objects: untyped
    """Refuse what the headers already say is too much, before decoding anything."""
    context = stream.codec_context
    rate = int(context.sample_rate or 0)
    channels = int(context.channels or 0)
    _check_format(name, rate, channels)
    if kind in ("mp3", "aac"):
        return  # their durations are estimates from the bit rate: the decode loop decides
    durations = []
    if stream.duration is not None and stream.time_base:
        durations.append(float(stream.duration * stream.time_base))
    if container.duration is not None:
        durations.append(container.duration / 1e6)
    if durations and rate and max(durations) > limit_s + 0.5:
        _check_duration(name, math.ceil(max(durations) * rate), rate, limit_s)


def _check_format(name: str, rate: int, channels: int) -> None:
    if rate and not _MIN_RATE <= rate <= _MAX_RATE:
        raise SoundError(
            f"{name}: sample rate {rate} Hz is outside {_MIN_RATE}-{_MAX_RATE} Hz; convert it: {_ffmpeg_hint(name)}"
        )
    if channels > _MAX_CHANNELS:
        raise SoundError(f"{name}: {channels} channels is more than {_MAX_CHANNELS}; convert it: {_ffmpeg_hint(name)}")
    if rate * max(channels, 1) > _MAX_SAMPLES_PER_S:
        raise SoundError(
            f"{name}: {channels} channels at {rate} Hz is more than this worker decodes "
            f"({_MAX_SAMPLES_PER_S} samples per second of audio, e.g. stereo at 384 kHz); "
            f"convert it: {_ffmpeg_hint(name)}"
        )


class _Mono24k:
    """Decoded frames in, one 24 kHz mono float32 buffer out: each frame is downmixed (mean of
    its channels) and pushed through FFmpeg's resampler as it arrives, and the limit is
    enforced on what the frames actually contain, so nothing is held at the source rate or
    channel count, and a file that lies in its headers stops at the limit."""

    def __init__(self, av, name: str, limit_s: float) -> None:  # av: the module
        self.av, self.name, self.limit_s = av, name, limit_s
        self._out = np.empty(0, dtype=np.float32)  # grown in place (realloc), never copied whole
        self._n = 0
        self.received = 0  # frames
        self.seconds = 0.0  # of source audio, summed frame by frame
        self.source_rate = 0
        self._rate = 0  # rate of the resampler in use
        self._resampler: Any = None
        self._pts = 0

    def add(self, frame) -> None:  # av.AudioFrame
        rate, n = int(frame.sample_rate or 0), int(frame.samples)
        channels = int(frame.layout.nb_channels)
        if n == 0:
            return
        if rate == 0 or channels == 0:
            raise ValueError("a frame without a sample rate or channels")
        _check_format(self.name, rate, channels)
        self.received += 1
        self.seconds += n / rate
        if self.seconds > self.limit_s:
            raise _too_long(self.name, self.limit_s)
        mono = _frame_to_mono(frame, channels)
        self.source_rate = self.source_rate or rate
        if rate != self._rate:
            self._flush()
            self._rate, self._pts = rate, 0
            self._resampler = None if rate == SAMPLE_RATE else self.av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE)
        if self._resampler is None:
            self._append(mono)
            return
        f = self.av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
        f.sample_rate, f.pts, f.time_base = rate, self._pts, Fraction(1, rate)
        self._pts += n
        self._collect(self._resampler.resample(f))

    def _collect(self, frames) -> None:
        for out in frames:
            self._append(out.to_ndarray().reshape(-1))

    def _append(self, x: np.ndarray) -> None:
        need = self._n + x.size
        if need > self._out.size:
            expected = int(self.limit_s * SAMPLE_RATE) + SAMPLE_RATE  # the most a file may fill
            grown = min(max(2 * self._out.size, 1 << 16), expected)
            self._out.resize(max(need, grown), refcheck=False)
        self._out[self._n : need] = x
        self._n = need

    def _flush(self) -> None:
        if self._resampler is not None:
            self._collect(self._resampler.resample(None))
            self._resampler = None

    def finish(self) -> np.ndarray:
        """The 24 kHz mono buffer (frames were made finite on the way in)."""
        self._flush()
        out, self._out = self._out, np.empty(0, dtype=np.float32)
        out.resize(self._n, refcheck=False)
        return out


def _frame_to_mono(frame, channels: int) -> np.ndarray:  # av.AudioFrame
    """One decoded frame, any sample format, planar or packed -> mono float32 in [-1, 1]."""
    fmt = frame.format
    base = fmt.name[:-1] if fmt.is_planar else fmt.name  # s16p -> s16, fltp -> flt
    x = frame.to_ndarray()
    x = x.reshape(channels, -1) if fmt.is_planar else x.reshape(-1, channels).T
    if base in ("flt", "dbl"):
        x = np.nan_to_num(np.clip(x, -_FLOAT_LIMIT, _FLOAT_LIMIT), nan=0.0)
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if base == "u8":
        return ((x.mean(axis=0, dtype=np.float64) - 128.0) / 128.0).astype(np.float32)
    if base in _INT_FULL_SCALE:
        return (x.mean(axis=0, dtype=np.float64) / _INT_FULL_SCALE[base]).astype(np.float32)
    raise ValueError(f"unexpected sample format {fmt.name}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]


# --------------------------------------------------------------------------------------------
# Downmix + resample
# --------------------------------------------------------------------------------------------

_RESAMPLE_CHUNK = 1 << 20  # input samples per push: bounds the FFI buffers, same output
_RESAMPLE_HEADROOM = 0.5  # int16 path: peak placed here, leaving room for the filter's overshoot


def to_mono_24k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Downmix (mean of channels) and resample once to 24 kHz mono float32.

    Uses livekit.rtc.AudioResampler (soxr, VERY_HIGH quality) and flushes it, so the output is
    time-aligned with the input (soxr's delay is compensated) and round(n * 24000 / rate) long.
    That resampler works on int16, so the signal is scaled to a fixed peak before and scaled
    back after: quantisation noise sits ~90 dB below the material's peak, whatever its level.
    """
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise ValueError(f"sample rate {rate} Hz is outside {_MIN_RATE}-{_MAX_RATE} Hz")
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:  # a matrix-vector product: ~20x faster than mean(axis=1) on (n, 2)
        mono = x @ np.full(x.shape[1], 1.0 / max(1, x.shape[1]), dtype=np.float32)
    else:
        mono = x.reshape(-1)
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if not math.isfinite(peak):
        mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
        peak = float(np.max(np.abs(mono)))
    if rate == SAMPLE_RATE:
        return np.array(mono, dtype=np.float32)
    if peak == 0.0:
        return np.zeros(round(mono.size * SAMPLE_RATE / rate), dtype=np.float32)
    scale = _RESAMPLE_HEADROOM / peak
    ints = np.round(mono * (scale * 32767.0)).astype(np.int16)
    out = _soxr_int16(ints, rate)
    return (out.astype(np.float32) * np.float32(1.0 / (scale * 32767.0))).astype(np.float32)


def _soxr_int16(ints: np.ndarray, rate: int) -> np.ndarray:
    from livekit import rtc

    resampler = rtc.AudioResampler(rate, SAMPLE_RATE, num_channels=1, quality=rtc.AudioResamplerQuality.VERY_HIGH)
    parts: list[np.ndarray] = []
    for start in range(0, ints.size, _RESAMPLE_CHUNK):
        for frame in resampler.push(bytearray(ints[start : start + _RESAMPLE_CHUNK].tobytes())):
            parts.append(np.frombuffer(frame.data, dtype=np.int16).copy())
    for frame in resampler.flush():
        parts.append(np.frombuffer(frame.data, dtype=np.int16).copy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


# --------------------------------------------------------------------------------------------
# Loudness (ITU-R BS.1770-4)
# --------------------------------------------------------------------------------------------

_BLOCK_S, _STEP_S = 0.4, 0.1
_STEPS_PER_BLOCK = round(_BLOCK_S / _STEP_S)  # 400 ms blocks with 75 % overlap
_ABSOLUTE_GATE = -70.0
_RELATIVE_GATE = -10.0


def k_weighting_coefficients(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two BS.1770 K-weighting biquads (b, a) for any rate, via the bilinear transform.

    Analogue prototypes as derived in libebur128/pyloudnorm; at 48 kHz they reproduce the table
    printed in BS.1770-4 to ~1e-8.
    """
    # Stage 1: high shelf (+4 dB above ~1.7 kHz), models the head's acoustic effect.
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / rate)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf_b = np.array([(vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0])
    shelf_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0])
    # Stage 2: RLB high-pass at ~38 Hz.
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / rate)
    a0 = 1.0 + k / q + k * k
    hp_b = np.array([1.0, -2.0, 1.0])
    hp_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0])
    return [(shelf_b, shelf_a), (hp_b, hp_a)]


def _k_weighting_fir(rate: int) -> np.ndarray:
    """Impulse response of the K-weighting cascade, truncated once its tail is below 1e-10.

    Sampled from the exact IIR frequency response on a grid long enough (>= 1 s; the response
    decays in ~0.1 s) that time aliasing is far below float precision.
    """
    m = 1 << max(12, math.ceil(math.log2(rate)))
    z = np.exp(-2j * np.pi * np.arange(m // 2 + 1) / m)
    response = np.ones_like(z)
    for b, a in k_weighting_coefficients(rate):
        response *= np.polyval(b[::-1], z) / np.polyval(a[::-1], z)
    h = np.fft.irfft(response, m)
    tail = np.sqrt(np.cumsum((h * h)[::-1])[::-1])  # energy from n to the end
    length = int(np.searchsorted(-tail, -1e-10 * tail[0])) + 1
    return h[: max(length, 3)]


def _subblock_energy(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """K-weighted sum of squares per 100 ms sub-block and per channel.

    `x` is channels x frames. Overlap-save FIR filtering (float32 FFTs: ample for a level
    measurement) in groups aligned on sub-block boundaries, so memory stays small however long
    the input. Returns (energy[sub-block, channel], sub-block boundaries in samples).
    """
    channels, n = x.shape
    step = rate * _STEP_S
    bounds = np.round(np.arange(int(n // step) + 1) * step).astype(np.int64)
    if bounds.size < 2:
        return np.zeros((0, channels)), bounds
    h = _k_weighting_fir(rate)
    taps = h.size
    nfft = 1 << max(15, math.ceil(math.log2(8 * taps)))
    per_group = max(1, int((nfft - taps + 1) // math.ceil(step)) - 1)
    spectrum = np.fft.rfft(h, nfft).astype(np.complex64)
    energy = np.empty((bounds.size - 1, channels))
    seg = np.zeros((channels, nfft), dtype=np.float32)
    for g0 in range(0, bounds.size - 1, per_group):
        g1 = min(g0 + per_group, bounds.size - 1)
        s, e = int(bounds[g0]), int(bounds[g1])
        lead = min(taps - 1, s)
        seg[:] = 0.0
        seg[:, taps - 1 - lead : taps - 1 + e - s] = x[:, s - lead : e]
        y = np.fft.irfft(np.fft.rfft(seg, axis=-1) * spectrum, nfft, axis=-1)[:, taps - 1 : taps - 1 + e - s]
        energy[g0:g1] = np.add.reduceat(y.astype(np.float64) ** 2, bounds[g0:g1] - s, axis=-1).T
    return energy, bounds


def integrated_loudness(samples: np.ndarray, rate: int, *, channel_weights: Sequence[float] | None = None) -> float:
    """Integrated loudness in LUFS per ITU-R BS.1770-4; -inf for silence.

    `samples` is 1-D (mono) or frames x channels. Channel weights default to 1.0 (L, R, C; pass
    e.g. (1, 1, 1, 0, 1.41, 1.41) for 5.1 with the LFE fourth). Gating blocks are 400 ms with
    75 % overlap, an absolute gate at -70 LUFS and a relative gate 10 LU below the absolutely
    gated loudness. Material shorter than one block is measured as a single block.
    """
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"expected mono (n,) or frames x channels (n, c) samples, got shape {x.shape}")
    if x.shape[0] == 0:
        return float("-inf")
    weights = np.ones(x.shape[1]) if channel_weights is None else np.asarray(channel_weights, dtype=np.float64)
    if weights.shape != (x.shape[1],):
        raise ValueError(f"{len(weights)} channel weights given for {x.shape[1]} channels")
    energy, bounds = _subblock_energy(np.ascontiguousarray(x.T, dtype=np.float32), rate)
    k = _STEPS_PER_BLOCK
    if energy.shape[0] < k:  # shorter than one 400 ms block: one block over what exists
        power = _k_weighted_power_whole(x, rate)
        block_power = np.array([power @ weights])
    else:
        summed = energy @ weights
        window = np.convolve(summed, np.ones(k), mode="valid")
        block_power = window / (bounds[k:] - bounds[:-k])
    return _gated_loudness(block_power)


def _k_weighted_power_whole(x: np.ndarray, rate: int) -> np.ndarray:
    h = _k_weighting_fir(rate)
    nfft = 1 << math.ceil(math.log2(x.shape[0] + h.size))
    y = np.fft.irfft(np.fft.rfft(x.astype(np.float64), nfft, axis=0) * np.fft.rfft(h, nfft)[:, None], nfft, axis=0)[
        : x.shape[0]
    ]
    return np.mean(y * y, axis=0)


def _gated_loudness(block_power: np.ndarray) -> float:
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10(block_power)
    above_abs = block_power[block_lufs > _ABSOLUTE_GATE]
    if above_abs.size == 0:
        return float("-inf")
    relative_gate = -0.691 + 10.0 * math.log10(float(np.mean(above_abs))) + _RELATIVE_GATE
    gated = block_power[(block_lufs > _ABSOLUTE_GATE) & (block_lufs > relative_gate)]
    return float(-0.691 + 10.0 * math.log10(float(np.mean(gated))))


def normalize(samples: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """Gain `samples` to `target_lufs` (gain only), limited so the peak stays below 0.99.

    Silent material is returned unchanged (as float32).
    """
    loudness = integrated_loudness(samples, rate)
    if not math.isfinite(loudness):
        return np.array(samples, dtype=np.float32)
    return _apply_gain(np.asarray(samples, dtype=np.float32), target_lufs - loudness, "samples")


def _apply_gain(x: np.ndarray, gain_db: float, name: str) -> np.ndarray:
    """Apply `gain_db`, reduced if needed so |peak| <= PEAK_CEILING (logged at debug)."""
    return (x * np.float32(_limited_gain(x, gain_db, name))).astype(np.float32)


def _limited_gain(x: np.ndarray, gain_db: float, name: str) -> float:
    """The linear gain for `gain_db`, reduced if needed so |peak| <= PEAK_CEILING."""
    gain = 10.0 ** (gain_db / 20.0)
    peak = max(float(np.max(x)), -float(np.min(x))) if x.size else 0.0  # no |x| copy
    if peak * gain > PEAK_CEILING:
        limited = PEAK_CEILING / peak
        log.debug(
            "%s: gain limited to %+.1f dB (wanted %+.1f dB) to keep peaks under %.2f",
            name,
            20.0 * math.log10(limited),
            gain_db,
            PEAK_CEILING,
        )
        gain = limited
    return gain


# --------------------------------------------------------------------------------------------
# Seamless loop
# --------------------------------------------------------------------------------------------


def make_seamless_loop(samples: np.ndarray, crossfade_samples: int) -> np.ndarray:
    """Return a buffer that loops without a gap or a pop.

    Drops the first X samples and crossfades the original head x[0:X] into the last X samples,
    so the buffer ends on x[X-1] exactly and wraps to x[X], its natural successor. The fade is
    equal-power (cos/sin) for uncorrelated material; when head and tail are positively
    correlated (tonal material) the sum is renormalised by sqrt(1 + 2·rho·sin·cos) so it does
    not swell by up to 3 dB mid-fade. X shrinks to a third of the material when it is short.
    """
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    fade = min(int(crossfade_samples), x.size // 3)
    if fade < 1:
        return x.copy()
    head = x[:fade].astype(np.float64)
    tail = x[x.size - fade :].astype(np.float64)
    theta = (np.pi / 2.0) * np.arange(1, fade + 1) / fade
    fade_in, fade_out = np.sin(theta), np.cos(theta)
    rho = _correlation(head, tail)
    mixed = (tail * fade_out + head * fade_in) / np.sqrt(1.0 + 2.0 * max(rho, 0.0) * fade_in * fade_out)
    out = x[fade:].copy()
    out[-fade:] = mixed.astype(np.float32)
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Clip lists ("AMBIENT_SOUND=builtin:office:0.4:0.7, sounds/cafe.mp3:0.3:0.3")
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PROBABILITY_EPSILON = 1e-6


@dataclass(frozen=True)
class Clip:
    """One entry of a clip list: a source, an optional volume and the chance it is picked."""

    source: str
    volume: float | None = None  # None = use the configured default volume
    probability: float = 1.0


def parse_clip_list(text: str, variable: str) -> list[Clip]:
    """Parse `source[:volume[:probability]]` entries separated by commas.

    Fields are taken from the RIGHT (at most two numbers), so "builtin:office", "C:\\x.wav" and
    other paths with colons work; quote a path that contains commas or ends in ":<number>"
    ("my,file.wav":0.3). An empty volume ("a.wav::0.5") means the default volume. Entries without a
    probability share what the others leave (a single such entry gets 1.0); when probabilities
    sum below 1, the rest is the chance of silence. Errors name `variable` and the entry.
    """
    entries = [e for e in _split_entries(text, variable) if e.strip()]
    parsed = [_parse_entry(e.strip(), variable) for e in entries]
    return _resolve_probabilities(parsed, variable)


def _split_entries(text: str, variable: str) -> list[str]:
    """Split on commas, except inside a quoted path (a quote that opens an entry)."""
    entries: list[str] = []
    current: list[str] = []
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'" and not "".join(current).strip():
            quote = ch
        elif ch == ",":
            entries.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote:
        raise SoundError(f"{variable}: unterminated quote in {text.strip()!r}; close the {quote} around the path")
    entries.append("".join(current))
    return entries


def _parse_entry(entry: str, variable: str) -> tuple[str, float | None, float | None]:
    """One entry -> (source, volume or None, probability or None)."""
    if entry[0] in "\"'":
        end = entry.find(entry[0], 1)
        if end < 0:
            raise SoundError(f"{variable}: unterminated quote in {entry!r}; close the quote around the path")
        source, rest = entry[1:end], entry[end + 1 :].strip()
        if rest and not rest.startswith(":"):
            raise SoundError(
                f'{variable}: unexpected text after the quoted path in {entry!r}; write "path":volume:probability'
            )
        fields = [f.strip() for f in rest[1:].split(":")] if rest else []
        if len(fields) > 2 or not all(_NUMBER.fullmatch(f) or f == "" for f in fields):
            raise SoundError(
                f'{variable}: expected up to two numbers after the path in {entry!r}; write "path":volume:probability'
            )
    else:
        source, fields = _split_fields_from_right(entry, variable)
    if not source.strip():
        raise SoundError(f"{variable}: entry {entry!r} has no sound source; write source[:volume[:probability]]")
    source = _check_source(source.strip(), entry, variable)
    volume, probability = _numbers(fields, entry, variable)
    return source, volume, probability


def _split_fields_from_right(entry: str, variable: str) -> tuple[str, list[str]]:
    tokens = [t.strip() for t in entry.split(":")]
    min_source_tokens = 2 if tokens[0].lower() == "builtin" else 1
    if len(tokens) > min_source_tokens and tokens[-1] == "":
        raise SoundError(f"{variable}: entry {entry!r} ends with an empty ':' field; remove the trailing ':'")
    fields: list[str] = []
    while len(tokens) > min_source_tokens and len(fields) < 2 and _NUMBER.fullmatch(tokens[-1]):
        fields.insert(0, tokens.pop())
    # "a.wav::0.5": empty volume followed by a probability means default volume.
    if len(fields) == 1 and len(tokens) > min_source_tokens and tokens[-1] == "":
        fields.insert(0, tokens.pop())
    if len(fields) == 2 and len(tokens) > min_source_tokens and _NUMBER.fullmatch(tokens[-1]):
        raise SoundError(
            f"{variable}: too many ':' fields in {entry!r}; write source[:volume[:probability]], "
            f"and quote a path that itself ends in ':<number>'"
        )
    return ":".join(tokens), fields


def _check_source(source: str, entry: str, variable: str) -> str:
    name = builtin_name(source)
    if name is None:
        return source
    if name not in BUILTINS:
        raise SoundError(f"{variable}: unknown built-in {name!r} in {entry!r}; choose one of {_builtin_choices()}")
    return BUILTIN_PREFIX + name


def _numbers(fields: list[str], entry: str, variable: str) -> tuple[float | None, float | None]:
    values: list[float | None] = [float(f) if f else None for f in fields] + [None] * (2 - len(fields))
    volume, probability = values
    for label, value in (("volume", volume), ("probability", probability)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise SoundError(f"{variable}: {label} {value:g} in {entry!r} is outside 0.0-1.0")
    return volume, probability


def _resolve_probabilities(parsed: list[tuple[str, float | None, float | None]], variable: str) -> list[Clip]:
    explicit = sum(p for _, _, p in parsed if p is not None)
    unspecified = sum(1 for _, _, p in parsed if p is None)
    listing = ", ".join(f"{s}={p:g}" for s, _, p in parsed if p is not None)
    if explicit > 1.0 + _PROBABILITY_EPSILON:
        raise SoundError(f"{variable}: probabilities sum to {explicit:.3g} ({listing}); they must add up to at most 1")
    share = max(0.0, 1.0 - explicit) / unspecified if unspecified else 0.0
    if unspecified and share <= _PROBABILITY_EPSILON:
        unnamed = ", ".join(s for s, _, p in parsed if p is None)
        raise SoundError(
            f"{variable}: {unnamed} would never play: the other probabilities already sum to 1 ({listing}); "
            f"give it a probability or lower the others"
        )
    return [Clip(source=s, volume=v, probability=p if p is not None else share) for s, v, p in parsed]


def pick_clip(clips: list[Clip], rng: random.Random) -> Clip | None:
    """Pick one clip according to the probabilities; None (silence) with the remaining chance."""
    u = rng.random()
    cumulative = 0.0
    for clip in clips:
        cumulative += clip.probability
        if u < cumulative:
            return clip
    return None


# --------------------------------------------------------------------------------------------
# Built-ins
# --------------------------------------------------------------------------------------------
# Synthesised by builtin_sounds.py (how each was made and judged is written there); named,
# checked, levelled to -30 LUFS and given a length here.
_BUILTIN_LUFS = -30.0
_BUILTIN_PEAK = 0.9
_BUILTIN_MAX_SECONDS = 120.0


def builtin(name: str, seconds: float | None = None) -> np.ndarray:
    """Synthesise a built-in bed or cue: float32 mono 24 kHz, deterministic, seamlessly loopable.

    Comes out at -30 LUFS (peak <= 0.9); `load("builtin:<name>", target_lufs=...)` normalises
    it like any file. `seconds` (1-120, default 8-20 depending on the sound) is rounded to the
    nearest FFT-friendly sample count (within 0.3 %; the default lengths are exact).
    """
    key = builtin_name(name)
    if key is None:
        key = name.strip().lower()
    if key not in BUILTINS:
        raise SoundError(f"unknown built-in sound {name!r}; choose one of {_builtin_choices()}")
    duration = DEFAULT_SECONDS[key] if seconds is None else float(seconds)
    if not 1.0 <= duration <= _BUILTIN_MAX_SECONDS:
        raise SoundError(f"built-in {key!r}: length {duration:g} s is outside 1-{_BUILTIN_MAX_SECONDS:g} s")
    n = _fft_friendly(round(duration * SAMPLE_RATE))
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return _level_builtin(synthesise(key, n, rng), key)


def builtin_name(source: str) -> str | None:
    """The built-in a "builtin:<name>" source names ("builtin:Office " -> "office"), known or
    not; None for any other source."""
    if not source.lower().startswith(BUILTIN_PREFIX):
        return None
    return source[len(BUILTIN_PREFIX) :].strip().lower()


def _builtin_choices() -> str:
    return ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)


def _fft_friendly(n: int) -> int:
    """The sample count nearest n whose prime factors are all <= 11 (at most ~0.3 % away).

    Built-ins are made of whole-buffer FFTs; a length with a large prime factor makes them
    2-5x slower. The default lengths are already such numbers, so they are kept exactly.
    """

    def smooth(m: int) -> bool:
        for p in (2, 3, 5, 7, 11):
            while m % p == 0:
                m //= p
        return m == 1

    for delta in range(n):
        for candidate in (n - delta, n + delta):
            if candidate > 0 and smooth(candidate):
                return candidate
    return n


def _level_builtin(x: np.ndarray, key: str) -> np.ndarray:
    x = x - x.mean()
    loudness = integrated_loudness(x, SAMPLE_RATE)
    gain = 10.0 ** ((_BUILTIN_LUFS - loudness) / 20.0)
    peak = float(np.max(np.abs(x)))
    if peak * gain > _BUILTIN_PEAK:
        log.debug("builtin %s: gain limited for a %.2f peak", key, _BUILTIN_PEAK)
        gain = _BUILTIN_PEAK / peak
    return (x * gain).astype(np.float32)



# --------------------------------------------------------------------------------------------
# Clip banks: a configured list of clips, decoded once, picked at random
# --------------------------------------------------------------------------------------------

NONE_VALUES = ("", "none", "off")


@dataclass(frozen=True, eq=False)
class Choice:
    clip: Clip
    sound: Sound


# A loop shorter than this repeats so fast that it is heard as a buzz, not as a bed: a file
# cut off just after its header, a 1 ms export.
MIN_LOOP_S = 0.1


def check_loop(sound: Sound) -> None:
    """Raise SoundError if ``sound`` is too short to loop."""
    if sound.duration_s < MIN_LOOP_S:
        raise SoundError(f"{sound.name}: only {sound.duration_s * 1000:.0f} ms of audio, which would buzz when "
                         f"looped: a loop needs at least {MIN_LOOP_S * 1000:.0f} ms (a cut-off copy? re-copy or "
                         f"re-export it)")


class ClipBank:
    """What AMBIENT_SOUND or THINKING_SOUND names: one source or a clip list, every clip
    decoded (and, for loops, made seamless) once, up front, so a bad file fails at start
    and a pick costs nothing. An empty bank ("none") always picks None."""

    def __init__(self, text: str, variable: str, *, target_lufs: float | None, loop: bool = True,
                 crossfade_s: float = 0.25) -> None:
        self.variable = variable
        self.clips: list[Clip] = [] if text.strip().lower() in NONE_VALUES else parse_clip_list(text, variable)
        self._sounds: dict[str, Sound] = {}
        for clip in self.clips:
            if clip.source in self._sounds:
                continue
            try:
                sound = load(clip.source, target_lufs=target_lufs)
                if loop:
                    check_loop(sound)
            except SoundError as e:
                raise SoundError(f"{variable}: {e}") from None
            if loop and not clip.source.startswith(BUILTIN_PREFIX):  # built-ins loop seamlessly as made
                seamless = make_seamless_loop(sound.samples, int(crossfade_s * SAMPLE_RATE))
                sound = Sound(sound.name, seamless, sound.source_rate, sound.loudness_lufs)
            self._sounds[clip.source] = sound

    def __bool__(self) -> bool:
        return bool(self.clips)

    def pick(self, rng: random.Random) -> Choice | None:
        clip = pick_clip(self.clips, rng)
        return None if clip is None else Choice(clip, self._sounds[clip.source])

    def sounds(self) -> list[Sound]:
        return list(self._sounds.values())
