"""Seeded fuzzing of the decoders (issue 20): thousands of mutated WAV, RF64, RIFX, FLAC, MP3,
Ogg, MP4, WebM, ADTS and AIFF files. Whatever the bytes, only SoundError may come out of
decode_wav and decode_bytes, each decode stays within a memory and a time bound, and the run
is the same every time (fixed seeds)."""

from __future__ import annotations

import random
import struct
import time

import pytest

import sounds
from sound_samples import av_seeds, peak_rss_mb, reset_peak_rss, wav_seeds
from sounds import SoundError

pytest.importorskip("av")

WAV_CASES = 10_000
AV_CASES = 5000
MAX_PEAK_GROWTH_MB = 64.0  # per decode: the seeds are 0.25 s; a mutation must not make that 1 GB
MAX_CASE_S = 2.0

_INTERESTING32 = (0, 1, 2, 3, 15, 16, 17, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                  0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
_CHUNK_IDS = (b"fmt ", b"data", b"ds64", b"LIST", b"junk", b"fact", b"\x00\x00\x00\x00", b"RIFF")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three mutations: bit flips, truncation, a size field set to an interesting or
    random value, a chunk inserted, a range duplicated or deleted, bytes overwritten."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        n = len(out)
        if n < 8:
            out += bytes(rng.randrange(256) for _ in range(8))
            continue
        if kind == 0:  # bit flips, mostly in the headers
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(min(n, 256)) if rng.random() < 0.7 else rng.randrange(n)
                out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del out[rng.randrange(1, n):]
        elif kind == 2:  # a 32-bit size field: at a chunk header if there is one, else anywhere early
            heads = [i + 4 for i in range(0, min(n - 8, 4096)) if bytes(out[i:i + 4]) in _CHUNK_IDS]
            pos = rng.choice(heads) if heads and rng.random() < 0.7 else rng.randrange(0, min(n - 4, 128))
            value = rng.choice(_INTERESTING32) if rng.random() < 0.7 else rng.getrandbits(32)
            out[pos:pos + 4] = struct.pack(rng.choice("<>") + "I", value)
        elif kind == 3:  # a chunk inserted
            cid = rng.choice(_CHUNK_IDS)
            size = rng.choice((0, 1, 4, 16, 28, 40, rng.randrange(64)))
            declared = size if rng.random() < 0.6 else rng.choice(_INTERESTING32)
            chunk = cid + struct.pack("<I", declared) + bytes(rng.randrange(256) for _ in range(size))
            pos = rng.choice((12, 12, rng.randrange(n)))
            out[pos:pos] = chunk
        elif kind == 4:  # a range duplicated
            a = rng.randrange(n)
            b = min(n, a + rng.randint(1, 512))
            out[a:a] = out[a:b]
        elif kind == 5:  # a range deleted
            a = rng.randrange(n)
            del out[a:a + rng.randint(1, 64)]
        elif kind == 6:  # bytes overwritten with extremes
            pos = rng.randrange(min(n, 512))
            out[pos:pos + 4] = bytes(rng.choice((0x00, 0xFF, 0x7F, 0x80)) for _ in range(4))[: n - pos]
        else:  # random bytes
            pos = rng.randrange(n)
            length = min(n - pos, rng.randint(1, 32))
            out[pos:pos + length] = bytes(rng.randrange(256) for _ in range(length))
    return bytes(out)


def run_cases(seeds: dict[str, bytes], count: int, seed: int, decode) -> dict[str, int]:
    rng = random.Random(seed)
    names = sorted(seeds)
    outcomes = {"ok": 0, "SoundError": 0}
    worst_growth, worst_time = 0.0, 0.0
    for i in range(count):
        name = names[i % len(names)]
        data = mutate(seeds[name], rng)
        reset_peak_rss()
        base = peak_rss_mb()
        t0 = time.perf_counter()
        try:
            decode(data)
            outcomes["ok"] += 1
        except SoundError as e:
            assert "\n" not in str(e), (name, i, str(e))
            outcomes["SoundError"] += 1
        except BaseException as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {i} (seed {seed}, from {name}): {type(e).__name__}: {e}; "
                        f"first bytes {data[:48]!r}, {len(data)} bytes")
        elapsed = time.perf_counter() - t0
        growth = peak_rss_mb() - base
        assert growth < MAX_PEAK_GROWTH_MB, f"case {i} from {name}: peak RSS grew {growth:.0f} MB"
        assert elapsed < MAX_CASE_S, f"case {i} from {name}: took {elapsed:.2f} s"
        worst_growth, worst_time = max(worst_growth, growth), max(worst_time, elapsed)
    print(f"{count} cases: {outcomes}; worst peak-RSS growth {worst_growth:.1f} MB, slowest {worst_time * 1000:.0f} ms")
    return outcomes


def test_decode_wav_fuzz() -> None:
    seeds = wav_seeds()
    outcomes = run_cases(seeds, WAV_CASES, seed=20_2, decode=lambda d: sounds.decode_wav(d, "fuzz.wav"))
    assert outcomes["ok"] > WAV_CASES // 10 and outcomes["SoundError"] > WAV_CASES // 10  # both paths exercised


def test_decode_bytes_fuzz() -> None:
    seeds = {**av_seeds(0.2), **{f"wav-{k}": v for k, v in wav_seeds().items()}}
    outcomes = run_cases(seeds, AV_CASES, seed=20_4, decode=lambda d: sounds.decode_bytes(d, name="fuzz"))
    assert outcomes["ok"] > AV_CASES // 10 and outcomes["SoundError"] > AV_CASES // 10
