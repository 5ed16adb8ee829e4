"""The built-in sounds (`builtin:<name>`), synthesised with numpy: how they are made.

sounds.py names, validates, levels and caches them; this module only makes one exact period
of each. How they were made and judged, without ears:

Each built-in is synthesised here with numpy only (no third-party audio, no scipy), from a fixed
seed, and is exactly periodic by construction: noise is written as a spectrum over the whole
buffer (an inverse FFT is circular), every event (key, clink, syllable) is added modulo the
length, and every tone and pitch contour completes a whole number of cycles. So a built-in loops
with no seam at all (no crossfade needed), and the tests check that the step across the wrap is
an ordinary step of the material. Voices are synthesised at 8 kHz and upsampled in the frequency
domain; each built-in takes ~0.05-0.2 s on a modest 2-core machine.

Without listening, each was judged against measurable features of what its name promises; each
check is a test in tests/test_sounds.py. `roomtone`: steady (250 ms levels within 3 dB), dark
(spectral centroid ~370 Hz, band energy falling octave by octave), no transients (crest factor
< 15 dB, no 3-8 Hz modulation), with mains hum lines at 50 and 100 Hz standing > 15 dB above the
neighbouring noise bins yet only ~7 % of the power (6-12 dB under the noise in their critical
bands: felt rather than heard). `keyboard`: key strokes found by onset detection in 2-8 kHz at a
human rate (~4 per second, median gap ~0.16 s) with several > 0.5 s pauses between words and
phrases, a high crest factor, stroke-to-stroke variation of timbre (spectral centroid varies by
~45 %), and about one stroke in six with a strong 60-170 Hz body: the spacebar thud. `cafe`:
~95 % of its energy in the speech band (200 Hz-4 kHz), a speech-band envelope whose modulation
in 3-8 Hz (syllables) is ~6x that in 12-24 Hz (room tone: ~1.4x), a level steady within 3 dB
over 1 s windows (a crowd, not one talker), and a clink every few seconds in 5-11 kHz. `office`:
a steady, dark bed (room tone + HVAC airflow + a fan line at 118 Hz) with sparse soft events
(distant typing bursts, a double click now and then: ~1 per second in 3-8 kHz, each ~10 dB over
the bed there) and a peak only ~14 dB over its loudness; a muffled phone voice passes once.
`thinking`: soft taps in small groups (~2.5 per second, pauses between groups), with a spectral
centroid a fifth of the keyboard's: rounded, not clicky. Levels of the components were set by
reasoning about real rooms and masking, then checked with these measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from pcm import SAMPLE_RATE

BUILTINS: tuple[str, ...] = ("roomtone", "office", "keyboard", "cafe", "thinking")
DEFAULT_SECONDS: Mapping[str, float] = MappingProxyType(
    {"roomtone": 12.0, "office": 20.0, "keyboard": 12.0, "cafe": 16.0, "thinking": 8.0}
)


def synthesise(key: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly one period (``n`` samples at SAMPLE_RATE) of built-in ``key``, at the level
    it comes out at (sounds.builtin levels it)."""
    return _SYNTHS[key](n, rng)


# -- building blocks -------------------------------------------------------------------------
# Everything is built on exactly one period of n samples: noises and tones are written directly
# as spectra (one inverse FFT per layer), filters multiply spectra, events are added modulo n.
# So every layer, and their sum, is periodic: the buffer loops with no seam at all.

_Magnitude = Callable[[np.ndarray], np.ndarray]


def _bins(n: int, rate: float = SAMPLE_RATE) -> np.ndarray:
    return np.fft.rfftfreq(n, 1.0 / rate)


def _power(spectrum: np.ndarray, n: int) -> float:
    """Mean square of irfft(spectrum, n), by Parseval (no inverse FFT needed)."""
    weights = np.full(spectrum.size, 2.0)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    return float(np.sum(weights * (spectrum.real**2 + spectrum.imag**2))) / (n * n)


def _noise(n: int, rng: np.random.Generator, magnitude: _Magnitude, rate: float = SAMPLE_RATE) -> np.ndarray:
    """Spectrum of Gaussian noise with |H| = magnitude(f), scaled to unit RMS."""
    f = _bins(n, rate)
    spectrum = (rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)) * magnitude(f)
    spectrum[0] = 0.0
    if n % 2 == 0:
        spectrum[-1] = spectrum[-1].real
    return spectrum / math.sqrt(_power(spectrum, n) + 1e-30)


