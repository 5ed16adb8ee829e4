"""Tests for sounds.py: decoding, resampling, loudness, loops, clip lists and built-ins.

Every test file is generated in tmp_path; nothing touches the network.
"""

from __future__ import annotations

import io
import math
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sounds
from harness import REPO
from sounds import SAMPLE_RATE, Clip, SoundError

# --------------------------------------------------------------------------------------------
# Helpers: signal generation, WAV writing, analysis
# --------------------------------------------------------------------------------------------

_PCM_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    """frames x channels float64 sine (identical channels)."""
    t = np.arange(round(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1)


def encode_samples(x: np.ndarray, layout: str, endian: str = "<") -> tuple[bytes, int, int]:
    """frames x channels float -> (interleaved bytes, format tag, bits) for a WAV layout."""
    if layout == "pcm8":
        return (np.round(x * 127) + 128).astype(np.uint8).tobytes(), 1, 8
    if layout == "pcm16":
        return np.round(x * 32767).astype(f"{endian}i2").tobytes(), 1, 16
    if layout == "pcm24":
        ints = np.round(x * (2**23 - 1)).astype(np.int32).reshape(-1)
        le = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        return (le if endian == "<" else le[:, ::-1]).tobytes(), 1, 24
    if layout == "pcm32":
        return np.round(x * (2**31 - 1)).astype(f"{endian}i4").tobytes(), 1, 32
    if layout == "float32":
        return x.astype(f"{endian}f4").tobytes(), 3, 32
    if layout == "float64":
        return x.astype(f"{endian}f8").tobytes(), 3, 64
    raise AssertionError(layout)


def make_wav(
    x: np.ndarray,
    rate: int,
    layout: str = "pcm16",
    *,
    extensible: bool = False,
    container: bytes = b"RIFF",
    extra_chunks: list[tuple[bytes, bytes]] | None = None,
    data_size: int | None = None,
    riff_size: int | None = None,
    tag: int | None = None,
) -> bytes:
    """Build a WAV file in memory. extra_chunks go between fmt and data."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    endian = ">" if container == b"RIFX" else "<"
    raw, fmt_tag, bits = encode_samples(x, layout, endian)
    channels = x.shape[1]
    block = channels * bits // 8
    fmt_tag = tag if tag is not None else fmt_tag
    if extensible:
        sub = struct.pack(endian + "H", fmt_tag) + _PCM_GUID_TAIL
        fmt = struct.pack(endian + "HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0) + sub
    else:
        fmt = struct.pack(endian + "HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + chunk(b"fmt ", fmt, endian)
    for cid, payload in extra_chunks or []:
        body += chunk(cid, payload, endian)
    size = len(raw) if data_size is None else data_size
    body += b"data" + struct.pack(endian + "I", size) + raw
    total = len(body) if riff_size is None else riff_size
    return container + struct.pack(endian + "I", total) + body


def chunk(cid: bytes, payload: bytes, endian: str = "<") -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return cid + struct.pack(endian + "I", len(payload)) + payload + pad


def dominant_freq(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Peak of the windowed spectrum, refined by parabolic interpolation."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-30)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * rate / x.size


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def band(x: np.ndarray, lo: float, hi: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    spectrum = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(x.size, 1 / rate)
    spectrum[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spectrum, x.size)


def band_share(x: np.ndarray, lo: float, hi: float, rate: int = SAMPLE_RATE) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / rate)
    return float(power[(f >= lo) & (f < hi)].sum() / power.sum())


def centroid(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / rate)
    return float((f * power).sum() / power.sum())


def frame_power(x: np.ndarray, hop: int) -> np.ndarray:
    frames = x.size // hop
    return np.mean(x[: frames * hop].reshape(frames, hop) ** 2, axis=1)


def onsets(
    x: np.ndarray, lo: float, hi: float, threshold: float, min_gap_s: float = 0.05, *, strokes: bool = False
) -> np.ndarray:
    """Times (s) of local maxima of 5 ms band power, at least min_gap_s apart.

    Events count when their power exceeds `threshold` x the background (median frame), or, with
    strokes=True, `threshold` x a typical loud event (90th percentile of the peaks that stand 20 dB
    above the background): that separates key presses from their ~10 dB quieter releases.
    """
    hop = SAMPLE_RATE // 200
    e = frame_power(band(x, lo, hi), hop)
    peaks = np.flatnonzero((e[1:-1] >= e[:-2]) & (e[1:-1] >= e[2:])) + 1
    background = np.median(e)
    if strokes:
        loud = e[peaks][e[peaks] > 100 * background]
        limit = threshold * np.percentile(loud, 90)
    else:
        limit = threshold * background
    kept: list[int] = []
    for p in peaks[e[peaks] > limit]:
        if not kept or (p - kept[-1]) * hop / SAMPLE_RATE >= min_gap_s:
            kept.append(int(p))
    return np.array(kept) * hop / SAMPLE_RATE


def modulation_ratio(x: np.ndarray) -> float:
    """Power of the speech-band envelope's modulation in 3-8 Hz over 12-24 Hz (per Hz)."""
    envelope = np.sqrt(frame_power(band(x, 300, 3000), SAMPLE_RATE // 100))
    spectrum = np.abs(np.fft.rfft(envelope - envelope.mean())) ** 2
    f = np.fft.rfftfreq(envelope.size, 0.01)
    return float(spectrum[(f >= 3) & (f <= 8)].mean() / spectrum[(f >= 12) & (f <= 24)].mean())


def short_term_levels_db(x: np.ndarray, seconds: float = 0.25) -> np.ndarray:
    return 10 * np.log10(frame_power(x.astype(np.float64), int(seconds * SAMPLE_RATE)))


def lfilter(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference direct-form biquad, pure Python (slow: short inputs only)."""
    y = np.zeros_like(x)
    x1 = x2 = y1 = y2 = 0.0
    for i, v in enumerate(x):
        out = b[0] * v + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        x2, x1, y2, y1 = x1, v, y1, out
        y[i] = out
    return y


def encode_with_pyav(fmt: str, codec: str, seconds: float = 1.0, rate: int = 48000, freq: float = 1000.0) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    options = {"strict": "experimental"} if codec == "vorbis" else {}
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.layout = "stereo"
        x = sine(freq, seconds, rate, amp=0.5, channels=2).T.astype(np.float32)
        for start in range(0, x.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[:, start : start + 1024]), format="fltp", layout="stereo"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# WAV decoding
# --------------------------------------------------------------------------------------------

LAYOUTS = ["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"]
RATES = [8000, 16000, 22050, 44100, 48000]


def check_decoded_sine(sound: sounds.Sound, seconds: float, freq: float, amp: float, tolerance_db: float = 0.3) -> None:
    x = sound.samples
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - round(seconds * SAMPLE_RATE)) <= 3, f"length {x.size} for {seconds} s"
    assert dominant_freq(x) == pytest.approx(freq, abs=0.5), "frequency not preserved"
    level_db = 20 * math.log10(rms(x[2400:-2400]) / (amp / math.sqrt(2)))
    assert abs(level_db) < tolerance_db, f"level off by {level_db:.2f} dB"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("extensible", [False, True])
def test_every_wav_layout_decodes_to_the_same_24k_sine(
    tmp_path: Path, layout: str, channels: int, extensible: bool
) -> None:
    path = tmp_path / f"{layout}-{channels}ch{'-ext' if extensible else ''}.wav"
    path.write_bytes(make_wav(sine(440, 1.0, 44100, 0.5, channels), 44100, layout, extensible=extensible))
    sound = sounds.load(str(path))
    assert sound.source_rate == 44100
    check_decoded_sine(sound, 1.0, 440, 0.5, tolerance_db=0.3 if layout != "pcm8" else 0.5)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("layout", ["pcm16", "float32"])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_rate_resamples_to_24k_with_frequency_preserved(rate: int, layout: str, channels: int) -> None:
    freq = 1000.0 if rate > 8000 else 700.0
    sound = sounds.decode_bytes(make_wav(sine(freq, 1.3, rate, 0.5, channels), rate, layout), name="t.wav")
    assert sound.source_rate == rate
    check_decoded_sine(sound, 1.3, freq, 0.5)


def test_decode_wav_returns_frames_by_channels_at_the_source_rate() -> None:
    left, right = sine(440, 0.5, 16000, 0.5), sine(660, 0.5, 16000, 0.25)
    frames, rate = sounds.decode_wav(make_wav(np.hstack([left, right]), 16000, "pcm24"), "t.wav")
    assert rate == 16000 and frames.shape == (8000, 2) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[:, 0], left[:, 0], atol=1e-6)
    np.testing.assert_allclose(frames[:, 1], right[:, 0], atol=1e-6)


def test_stereo_is_downmixed_as_the_mean_of_channels() -> None:
    left, right = sine(440, 1.0, 24000, 0.6), sine(440, 1.0, 24000, 0.2)
    sound = sounds.decode_bytes(make_wav(np.hstack([left, right]), 24000, "float32"))
    np.testing.assert_allclose(sound.samples, 0.4 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000), atol=1e-6)


def test_more_than_two_channels_are_downmixed() -> None:
    x = np.hstack([sine(440, 0.5, 48000, 0.3)] * 6)
    sound = sounds.decode_bytes(make_wav(x, 48000, "pcm16", extensible=True))
    check_decoded_sine(sound, 0.5, 440, 0.3)


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_integer_pcm_full_scale_values_map_to_minus_one_and_almost_one(bits: int) -> None:
    layout = f"pcm{bits}"
    x = np.array([[-1.0], [0.0], [1.0]])
    frames, _ = sounds.decode_wav(make_wav(x, 8000, layout), "t.wav")
    assert frames[0, 0] == pytest.approx(-1.0, abs=1.0 / 127) and frames[1, 0] == pytest.approx(0.0, abs=1.0 / 127)
    assert frames[2, 0] == pytest.approx(1.0, abs=1.0 / 127)


def test_big_endian_rifx_decodes() -> None:
    for layout in ("pcm16", "pcm24", "float32"):
        sound = sounds.decode_bytes(make_wav(sine(440, 0.5, 22050), 22050, layout, container=b"RIFX"))
        check_decoded_sine(sound, 0.5, 440, 0.5)


def test_unknown_chunks_and_odd_sizes_are_skipped() -> None:
    extra = [(b"LIST", b"INFOISFT\x05\x00\x00\x00odd!\x00"), (b"junk", b"abc"), (b"fact", b"\x00" * 4)]
    data = make_wav(sine(440, 0.5, 16000), 16000, "pcm16", extra_chunks=extra)
    data = data[:12] + chunk(b"bext", b"x" * 7) + data[12:]  # an odd-sized chunk before fmt too
    check_decoded_sine(sounds.decode_bytes(data), 0.5, 440, 0.5)


def test_fmt_after_data_and_chunks_after_data_are_handled() -> None:
    x = sine(440, 0.5, 16000)
    normal = make_wav(x, 16000, "pcm16")
    fmt_chunk, data_chunk = normal[12:36], normal[36:]
    reordered = b"RIFF" + struct.pack("<I", len(normal) - 8) + b"WAVE" + data_chunk + fmt_chunk
    check_decoded_sine(sounds.decode_bytes(reordered), 0.5, 440, 0.5)
    trailing = normal + chunk(b"LIST", b"INFOIART\x03\x00\x00\x00me\x00")
    check_decoded_sine(sounds.decode_bytes(trailing), 0.5, 440, 0.5)


def test_streaming_writer_sizes_0xffffffff_are_read_to_the_end() -> None:
    data = make_wav(sine(440, 0.5, 16000), 16000, "pcm16", data_size=0xFFFFFFFF, riff_size=0xFFFFFFFF)
    check_decoded_sine(sounds.decode_bytes(data), 0.5, 440, 0.5)


def test_rf64_with_ds64_chunk_decodes() -> None:
    x = sine(440, 0.5, 16000)
    ds64 = struct.pack("<QQQI", 0, x.size * 2, x.size, 0)
    data = make_wav(x, 16000, "pcm16", container=b"RF64", data_size=0xFFFFFFFF, riff_size=0xFFFFFFFF)
    data = data[:12] + chunk(b"ds64", ds64) + data[12:]
    check_decoded_sine(sounds.decode_bytes(data), 0.5, 440, 0.5)


def test_truncated_file_uses_the_audio_that_is_there(caplog: pytest.LogCaptureFixture) -> None:
    data = make_wav(sine(440, 1.0, 16000), 16000, "pcm16")
    cut = data[: len(data) - 16000 + 1]  # half the audio gone, and half a sample frame
    with caplog.at_level("WARNING", logger="sounds"):
        sound = sounds.decode_bytes(cut)
    assert "cut-off copy" in caplog.text, "a WAV with half its audio missing was used without a word"
    assert sound.duration_s == pytest.approx(0.5, abs=0.002)
    assert dominant_freq(sound.samples) == pytest.approx(440, abs=1)


def test_float_wav_above_full_scale_and_nans_are_tamed() -> None:
    x = sine(440, 0.5, 48000, amp=3.0)
    x[100] = np.nan
    sound = sounds.decode_bytes(make_wav(x, 48000, "float32"))
    assert np.all(np.isfinite(sound.samples))
    assert np.max(np.abs(sound.samples)) <= sounds.PEAK_CEILING + 1e-6


# --------------------------------------------------------------------------------------------
# Other formats through PyAV
# --------------------------------------------------------------------------------------------

COMPRESSED = [
    ("mp3", "libmp3lame", "mp3"),
    ("flac", "flac", "flac"),
    ("ogg", "vorbis", "ogg"),
    ("ogg", "libopus", "opus"),
    ("webm", "libopus", "webm"),
    ("mp4", "aac", "m4a"),
]


@pytest.mark.parametrize("fmt,codec,suffix", COMPRESSED, ids=[c[2] for c in COMPRESSED])
def test_compressed_formats_decode_to_the_expected_frequency_and_duration(
    tmp_path: Path, fmt: str, codec: str, suffix: str
) -> None:
    path = tmp_path / f"tone.{suffix}"
    path.write_bytes(encode_with_pyav(fmt, codec, seconds=1.5, rate=48000, freq=1000.0))
    sound = sounds.load(str(path))
    assert sound.duration_s == pytest.approx(1.5, abs=0.05), f"{suffix}: {sound.duration_s:.3f} s"
    assert dominant_freq(sound.samples) == pytest.approx(1000.0, abs=2.0)
    assert sound.source_rate == 48000
    assert sound.loudness_lufs == pytest.approx(-9.0, abs=0.5)  # a 0.5 sine, mono: 10*log10(0.125)


def test_decode_bytes_detects_the_format_from_the_content() -> None:
    sound = sounds.decode_bytes(encode_with_pyav("flac", "flac", seconds=0.5), name="upload.wav")
    assert sound.duration_s == pytest.approx(0.5, abs=0.05)


def test_missing_pyav_names_pip_install_av_and_the_ffmpeg_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = encode_with_pyav("mp3", "libmp3lame", seconds=0.3)
    path = tmp_path / "music.mp3"
    path.write_bytes(data)
    monkeypatch.setitem(sys.modules, "av", None)  # "import av" now raises ImportError
    with pytest.raises(SoundError) as err:
        sounds.load(str(path))
    message = str(err.value)
    assert str(path) in message and "pip install av" in message
    assert "ffmpeg -i" in message and "-ac 1 -ar 24000" in message
    assert "\n" not in message
    # WAV keeps working without PyAV.
    check_decoded_sine(sounds.decode_bytes(make_wav(sine(440, 0.5, 16000), 16000)), 0.5, 440, 0.5)


def test_a_wav_only_use_never_imports_pyav(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(make_wav(sine(440, 0.3, 16000), 16000))
    code = (
        "import sys, sounds; sounds.load(sys.argv[1], target_lufs=-30); sounds.load('builtin:roomtone');"
        "print('av' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(sounds.__file__).parent,
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Errors users will meet
# --------------------------------------------------------------------------------------------


def error_for(source: str) -> str:
    with pytest.raises(SoundError) as err:
        sounds.load(source)
    message = str(err.value)
    assert "\n" not in message, "a SoundError must be one line"
    assert source in message, f"message does not name {source!r}: {message}"
    return message


def test_not_a_wav_with_a_wav_name_is_rejected_with_the_fix(tmp_path: Path) -> None:
    pytest.importorskip("av")  # without PyAV the next test covers the message
    path = tmp_path / "fake.wav"
    path.write_bytes(b"this is certainly not audio, just some text pretending to be a wav file\n" * 20)
    message = error_for(str(path))
    assert "ffmpeg -i" in message and "cannot decode" in message


def test_not_a_wav_without_pyav_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fake.wav"
    path.write_bytes(b"ID3" + b"\x00" * 500)
    monkeypatch.setitem(sys.modules, "av", None)
    message = error_for(str(path))
    assert "not a WAV file" in message and "pip install av" in message


def test_truncated_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    path.write_bytes(make_wav(sine(440, 0.1, 16000), 16000)[:28])
    message = error_for(str(path))
    assert "truncated" in message and "ffmpeg -i" in message


def test_adpcm_wav_is_rejected_with_the_conversion_line(tmp_path: Path) -> None:
    path = tmp_path / "adpcm.wav"
    path.write_bytes(make_wav(sine(440, 0.1, 16000), 16000, "pcm16", tag=0x0002))
    message = error_for(str(path))
    assert "ADPCM" in message and "ffmpeg -i" in message and "-ac 1 -ar 24000" in message


def test_mu_law_in_extensible_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ulaw.wav"
    path.write_bytes(make_wav(sine(440, 0.1, 8000), 8000, "pcm8", extensible=True, tag=0x0007))
    assert "µ-law" in error_for(str(path))


def test_empty_missing_directory_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty" in error_for(str(empty))
    assert "not found" in error_for(str(tmp_path / "nope.wav"))
    assert "directory" in error_for(str(tmp_path))
    locked = tmp_path / "locked.wav"
    locked.write_bytes(make_wav(sine(440, 0.1, 16000), 16000))

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root ignores chmod, so simulate it
    assert "permission" in error_for(str(locked)).lower()


def test_a_fifo_or_a_device_as_a_sound_is_called_not_a_regular_file(tmp_path: Path) -> None:
    """A FIFO would block the read and /dev/zero never ends; both report 0 bytes: the
    message must say what they are, not that the file is empty."""
    fifo = tmp_path / "bed.wav"
    os.mkfifo(fifo)
    for source in (str(fifo), "/dev/zero"):
        message = error_for(source)
        assert "not a regular file" in message and "empty" not in message, message


@pytest.mark.parametrize("keep", ["header and one sample", "1 ms"])
def test_a_bed_cut_off_after_its_header_or_a_1_ms_bed_is_refused(tmp_path: Path, keep: str) -> None:
    """A WAV cut off just after its header (a download that failed) or a 1 ms export loops
    into a buzz: the bed is refused with one line (exit 2 at start), not accepted as 0.0 s."""
    if keep == "1 ms":
        data = make_wav(sine(440, 0.001, 48000), 48000, "pcm16")
    else:
        data = make_wav(sine(440, 1.0, 16000), 16000, "pcm16")[:46]  # 44-byte header + one sample
    path = tmp_path / "bed.wav"
    path.write_bytes(data)
    with pytest.raises(SoundError) as err:
        sounds.ClipBank(str(path), "AMBIENT_SOUND", target_lufs=-30.0)
    message = str(err.value)
    assert message.startswith("AMBIENT_SOUND: ") and "ms of audio" in message and "\n" not in message, message
    r = subprocess.run([sys.executable, str(REPO / "worker.py"), "check"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "AMBIENT_SOUND": str(path),
                                        "LIVEKIT_URL": "ws://127.0.0.1:9", "LIVEKIT_API_KEY": "k",
                                        "LIVEKIT_API_SECRET": "s", "ASSEMBLYAI_API_KEY": "a",
                                        "VOICE_AGENT_URL": "ws://127.0.0.1:9/v1/ws"})
    assert "\u2717 AMBIENT_SOUND" in r.stdout, f"check passed a {keep} bed:\n{r.stdout}"


def test_wav_without_audio_zero_channels_and_absurd_rates_are_rejected(tmp_path: Path) -> None:
    cases = {
        "nodata.wav": make_wav(sine(440, 0.1, 16000), 16000)[:36],
        "zerodata.wav": make_wav(np.zeros((0, 1)), 16000),
        "zerochannels.wav": make_wav(sine(440, 0.1, 16000), 16000).replace(
            struct.pack("<HH", 1, 1), struct.pack("<HH", 1, 0), 1
        ),
        "rate.wav": make_wav(sine(440, 0.1, 16000), 16000).replace(struct.pack("<I", 16000), struct.pack("<I", 7), 1),
    }
    expected = {
        "nodata.wav": "no 'data' chunk",
        "zerodata.wav": "no audio samples",
        "zerochannels.wav": "0 channels",
        "rate.wav": "7 Hz",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert expected[name] in error_for(str(path))


def test_size_and_duration_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "long.wav"
    path.write_bytes(make_wav(sine(440, 3.0, 16000), 16000))
    monkeypatch.setattr(sounds, "MAX_DURATION_S", 2)
    message = error_for(str(path))
    assert "limit" in message and "-t 2" in message
    monkeypatch.setattr(sounds, "MAX_FILE_BYTES", 1000)
    assert "MB limit" in error_for(str(path))
    with pytest.raises(SoundError, match="upload"):
        sounds.decode_bytes(path.read_bytes())


def test_a_truncated_rf64_ds64_chunk_is_a_one_line_error(tmp_path: Path) -> None:
    data = b"RF64\xff\xff\xff\xffWAVEds64" + struct.pack("<I", 28) + b"\x00" * 4  # 24 bytes, ds64 cut short
    for call in (lambda: sounds.decode_wav(data, "x.wav"), lambda: sounds.decode_bytes(data, name="x.wav")):
        with pytest.raises(SoundError) as err:
            call()
        assert "ds64" in str(err.value) and "ffmpeg -i" in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "bed.wav"
    path.write_bytes(data)
    assert "ds64" in error_for(str(path))


def test_a_flood_of_empty_chunks_is_refused_quickly() -> None:
    body = b"WAVE" + b"junk\x00\x00\x00\x00" * 20_000
    start = time.perf_counter()
    with pytest.raises(SoundError, match="chunks"):
        sounds.decode_wav(b"RIFF" + struct.pack("<I", len(body)) + body, "x.wav")
    assert time.perf_counter() - start < 1.0


def test_decode_bytes_errors_name_the_upload() -> None:
    with pytest.raises(SoundError, match=r"^upload: the sound is empty"):
        sounds.decode_bytes(b"")
    with pytest.raises(SoundError, match=r"^clip-7: "):
        sounds.decode_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ", name="clip-7")


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
@pytest.mark.parametrize("n", [1, 7, 999, 44101])
def test_to_mono_24k_length_is_exact(rate: int, n: int) -> None:
    x = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
    out = sounds.to_mono_24k(x, rate)
    assert abs(out.size - round(n * SAMPLE_RATE / rate)) <= 2


def test_to_mono_24k_is_time_aligned_and_keeps_quiet_material_clean() -> None:
    rate = 44100
    x = sine(997, 2.0, rate, amp=1e-4)[:, 0]  # -80 dBFS: the int16 resampler path must not crush it
    out = sounds.to_mono_24k(x, rate)
    expected = 1e-4 * np.sin(2 * np.pi * 997 * np.arange(out.size) / SAMPLE_RATE)
    error = out[1200:-1200] - expected[1200:-1200]
    assert rms(error) < 0.01 * rms(expected), "resampler delay not compensated, or quantised"


def test_to_mono_24k_passes_24k_through_and_silence_stays_silent() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32)
    np.testing.assert_array_equal(sounds.to_mono_24k(x, SAMPLE_RATE), x)
    assert not np.any(sounds.to_mono_24k(np.zeros(4410), 44100))


def test_three_minute_cd_quality_wav_loads_fast(tmp_path: Path) -> None:
    rate = 44100
    x = (np.random.default_rng(1).standard_normal((rate * 180, 2)) * 3000).astype("<i2")
    raw = x.tobytes()
    fmt = struct.pack("<HHIIHH", 1, 2, rate, rate * 4, 4, 16)
    path = tmp_path / "three-minutes.wav"
    path.write_bytes(
        b"RIFF"
        + struct.pack("<I", 36 + len(raw))
        + b"WAVE"
        + chunk(b"fmt ", fmt)
        + b"data"
        + struct.pack("<I", len(raw))
        + raw
    )
    start = time.perf_counter()
    sound = sounds.load(str(path), target_lufs=-30.0)
    elapsed = time.perf_counter() - start
    assert sound.duration_s == pytest.approx(180.0, abs=0.01)
    assert elapsed < 2.0, f"3-minute 44.1 kHz stereo WAV took {elapsed:.2f} s (expected well under 1 s)"


# --------------------------------------------------------------------------------------------
# Loudness: ITU-R BS.1770-4 / EBU Tech 3341 conformance
# --------------------------------------------------------------------------------------------


def stereo_sine(db: float, seconds: float, rate: int = 48000) -> np.ndarray:
    return sine(1000, seconds, rate, amp=10 ** (db / 20), channels=2)


def test_k_weighting_coefficients_match_the_48k_table_in_bs1770() -> None:
    (b1, a1), (b2, a2) = sounds.k_weighting_coefficients(48000)
    np.testing.assert_allclose(b1, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-8)
    np.testing.assert_allclose(a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-8)
    np.testing.assert_allclose(b2, [1.0, -2.0, 1.0])
    np.testing.assert_allclose(a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-8)


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
@pytest.mark.parametrize("seconds", [0.4, 0.3])  # exactly one gating block; shorter than one
def test_fir_k_weighting_matches_a_true_iir_filter(rate: int, seconds: float) -> None:
    x = np.random.default_rng(3).standard_normal(int(seconds * rate)) * 0.1
    x[: rate // 100] += 0.5  # a low-frequency step: exercises the 38 Hz high-pass tail
    y = x.copy()
    for b, a in sounds.k_weighting_coefficients(rate):
        y = lfilter(b, a, y)
    expected = -0.691 + 10 * math.log10(np.mean(y * y))
    assert sounds.integrated_loudness(x, rate) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    "segments,expected",
    [
        ([(-23, 20)], -23.0),  # Tech 3341 case 1
        ([(-33, 20)], -33.0),  # case 2
        ([(-36, 10), (-23, 60), (-36, 10)], -23.0),  # case 3: relative gate
        ([(-72, 10), (-36, 10), (-23, 60), (-36, 10), (-72, 10)], -23.0),  # case 4: both gates
        ([(-26, 20), (-20, 20.1), (-26, 20)], -23.0),  # case 5
    ],
    ids=["case1", "case2", "case3", "case4", "case5"],
)
def test_ebu_tech_3341_integrated_loudness(segments: list[tuple[float, float]], expected: float) -> None:
    x = np.concatenate([stereo_sine(db, s) for db, s in segments])
    assert sounds.integrated_loudness(x, 48000) == pytest.approx(expected, abs=0.1)


def test_mono_sine_reads_3_lu_below_the_same_sine_on_two_channels() -> None:
    assert sounds.integrated_loudness(sine(1000, 20, 48000, 10 ** (-23 / 20))[:, 0], 48000) == pytest.approx(
        -26.0, abs=0.1
    )


@pytest.mark.parametrize("rate", [24000, 44100, 96000])
def test_loudness_is_the_same_at_other_rates(rate: int) -> None:
    reference = sounds.integrated_loudness(stereo_sine(-23, 10), 48000)
    assert sounds.integrated_loudness(stereo_sine(-23, 10, rate), rate) == pytest.approx(reference, abs=0.1)


def test_silence_is_minus_infinity_and_short_material_is_one_block() -> None:
    assert sounds.integrated_loudness(np.zeros(48000), 48000) == float("-inf")
    assert sounds.integrated_loudness(np.zeros(0), 48000) == float("-inf")
    assert sounds.integrated_loudness(stereo_sine(-23, 0.2), 48000) == pytest.approx(-23.0, abs=0.1)


def test_channel_weights_for_surround() -> None:
    x = np.hstack([stereo_sine(-23, 5)] * 3)  # L R C LFE Ls Rs, all the same sine
    weighted = sounds.integrated_loudness(x, 48000, channel_weights=(1, 1, 1, 0, 1.41, 1.41))
    assert weighted == pytest.approx(-23.0 + 10 * math.log10((3 + 2 * 1.41) / 2), abs=0.1)


def test_normalize_brings_very_different_beds_within_1_lu() -> None:
    rng = np.random.default_rng(5)
    quiet = (rng.standard_normal(SAMPLE_RATE * 5) * 0.003).astype(np.float32)
    loud = (np.convolve(rng.standard_normal(SAMPLE_RATE * 5), np.ones(8) / 8, "same") * 0.3).astype(np.float32)
    levels = [
        sounds.integrated_loudness(sounds.normalize(bed, SAMPLE_RATE, -30.0), SAMPLE_RATE) for bed in (quiet, loud)
    ]
    assert abs(levels[0] - levels[1]) < 1.0 and levels[0] == pytest.approx(-30.0, abs=0.1)


def test_normalize_limits_the_gain_to_keep_peaks_under_0_99() -> None:
    x = np.zeros(SAMPLE_RATE * 2, dtype=np.float32)
    x[::4800] = 0.5  # spiky: reaching -10 LUFS would need peaks far above full scale
    y = sounds.normalize(x, SAMPLE_RATE, -10.0)
    assert np.max(np.abs(y)) == pytest.approx(0.99, abs=1e-3)
    silent = np.zeros(100, dtype=np.float32)
    np.testing.assert_array_equal(sounds.normalize(silent, SAMPLE_RATE, -30.0), silent)


def test_load_reports_the_original_loudness_and_normalises(tmp_path: Path) -> None:
    path = tmp_path / "bed.wav"
    noise = np.random.default_rng(2).standard_normal((48000 * 3, 1)) * 0.05
    path.write_bytes(make_wav(noise, 48000, "float32"))
    raw = sounds.load(str(path))
    normalised = sounds.load(str(path), target_lufs=-30.0)
    # soxr dithers its int16 output, so two decodes differ by ~1 LSB: equal, not identical.
    assert raw.loudness_lufs == pytest.approx(normalised.loudness_lufs, abs=1e-3)
    assert sounds.integrated_loudness(raw.samples, SAMPLE_RATE) == pytest.approx(raw.loudness_lufs, abs=1e-6)
    assert sounds.integrated_loudness(normalised.samples, SAMPLE_RATE) == pytest.approx(-30.0, abs=0.05)
    assert not normalised.samples.flags.writeable
    assert normalised.duration_s == pytest.approx(3.0)


def test_silent_file_has_no_loudness(tmp_path: Path) -> None:
    sound = sounds.decode_bytes(make_wav(np.zeros((16000, 1)), 16000), target_lufs=-30.0)
    assert sound.loudness_lufs is None and not np.any(sound.samples)


# --------------------------------------------------------------------------------------------
# Seamless loops
# --------------------------------------------------------------------------------------------


def wrap_step(loop: np.ndarray) -> float:
    return abs(float(loop[0]) - float(loop[-1]))


def max_step(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(x.astype(np.float64)))))


@pytest.mark.parametrize("kind", ["sine", "noise", "sine+noise"])
def test_seamless_loop_wraps_with_an_ordinary_step(kind: str) -> None:
    rng = np.random.default_rng(9)
    n = 24000 * 3 + 123
    t = np.arange(n) / SAMPLE_RATE
    tone = 0.5 * np.sin(2 * np.pi * 437.3 * t + 0.3)  # period does not divide the length
    noise = 0.2 * np.convolve(rng.standard_normal(n), np.ones(5) / 5, "same")
    x = {"sine": tone, "noise": noise, "sine+noise": tone + noise}[kind].astype(np.float32)
    loop = sounds.make_seamless_loop(x, 2400)
    assert loop.size == n - 2400
    assert loop[0] == x[2400] and loop[-1] == pytest.approx(x[2399], abs=1e-6)
    assert wrap_step(loop) <= max_step(x)
    assert max_step(np.concatenate([loop, loop])) <= max_step(x) * 1.05, "the crossfade itself jumps"


def test_seamless_loop_of_a_sine_does_not_swell_or_dip_much() -> None:
    n = 24000 + 77
    x = (0.5 * np.sin(2 * np.pi * 300.0 * np.arange(n) / SAMPLE_RATE)).astype(np.float32)  # in phase at the seam
    loop = sounds.make_seamless_loop(x, 4800)
    envelope = np.abs(loop[-4800:]).reshape(-1, 160).max(axis=1)
    assert envelope.max() < 0.5 * 1.05, "equal-power fade of correlated material swelled"


def test_seamless_loop_shrinks_the_crossfade_for_short_material() -> None:
    x = np.linspace(-0.5, 0.5, 90, dtype=np.float32)
    loop = sounds.make_seamless_loop(x, 1000)
    assert loop.size == 60  # X shrank to 30
    assert sounds.make_seamless_loop(np.ones(2, np.float32), 10).size == 2


# --------------------------------------------------------------------------------------------
# Clip lists
# --------------------------------------------------------------------------------------------


def test_clip_list_example_from_the_env_file() -> None:
    clips = sounds.parse_clip_list("builtin:office:0.4:0.7, sounds/cafe.mp3:0.3:0.3", "AMBIENT_SOUND")
    assert clips == [Clip("builtin:office", 0.4, 0.7), Clip("sounds/cafe.mp3", 0.3, 0.3)]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("builtin:office", [Clip("builtin:office", None, 1.0)]),
        ("builtin:OFFICE:0.5", [Clip("builtin:office", 0.5, 1.0)]),
        ("a.wav", [Clip("a.wav", None, 1.0)]),
        ("a.wav:0.25", [Clip("a.wav", 0.25, 1.0)]),
        ("a.wav::0.5", [Clip("a.wav", None, 0.5)]),
        (r"C:\sounds\rain.wav:0.3:0.6", [Clip(r"C:\sounds\rain.wav", 0.3, 0.6)]),
        (r"C:\sounds\rain.wav", [Clip(r"C:\sounds\rain.wav", None, 1.0)]),
        ("'odd, name.wav':0.2:0.4", [Clip("odd, name.wav", 0.2, 0.4)]),
        ('"take:2:3.wav":1:0.5', [Clip("take:2:3.wav", 1.0, 0.5)]),
        ("sounds/o'brien.wav:0.3", [Clip("sounds/o'brien.wav", 0.3, 1.0)]),
        ("a.wav, b.wav", [Clip("a.wav", None, 0.5), Clip("b.wav", None, 0.5)]),
        ("a.wav:1:0.2, b.wav", [Clip("a.wav", 1.0, 0.2), Clip("b.wav", None, 0.8)]),
        ("a.wav:0.5:0.3,b.wav:0.5:0.3", [Clip("a.wav", 0.5, 0.3), Clip("b.wav", 0.5, 0.3)]),
        ("  a.wav : 0.5 : 0.25 ,  ", [Clip("a.wav", 0.5, 0.25)]),
        ("", []),
    ],
)
def test_clip_list_parses(text: str, expected: list[Clip]) -> None:
    clips = sounds.parse_clip_list(text, "AMBIENT_SOUND")
    assert [(c.source, c.volume) for c in clips] == [(c.source, c.volume) for c in expected]
    assert [c.probability for c in clips] == pytest.approx([c.probability for c in expected])


@pytest.mark.parametrize(
    "text,offending,fix",
    [
        ("a.wav:1.5", "a.wav:1.5", "volume 1.5"),
        ("a.wav:0.5:-0.1", "a.wav:0.5:-0.1", "probability -0.1"),
        ("a.wav:0.5:0.7, b.wav:0.5:0.6", "a.wav=0.7", "at most 1"),
        ("builtin:disco:0.3", "builtin:disco:0.3", "builtin:office"),
        ("builtin:0.3", "builtin:0.3", "unknown built-in"),
        (":0.5:0.5", ":0.5:0.5", "no sound source"),
        ("a.wav:0.1:0.2:0.3", "a.wav:0.1:0.2:0.3", "too many"),
        ("a.wav:0.3:", "a.wav:0.3:", "empty"),
        ('"a.wav:0.3', '"a.wav:0.3', "quote"),
        ('"a.wav"x:0.3', '"a.wav"x:0.3', "after the quoted path"),
        ("a.wav:1:1, b.wav", "b.wav", "never play"),
    ],
)
def test_clip_list_errors_name_the_variable_and_the_entry(text: str, offending: str, fix: str) -> None:
    with pytest.raises(SoundError) as err:
        sounds.parse_clip_list(text, "AMBIENT_SOUND")
    message = str(err.value)
    assert message.startswith("AMBIENT_SOUND: ") and offending in message and fix in message, message


def test_probabilities_may_sum_to_one_within_a_small_epsilon() -> None:
    clips = sounds.parse_clip_list("a.wav::0.3333333, b.wav::0.3333333, c.wav::0.3333334", "X")
    assert sum(c.probability for c in clips) == pytest.approx(1.0)


def test_pick_clip_honours_probabilities_and_leaves_room_for_silence() -> None:
    clips = sounds.parse_clip_list("a.wav:0.5:0.5, b.wav:0.5:0.2", "AMBIENT_SOUND")
    rng = random.Random(1234)
    draws = 20000
    counts = {"a.wav": 0, "b.wav": 0, None: 0}
    for _ in range(draws):
        clip = sounds.pick_clip(clips, rng)
        counts[clip.source if clip else None] += 1
    for key, p in (("a.wav", 0.5), ("b.wav", 0.2), (None, 0.3)):
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(counts[key] - draws * p) < 4 * sigma, f"{key}: {counts[key]} of {draws}, expected ~{draws * p:.0f}"
    assert sounds.pick_clip([], rng) is None
    assert sounds.pick_clip([Clip("only.wav")], rng) == Clip("only.wav")


# --------------------------------------------------------------------------------------------
# Built-ins
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> dict[str, np.ndarray]:
    out = {}
    for name in sounds.BUILTINS:
        start = time.perf_counter()
        out[name] = sounds.builtin(name)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"builtin:{name} took {elapsed:.2f} s to synthesise"
    return out


def test_builtins_exist(built: dict[str, np.ndarray]) -> None:
    assert {"roomtone", "office", "keyboard", "cafe", "thinking"} <= set(sounds.BUILTINS)


@pytest.mark.parametrize("name", sounds.BUILTINS)
def test_builtin_basics(
    built: dict[str, np.ndarray], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = built[name]
    assert x.dtype == np.float32 and x.ndim == 1
    assert 8.0 <= x.size / SAMPLE_RATE <= 20.0
    assert np.max(np.abs(x)) <= 0.9
    assert sounds.integrated_loudness(x, SAMPLE_RATE) == pytest.approx(-30.0, abs=0.1)
    assert wrap_step(x) <= np.percentile(np.abs(np.diff(x)), 99.9), "audible seam at the loop point"
    edge = np.concatenate([x[-240:], x[:240]])
    assert wrap_step(x) <= max_step(edge[:239]) + max_step(edge[241:]), "step at the wrap larger than its neighbours"
    monkeypatch.chdir(tmp_path)  # no file anywhere: built-ins need none
    sound = sounds.load(f"builtin:{name}", target_lufs=-27.0)
    assert sound.name == f"builtin:{name}" and sound.source_rate == SAMPLE_RATE
    assert sound.loudness_lufs == pytest.approx(-30.0, abs=0.1)
    assert sounds.integrated_loudness(sound.samples, SAMPLE_RATE) == pytest.approx(-27.0, abs=0.1)


def test_builtins_are_deterministic_and_lengths_are_adjustable(built: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(sounds.builtin("keyboard"), built["keyboard"])
    np.testing.assert_array_equal(sounds.builtin("builtin:roomtone"), built["roomtone"])
    assert sounds.builtin("thinking", seconds=3.0).size == 3 * SAMPLE_RATE
    odd = sounds.builtin("roomtone", seconds=2.0417)  # rounded to an FFT-friendly length
    assert abs(odd.size - 2.0417 * SAMPLE_RATE) <= 0.003 * odd.size
    with pytest.raises(SoundError, match="builtin:office"):
        sounds.builtin("disco")
    with pytest.raises(SoundError, match="builtin:disco"):
        sounds.load("builtin:disco")


def test_roomtone_is_a_steady_dark_bed_with_a_faint_hum(built: dict[str, np.ndarray]) -> None:
    x = built["roomtone"]
    levels = short_term_levels_db(x)
    assert levels.max() - levels.min() < 3.0, "room tone level is not steady"
    assert centroid(x) < 800, "room tone is too bright"
    assert band_share(x, 50, 400) > band_share(x, 400, 1600) > band_share(x, 1600, 6400) > band_share(x, 6400, 12000)
    assert 20 * math.log10(np.max(np.abs(x)) / rms(x)) < 15, "room tone has transients"
    spectrum = np.abs(np.fft.rfft(x))
    f = np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE)
    for line in (50, 100):
        hum = spectrum[np.argmin(np.abs(f - line))]
        around = np.median(spectrum[(np.abs(f - line) < 15) & (np.abs(f - line) > 2)])
        assert 20 * math.log10(hum / around) > 15, f"no mains hum line at {line} Hz"
    lines = sum(band_share(x, k * 50 - 0.2, k * 50 + 0.2) for k in range(1, 8))
    assert 0.01 < lines < 0.15, f"the hum is {lines:.1%} of the power: should be faint but there"
    assert modulation_ratio(x) < 2.0


def test_keyboard_types_at_a_human_rate_with_pauses(built: dict[str, np.ndarray]) -> None:
    x = built["keyboard"]
    times = onsets(x, 2000, 8000, threshold=0.1, strokes=True)
    gaps = np.diff(times)
    seconds = x.size / SAMPLE_RATE
    assert 2.5 <= times.size / seconds <= 10, f"{times.size} key strokes in {seconds:.0f} s"
    assert 0.1 <= float(np.median(gaps)) <= 0.3, f"median gap between keys {np.median(gaps):.3f} s"
    assert np.sum(gaps > 0.5) >= 3, "no pauses between words or phrases"
    assert 20 * math.log10(np.max(np.abs(x)) / rms(x)) > 18, "typing should be transient"
    assert 1000 < centroid(x) < 4000


def test_keyboard_keys_vary_and_the_spacebar_thuds(built: dict[str, np.ndarray]) -> None:
    x = built["keyboard"].astype(np.float64)
    times = onsets(x, 2000, 8000, threshold=0.1, strokes=True)
    strokes = [
        x[int(t * SAMPLE_RATE) - 120 : int(t * SAMPLE_RATE) + 1200]
        for t in times
        if 0.01 < t < x.size / SAMPLE_RATE - 0.06
    ]
    low_share = np.array([band_share(s, 60, 170) for s in strokes])
    centroids = np.array([centroid(s) for s in strokes])
    assert np.std(centroids) / np.mean(centroids) > 0.1, "every key sounds the same"
    thuds = np.mean(low_share > 4 * np.median(low_share))
    assert 0.08 <= thuds <= 0.35, f"{thuds:.0%} of strokes have a low spacebar thud (expected about one in six)"


def test_cafe_is_babble_with_syllabic_modulation_and_clinks(built: dict[str, np.ndarray]) -> None:
    x = built["cafe"]
    assert band_share(x, 200, 4000) > 0.85, "crowd energy is not in the speech band"
    assert modulation_ratio(x) > 3.0, "no syllable-rate (3-8 Hz) modulation"
    assert modulation_ratio(x) > 2 * modulation_ratio(built["roomtone"])
    clinks = onsets(x, 5000, 11000, threshold=8, min_gap_s=0.1)
    assert 3 <= clinks.size <= 2 * x.size / SAMPLE_RATE, f"{clinks.size} clinks"
    levels = short_term_levels_db(x, 1.0)
    assert levels.max() - levels.min() < 4.0, "a crowd murmur, not a single talker"


def test_office_is_a_quiet_bed_with_sparse_soft_events(built: dict[str, np.ndarray]) -> None:
    x = built["office"]
    levels = short_term_levels_db(x)
    assert levels.max() - levels.min() < 4.0, "office bed is not steady"
    assert centroid(x) < 1000
    events = onsets(x, 3000, 8000, threshold=8)
    assert 3 <= events.size <= 2 * x.size / SAMPLE_RATE, f"{events.size} events in the office"
    peak_to_loudness = 20 * math.log10(np.max(np.abs(x))) + 30.0
    assert peak_to_loudness < 18, "office events are not subtle"


def test_thinking_is_soft_sparse_taps(built: dict[str, np.ndarray]) -> None:
    x = built["thinking"]
    taps = onsets(x, 100, 3000, threshold=0.1, strokes=True)
    assert 1.5 <= taps.size / (x.size / SAMPLE_RATE) <= 8
    assert np.sum(np.diff(taps) > 0.5) >= 3, "taps should come in small groups"
    assert centroid(x) < 0.5 * centroid(built["keyboard"]), "thinking taps should be softer than typing"
