"""The diarizer: GE2E speaker embeddings of 1.6 s windows of speech (onnxruntime), clustered into speakers.

Audio is read block by block (audio.PcmStream) and cut into speech regions by Silero VAD, as the faster-whisper
engine does (engines.faster.speech_regions), or by the regions the caller already has. Each region is
embedded window by window as it comes; only the embeddings (1 KB per 0.8 s of speech) are kept, so memory
does not grow with the audio, and clustering (clustering.py) bounds its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE
from . import features
from .result import Diarization, DiarizationUnavailable, Turn

log = logging.getLogger(__name__)

MODEL_ENV = "WHISPER_DIARIZATION_MODEL"
ASSET_PATH = Path("models") / "ge2e" / "ge2e.onnx"  # under the assets directory scripts/fetch-assets builds
HOP_FRAMES = 80  # windows of 160 frames (1.6 s) every 0.8 s: half overlap, as resemblyzer's partials
MIN_FRAMES = 50  # a speech region shorter than 0.5 s gets no embedding: it takes its neighbours' speaker
CLUSTER_MIN_FRAMES = features.PARTIAL_FRAMES  # shorter windows (noisier) are assigned, not clustered
BATCH = 32  # windows per encoder call
SMOOTH_ROWS = 4096  # embeddings smoothed at a time (a 4 MB block)
BLOCK_S = 40.0  # audio decoded at a time, as the faster engine
# Silero VAD as the faster engine runs it, with less padding: padding turns silence into speech of someone.
VAD = {"max_speech_duration_s": 30.0, "min_silence_duration_ms": 160, "speech_pad_ms": 100}
TOUCH_S = 1e-3  # two regions closer than this touch: one region cut at 30 s, or silence shared out between two
REFERENCE_MIN_S, REFERENCE_MAX_S = 1.0, 30.0  # a known speaker's clip: speech in it, and the clip's length
# A cluster takes a known name only if its voice is this close to the reference (cosine of GE2E embeddings;
# the same voice scores above 0.85, two different synthetic voices of one gender up to about 0.8).
REFERENCE_MIN_SIMILARITY = 0.7


def default_model_path() -> Path:
    """$WHISPER_DIARIZATION_MODEL, else the file scripts/fetch-assets builds in the assets directory."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    assets = os.environ.get("PILOTYS_WHISPER_ASSETS") or Path.home() / ".cache" / "pilotys-whisper" / "assets"
    return Path(assets) / ASSET_PATH


