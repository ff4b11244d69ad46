"""scripts/ct2_to_ggml.py: the `base` weights converted to a whisper.cpp model load in pywhispercpp (PyPI), with
the dimensions, vocabulary and special tokens of ours, and transcribe real speech token for token as our engine
does when both decode greedily."""

import wave

import pytest

from pilotys_whisper.engines import TranscribeOptions
from pilotys_whisper.engines.faster import FasterWhisperEngine
from pilotys_whisper.settings import Settings

from conftest import load_script

CLIP_S = 28  # one Whisper window (30 s) holds it: both engines decode it in one pass, no seeking to compare


@pytest.fixture(scope="module")
def ggml_model(model_dir, tmp_path_factory):
    return load_script("ct2_to_ggml").write_ggml(model_dir, tmp_path_factory.mktemp("ggml") / "ggml-base.bin")


@pytest.fixture(scope="module")
def whispercpp(ggml_model):
    from pywhispercpp.model import Model

    # Greedy at temperature 0 only, non-speech tokens suppressed: what our engine's first pass does
    # (faster-whisper's suppress_tokens=[-1]); whisper.cpp's logs to /dev/null.
    return Model(str(ggml_model), n_threads=2, redirect_whispercpp_logs_to=None, print_progress=False,
                 suppress_nst=True, temperature_inc=0.0)


@pytest.fixture(scope="module")
def greedy_engine(model_dir):
    # Our engine decoding greedily, without VAD (whisper.cpp has none here), in float32: the converted file
    # holds the float16 weights exactly, and int8 would add quantisation error that is not the converter's.
    engine = FasterWhisperEngine(Settings.from_env({
        "WHISPER_MODEL": str(model_dir), "WHISPER_DEVICE": "cpu", "WHISPER_COMPUTE_TYPE": "float32",
        "WHISPER_BEAM_SIZE": "1", "WHISPER_BATCH_SIZE": "1", "WHISPER_VAD": "false", "WHISPER_CPU_THREADS": "2"}))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def news_clip(audio, tmp_path_factory):
    """The first 28 s of the real TV news (16 kHz mono PCM, as whisper.cpp reads a WAV file)."""
    clip = tmp_path_factory.mktemp("clip") / "news_28s.wav"
    with wave.open(str(audio("news_en_169s.wav"))) as source, wave.open(str(clip), "wb") as target:
        assert (source.getframerate(), source.getnchannels(), source.getsampwidth()) == (16000, 1, 2)
        target.setparams(source.getparams())
        target.writeframes(source.readframes(CLIP_S * source.getframerate()))
    return clip


def _text_tokens(whispercpp) -> list[int]:
    import _pywhispercpp as pw

    ctx = whispercpp._ctx
    eot = pw.whisper_token_eot(ctx)
    return [token for i in range(pw.whisper_full_n_segments(ctx)) for j in range(pw.whisper_full_n_tokens(ctx, i))
            if (token := pw.whisper_full_get_token_id(ctx, i, j)) < eot]


@pytest.mark.model
def test_whisper_cpp_reads_the_dimensions_vocabulary_and_special_tokens_of_base(whispercpp, greedy_engine):
    import _pywhispercpp as pw
    from faster_whisper.tokenizer import Tokenizer

    ctx = whispercpp._ctx
    ours = greedy_engine._model.model
    assert pw.whisper_model_type_readable(ctx) == "base"
    assert (pw.whisper_model_n_vocab(ctx), pw.whisper_model_n_audio_layer(ctx), pw.whisper_model_n_text_layer(ctx),
            pw.whisper_model_n_audio_state(ctx), pw.whisper_model_n_mels(ctx)) == (51865, 6, 6, 512, 80)
    assert pw.whisper_is_multilingual(ctx) == ours.is_multilingual
    assert pw.whisper_model_ftype(ctx) == 1  # float16, as the CTranslate2 model stores its weights
    # whisper.cpp derives its special tokens from n_vocab; they must be the ids our tokenizer uses.
    tokenizer = Tokenizer(greedy_engine._model.hf_tokenizer, True, task="transcribe", language="fr")
    assert (pw.whisper_token_eot(ctx), pw.whisper_token_sot(ctx), pw.whisper_token_transcribe(ctx),
            pw.whisper_token_not(ctx), pw.whisper_token_lang(ctx, pw.whisper_lang_id("fr"))) == (
        tokenizer.eot, tokenizer.sot, tokenizer.transcribe, tokenizer.no_timestamps, tokenizer.language)
    # Every ordinary token spells the same text in both (byte-level BPE undone into raw bytes).
    differ = [i for i in range(tokenizer.eot)
              if (spelled := pw.whisper_token_to_bytes(ctx, i)).decode("utf-8", "ignore") and
              spelled.decode("utf-8", "replace") != tokenizer.decode([i])]
    assert differ == [], [(i, pw.whisper_token_to_bytes(ctx, i), tokenizer.decode([i])) for i in differ[:5]]


@pytest.mark.model
def test_greedy_transcription_is_token_identical_to_our_engine(whispercpp, greedy_engine, news_clip):
    # whisper.cpp computes the log-mel itself, with the filter bank the converter wrote; our engine with
    # faster-whisper's. Token-identical here (82 tokens); on other clips the two differ by a word or a comma
    # where the model hesitates (float16 activations in whisper.cpp, float32 in CTranslate2).
    segments = whispercpp.transcribe(str(news_clip), language="en")
    ours = greedy_engine.transcribe(str(news_clip), TranscribeOptions(language="en"))
    assert _text_tokens(whispercpp) == [t for s in ours.segments for t in s.tokens]
    assert " ".join(s.text for s in segments) == ours.text
    assert "Donald Trump" in ours.text
