"""The GE2E encoder's input, in numpy: Resemblyzer's mel spectrogram and its 1.6 s partials.

Resemblyzer computes it with librosa (`librosa.feature.melspectrogram`: a centred, zero-padded STFT of 25 ms
Hann windows every 10 ms, power 2, 40 Slaney mel bands from 0 to 8 kHz, not logarithmic) on audio normalised
to -30 dBFS. librosa is no dependency of the service, so the same computation is written out here; the test
compares it with values librosa 0.11 gave (tests/data/ge2e_mel_reference.npz).
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
MEL_BANDS = 40
PARTIAL_FRAMES = 160  # 1.6 s: the length the encoder was trained on
TARGET_DBFS = -30.0  # resemblyzer's audio_norm_target_dBFS: quieter speech is raised to it, louder is left


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    linear = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asanyarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.cache
def mel_filters() -> np.ndarray:
    """(MEL_BANDS, N_FFT // 2 + 1) triangular filters, area-normalised (Slaney), as librosa.filters.mel."""
    fft_hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), MEL_BANDS + 2))
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@functools.cache
def _window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def mel_spectrogram(audio: np.ndarray) -> np.ndarray:
    """(frames, MEL_BANDS) power mel spectrogram, one frame every 10 ms centred on sample HOP * i."""
    audio = np.asarray(audio, dtype=np.float32)
    padded = np.pad(audio, N_FFT // 2)
    frames = 1 + (padded.shape[0] - N_FFT) // HOP
    if frames <= 0:
        return np.zeros((0, MEL_BANDS), dtype=np.float32)
    strided = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:frames]
    spectrum = np.fft.rfft(strided * _window(), axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return power @ mel_filters().T


def volume_gain(audio: np.ndarray) -> float:
    """The factor that brings `audio` up to TARGET_DBFS (never below 1), as resemblyzer's normalize_volume."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    if rms <= 1e-9:
        return 1.0
    change_db = TARGET_DBFS - 20 * np.log10(rms)
    return float(10 ** (change_db / 20)) if change_db > 0 else 1.0
