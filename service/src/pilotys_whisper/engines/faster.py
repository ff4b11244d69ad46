"""faster-whisper (CTranslate2) engine: speech cut into chunks by VAD, decoded in batches, in bounded memory.

Why not faster-whisper's own pipelines: its sequential `transcribe` decodes one 30 s window at a time
(slow on CPU), and its batched pipeline decodes the whole file and stacks every chunk's features up
front, so memory grows with the recording and the encoder runs a whole batch at once (its attention
matrices dominate the peak). Here audio is decoded block by block, each chunk is encoded alone and
only the decoder runs batched, which is where batching pays on a CPU. A chunk whose greedy result
looks wrong (repetitive or improbable) is decoded again with beam search and temperature fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..audio import SAMPLE_RATE, PcmStream
from ..repetition import cut_loops, find_loops
from . import (
    Cancelled,
    HoldFn,
    ProgressFn,
    Segment,
    SegmentsFn,
    SpeechFn,
    SpeechRegions,
    StopFn,
    TranscribeOptions,
    Transcription,
    Word,
    release_free_memory,
)

log = logging.getLogger(__name__)

CHUNK_S = 30.0  # Whisper's window
# Audio decoded and scanned by the VAD at a time, while the model decodes the previous regions: 40 s rather
# than 120 s cut the peak by about 30 MB on a long recording, at the same speed (bench/README.md).
BLOCK_S = 40.0
LIVE_BLOCK_S = 5.0  # a live upload's audio is looked at (VAD) as soon as 5 s more of it arrived
# A live upload's chunk is decoded once it holds this much speech and no closed region waits behind it, not only
# when 30 s are full: what is left when the meeting ends is then the last few seconds, not up to 30. A decoder
# that falls behind finds regions waiting and packs full chunks again (each chunk costs one 30 s encoder pass).
LIVE_MIN_CHUNK_S = 5.0
GUARD_S = 3.0  # speech ending this close to the end of what is decoded may go on in the next block
MIN_LEFTOVER_S = 1.0  # a shorter undecoded tail at the end of a chunk is not worth another pass
MAX_RETRIES = 2  # times the same audio may be handed back before its tail is dropped
# Batch and beam when WHISPER_BATCH_SIZE / WHISPER_BEAM_SIZE are 0, by device (bench/README.md): on 2 CPU
# cores a small batch bounds memory and beam 2 is the cheapest setting more accurate than the original; a GPU
# has memory to spare, and there greedy decoding of larger batches is 1.6 times as fast for +0.2 WER points.
AUTO_BATCH_BEAM = {"cpu": (3, 2), "cuda": (16, 1)}
# The fallback, for a chunk whose first decoding looks wrong (repetitive, a loop, or improbable): at most
# FALLBACK_DECODER_CALLS more decoder calls, one per temperature, the first result that looks right kept.
# faster-whisper's own fallback (beam 5, then the best of 5 samples at each of 5 temperatures) could take 26,
# one after another: 30 s of compute for one chunk of a female espeak-ng voice (bench/README.md).
FALLBACK_DECODER_CALLS = 4
FALLBACK_BEAM = 5  # tried first
# After a loop, beam search alone writes the same loop again (measured): it is then told not to repeat any
# 3 tokens in a row, which broke every loop of the stress corpus in one call.
FALLBACK_NO_REPEAT_NGRAM = 3
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8)
FALLBACK_BEST_OF_GPU = 5  # samples per call on a GPU (one call); on a CPU one sample a call (memory)
MAX_INITIAL_TIMESTAMP_S = 1.0  # faster-whisper's: the first segment starts in the chunk's first second
COMPRESSION_LIMIT = 2.4  # faster-whisper's compression_ratio_threshold: above, the text repeats itself
LOGPROB_LIMIT = -1.0  # faster-whisper's log_prob_threshold
# Tokens a chunk may take, by its length: a loop otherwise runs to the model's limit whatever the audio (a 2 s
# chunk then costs as much decoding as 30 s of speech). Speech measured on the stress corpus: at most about 7
# tokens (timestamps included) per second, so this caps only chunks under about 20 s, and only loops.
TOKENS_PER_S = 10
MIN_TOKENS = 32
# Silero VAD's padding around speech (faster-whisper's default, named because the diarizer, which takes these
# regions, wants less of it and trims the difference).
SPEECH_PAD_MS = 400
PREFETCH_REGIONS = 4  # speech regions decoded and cut by VAD ahead of the model (each at most 30 s)
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass
class Region:
    """A stretch of the recording to transcribe: where it starts (in samples) and its audio."""

    start: int
    audio: np.ndarray
    retries: int = 0  # how many times this audio was handed back undecoded by the model


@dataclass
class Chunk:
    """Up to 30 s of audio made of one or more regions, and where each region came from."""

    regions: list[Region]

    @functools.cached_property
    def audio(self) -> np.ndarray:
        if len(self.regions) == 1:
            return self.regions[0].audio
        return np.concatenate([r.audio for r in self.regions])

    @property
    def source_end(self) -> float:
        last = self.regions[-1]
        return (last.start + last.audio.shape[0]) / SAMPLE_RATE

    def source_time(self, t: float, *, is_end: bool = False) -> float:
        """Map a time inside the chunk to the time in the original recording."""
        sample = t * SAMPLE_RATE
        offset = 0
        for i, region in enumerate(self.regions):
            length = region.audio.shape[0]
            last = i == len(self.regions) - 1
            if sample < offset + length or (is_end and sample <= offset + length) or last:
                return round(float(region.start + min(max(sample - offset, 0), length)) / SAMPLE_RATE, 3)
            offset += length
        return 0.0  # a chunk always has a region

    def tail(self, t: float) -> list[Region]:
        """The regions (or parts of them) after time `t` inside the chunk."""
        cut = int(t * SAMPLE_RATE)
        out, offset = [], 0
        for region in self.regions:
            length = region.audio.shape[0]
            if offset + length > cut:
                skip = max(cut - offset, 0)
                out.append(Region(region.start + skip, region.audio[skip:], region.retries + 1))
            offset += length
        return out


def speech_vad_options():
    """Silero VAD's options as the engine runs it: regions of at most a window, padded by SPEECH_PAD_MS."""
    from faster_whisper.vad import VadOptions

    return VadOptions(max_speech_duration_s=CHUNK_S, min_silence_duration_ms=160, speech_pad_ms=SPEECH_PAD_MS)


