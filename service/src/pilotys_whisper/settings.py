"""Service configuration: one typed, validated object built from WHISPER_* environment variables."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .auth import MIN_KEY_LENGTH, KeyRing

# Names faster-whisper and openai-whisper download by name. A path to a local model is accepted too.
MODEL_NAMES = (
    "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
    "distil-small.en", "distil-medium.en", "distil-large-v2", "distil-large-v3",
)
ENGINES = ("faster-whisper", "openai-whisper")
DEVICES = ("auto", "cpu", "cuda")
JOB_BACKENDS = ("sqlite", "postgresql")
COMPUTE_TYPES = (
    "default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
    "int16", "float16", "bfloat16", "float32",
)
# The languages Whisper knows (faster_whisper.tokenizer._LANGUAGE_CODES, whisper.tokenizer.LANGUAGES), copied so
# that reading the settings loads no model library; tests/test_settings.py keeps the copy equal to the library's.
LANGUAGES = frozenset((
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu "
    "hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro "
    "ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue").split())


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable and what to change."""


class Secret(str):
    """A string that never shows itself in repr() or logs."""

    def __repr__(self) -> str:
        return "Secret('********')"


@dataclass(frozen=True)
class Settings:
    model: str = "base"
    model_label: str = "whisper-base"
    language: str | None = "fr"  # None: detect
    api_key: Secret | None = None
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    compute_type: str = "default"
    engine: str = "faster-whisper"
    model_cache_dir: Path | None = None
    max_upload_mb: int = 500
    max_duration_s: int = 4 * 3600
    cors_origins: tuple[str, ...] = ()
    concurrency: int = 1
    queue_size: int = 4
    http_threads: int = 0  # 0: concurrency + queue + 4 (+ event streams with the jobs API)
    cpu_threads: int = 0  # 0: all cores divided among concurrent transcriptions
    beam_size: int = 0  # 0: by device, see engines/faster.py
    batch_size: int = 0
    vad: bool = True
    tmp_dir: Path | None = None
    log_level: str = "INFO"
    state_dir: Path | None = None  # jobs database and spool; None disables the jobs API
    job_workers: int = 1
    max_event_streams: int = 8  # open GET /v1/jobs/{id}/events at once; each holds an HTTP thread
    job_retention_s: int = 24 * 3600
    job_purge_interval_s: int = 60
    spool_min_free_mb: int = 256
    live_idle_timeout_s: int = 2 * 3600  # a live upload idle this long is finalized (jobs/live.py)
    live_incremental: bool = False  # transcribe a live upload as it arrives (a slot per chunk); off: see README
    job_backend: str = "sqlite"  # sqlite: this host only; postgresql: a queue shared by several workers
    job_database: Secret | None = None  # libpq connection string (postgresql backend)
    webhook_secret: Secret | None = None  # for WHISPER_API_KEY (keys-file keys carry their own)
    webhook_allow_private: tuple[str, ...] = ()
    webhook_ca_file: str | None = None
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 6
    webhook_backoff_s: float = 10.0
    diarization: bool = False  # speaker diarization (the [diarization] extra), loaded at start-up when on
    diarization_model: Path | None = None  # an ONNX speaker-embedding model; None: the packaged default

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def auth_enabled(self) -> bool:
        return self.api_key is not None or self.api_keys_file is not None

    @property
    def effective_http_threads(self) -> int:
        return self.http_threads or (self.concurrency + self.queue_size + 4 + self.stream_threads)

    @property
    def stream_threads(self) -> int:
        """HTTP threads that event streams may hold (one each, for as long as they last): only with jobs."""
        return self.max_event_streams if self.state_dir is not None else 0

    @property
    def model_aliases(self) -> frozenset[str]:
        """Names a client may send in the OpenAI `model` field for the served model."""
        short = self.model_label.removeprefix("whisper-")
        return frozenset({"whisper-1", self.model_label, short, self.model})

    def describe(self) -> dict:
        """The effective configuration, secrets masked, for `whisper-service check-config`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = "********"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        model = r.text("WHISPER_MODEL", "base", check=_check_model)
        label = r.text("WHISPER_MODEL_LABEL", _default_label(model))
        language = r.text("WHISPER_LANGUAGE", "fr", check=_check_language).lower()
        api_key = r.text("WHISPER_API_KEY", "", check=_check_api_key)
        webhook_secret = r.text("WHISPER_WEBHOOK_SECRET", "")
        keys_file = r.text("WHISPER_API_KEYS_FILE", "")
        host = r.text("WHISPER_HOST", "127.0.0.1", check=_check_host)
        allow_unauth = r.boolean("WHISPER_ALLOW_UNAUTHENTICATED", False)
        settings = cls(
            model=model,
            model_label=label,
            language=None if language == "auto" else language,
            api_key=Secret(api_key) if api_key else None,
            api_keys_file=Path(keys_file) if keys_file else None,
            allow_unauthenticated=allow_unauth,
            host=host,
            port=r.integer("WHISPER_PORT", 8000, 0, 65535),
            device=r.choice("WHISPER_DEVICE", "auto", DEVICES),
            compute_type=r.choice("WHISPER_COMPUTE_TYPE", "default", COMPUTE_TYPES),
            engine=r.choice("WHISPER_ENGINE", "faster-whisper", ENGINES),
            model_cache_dir=r.path("WHISPER_MODEL_CACHE_DIR"),
            max_upload_mb=r.integer("WHISPER_MAX_UPLOAD_MB", 500, 1, 10240),
            max_duration_s=r.integer("WHISPER_MAX_DURATION_S", 4 * 3600, 1, 48 * 3600),
            cors_origins=r.origins("WHISPER_CORS_ORIGINS"),
            concurrency=r.integer("WHISPER_CONCURRENCY", 1, 1, 64),
            queue_size=r.integer("WHISPER_QUEUE_SIZE", 4, 0, 1000),
            http_threads=r.integer("WHISPER_HTTP_THREADS", 0, 0, 1000),
            cpu_threads=r.integer("WHISPER_CPU_THREADS", 0, 0, 256),
            beam_size=r.integer("WHISPER_BEAM_SIZE", 0, 0, 10),
            batch_size=r.integer("WHISPER_BATCH_SIZE", 0, 0, 64),
            vad=r.boolean("WHISPER_VAD", True),
            tmp_dir=r.path("WHISPER_TMP_DIR"),
            log_level=r.choice("WHISPER_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
            state_dir=r.path("WHISPER_STATE_DIR"),
            job_workers=r.integer("WHISPER_JOB_WORKERS", 1, 1, 16),
            max_event_streams=r.integer("WHISPER_MAX_EVENT_STREAMS", 8, 0, 1000),
            job_retention_s=r.integer("WHISPER_JOB_RETENTION_S", 24 * 3600, 1, 90 * 24 * 3600),
            job_purge_interval_s=r.integer("WHISPER_JOB_PURGE_INTERVAL_S", 60, 1, 24 * 3600),
            spool_min_free_mb=r.integer("WHISPER_SPOOL_MIN_FREE_MB", 256, 0, 10**9),
            live_idle_timeout_s=r.integer("WHISPER_LIVE_IDLE_TIMEOUT_S", 2 * 3600, 1, 7 * 24 * 3600),
            live_incremental=r.boolean("WHISPER_LIVE_INCREMENTAL", False),
            job_backend=r.choice("WHISPER_JOB_BACKEND", "sqlite", JOB_BACKENDS),
            job_database=_job_database(r),
            webhook_secret=Secret(webhook_secret) if webhook_secret else None,
            webhook_allow_private=r.networks("WHISPER_WEBHOOK_ALLOW_PRIVATE"),
            webhook_ca_file=str(r.path("WHISPER_WEBHOOK_CA_FILE") or "") or None,
            webhook_timeout_s=float(r.integer("WHISPER_WEBHOOK_TIMEOUT_S", 10, 1, 120)),
            webhook_max_attempts=r.integer("WHISPER_WEBHOOK_MAX_ATTEMPTS", 6, 1, 20),
            webhook_backoff_s=float(r.integer("WHISPER_WEBHOOK_BACKOFF_S", 10, 1, 3600)),
            diarization=r.boolean("WHISPER_DIARIZATION", False),
            diarization_model=r.path("WHISPER_DIARIZATION_MODEL"),
        )
        r.raise_errors()
        least = settings.concurrency + settings.queue_size + 1 + settings.stream_threads
        if settings.http_threads and settings.http_threads < least:
            raise SettingsError(
                "WHISPER_HTTP_THREADS must be at least WHISPER_CONCURRENCY + WHISPER_QUEUE_SIZE + 1 "
                f"(+ WHISPER_MAX_EVENT_STREAMS with the jobs API): {least}, so that /health answers while the "
                "queue is full and every event stream is open"
            )
        if not settings.auth_enabled and not _is_loopback(settings.host) and not settings.allow_unauthenticated:
            raise SettingsError(
                f"WHISPER_HOST={settings.host} listens beyond this machine but no API key is configured: "
                "set WHISPER_API_KEY or WHISPER_API_KEYS_FILE (or WHISPER_ALLOW_UNAUTHENTICATED=true "
                "if something in front of the service authenticates)"
            )
        if settings.job_backend == "postgresql" and not (settings.job_database and settings.state_dir):
            raise SettingsError("WHISPER_JOB_BACKEND=postgresql needs WHISPER_JOB_DATABASE_URL (or "
                                "WHISPER_JOB_DATABASE_URL_FILE) and WHISPER_STATE_DIR (the local spool)")
        if settings.engine == "openai-whisper" and Path(settings.model).is_dir():
            from .engines.openai import checkpoint_in

            try:
                checkpoint_in(Path(settings.model))
            except ValueError as exc:
                raise SettingsError(f"WHISPER_MODEL={settings.model} (WHISPER_ENGINE=openai-whisper): {exc}") from None
        if settings.diarization_model is not None and not settings.diarization_model.is_file():
            raise SettingsError(f"WHISPER_DIARIZATION_MODEL={settings.diarization_model} is not a readable file "
                                "(an ONNX speaker-embedding model)")
        if settings.api_keys_file is not None and not settings.api_keys_file.is_file():
            raise SettingsError(f"WHISPER_API_KEYS_FILE={settings.api_keys_file} is not a readable file")
        if settings.auth_enabled:
            try:  # what the service will read at start-up, so that check-config refuses it too
                KeyRing(settings.api_key, settings.api_keys_file, webhook_secret=settings.webhook_secret)
            except (OSError, ValueError) as exc:
                raise SettingsError(f"WHISPER_API_KEYS_FILE: {exc}") from None
        return settings


def _job_database(r: _Reader) -> Secret | None:
    """The queue's connection string, from the environment or from a file (a systemd credential)."""
    value = r.text("WHISPER_JOB_DATABASE_URL", "")
    path = r.path("WHISPER_JOB_DATABASE_URL_FILE")
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            r.errors.append(f"WHISPER_JOB_DATABASE_URL_FILE={str(path)!r} cannot be read ({exc.strerror})")
    return Secret(value) if value else None