def _tone(n: int, freq: float, amp: float, phase: float = 0.0, rate: float = SAMPLE_RATE) -> np.ndarray:
    """Spectrum of amp * sin(2 pi f t + phase), f rounded to a whole number of cycles in n."""
    spectrum = np.zeros(n // 2 + 1, dtype=complex)
    spectrum[max(1, round(freq * n / rate))] = amp * n / 2.0 * np.exp(1j * (phase - np.pi / 2.0))
    return spectrum


def _to_time(spectrum: np.ndarray, n: int) -> np.ndarray:
    return np.fft.irfft(spectrum, n)


def _upsample(spectrum: np.ndarray, m: int, n: int) -> np.ndarray:
    """The spectrum of the same periodic signal sampled n (> m) times per period instead of m."""
    out = np.zeros(n // 2 + 1, dtype=complex)
    keep = spectrum.size - (1 if m % 2 == 0 else 0)  # an even-length Nyquist bin has no twin
    out[:keep] = spectrum[:keep] * (n / m)
    return out


def _band(lo: float | None, hi: float | None, order: int = 2) -> _Magnitude:
    """Butterworth-like magnitude: high-pass at lo and/or low-pass at hi (zero phase)."""

    def magnitude(f: np.ndarray) -> np.ndarray:
        m = np.ones_like(f)
        if lo:
            m /= np.sqrt(1.0 + (lo / np.maximum(f, 1e-9)) ** (2 * order))
        if hi:
            m /= np.sqrt(1.0 + (f / hi) ** (2 * order))
        return m

    return magnitude


def _tilt(exponent: float, lo: float, hi: float) -> _Magnitude:
    """|H| ~ f^-exponent between lo and hi (pink: 0.5, brown: 1.0), gently band-limited."""
    band = _band(lo, hi)
    return lambda f: np.maximum(f, lo) ** -exponent * band(f)


def _smooth_random(n: int, rng: np.random.Generator, below_hz: float, rate: float = SAMPLE_RATE) -> np.ndarray:
    """A slow, unit-RMS periodic random curve (made at a ~100 Hz control rate, interpolated)."""
    control = max(16, int(n * 100 / rate))
    curve = _to_time(_noise(control, rng, _band(None, below_hz, order=4), rate=control * rate / n), control)
    grid = np.arange(n) * (control / n)
    return np.interp(grid, np.arange(control + 1), np.append(curve, curve[0]))


def _add_circular(out: np.ndarray, event: np.ndarray, at: int) -> None:
    """out[at : at + len(event)] += event, wrapping around the end (as often as needed)."""
    n = out.size
    at %= n
    done = 0
    while done < event.size:
        take = min(event.size - done, n - at)
        out[at : at + take] += event[done : done + take]
        done += take
        at = 0


def _damped(
    freqs: Sequence[float], decays_s: Sequence[float], amps: Sequence[float], length: int, rate: float
) -> np.ndarray:
    """A sum of exponentially decaying sines (struck objects, key bodies)."""
    t = np.arange(length) / rate
    out = np.zeros(length)
    for f, d, a in zip(freqs, decays_s, amps, strict=True):
        if f < 0.45 * rate:
            out += a * np.sin(2.0 * np.pi * f * t) * np.exp(-t / d)
    return out


def _room(n: int, rng: np.random.Generator, rt60: float, wet: float, rate: float = SAMPLE_RATE) -> np.ndarray:
    """Frequency response 1 + wet * R(f) of a small diffuse room (dark decaying noise tail)."""
    length = min(n, int(rt60 * rate))
    t = np.arange(length) / rate
    ir = np.convolve(rng.standard_normal(length) * np.exp(-6.9 * t / rt60), np.ones(4) / 4, mode="same")
    ir[: int(0.004 * rate)] = 0.0  # the direct sound is the dry path; reflections start later
    return 1.0 + wet * np.fft.rfft(ir / math.sqrt(float(ir @ ir) + 1e-30), n)


def _rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.mean(x * x)) + 1e-30)


