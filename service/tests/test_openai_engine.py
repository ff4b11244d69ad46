"""The openai-whisper engine (WHISPER_ENGINE=openai-whisper) on the real `base` weights and real speech, loaded
from a model directory as the Ansible role provisions it (/models/base holding base.pt)."""

from pathlib import Path

import pytest

from pilotys_whisper import cli
from pilotys_whisper.engines import TranscribeOptions
from pilotys_whisper.engines.openai import OpenAIWhisperEngine
from pilotys_whisper.settings import Settings

from conftest import load_script, reference, wer


@pytest.fixture(scope="module")
def openai_model_dir(model_dir, tmp_path_factory):
    """The assets' faster-whisper `base` converted to an openai-whisper checkpoint, alone in its directory."""
    directory = tmp_path_factory.mktemp("models") / "base"
    directory.mkdir()
    load_script("ct2_to_openai_whisper").write_checkpoint(model_dir, directory / "base.pt")
    return directory


@pytest.fixture(scope="module")
def engine(openai_model_dir):
    settings = Settings.from_env({"WHISPER_ENGINE": "openai-whisper", "WHISPER_MODEL": str(openai_model_dir),
                                  "WHISPER_DEVICE": "cpu"})
    engine = OpenAIWhisperEngine(settings)
    engine.load()
    return engine


@pytest.mark.model
def test_real_english_lecture_from_a_model_directory(engine, audio):
    # One recording only: this engine takes about a minute of CPU for it (CI time).
    result = engine.transcribe(str(audio("lecture_en_60s.wav")), TranscribeOptions(language=None,
                                                                                   word_timestamps=True))
    assert result.language == "en"
    assert wer(reference("lecture_en_60s"), result.text) <= 0.08, result.text
    # base.pt is named after its official model: the engine gives it that model's alignment heads back.
    words = result.words
    assert "Piketty" in "".join(w.word for w in words)
    assert all(0 <= w.start <= w.end <= result.duration + 0.5 for w in words)
    assert all(a.start <= b.start + 0.01 for a, b in zip(words, words[1:]))


@pytest.mark.parametrize("name, url_file", [("base", "base.pt"), ("large", "large-v3.pt"),
                                            ("turbo", "large-v3-turbo.pt")])
def test_fetch_model_writes_the_checkpoint_under_the_name_asked(tmp_path, monkeypatch, name, url_file):
    # openai-whisper names a download after its URL; the role's `creates: NAME.pt` and the engine expect NAME.pt.
    import whisper

    assert whisper._MODELS[name].endswith("/" + url_file)

    def download(url, root, in_memory):
        path = Path(root) / url.rsplit("/", 1)[-1]
        path.write_bytes(b"checkpoint")
        return str(path)

    monkeypatch.setattr(whisper, "_download", download)
    output = tmp_path / name
    output.mkdir()
    (output / url_file).write_bytes(b"left by an earlier release under the URL's name")
    assert cli.main(["fetch-model", name, str(output), "--engine", "openai-whisper"]) == 0
    assert sorted(p.name for p in output.iterdir()) == [f"{name}.pt"]