def _default_label(model: str) -> str:
    name = Path(model).name if ("/" in model or model.startswith(".")) else model
    name = name.removeprefix("faster-whisper-").removeprefix("whisper-").removesuffix(".pt")
    return f"whisper-{name}"


def _check_model(value: str) -> str | None:
    if value in MODEL_NAMES:
        return None
    path = Path(value)
    if path.is_dir() or path.is_file():
        return None
    return (f"must be a model name ({', '.join(MODEL_NAMES[:9])}, ...), an existing model directory "
            "or an openai-whisper checkpoint (.pt)")


def _check_language(value: str) -> str | None:
    # Checked here, not at the first transcription: an unknown code would fail every request with a 500.
    if value.lower() == "auto" or value.lower() in LANGUAGES:
        return None
    return "must be the ISO 639-1 code of a language Whisper knows, such as fr or en, or auto to detect it"


def _check_api_key(value: str) -> str | None:
    if len(value.split()) > 1:  # "OLDKEY NEWKEY": neither would work
        return "must be one key, without spaces (to accept several keys, use WHISPER_API_KEYS_FILE)"
    # The rule of the keys file (auth.parse_keys): a short key is one an attacker can guess.
    if len(value) < MIN_KEY_LENGTH:
        return (f"must be at least {MIN_KEY_LENGTH} characters (it is {len(value)}); "
                "generate one with: openssl rand -hex 24")
    return None


