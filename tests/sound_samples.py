"""Audio files for the hostile-input tests (sounds and control): valid seeds in every allowed
container, the files an attacker would upload instead (SDP, ffconcat, HLS, a truncated RF64),
FLAC "decompression bombs", and the Linux probes the tests watch the decoder with (socket
inodes, inotify, peak RSS, thread scheduling). Everything is generated; nothing is downloaded."""

from __future__ import annotations

import ctypes
import io
import os
import struct
import wave
from pathlib import Path

import numpy as np

# --- valid seeds ------------------------------------------------------------------------------


def wav_bytes(seconds: float = 0.25, rate: int = 16000, channels: int = 1, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def riff(form: bytes, chunks: list[tuple[bytes, bytes]], container: bytes = b"RIFF", endian: str = "<") -> bytes:
    body = form
    for cid, payload in chunks:
        body += cid + struct.pack(endian + "I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")
    return container + struct.pack(endian + "I", len(body)) + body


def wav_seeds() -> dict[str, bytes]:
    """WAV layouts the parser handles: RIFF, RIFX (big-endian), RF64 with ds64, float, 8-bit,
    WAVE_FORMAT_EXTENSIBLE, 24-bit, with extra chunks."""
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2000) / 8000)
    pcm16 = (x * 32767).astype("<i2")
    out = {"riff-pcm16": riff(b"WAVE", [(b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)),
                                        (b"data", pcm16.tobytes())])}
    out["rifx-pcm16"] = riff(b"WAVE", [(b"fmt ", struct.pack(">HHIIHH", 1, 1, 8000, 16000, 2, 16)),
                                       (b"data", pcm16.astype(">i2").tobytes())], b"RIFX", ">")
    ds64 = struct.pack("<QQQI", 0, pcm16.nbytes, pcm16.size, 0)
    rf64 = riff(b"WAVE", [(b"ds64", ds64), (b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)),
                          (b"data", pcm16.tobytes())], b"RF64")
    data_at = rf64.index(b"data")
    out["rf64-ds64"] = b"RF64\xff\xff\xff\xff" + rf64[8:data_at + 4] + b"\xff\xff\xff\xff" + rf64[data_at + 8:]
    out["float32-stereo"] = riff(b"WAVE", [(b"fmt ", struct.pack("<HHIIHH", 3, 2, 8000, 64000, 8, 32)),
                                           (b"LIST", b"INFOISFT\x03\x00\x00\x00ab\x00"),
                                           (b"data", np.repeat(x[:, None], 2, 1).astype("<f4").tobytes())])
    out["pcm8"] = riff(b"WAVE", [(b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 8000, 1, 8)),
                                 (b"data", (x * 127 + 128).astype(np.uint8).tobytes())])
    guid = struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    ext = struct.pack("<HHIIHHHHI", 0xFFFE, 6, 8000, 96000, 12, 16, 22, 16, 0x3F) + guid
    out["extensible-6ch"] = riff(b"WAVE", [(b"fmt ", ext), (b"data", np.repeat(pcm16[:, None], 6, 1).tobytes())])
    ints = np.round(x * (2**23 - 1)).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
    out["pcm24"] = riff(b"WAVE", [(b"junk", b"x" * 5), (b"fmt ", struct.pack("<HHIIHH", 1, 1, 8000, 24000, 3, 24)),
                                  (b"data", ints.tobytes())])
    return out