# -- roomtone -------------------------------------------------------------------------------


def _roomtone(n: int, rng: np.random.Generator) -> np.ndarray:
    return _to_time(_roomtone_spectrum(n, rng), n)


def _roomtone_spectrum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Brownish air noise (-4.8 dB/octave, rolled off below 60 Hz and above 3 kHz) with a faint
    50 Hz mains hum. The hum's lines sit 6-12 dB under the noise in their critical bands (about
    7 % of the power): at the edge of audibility, a texture rather than a tone."""
    air = _noise(n, rng, lambda f: _tilt(0.8, 40.0, 3000.0)(f) * _band(60.0, None)(f))
    hum = sum(
        (_tone(n, 50.0 * k, amp, phase=float(k)) for k, amp in ((1, 0.15), (2, 0.3), (3, 0.12), (4, 0.1), (6, 0.06))),
        np.zeros(n // 2 + 1, dtype=complex),
    )
    return air + hum


# -- keyboard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Typist:
    """Timing model of a typist; times in seconds."""

    median_gap: float = 0.16  # inter-key interval inside a word (log-normal)
    gap_spread: float = 0.35
    mean_word: float = 4.5  # letters per word
    word_pause_chance: float = 0.25  # a thinking pause after a word
    phrase_words: tuple[int, int] = (4, 9)  # a longer pause after this many words


def _typing_events(
    seconds: float, rng: np.random.Generator, typist: _Typist, start_s: float
) -> list[tuple[float, str]]:
    """(time, kind) key presses, kind in {"key", "space", "backspace"}, within the span."""
    end = seconds - 0.12
    events: list[tuple[float, str]] = []
    t = start_s
    words_left = int(rng.integers(*typist.phrase_words))
    while t < end:
        for _ in range(max(1, int(rng.poisson(typist.mean_word)))):
            events.append((t, "key"))
            t += typist.median_gap * float(np.exp(typist.gap_spread * rng.standard_normal()))
        if rng.random() < 0.08:  # a typo, corrected
            for _ in range(int(rng.integers(1, 4))):
                events.append((t, "backspace"))
                t += 0.11 + 0.03 * rng.random()
        events.append((t, "space"))
        t += 1.2 * typist.median_gap * float(np.exp(typist.gap_spread * rng.standard_normal()))
        words_left -= 1
        if words_left == 0:
            t += 1.0 + 1.2 * rng.random()
            words_left = int(rng.integers(*typist.phrase_words))
        elif rng.random() < typist.word_pause_chance:
            t += 0.35 + 0.6 * rng.random()
    return [(time, kind) for time, kind in events if time < end]


def _click(rng: np.random.Generator, centre_hz: float, decay_s: float, rate: float) -> np.ndarray:
    """A short noise burst ringing around centre_hz: a hard plastic tick."""
    length = int(decay_s * 8 * rate)
    t = np.arange(length) / rate
    noise = np.diff(rng.standard_normal(length) * np.exp(-t / decay_s), prepend=0.0)
    ring = np.sin(2.0 * np.pi * min(centre_hz, 0.42 * rate) * t) * np.exp(-t / (1.5 * decay_s))
    return 0.6 * ring + 0.4 * noise


def _key_sound(kind: str, rng: np.random.Generator, rate: float, soft: bool = False) -> np.ndarray:
    """One key stroke: a contact click, the body "thock" at bottom-out, then a quieter release.

    Letter keys vary in body pitch and click colour; the spacebar is lower, louder in the body
    and rattles (stabiliser); backspace sits in between.
    """
    out = np.zeros(int(0.16 * rate))
    if kind == "space":
        body = _damped(
            [rng.uniform(95, 150), rng.uniform(260, 340)], [0.030, 0.012], [0.8, 0.3], int(0.07 * rate), rate
        )
        click_level = 0.45
    else:
        body_f = rng.uniform(200, 450) if kind == "key" else rng.uniform(170, 260)
        body = _damped([body_f, body_f * rng.uniform(2.2, 2.9)], [0.007, 0.003], [0.45, 0.2], int(0.04 * rate), rate)
        click_level = 1.0
    level = rng.uniform(0.65, 1.0)
    click = _click(rng, rng.uniform(2200, 5000), rng.uniform(0.0015, 0.0025), rate) * click_level
    out[: click.size] += click * level * (0.2 if soft else 1.0)
    bottom = int(rng.uniform(0.004, 0.012) * rate)
    out[bottom : bottom + body.size] += body * level
    if kind == "space":
        for k in range(3):
            tick = _click(rng, rng.uniform(1800, 3000), 0.0008, rate) * 0.25
            at = bottom + int((0.004 + 0.005 * k) * rate)
            out[at : at + tick.size] += tick
    release = int(rng.uniform(0.07, 0.12) * rate)
    up = _click(rng, rng.uniform(2000, 4500), 0.001, rate) * rng.uniform(0.2, 0.35) * (0.3 if soft else 1.0)
    end = min(out.size, release + up.size)
    out[release:end] += up[: end - release]
    return out


def _typing(
    n: int, rng: np.random.Generator, typist: _Typist, rate: float = SAMPLE_RATE, start_s: float = 0.3
) -> np.ndarray:
    out = np.zeros(n)
    for time, kind in _typing_events(n / rate, rng, typist, start_s):
        _add_circular(out, _key_sound(kind, rng, rate), int(time * rate))
    return out


def _keyboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """A typist at a desk, in a small room, over a very low room tone."""
    keys = _typing(n, rng, _Typist())
    spectrum = np.fft.rfft(keys) * _room(n, rng, rt60=0.3, wet=0.3)
    spectrum += _noise(n, rng, _tilt(0.8, 40.0, 3000.0)) * (0.02 * _rms(keys))
    return _to_time(spectrum, n)


# -- voices (cafe babble, office murmur) --------------------------------------------------------

_VOICE_RATE = 8000  # voices are band-limited below 4 kHz: synthesised at 8 kHz, upsampled once
_VOWELS = (  # F1, F2, F3 (Hz) of an average adult voice: /a/, /i/, /u/, /e/, /o/
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (300.0, 870.0, 2240.0),
    (530.0, 1840.0, 2480.0),
    (570.0, 840.0, 2410.0),
)


def _formant_response(formants: Sequence[float], scale: float) -> _Magnitude:
    """Magnitude of a cascade of second-order resonators: a crude vocal tract."""

    def magnitude(f: np.ndarray) -> np.ndarray:
        m = np.ones_like(f)
        for k, formant in enumerate(formants):
            fc = formant * scale
            bw = 60.0 + 40.0 * k
            m *= fc * fc / np.sqrt((fc * fc - f * f) ** 2 + (bw * f) ** 2 + 1e-9)
        return m

    return magnitude


def _glottal_source(m: int, rng: np.random.Generator, f0: float) -> np.ndarray:
    """A sawtooth pulse train whose pitch wanders (intonation) and closes on whole cycles.

    The pitch contour lives at a ~100 Hz control rate; its running phase is interpolated, so
    the per-sample work is one interpolation and one modulo.
    """
    control = max(16, int(m * 100 / _VOICE_RATE))
    control_rate = control * _VOICE_RATE / m
    wander = _to_time(_noise(control, rng, _band(None, 3.0, order=4), rate=control_rate), control)
    cycles_per_step = f0 * np.exp(0.12 * wander) / control_rate
    cycles_per_step *= round(cycles_per_step.sum()) / cycles_per_step.sum()
    phase = np.concatenate(([0.0], np.cumsum(cycles_per_step)))
    at = np.interp(np.arange(m) * (control / m), np.arange(control + 1), phase)
    return 2.0 * (at % 1.0) - 1.0


def _syllables(
    rng: np.random.Generator, span: tuple[float, float], syllable_hz: float, talk_share: float
) -> list[tuple[float, float, float]]:
    """(start s, length s, level) of syllables in talk spurts of 1-3.5 s within span."""
    out: list[tuple[float, float, float]] = []
    t, end = span[0] + rng.uniform(0.0, 0.5), span[0] + span[1]
    while t < end:
        spurt_end = min(t + rng.uniform(1.0, 3.5), end)
        while t < spurt_end:
            out.append((t, rng.uniform(0.6, 1.1) / syllable_hz, float(rng.uniform(0.5, 1.0))))
            t += 1.0 / (syllable_hz * rng.uniform(0.8, 1.25))
        t += rng.uniform(0.3, 1.2) * (1.0 - talk_share) / max(talk_share, 0.05)
    return out


def _babble_spectrum(
    m: int, rng: np.random.Generator, voices: Sequence[tuple[float, float]], span: tuple[float, float] | None = None
) -> np.ndarray:
    """Spectrum (at _VOICE_RATE, m samples) of pseudo-voices saying vowel-like syllables.

    Each voice (f0, level) talks in spurts at its own syllable rate (3.5-6.5 Hz); a syllable is
    a Hann window over the voice's pulse train plus breath noise, added to the buffer of its
    vowel. One formant filter per vowel and voice register then serves the whole crowd, since
    filtering is linear.
    """
    span = span or (0.0, m / _VOICE_RATE)
    per_vowel = np.zeros((2, len(_VOWELS), m))  # [low / higher voice register, vowel]
    breath = rng.standard_normal(m)
    hann = np.hanning(1024)
    for f0, level in voices:
        source = _glottal_source(m, rng, f0) + 0.25 * np.roll(breath, int(rng.integers(m)))
        register = per_vowel[int(f0 > 165.0)]
        for start_s, length_s, amp in _syllables(rng, span, rng.uniform(3.5, 6.5), talk_share=0.65):
            start, length = int(start_s * _VOICE_RATE), int(length_s * _VOICE_RATE)
            envelope = hann[(np.arange(length) * (hann.size - 1)) // max(1, length - 1)]
            syllable = envelope * (amp * level) * np.take(source, np.arange(start, start + length), mode="wrap")
            _add_circular(register[int(rng.integers(len(_VOWELS)))], syllable, start)
    f = _bins(m, _VOICE_RATE)
    spectrum = np.zeros(f.size, dtype=complex)
    for register, scale in enumerate((1.0, 1.17)):
        for vowel, formants in enumerate(_VOWELS):
            if per_vowel[register, vowel].any():
                spectrum += np.fft.rfft(per_vowel[register, vowel]) * _formant_response(formants, scale)(f)
    return spectrum


def _clinks(n: int, rng: np.random.Generator, every_s: float) -> np.ndarray:
    """Cup and spoon clinks: inharmonic, quickly decaying partials, sometimes a stirring run."""
    out = np.zeros(n)
    t = rng.uniform(0.5, every_s)
    while t < n / SAMPLE_RATE:
        base = rng.uniform(2200.0, 3600.0)
        for k in range(int(rng.choice([1, 1, 2, 3]))):
            ring = _damped(
                [base, base * 1.58, base * 2.33, base * 2.92],
                [0.09, 0.05, 0.03, 0.02],
                [1.0, 0.6, 0.35, 0.2],
                int(0.35 * SAMPLE_RATE),
                SAMPLE_RATE,
            )
            _add_circular(out, ring * rng.uniform(0.5, 1.0), int((t + 0.16 * k) * SAMPLE_RATE))
        t += every_s * rng.uniform(0.4, 1.6)
    return out


def _cafe(n: int, rng: np.random.Generator) -> np.ndarray:
    """Three nearer talkers and a dozen farther ones in a reverberant room, plus clinks."""
    m = max(64, round(n * _VOICE_RATE / SAMPLE_RATE))
    near = [(rng.uniform(95, 130), 1.0), (rng.uniform(180, 240), 0.85), (rng.uniform(100, 140), 0.7)]
    far = [(rng.uniform(90, 250), rng.uniform(0.25, 0.45)) for _ in range(12)]
    crowd = _babble_spectrum(m, rng, near + far)
    crowd *= _band(150.0, 3500.0)(_bins(m, _VOICE_RATE)) * _room(m, rng, rt60=0.6, wet=0.6, rate=_VOICE_RATE)
    spectrum = _upsample(crowd, m, n)
    spectrum /= math.sqrt(_power(spectrum, n))
    spectrum += 0.15 * _noise(n, rng, _tilt(0.8, 40.0, 3000.0))
    return _to_time(spectrum, n) + 0.9 * _clinks(n, rng, every_s=2.5)


# -- office -------------------------------------------------------------------------------------


def _office(n: int, rng: np.random.Generator) -> np.ndarray:
    """Room tone + HVAC (airflow and a fan line), with someone typing a few desks away now and
    then, a colleague's muffled phone call, and the odd mouse click. The bed dominates."""
    m = max(64, round(n * _VOICE_RATE / SAMPLE_RATE))
    bed = _roomtone_spectrum(n, rng) + _tone(n, 118.0, 0.25) + _tone(n, 236.0, 0.1, 0.7)
    airflow = _to_time(_noise(n, rng, _band(120.0, 900.0)), n) * (1.0 + 0.08 * _smooth_random(n, rng, 0.3))
    # Levels against a bed of ~1.3 RMS: distant key clicks and mouse clicks stand 10-15 dB above
    # the bed in 3-8 kHz (where the bed is quiet) and no higher than the bed's own peaks overall;
    # the murmur's loudest syllables sit ~3 dB above the bed in 200 Hz-1 kHz.
    typing = np.fft.rfft(_typing_bursts(n, rng)) * _band(None, 6000.0)(_bins(n)) * 3.0
    murmur = _upsample(_phone_murmur(m, rng), m, n) * 0.2
    return _to_time(bed + typing + murmur, n) + 0.8 * airflow + 1.2 * _mouse_clicks(n, rng)