def _check_host(value: str) -> str | None:
    if value in ("localhost", "0.0.0.0", "::"):  # noqa: S104 - checked: needs a key, see from_env
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IP address to listen on (127.0.0.1 by default, 0.0.0.0 in a container)"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Reads and checks variables, collecting every error so that one start-up shows them all."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.errors: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _fail(self, name: str, value: str, why: str) -> None:
        secret = any(word in name for word in ("KEY", "SECRET", "DATABASE_URL")) and not name.endswith("FILE")
        shown = "********" if secret else value
        self.errors.append(f"{name}={shown!r} {why}")

    def raise_errors(self) -> None:
        if self.errors:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(self.errors))

    def text(self, name: str, default: str, check: Callable[[str], str | None] | None = None) -> str:
        value = self._raw(name)
        if value is None:
            return default
        problem = check(value) if check else None
        if problem:
            self._fail(name, value, problem)
            return default
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self._fail(name, value, f"must be a whole number between {low} and {high}")
            return default
        if not low <= number <= high:
            self._fail(name, value, f"must be between {low} and {high}")
            return default
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self._fail(name, value, "must be true or false")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        value = self._raw(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        if value not in choices:
            self._fail(name, value, f"must be one of: {', '.join(choices)}")
            return default
        return value

    def path(self, name: str) -> Path | None:
        value = self._raw(name)
        return Path(value) if value else None

    def origins(self, name: str) -> tuple[str, ...]:
        value = self._raw(name)
        if value is None:
            return ()
        origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
        for origin in origins:
            if origin != "*" and not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", origin):
                self._fail(name, value, f"has {origin!r}: each origin must look like https://app.example.com")
                return ()
        if "*" in origins and len(origins) > 1:
            self._fail(name, value, "mixes * with explicit origins: use one or the other")
            return ()
        return origins

    def networks(self, name: str) -> tuple[str, ...]:
        value = self._raw(name)
        if value is None:
            return ()
        nets = tuple(n.strip() for n in value.split(",") if n.strip())
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                self._fail(name, value, f"has {net!r}: each entry must be a CIDR such as 10.0.0.0/8")
                return ()
        return nets
