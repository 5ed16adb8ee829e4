"""The one audio format inside the process: what the Voice Agent API sends and takes
(``pcm16``, 24 kHz, mono), what the microphones are resampled to, what the sounds are
decoded to and what the mixer plays."""

SAMPLE_RATE = 24000
BYTES_PER_SAMPLE = 2  # PCM16, little-endian