def speech_regions(blocks: Iterable[np.ndarray], vad_options=None, max_s: float = CHUNK_S) -> Iterator[Region]:
    """Cut a stream of PCM blocks into regions of at most `max_s` seconds, in order.

    With `vad_options`, only speech is kept (Silero VAD); without, the audio is cut into consecutive
    windows. Only the audio not yet handed out is kept in memory.
    """
    from faster_whisper.vad import get_speech_timestamps

    max_len = int(max_s * SAMPLE_RATE)
    guard = int(GUARD_S * SAMPLE_RATE)
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # source index of buf[0]
    scan_from = 0  # source index from which regions are not known yet
    source = iter(blocks)
    final = False
    while not final:
        block = next(source, None)
        if block is None:
            final = True
        else:
            buf = np.concatenate([buf, block]) if buf.size else block
        buf_end = buf_start + buf.shape[0]
        todo = buf[scan_from - buf_start:]
        if vad_options is not None:
            found = [(scan_from + s["start"], scan_from + s["end"])
                     for s in get_speech_timestamps(todo, vad_options)] if todo.size else []
        else:
            found = [(s, min(s + max_len, buf_end)) for s in range(scan_from, buf_end, max_len)]
        if final:
            done, scan_from = found, buf_end
        else:
            # A region ending near the end of what is decoded may go on in the next block: look again then.
            horizon = buf_end - guard
            done = [r for r in found if r[1] <= horizon]
            rest = found[len(done):]
            scan_from = rest[0][0] if rest else max(horizon, scan_from)
        for start, end in done:
            while start < end:
                stop = min(end, start + max_len)
                yield Region(start, buf[start - buf_start:stop - buf_start].copy())
                start = stop
        if scan_from > buf_start:
            buf = buf[scan_from - buf_start:]
            buf_start = scan_from


