import pytest

from pilotys_whisper.settings import LANGUAGES, Settings, SettingsError


def test_defaults_keep_the_original_contract():
    s = Settings.from_env({})
    assert s.model == "base" and s.model_label == "whisper-base"
    assert s.language == "fr"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.engine == "faster-whisper" and s.device == "auto"
    assert s.cors_origins == () and not s.auth_enabled
    assert s.vad is True


def test_model_directory_and_label(tmp_path):
    model = tmp_path / "faster-whisper-small"
    model.mkdir()
    s = Settings.from_env({"WHISPER_MODEL": str(model), "WHISPER_LANGUAGE": "auto"})
    assert s.model_label == "whisper-small"
    assert s.language is None
    assert {"whisper-1", "whisper-small", "small"} <= s.model_aliases


def test_openai_whisper_model_directory_holds_one_checkpoint(tmp_path):
    # The Ansible role points WHISPER_MODEL at a directory for both engines; openai-whisper loads its one .pt.
    model = tmp_path / "base"
    model.mkdir()
    (model / "model.bin").write_bytes(b"")
    env = {"WHISPER_ENGINE": "openai-whisper", "WHISPER_MODEL": str(model)}
    with pytest.raises(SettingsError, match=r"no openai-whisper checkpoint \(\*\.pt\).*WHISPER_ENGINE=faster-whisper"):
        Settings.from_env(env)
    (model / "base.pt").write_bytes(b"")
    assert Settings.from_env(env).model_label == "whisper-base"
    (model / "large-v3.pt").write_bytes(b"")
    with pytest.raises(SettingsError, match="several checkpoints .*base.pt, large-v3.pt"):
        Settings.from_env(env)
    assert Settings.from_env({"WHISPER_ENGINE": "openai-whisper", "WHISPER_MODEL": str(model / "base.pt")}
                             ).model_label == "whisper-base"


@pytest.mark.parametrize("name, value, words", [
    ("WHISPER_PORT", "eighty", "whole number"),
    ("WHISPER_PORT", "70000", "between 0 and 65535"),
    ("WHISPER_MODEL", "gigantic", "model name"),
    ("WHISPER_LANGUAGE", "french", "ISO 639-1"),
    ("WHISPER_LANGUAGE", "xx", "Whisper knows"),  # accepted, it failed every transcription with a 500
    ("WHISPER_DEVICE", "tpu", "auto, cpu, cuda"),
    ("WHISPER_ENGINE", "whisper.cpp", "faster-whisper, openai-whisper"),
    ("WHISPER_COMPUTE_TYPE", "int4", "one of"),
    ("WHISPER_VAD", "maybe", "true or false"),
    ("WHISPER_CONCURRENCY", "0", "between 1 and 64"),
    ("WHISPER_CORS_ORIGINS", "app.example.com", "https://app.example.com"),
    ("WHISPER_CORS_ORIGINS", "*,https://a.example", "mixes *"),
    ("WHISPER_HOST", "example.com", "IP address"),
    ("WHISPER_API_KEY", "short-key-12345", "at least 16 characters"),  # the keys file's rule
])
def test_bad_values_are_named_with_what_to_change(name, value, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WHISPER_API_KEY": "k" * 20, name: value})
    assert name in str(err.value) and words in str(err.value)


def test_the_languages_are_those_of_the_model_library():
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert LANGUAGES == frozenset(_LANGUAGE_CODES)
    assert Settings.from_env({"WHISPER_LANGUAGE": "YUE"}).language == "yue"


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WHISPER_PORT": "x", "WHISPER_QUEUE_SIZE": "-1", "WHISPER_VAD": "2"})
    message = str(err.value)
    assert "WHISPER_PORT" in message and "WHISPER_QUEUE_SIZE" in message and "WHISPER_VAD" in message


def test_listening_beyond_loopback_needs_a_key():
    with pytest.raises(SettingsError, match="no API key"):
        Settings.from_env({"WHISPER_HOST": "0.0.0.0"})
    assert Settings.from_env({"WHISPER_HOST": "0.0.0.0", "WHISPER_API_KEY": "k" * 20}).auth_enabled
    assert Settings.from_env({"WHISPER_HOST": "0.0.0.0", "WHISPER_ALLOW_UNAUTHENTICATED": "true"}).host == "0.0.0.0"


def test_keys_never_show():
    s = Settings.from_env({"WHISPER_API_KEY": "super-secret-key-123456"})
    assert "super-secret" not in repr(s)
    assert s.describe()["api_key"] == "********"
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WHISPER_API_KEY": "secret-key-1234"})
    assert "secret-key" not in str(err.value)
    assert Settings.from_env({"WHISPER_API_KEY": "secret-key-12345"}).auth_enabled  # 16 characters


def test_keys_file_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="not a readable file"):
        Settings.from_env({"WHISPER_API_KEYS_FILE": str(tmp_path / "missing")})


def test_http_threads_must_leave_room_for_health():
    with pytest.raises(SettingsError, match="WHISPER_HTTP_THREADS"):
        Settings.from_env({"WHISPER_CONCURRENCY": "2", "WHISPER_QUEUE_SIZE": "4", "WHISPER_HTTP_THREADS": "5"})
    assert Settings.from_env({"WHISPER_CONCURRENCY": "2", "WHISPER_QUEUE_SIZE": "4"}).effective_http_threads == 10


def test_check_config_reads_the_environment_file_the_role_writes(tmp_path, capsys, monkeypatch):
    """`check-config --env-file`: how the Ansible role validates the file before it replaces the running one."""
    from pilotys_whisper.cli import main, read_env_file

    env_file = tmp_path / "environment"
    env_file.write_text('# Managed by Ansible\nWHISPER_LANGUAGE="en"\n'
                        'WHISPER_MODEL_LABEL="whisper-\\"odd\\" \\\\ one"\nWHISPER_LOG_LEVEL=warning\n\n')
    assert read_env_file(env_file) == {"WHISPER_LANGUAGE": "en", "WHISPER_MODEL_LABEL": 'whisper-"odd" \\ one',
                                       "WHISPER_LOG_LEVEL": "warning"}
    monkeypatch.setenv("WHISPER_LANGUAGE", "de")
    monkeypatch.setenv("WHISPER_CONCURRENCY", "3")  # the unit's Environment= lines: the file adds to them
    assert main(["check-config", "--env-file", str(env_file)]) == 0
    described = capsys.readouterr().out
    assert '"language": "en"' in described and '"concurrency": 3' in described

    env_file.write_text('WHISPER_LANGUAGE="xx"\n')
    with pytest.raises(SystemExit) as exited:
        main(["check-config", "--env-file", str(env_file)])
    assert exited.value.code == 2 and "WHISPER_LANGUAGE" in capsys.readouterr().err
    env_file.write_text("not a setting\n")
    assert main(["check-config", "--env-file", str(env_file)]) == 2
    assert "line 1: expected NAME=value" in capsys.readouterr().err