def encode(fmt: str, codec: str, seconds: float = 0.25, rate: int = 48000, layout: str = "stereo",
           sample_format: str = "fltp", freq: float = 1000.0) -> bytes:
    """A sine in `codec` inside `fmt`, written by PyAV (FFmpeg's own muxers)."""
    import av

    buf = io.BytesIO()
    options = {"strict": "experimental"} if codec == "vorbis" else {}
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.layout = layout
        channels = av.AudioLayout(layout).nb_channels
        n = int(seconds * rate)
        x = (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)
        for start in range(0, n, 1024):
            block = np.repeat(x[None, start:start + 1024], channels, axis=0)
            if sample_format == "s16":
                block = (block.T.reshape(1, -1) * 32767).astype(np.int16)
            elif sample_format == "s16p":
                block = (block * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format=sample_format, layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


# (muxer, codec, sample format, what sounds.sniff_format must call it)
AV_SEEDS = {
    "mp3": ("mp3", "libmp3lame", "fltp", "mp3"),
    "adts": ("adts", "aac", "fltp", "aac"),
    "flac": ("flac", "flac", "s16", "flac"),
    "ogg-vorbis": ("ogg", "vorbis", "fltp", "ogg"),
    "ogg-opus": ("ogg", "libopus", "s16", "ogg"),
    "webm-opus": ("webm", "libopus", "s16", "matroska"),
    "m4a-aac": ("mp4", "aac", "fltp", "mov"),
    "m4a-alac": ("ipod", "alac", "s16p", "mov"),
    "mka-pcm": ("matroska", "pcm_s16le", "s16", "matroska"),
    "aiff": ("aiff", "pcm_s16be", "s16", "aiff"),
    "mp2": ("mp2", "mp2", "s16", "mp3"),
}


def av_seeds(seconds: float = 0.25) -> dict[str, bytes]:
    return {name: encode(fmt, codec, seconds, sample_format=sf) for name, (fmt, codec, sf, _) in AV_SEEDS.items()}


# --- what an attacker uploads instead ---------------------------------------------------------


def sdp(port: int) -> bytes:
    """A session description: FFmpeg's SDP demuxer listens on UDP `port` and `port` + 1 for RTP
    from anyone (c=0.0.0.0) and plays it."""
    return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=bed\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


def ffconcat(target: str) -> bytes:
    """FFmpeg's concat demuxer reads `target` (relative to the working directory, or absolute)."""
    return f"ffconcat version 1.0\nfile '{target}'\n".encode()


def hls(target: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target}\n#EXT-X-ENDLIST\n".encode()


def truncated_rf64() -> bytes:
    """24 bytes: RF64 header, then a ds64 chunk that claims 28 bytes and has 4."""
    return b"RF64" + b"\xff\xff\xff\xff" + b"WAVE" + b"ds64" + struct.pack("<I", 28) + b"\x00" * 4


def flac_bomb(rate: int, layout: str, seconds: float, *, hide_length: bool = False) -> bytes:
    """Digital silence as FLAC: a few bytes per frame whatever the rate, channels and length.
    `hide_length` zeroes STREAMINFO's total-samples field (allowed: "unknown"), so only the
    decode loop can find out how long it is."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = layout
        stream.format = "s16"
        channels = av.AudioLayout(layout).nb_channels
        n, step = int(rate * seconds), 4608 * 32
        silence = np.zeros((1, step * channels), np.int16)
        for start in range(0, n, step):
            m = min(step, n - start)
            frame = av.AudioFrame.from_ndarray(silence[:, :m * channels], format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = bytearray(buf.getvalue())
    if hide_length:
        assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
        data[21] &= 0xF0  # the 36-bit total sits in bytes 21 (low nibble) to 25
        data[22:26] = b"\x00\x00\x00\x00"
    return bytes(data)


# --- probes -----------------------------------------------------------------------------------


def socket_inodes(pid: int | str = "self") -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def udp_sockets(pid: int | str = "self") -> dict[int, int]:
    """inode -> local port of every UDP socket in `pid`'s network namespace."""
    out = {}
    for table in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            out[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return out


def udp_ports_of(pid: int | str = "self") -> set[int]:
    """Local ports of the UDP sockets `pid` holds."""
    table = udp_sockets(pid)
    return {table[i] for i in socket_inodes(pid) if i in table}


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def thread_sched(pid: int | str, tid: int | str) -> tuple[str, int, int]:
    """(comm, policy, nice) of a thread, from /proc/<pid>/task/<tid>/stat."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return _sched_of(stat)


def threads_sched(pid: int | str) -> dict[str, tuple[str, int, int]]:
    """thread_sched of every thread of ``pid`` still running once read: a thread listed in
    /proc/<pid>/task can end before its stat is read (the SDK's threads come and go)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = thread_sched(pid, tid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _sched_of(stat: str) -> tuple[str, int, int]:
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return comm, int(fields[38]), int(fields[16])  # fields 41 and 19 of proc(5), counted from 3


class FileWatch:
    """inotify on a directory: did anyone (any process) open or read a file in it?"""

    IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0x800

    def __init__(self, directory: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_ACCESS | self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def events(self) -> list[tuple[int, str]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                out.append((mask, buf[pos + 16:pos + 16 + length].rstrip(b"\x00").decode()))
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)