def _noting_spans(regions: Iterator[Region], spans: list[tuple[float, float]]) -> Iterator[Region]:
    for region in regions:
        spans.append((region.start / SAMPLE_RATE, (region.start + region.audio.shape[0]) / SAMPLE_RATE))
        yield region


def _handing_out(regions: Iterator[Region], on_speech: SpeechFn) -> Iterator[Region]:
    """The regions, each handed to on_speech as the packer takes it: in the model's thread, between batches."""
    for region in regions:
        on_speech(region.start, region.audio, SPEECH_PAD_MS / 1000)
        yield region


class _Packer:
    """Packs regions into chunks of at most 30 s, and batches of chunks; takes back undecoded tails.

    A chunk's audio must be in the recording's order, or the model reads a jump back in time as speech
    running on and its segments land in the wrong place. So a tail goes in front of the next regions only
    when it is the end of the last chunk decoded (what follows it in the recording comes next); the tail of
    an earlier chunk of a batch, whose following audio was decoded beside it, becomes a chunk of its own.
    """

    def __init__(self, regions: Iterator[Region], chunk_s: float = CHUNK_S, ready=None, min_chunk_s: float = 0.0):
        self._source = regions
        # ready(): whether a next region is there without waiting (a live upload: the audio may still be coming);
        # then a chunk of at least min_chunk_s is decoded at once rather than waiting for 30 s to fill.
        self._ready = ready
        self._min = int(min_chunk_s * SAMPLE_RATE)
        self._front: list[Region] = []  # handed back, to go first
        self._alone: list[Chunk] = []  # tails to decode on their own, first of all
        self._last_is_alone = False  # the last batch ended with such a tail, not with the newest audio
        self._max = int(chunk_s * SAMPLE_RATE)

    def _next_region(self) -> Region | None:
        if self._front:
            return self._front.pop(0)
        return next(self._source, None)

    def give_back(self, tails: list[list[Region]]) -> None:
        """The undecoded tails of a batch's chunks, in the batch's order (empty lists for none)."""
        *earlier, last = tails or [[]]
        if self._last_is_alone:
            earlier, last = [*earlier, last], []
        self._alone.extend(Chunk(t) for t in earlier if t)
        self._front[:0] = last

    def pending_start(self) -> float | None:
        """Where the earliest audio handed back but not decoded yet starts (seconds); None if there is none:
        what comes from the source next follows everything decoded so far."""
        starts = [c.regions[0].start for c in self._alone] + [r.start for r in self._front]
        return min(starts) / SAMPLE_RATE if starts else None

    def next_batch(self, size: int) -> list[Chunk]:
        alone = self._alone[:size]
        del self._alone[:size]
        batch = list(alone)
        current: list[Region] = []
        total = 0
        while len(batch) < size:
            if (current and self._ready is not None and total >= self._min and not self._front
                    and not self._ready()):
                break
            region = self._next_region()
            if region is None:
                break
            length = region.audio.shape[0]
            if current and total + length > self._max:
                batch.append(Chunk(current))
                current, total = [], 0
                if len(batch) == size:
                    self._front.insert(0, region)
                    break
            current.append(region)
            total += length
        if current:
            batch.append(Chunk(current))
        self._last_is_alone = bool(alone) and len(batch) == len(alone)
        return batch