def _typing_bursts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Someone typing now and then: 2-5 s bursts, 3-8 s apart."""
    out = np.zeros(n)
    typist = _Typist(word_pause_chance=0.1)
    t = rng.uniform(0.5, 2.0)
    while t < n / SAMPLE_RATE - 1.0:
        length = int(rng.uniform(2.0, 5.0) * SAMPLE_RATE)
        burst = _typing(length, rng, typist, start_s=0.0)
        _add_circular(out, burst * rng.uniform(0.6, 1.0), int(t * SAMPLE_RATE))
        t += length / SAMPLE_RATE + rng.uniform(3.0, 8.0)
    return out


def _phone_murmur(m: int, rng: np.random.Generator) -> np.ndarray:
    """Spectrum of one colleague on the phone across the room: 4-7 s of a muffled voice."""
    seconds = m / _VOICE_RATE
    length = min(rng.uniform(4.0, 7.0), 0.6 * seconds)
    voice = _babble_spectrum(m, rng, [(rng.uniform(105, 135), 1.0)], span=(rng.uniform(0.0, seconds), length))
    voice *= _band(300.0, 1800.0, order=3)(_bins(m, _VOICE_RATE))
    active_share = length / seconds
    return voice / math.sqrt(_power(voice, m) / active_share + 1e-30)


def _mouse_clicks(n: int, rng: np.random.Generator) -> np.ndarray:
    """A click or a double click every ~7 s."""
    out = np.zeros(n)
    for _ in range(max(1, int(n / SAMPLE_RATE / 7))):
        at = int(rng.uniform(0, n))
        for k in range(int(rng.choice([1, 2]))):
            _add_circular(
                out, _click(rng, rng.uniform(4000, 6500), 0.0006, SAMPLE_RATE), at + int(0.11 * k * SAMPLE_RATE)
            )
    return out


# -- thinking -----------------------------------------------------------------------------------


def _thinking(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gentle taps in small groups (soft, rounded keys; no sharp clicks) over a whisper of air."""
    out = np.zeros(n)
    t = 0.25
    while t < n / SAMPLE_RATE - 0.4:
        for _ in range(int(rng.integers(3, 7))):
            _add_circular(
                out, _key_sound("key", rng, SAMPLE_RATE, soft=True) * rng.uniform(0.6, 1.0), int(t * SAMPLE_RATE)
            )
            t += 0.15 + 0.1 * rng.random()
        t += rng.uniform(0.6, 1.4)
    spectrum = np.fft.rfft(out) * _band(None, 2500.0)(_bins(n)) * _room(n, rng, rt60=0.25, wet=0.25)
    spectrum += _noise(n, rng, _tilt(0.8, 40.0, 3000.0)) * (0.05 * _rms(out))
    return _to_time(spectrum, n)


_SYNTHS: Mapping[str, Callable[[int, np.random.Generator], np.ndarray]] = MappingProxyType(
    {
        "roomtone": _roomtone,
        "office": _office,
        "keyboard": _keyboard,
        "cafe": _cafe,
        "thinking": _thinking,
    }
)