def _letters(n: int) -> str:
    """A, B, ... Z, AA, AB, ...: spreadsheet column names."""
    name = ""
    n += 1
    while n:
        n, rest = divmod(n - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def _array_blocks(audio: np.ndarray) -> Iterator[np.ndarray]:
    step = int(BLOCK_S * SAMPLE_RATE)
    for start in range(0, audio.shape[0], step):
        yield audio[start:start + step]


def _given_regions(blocks: Iterable[np.ndarray], speech: list[tuple[float, float]]) -> Iterator[tuple[int, np.ndarray]]:
    """The caller's speech regions cut out of a stream of blocks; only the audio not yet passed is kept."""
    wanted = sorted((int(s * SAMPLE_RATE), int(e * SAMPLE_RATE)) for s, e in speech if e > s)
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0
    i = 0
    for block in blocks:
        buf = np.concatenate([buf, block]) if buf.size else block
        buf_end = buf_start + buf.shape[0]
        while i < len(wanted) and wanted[i][1] <= buf_end:
            start, end = wanted[i]
            if end > buf_start:
                yield max(start, buf_start), buf[max(start, buf_start) - buf_start:end - buf_start].copy()
            i += 1
        keep_from = wanted[i][0] if i < len(wanted) else buf_end
        keep_from = min(max(keep_from, buf_start), buf_end)
        buf, buf_start = buf[keep_from - buf_start:], keep_from
        if i >= len(wanted):
            return
    if i < len(wanted) and buf.size:  # regions running past the end of the audio
        for start, end in wanted[i:]:
            if start < buf_start + buf.shape[0]:
                yield max(start, buf_start), buf[max(start, buf_start) - buf_start:end - buf_start].copy()


def _trim(start, end, previous_end, next_start, cut, touch):
    """One region's edges brought in by `cut` where they touch no other region (closer than `touch`; the
    neighbours' edges None at either end of the recording), in seconds or in samples alike. An edge at 0 stays:
    its padding was cut off there."""
    alone_before = start > 0 and (previous_end is None or start - previous_end > touch)
    alone_after = next_start is None or next_start - end > touch
    return start + cut * alone_before, end - cut * alone_after


def _trimmed(speech: list[tuple[float, float]], pad_s: float) -> list[tuple[float, float]]:
    """Regions another VAD pass padded by `pad_s` brought to the diarizer's own padding: an edge that touches
    no other region (so its padding is all there) moves in by the difference; where two regions touch, the
    silence between them was shared out and stays (it is shorter than two paddings)."""
    cut = pad_s - VAD["speech_pad_ms"] / 1000
    spans = sorted((s, e) for s, e in speech if e > s)
    if cut <= 0:
        return spans
    out = []
    for i, (start, end) in enumerate(spans):
        start, end = _trim(start, end, spans[i - 1][1] if i else None,
                           spans[i + 1][0] if i + 1 < len(spans) else None, cut, TOUCH_S)
        if end > start:
            out.append((start, end))
    return out


def _smoothed(vectors: np.ndarray, owner: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Each window's embedding averaged with its neighbours' in the same speech region (2.4 s of context
    instead of 1.6 s): less noise for the clustering, which on the corpus counted speakers better so."""
    total = vectors.astype(dtype)
    same = (owner[1:] == owner[:-1])[:, None]
    # Block by block, in place: one copy of the embeddings (3 hours' 13,500 are 14 MB in float32), not four.
    for first in range(0, max(vectors.shape[0] - 1, 0), SMOOTH_ROWS):
        last = min(first + SMOOTH_ROWS, vectors.shape[0] - 1)
        total[first + 1:last + 1] += vectors[first:last] * same[first:last]
        total[first:last] += vectors[first + 1:last + 1] * same[first:last]
    total /= np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
    return total


class Diarizer:
    """Speaker diarization with a GE2E encoder in ONNX. Load once at start-up; diarize() is thread-safe."""

    def __init__(self, session, model_path: Path):
        self._session = session
        self.model_path = model_path

    @classmethod
    def load(cls, model_path: str | None = None, threads: int = 0) -> Diarizer:
        path = Path(model_path) if model_path else default_model_path()
        try:
            # The clustering's SciPy too, imported here rather than on the first request (1 CPU s, measured).
            import onnxruntime
            import scipy.cluster.vq  # noqa: F401
            import scipy.linalg  # noqa: F401
            import scipy.optimize  # noqa: F401
        except ImportError as exc:
            raise DiarizationUnavailable(
                f"speaker diarization needs the optional dependencies ({exc.name} is missing): install the "
                "service with its [diarization] extra (pip install 'pilotys-whisper[diarization]')") from exc
        if not path.is_file():
            raise DiarizationUnavailable(
                f"the speaker model {path} is missing: build it with scripts/fetch-assets (make assets), or set "
                f"{MODEL_ENV} to an ONNX speaker-embedding model")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads that spin burn CPU a loaded server's transcriptions need (the same lever as blas.py's).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise DiarizationUnavailable(f"the speaker model {path} could not be loaded: {exc}") from exc
        diarizer = cls(session, path)
        try:  # one run now: onnxruntime sets up its buffers on the first, and a bad model fails at start-up
            diarizer._embed(np.zeros((1, features.PARTIAL_FRAMES, features.MEL_BANDS), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a wrong model
            raise DiarizationUnavailable(f"the speaker model {path} does not embed a 1.6 s window: {exc}") from exc
        log.info("speaker model %s loaded", path)
        return diarizer

    def stream(self) -> SpeechStream:
        """A SpeechStream: the regions a transcription's VAD finds, embedded while the model transcribes."""
        return SpeechStream(self)

    # -- embeddings ------------------------------------------------------------------------------------

    def _embed(self, mels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {"mels": np.ascontiguousarray(mels, dtype=np.float32)})
        return out

    def _windows(self, start: int, audio: np.ndarray) -> Iterator[tuple[float, float, np.ndarray, bool]]:
        """(start s, end s, mel frames, full length) of the windows of one speech region."""
        mel = features.mel_spectrogram(audio)
        frames = mel.shape[0]
        if frames < MIN_FRAMES:
            return
        size = features.PARTIAL_FRAMES
        if frames <= size:
            starts = [0]
        else:
            starts = list(range(0, frames - size + 1, HOP_FRAMES))
            if starts[-1] != frames - size:
                starts.append(frames - size)  # the region's end is covered too
        for first in starts:
            last = min(first + size, frames)
            piece = audio[first * features.HOP:last * features.HOP]
            gain = features.volume_gain(piece)
            t0 = (start + first * features.HOP) / SAMPLE_RATE
            t1 = (start + min(last * features.HOP, audio.shape[0])) / SAMPLE_RATE
            yield t0, t1, mel[first:last] * (gain * gain), last - first >= CLUSTER_MIN_FRAMES

    def _embed_regions(self, regions: Iterable[tuple[int, np.ndarray]]):
        """Embeddings of every window of every region: (times (n, 2), embeddings (n, 256), full (n,),
        region of each window, the regions' (start, end) in seconds)."""
        embeddings = _Embeddings(self)
        for start, audio in regions:
            embeddings.add(start, audio)
        return embeddings.result()

    def _regions(self, audio, speech) -> Iterator[tuple[int, np.ndarray]]:
        from ..audio import PcmStream

        if isinstance(audio, (str, os.PathLike)):
            with PcmStream(str(audio)) as stream:
                yield from self._cut(stream.blocks(BLOCK_S), speech)
        else:
            yield from self._cut(_array_blocks(np.asarray(audio, dtype=np.float32).reshape(-1)), speech)

    @staticmethod
    def _cut(blocks: Iterable[np.ndarray], speech) -> Iterator[tuple[int, np.ndarray]]:
        if speech is not None:
            yield from _given_regions(blocks, speech)
            return
        from faster_whisper.vad import VadOptions

        from ..engines.faster import speech_regions

        for region in speech_regions(blocks, VadOptions(**VAD), max_s=VAD["max_speech_duration_s"]):
            yield region.start, region.audio

    def reference(self, audio) -> np.ndarray:
        """The embedding of a known speaker's clip (a path or 16 kHz float32 samples): the mean of its windows."""
        from ..audio import decode_all
        from ..errors import ApiError

        if isinstance(audio, (str, os.PathLike)):
            try:
                audio = decode_all(str(audio), max_seconds=REFERENCE_MAX_S)
            except ApiError as exc:
                raise ValueError(f"the reference clip is not usable audio: {exc.message}") from exc
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        if samples.shape[0] > REFERENCE_MAX_S * SAMPLE_RATE:
            raise ValueError(f"the reference clip lasts {samples.shape[0] / SAMPLE_RATE:.1f} s; send a clip of "
                             f"{REFERENCE_MIN_S:.0f} to 10 s of the speaker alone")
        if samples.shape[0] < REFERENCE_MIN_S * SAMPLE_RATE:
            raise ValueError(f"the reference clip lasts {samples.shape[0] / SAMPLE_RATE:.2f} s; it needs at least "
                             f"{REFERENCE_MIN_S:.0f} s of the speaker's voice")
        _, vectors, _, _, spans = self._embed_regions(self._cut(_array_blocks(samples), None))
        speech = sum(end - start for start, end in spans)
        if speech < REFERENCE_MIN_S or vectors.shape[0] == 0:
            raise ValueError(f"the reference clip holds {speech:.2f} s of speech; it needs at least "
                             f"{REFERENCE_MIN_S:.0f} s of the speaker's voice")
        mean = vectors.mean(axis=0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)

    # -- diarization -----------------------------------------------------------------------------------

    def diarize(self, audio, *, speech: list[tuple[float, float]] | None = None, speech_pad_s: float | None = None,
                num_speakers: int | None = None, min_speakers: int | None = None, max_speakers: int | None = None,
                references: dict[str, np.ndarray] | None = None) -> Diarization:
        """Who speaks when in `audio` (a path or 16 kHz samples). `speech`: the speech regions (seconds) when
        the caller has them (the engine's VAD pass: the VAD then runs once per request), `speech_pad_s` the
        padding its VAD put around them; without, the diarizer runs Silero VAD itself."""
        if speech is not None and speech_pad_s is not None:
            speech = _trimmed(speech, speech_pad_s)
        from .blas import single_threaded

        with single_threaded():  # the mel features' matrix products too (0.3 CPU s of 10 minutes, loaded)
            embedded = self._embed_regions(self._regions(audio, speech))
        return self.label(*embedded, num_speakers=num_speakers, min_speakers=min_speakers,
                          max_speakers=max_speakers, references=references)

    def diarize_stream(self, stream: SpeechStream, **counts) -> Diarization:
        """diarize() of what `stream` was given (the same regions, embedded as they came): only the clustering
        is left to do."""
        return self.label(*stream.finish(), **counts)

    @classmethod
    def label(cls, times, vectors, full, owner, spans, *, num_speakers=None, min_speakers=None, max_speakers=None,
              references=None) -> Diarization:
        """Speakers from the windows' embeddings (what _embed_regions gives)."""
        from .blas import single_threaded
        from .clustering import cluster, match_references, working_dtype

        if vectors.shape[0] == 0:
            return Diarization(turns=[], speakers=[], windows=0, affinity_size=0)
        clustered = np.flatnonzero(full) if full.any() else np.arange(vectors.shape[0])
        with single_threaded():
            smoothed = _smoothed(vectors, owner, working_dtype(clustered.size))
            points = smoothed if clustered.size == smoothed.shape[0] else smoothed[clustered]  # no copy if all
            found = cluster(points, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers,
                            regions=owner[clustered])
        # Every window (the short ones too) takes the speaker whose centroid is nearest; the clustered ones
        # keep the cluster they were put in.
        labels = np.argmax(vectors @ found.centroids.T.astype(np.float32), axis=1)
        labels[clustered] = found.labels
        names = match_references(found.centroids, references or {}, REFERENCE_MIN_SIMILARITY)
        turns = cls._turns(times, labels, owner, spans)
        ordered: dict[int, str] = {}
        for label, _ in turns:
            if label not in ordered:
                ordered[label] = names.get(label) or _letters(sum(1 for k in ordered if k not in names))
        result = [Turn(round(s, 3), round(e, 3), ordered[label]) for label, (s, e) in
                  ((label, span) for label, span in turns)]
        return Diarization(turns=result, speakers=list(dict.fromkeys(t.speaker for t in result)),
                           windows=int(vectors.shape[0]), affinity_size=found.affinity_size,
                           stats={"clusters": int(found.centroids.shape[0])})

    @staticmethod
    def _turns(times: np.ndarray, labels: np.ndarray, owner: np.ndarray, spans) -> list:
        """[(label, (start, end))] in time order: each region split between its windows' speakers at the
        midpoints of consecutive windows; a region without a window takes its nearest window's speaker."""
        centres = times.mean(axis=1)
        out: list = []
        for region, (start, end) in enumerate(spans):
            mine = np.flatnonzero(owner == region) if owner.size else np.zeros(0, dtype=int)
            if mine.size == 0:
                nearest = int(np.argmin(np.abs(centres - (start + end) / 2)))
                pieces = [(int(labels[nearest]), start, end)]
            else:
                pieces, cut = [], start
                for a, b in zip(mine[:-1], mine[1:], strict=True):
                    if labels[a] != labels[b]:
                        middle = (centres[a] + centres[b]) / 2
                        pieces.append((int(labels[a]), cut, middle))
                        cut = middle
                pieces.append((int(labels[mine[-1]]), cut, end))
            for label, s, e in pieces:
                if out and out[-1][0] == label and s - out[-1][1][1] < 1e-6:
                    out[-1] = (label, (out[-1][1][0], e))
                else:
                    out.append((label, (s, e)))
        return out


class _Embeddings:
    """The windows of speech regions embedded as the regions come, BATCH windows per encoder call."""

    def __init__(self, diarizer: Diarizer):
        self._diarizer = diarizer
        self.times: list[tuple[float, float]] = []
        self.vectors: list[np.ndarray | None] = []
        self.full: list[bool] = []
        self.owner: list[int] = []
        self.spans: list[tuple[float, float]] = []
        self._pending: list[np.ndarray] = []
        self._pending_at: list[int] = []

    def add(self, start: int, audio: np.ndarray) -> None:
        self.spans.append((start / SAMPLE_RATE, (start + audio.shape[0]) / SAMPLE_RATE))
        for t0, t1, mel, is_full in self._diarizer._windows(start, audio):
            self.times.append((t0, t1))
            self.full.append(is_full)
            self.owner.append(len(self.spans) - 1)
            self.vectors.append(None)
            if mel.shape[0] == features.PARTIAL_FRAMES:
                self._pending.append(mel)
                self._pending_at.append(len(self.vectors) - 1)
                if len(self._pending) == BATCH:
                    self._flush()
            else:
                self.vectors[-1] = self._diarizer._embed(mel[None])[0]

    def _flush(self) -> None:
        if self._pending:
            out = self._diarizer._embed(np.stack(self._pending))
            for index, vector in zip(self._pending_at, out, strict=True):
                self.vectors[index] = vector
            self._pending.clear()
            self._pending_at.clear()

    def result(self):
        self._flush()
        dim = self.vectors[0].shape[0] if self.vectors else 256
        return (np.array(self.times, dtype=np.float64).reshape(-1, 2),
                np.array(self.vectors, dtype=np.float32).reshape(-1, dim), np.array(self.full, dtype=bool),
                np.array(self.owner, dtype=int), self.spans)


class SpeechStream:
    """Speech regions embedded as an engine hands them out (Engine.transcribe's on_speech, called in the
    model's thread between its batches): the file is decoded once and the VAD runs once, and when the
    transcription ends only the clustering is left. In the model's thread, not beside it: on 2 cores an
    encoder thread beside CTranslate2's took more time than it saved (+23 % CPU and +36 % wall on a 10-minute
    meeting, against +17 % and +10 % in turn; bench/README.md). The regions are brought to the diarizer's
    padding as diarize() does (_trimmed: an edge that touches no other region moves in), so the result is
    diarize()'s with the same regions; each is embedded once the next one says whether they touch."""

    def __init__(self, diarizer: Diarizer):
        self._embeddings = _Embeddings(diarizer)
        self._held: tuple[int, np.ndarray, int] | None = None  # the last region: its end edge waits for the next
        self._previous_end: int | None = None  # the sample after the region before the held one

    def add(self, start: int, audio: np.ndarray, pad_s: float) -> None:
        """One speech region of the transcription's VAD, in order: its first sample, its samples (kept until
        the next region comes, not copied: the engine does not write to them), the padding its VAD put
        around the speech."""
        if self._held is not None:
            self._release(next_start=start)
        self._held = (start, audio, max(0, round((pad_s - VAD["speech_pad_ms"] / 1000) * SAMPLE_RATE)))

    def _release(self, next_start: int | None) -> None:
        from .blas import single_threaded

        start, audio, cut = self._held
        end = start + audio.shape[0]
        first, last = _trim(start, end, self._previous_end, next_start, cut, TOUCH_S * SAMPLE_RATE)
        self._previous_end, self._held = end, None
        if last > first:
            with single_threaded():  # the mel features' matrix products, as diarize()
                self._embeddings.add(first, audio[first - start:last - start])

    def finish(self):
        """The embeddings of every region (what Diarizer.label takes)."""
        if self._held is not None:
            self._release(next_start=None)
        return self._embeddings.result()