class _Prefetch:
    """Runs an iterator in a thread, a bounded number of items ahead of the consumer.

    Audio decoding and VAD then overlap with the model (CTranslate2 and ONNX Runtime release the GIL):
    on a GPU they would otherwise be most of the time a request takes. An exception in the thread is
    raised in the consumer; leaving the context stops the thread and waits for it.
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(exc)
            return
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
        self._put(self._END)

    def __enter__(self) -> Iterator:
        self._thread.start()
        return self._items()

    def ready(self) -> bool:
        """Whether the next item is there: taking it does not wait."""
        return not self._queue.empty()

    def _items(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(self, settings):
        self.settings = settings
        self.device = settings.device
        self.compute_type = settings.compute_type
        self.batch_size = self.beam_size = 0  # chosen by load(), once the device is known
        self.vad = settings.vad
        self._model = None

    def load(self) -> None:
        import ctranslate2
        from faster_whisper import WhisperModel

        device = self.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = self.compute_type
        if compute_type in ("default", "auto"):
            compute_type = "float16" if device == "cuda" else "int8"
        cpu_threads = self.settings.cpu_threads or max(1, (os.cpu_count() or 1) // self.settings.concurrency)
        model = self.settings.model
        self._model = WhisperModel(
            model,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=self.settings.concurrency,
            download_root=str(self.settings.model_cache_dir) if self.settings.model_cache_dir else None,
            local_files_only=os.path.isdir(model),
        )
        if self.vad:
            from faster_whisper.vad import get_vad_model

            get_vad_model()  # load Silero now rather than on the first request
        self.device, self.compute_type = device, compute_type
        batch, beam = AUTO_BATCH_BEAM[device]
        self.batch_size = self.settings.batch_size or batch
        self.beam_size = self.settings.beam_size or beam
        log.info("model %s loaded on %s (%s, %d CPU threads, batch %d, beam %d)", self.settings.model_label, device,
                 compute_type, cpu_threads, self.batch_size, self.beam_size)
        release_free_memory()

    # -- one request ---------------------------------------------------------------------------------------

    def transcribe(self, path: str, options: TranscribeOptions, progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None, on_segments: SegmentsFn | None = None,
                   hold: HoldFn | None = None, on_speech: SpeechFn | None = None) -> Transcription:
        assert self._model is not None, "load() first"
        vad_options = speech_vad_options() if self.vad else None
        run = _Run(self, options)
        spans: list[tuple[float, float]] = []  # where the VAD found speech, kept for the diarizer
        try:
            with PcmStream(path, max_seconds=options.max_duration_s) as stream:
                blocks = stream.blocks(LIVE_BLOCK_S if options.live else BLOCK_S)
                prefetch = _Prefetch(_noting_spans(speech_regions(blocks, vad_options), spans), PREFETCH_REGIONS)
                with prefetch as regions:
                    if on_speech is not None and vad_options is not None:
                        regions = _handing_out(regions, on_speech)
                    self._decode_all(run, regions, options, progress, should_stop, on_segments,
                                     ready=prefetch.ready if options.live else None, hold=hold)
            duration = stream.seconds_read
        finally:
            release_free_memory()
        if progress is not None:
            progress(duration, duration)
        result = run.result(duration)
        if vad_options is not None:
            result.speech = SpeechRegions(spans=tuple(spans), pad_s=SPEECH_PAD_MS / 1000)
        if on_segments is not None and (rest := result.segments[run.settled_count:]):
            on_segments(rest)
        return result

    def _decode_all(self, run: _Run, regions: Iterator[Region], options: TranscribeOptions,
                    progress: ProgressFn | None, should_stop: StopFn | None, on_segments: SegmentsFn | None,
                    ready=None, hold: HoldFn | None = None) -> None:
        """The regions, packed into chunks and batches, through the model (segments handed out as they settle)."""
        total = options.duration_hint or 0.0
        packer = _Packer(regions, ready=ready, min_chunk_s=LIVE_MIN_CHUNK_S)
        done = 0.0
        size = 1 if options.live else self.batch_size
        while batch := packer.next_batch(size):
            if should_stop is not None and should_stop():
                raise Cancelled()
            with hold() if hold is not None else contextlib.nullcontext():
                packer.give_back(run.decode_batch(batch))
            done = max(done, batch[-1].source_end)
            if on_segments is not None and (final := run.settled(packer.pending_start())):
                on_segments(final)
            if progress is not None:
                progress(done, total)


def _is_silence(no_speech_prob: float, avg_logprob: float) -> bool:
    """Silence the VAD let through: the model says "no speech" and is unsure of the words it found
    (faster-whisper's no_speech_threshold 0.6 and log_prob_threshold -1.0)."""
    return no_speech_prob > 0.6 and avg_logprob < LOGPROB_LIMIT


@dataclass
class _Decoded:
    """One decoding of a chunk and what it looks like."""

    tokens: list[int]
    avg_logprob: float
    compression: float
    no_speech: float
    temperature: float
    looped: bool  # the text holds a repetition loop (repetition.find_loops), wherever in the chunk

    @property
    def repetitive(self) -> bool:
        # The compression ratio is of the whole chunk: a loop in a few seconds of it can stay under the limit.
        return self.compression > COMPRESSION_LIMIT or self.looped

    @property
    def silent(self) -> bool:
        return _is_silence(self.no_speech, self.avg_logprob)

    @property
    def wanting(self) -> bool:
        return self.repetitive or self.avg_logprob < LOGPROB_LIMIT


class _Run:
    """State of one transcription: language, tokenizer and prompt once known, segments so far."""

    def __init__(self, engine: FasterWhisperEngine, options: TranscribeOptions):
        self.engine = engine
        self.model = engine._model
        self.options = options
        self.language = options.language
        self.language_probability = 1.0
        self.tokenizer = None
        self.prompt: list[int] = []
        self.suppress: tuple[int, ...] = ()
        self.segments: list[Segment] = []
        self.settled_count = 0  # segments already handed to on_segments, in the result's order

    def settled(self, pending_start: float | None) -> list[Segment]:
        """The segments that became final: no audio before them is left to decode, so the result will have them
        at these places (numbered as in it). A tail decoded later lands before segments decoded meanwhile."""
        ordered = sorted(self.segments, key=lambda seg: (seg.start, seg.end))
        end = len(ordered)
        if pending_start is not None:
            end = next((i for i, seg in enumerate(ordered) if seg.start >= pending_start), end)
        final = [dataclasses.replace(seg, id=i) for i, seg in enumerate(ordered[self.settled_count:end],
                                                                         start=self.settled_count)]
        self.settled_count = max(self.settled_count, end)
        return final

    def _prepare(self, encoder_output) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self.model
        if not model.model.is_multilingual:
            self.language = "en"
        elif self.language is None:
            token, prob = model.model.detect_language(encoder_output)[0][0]
            self.language, self.language_probability = token[2:-2], prob
        self.tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task=self.options.task,
                                   language=self.language)
        previous = self.tokenizer.encode(" " + self.options.prompt.strip()) if self.options.prompt else []
        self.prompt = model.get_prompt(self.tokenizer, previous, without_timestamps=False)
        self.suppress = get_suppressed_tokens(self.tokenizer, [-1])

    def _encode(self, batch: list[Chunk]):
        import ctranslate2
        from faster_whisper.transcribe import pad_or_trim

        model = self.model
        release_free_memory()  # what the previous batch's decoder held, before the encoder needs its own
        features = [pad_or_trim(model.feature_extractor(c.audio)[..., :-1]) for c in batch]
        if model.model.device == "cuda":
            return model.encode(np.stack(features))
        # On a CPU the encoder gains little from batching but its attention matrices grow with the
        # batch: encode one chunk at a time and batch the decoder only.
        outputs = [np.asarray(model.encode(f[None])) for f in features]
        stacked = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.concatenate(outputs)))
        del outputs, features
        release_free_memory()  # the encoder's scratch memory, before the decoder needs its own
        return stacked

    def decode_batch(self, batch: list[Chunk]) -> list[list[Region]]:
        """Decode a batch of chunks; return, for each chunk, the audio the model left for a next window, as
        sequential Whisper does when its last segment is unfinished (it is decoded again in a next batch, so
        nothing said at the end of a chunk is lost)."""
        model = self.model
        encoder_output = self._encode(batch)
        if self.tokenizer is None:
            self._prepare(encoder_output)
        tok = self.tokenizer
        sampling = self.options.temperature > 0
        results = model.model.generate(
            encoder_output,
            [list(self.prompt) for _ in batch],
            beam_size=1 if sampling else self.engine.beam_size,
            max_length=max(self._max_length(chunk) for chunk in batch),
            suppress_blank=True,
            suppress_tokens=list(self.suppress),
            return_scores=True,
            return_no_speech_prob=True,
            sampling_temperature=self.options.temperature if sampling else 1.0,
            sampling_topk=0 if sampling else 1,
        )
        outputs: list[list[dict]] = []
        leftovers: list[list[Region]] = [[] for _ in batch]
        for index, (chunk, result) in enumerate(zip(batch, results, strict=True)):
            decoded = self._judge(result, 0, self.options.temperature)
            if decoded.silent:
                outputs.append([])
                continue
            if decoded.wanting:
                decoded = self._fallback(encoder_output, batch, index, decoded)
                # Asked again, as faster-whisper does of its final result: on near silence the fallback's
                # samples at high temperature invent words the model itself rates as likely silence.
                if decoded.silent:
                    outputs.append([])
                    continue
            tokens = decoded.tokens
            seconds = chunk.audio.shape[0] / SAMPLE_RATE
            frames = int(np.ceil(chunk.audio.shape[0] / model.feature_extractor.hop_length))
            parts, seek, _ = model._split_segments_by_timestamps(
                tokenizer=tok, tokens=tokens, time_offset=0.0, segment_size=frames,
                segment_duration=seconds, seek=0)
            consumed = min(seek, frames) / model.frames_per_second
            if seconds - consumed >= MIN_LEFTOVER_S and all(r.retries < MAX_RETRIES for r in chunk.regions):
                leftovers[index] = chunk.tail(consumed)
            outputs.append([
                self._without_loops(dict(part, text=tok.decode(part["tokens"]), avg_logprob=decoded.avg_logprob,
                                         compression_ratio=decoded.compression, no_speech_prob=decoded.no_speech,
                                         temperature=decoded.temperature))
                for part in parts if any(t < tok.eot for t in part["tokens"])
            ])
        if self.options.word_timestamps and any(outputs):
            self._add_words(outputs, encoder_output, batch)
        for chunk, parts in zip(batch, outputs, strict=True):
            self._append(chunk, parts)
        return leftovers

    def _rows(self, encoder_output, batch: list[Chunk], keep: list[int]):
        """The encoder output of some of a batch's chunks: sliced on a CPU; encoded again on a GPU, where
        the output lives in device memory that NumPy cannot index (and a chunk encodes in milliseconds)."""
        import ctranslate2

        if len(keep) == encoder_output.shape[0]:
            return encoder_output
        if self.model.model.device == "cuda":
            return self._encode([batch[i] for i in keep])
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(encoder_output)[keep]))

    def _max_length(self, chunk: Chunk) -> int:
        """CTranslate2's max_length for a chunk: Whisper's decoding stops at half of it in new tokens (measured
        on 4.8: 30 for 60, 100 for 200, 224 for the model's 448)."""
        seconds = chunk.audio.shape[0] / SAMPLE_RATE
        return min(self.model.max_length, 2 * (len(self.prompt) + MIN_TOKENS + int(seconds * TOKENS_PER_S)))

    def _judge(self, result, hypothesis: int, temperature: float) -> _Decoded:
        from faster_whisper.transcribe import get_compression_ratio

        tokens = result.sequences_ids[hypothesis]
        text = self.tokenizer.decode(tokens).strip()
        return _Decoded(tokens=tokens, avg_logprob=result.scores[hypothesis] * len(tokens) / (len(tokens) + 1),
                        compression=get_compression_ratio(text), no_speech=result.no_speech_prob,
                        temperature=temperature, looped=bool(find_loops(text)))

    def _fallback(self, encoder_output, batch: list[Chunk], index: int, first: _Decoded) -> _Decoded:
        """Decode one chunk again within its budget of FALLBACK_DECODER_CALLS: beam search (kept from
        repeating itself if the first decoding looped), then one sampling call per rising temperature; the
        first result that looks right wins. Spent, the most probable result that does not repeat itself
        (what loops remain in it are cut later)."""
        single = self._rows(encoder_output, batch, [index])
        gpu = self.model.model.device == "cuda"
        tried = [first]
        for temperature in [0.0, *FALLBACK_TEMPERATURES][:FALLBACK_DECODER_CALLS]:
            if temperature > 0:
                # On a GPU memory is not what is short, and several samples in one call cost about one.
                kwargs = dict(beam_size=1, num_hypotheses=FALLBACK_BEST_OF_GPU if gpu else 1, sampling_topk=0,
                              sampling_temperature=temperature)
            else:
                kwargs = dict(beam_size=FALLBACK_BEAM,
                              no_repeat_ngram_size=FALLBACK_NO_REPEAT_NGRAM if first.repetitive else 0)
            [result] = self.model.model.generate(
                single, [list(self.prompt)], max_length=self._max_length(batch[index]), return_scores=True,
                return_no_speech_prob=True, suppress_blank=True, suppress_tokens=list(self.suppress),
                max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP_S / self.model.time_precision), **kwargs)
            samples = [self._judge(result, h, temperature) for h in range(len(result.sequences_ids))]
            tried += samples
            for decoded in sorted(samples, key=lambda d: d.repetitive):  # the best that does not loop, first
                if decoded.silent or not decoded.wanting:
                    return decoded
        return max([d for d in tried if not d.repetitive] or tried, key=lambda d: d.avg_logprob)

    def _without_loops(self, part: dict) -> dict:
        """A segment with a loop the fallback could not avoid, written with the loop once."""
        text = cut_loops(part["text"])
        if text == part["text"]:
            return part
        return dict(part, text=text, tokens=self.tokenizer.encode(text))

    def _add_words(self, outputs: list[list[dict]], encoder_output, batch: list[Chunk]) -> None:
        model = self.model
        keep = [i for i, parts in enumerate(outputs) if parts]
        frames = [int(np.ceil(batch[i].audio.shape[0] / model.feature_extractor.hop_length)) for i in keep]
        if model.model.device == "cuda":
            enc = self._rows(encoder_output, batch, keep)
            model.add_word_timestamps([outputs[i] for i in keep], self.tokenizer, enc, frames,
                                      PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, 0.0)
            return
        # On a CPU one chunk at a time, as the encoder: aligning a batch of 3 at once raised the peak of a
        # transcription by 180 MB (584 MB against 404, the same words; bench/README.md). `last` goes from one
        # chunk to the next as faster-whisper carries it through a batch.
        last = 0.0
        for i, n in zip(keep, frames, strict=True):
            last = model.add_word_timestamps([outputs[i]], self.tokenizer, self._rows(encoder_output, batch, [i]),
                                             [n], PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, last)
            release_free_memory()

    def _append(self, chunk: Chunk, parts: list[dict]) -> None:
        for part in parts:
            text = part["text"]
            if not text.strip():
                continue
            words = None
            if self.options.word_timestamps:
                words = [
                    Word(start=chunk.source_time(w["start"]), end=chunk.source_time(w["end"], is_end=True),
                         word=w["word"], probability=round(float(w["probability"]), 4))
                    for w in part.get("words", [])
                ]
            start = chunk.source_time(part["start"])
            end = max(chunk.source_time(part["end"], is_end=True), start)
            if words:
                start, end = words[0].start, max(words[-1].end, words[0].start)
            self.segments.append(Segment(
                id=len(self.segments), start=start, end=end, text=text,
                tokens=[t for t in part["tokens"] if t < self.tokenizer.eot],
                avg_logprob=round(float(part["avg_logprob"]), 4),
                compression_ratio=round(float(part["compression_ratio"]), 4),
                no_speech_prob=round(float(part["no_speech_prob"]), 4),
                temperature=float(part["temperature"]), seek=int(chunk.regions[0].start // 160), words=words))

    def result(self, duration: float) -> Transcription:
        # Tails decoded in a later batch come after chunks that follow them: restore the order.
        self.segments.sort(key=lambda seg: (seg.start, seg.end))
        for number, seg in enumerate(self.segments):
            seg.id = number
        text = "".join(s.text for s in self.segments).strip()
        return Transcription(text=text, language=self.language, duration=round(duration, 3),
                             segments=self.segments, language_probability=round(float(self.language_probability), 4))
