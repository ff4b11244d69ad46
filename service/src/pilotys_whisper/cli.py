"""`whisper-service`: serve, check the configuration, or fetch a model by name."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from . import __version__
from .settings import Settings, SettingsError


def _configure_logging(level: str) -> None:
    # journald adds the time; keep lines short and greppable.
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters (malloc.h)


def _tune_memory(arenas: int = 2, mmap_threshold: int = 8 << 20) -> None:
    """Cap glibc's malloc arenas, fix its mmap threshold and turn off MKL's buffer pools, before any thread
    starts and before CTranslate2 loads (each measured in bench/).

    Arenas: glibc gives each thread that meets contention an arena of its own (up to 8 per core) and keeps
    their freed pages: requests served by different waitress threads then left the model's scratch memory in
    several arenas, about 120 MB more at the peak. Two arenas keep it at one request's worth.
    mmap threshold: glibc raises it as large blocks are freed, after which the decoder's buffers of a few MB
    stay in the heap between chunks; fixed at 8 MiB they go back to the system when freed: about 30 MB less
    at the peak on a long recording, for about 15 % more time on 2 CPU cores.
    MKL's memory manager (CTranslate2 allocates through mkl_malloc on x86) keeps freed buffers in pools of its
    own, out of malloc_trim's reach; turned off, the peak is 12-19 MB lower at the same speed.
    MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ / MKL_DISABLE_FAST_MM in the environment, when set, win.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")  # read when MKL first runs, after this
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(M_ARENA_MAX, arenas)
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _settings(env: dict[str, str] | None = None) -> Settings:
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        print(f"whisper-service: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(_args) -> NoReturn:
    _tune_memory()
    settings = _settings()
    _configure_logging(settings.log_level)
    from .app import create_app
    from .server import run

    def on_load_error(_exc: BaseException) -> None:
        # Exit so that systemd (Restart=on-failure) or the container runtime sees the failure.
        logging.getLogger("pilotys_whisper").critical("exiting: the model could not be loaded")
        os._exit(3)

    app = create_app(settings, on_load_error=on_load_error)
    run(app, settings)
    # Everything is stopped and cleaned up by now, but a request cut off by the drain may still be inside the
    # model on a worker thread: finalizing the interpreter under it crashed Python 3.13 (SIGSEGV on Debian 13
    # after a drain timeout). Leave without finalizing, once the logs are flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_check_config(args) -> int:
    env = None
    if args.env_file is not None:
        try:
            # On top of the environment, as systemd reads EnvironmentFile= after Environment=.
            env = {**os.environ, **read_env_file(Path(args.env_file))}
        except (OSError, ValueError) as exc:
            print(f"whisper-service: {args.env_file}: {exc}", file=sys.stderr)
            return 2
    settings = _settings(env)
    print(json.dumps(settings.describe(), indent=2))
    return 0


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a systemd EnvironmentFile as the Ansible role writes it: NAME="value" lines (\\ and \"
    escaped inside the quotes) or NAME=value, blank lines and # comments."""
    env = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ValueError(f"line {number}: expected NAME=value")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            inner, value, escaped = value[1:-1], "", False
            for char in inner:
                if escaped or char != "\\":
                    value, escaped = value + char, False
                else:
                    escaped = True
        env[name.strip()] = value
    return env


def cmd_fetch_model(args) -> int:
    """Download a model by name into a directory (provisioning time, not start): from the Hugging Face Hub for
    faster-whisper, from OpenAI's site for openai-whisper."""
    _configure_logging("INFO")
    if args.engine == "openai-whisper":
        path = _fetch_openai_checkpoint(args.name, Path(args.output))
    else:
        from faster_whisper.utils import download_model

        path = download_model(args.name, output_dir=args.output)
    print(path)
    return 0


def _fetch_openai_checkpoint(name: str, output: Path) -> Path:
    """Download an official openai-whisper checkpoint as OUTPUT/NAME.pt, the directory's only checkpoint.

    openai-whisper names the file after its URL (`large` and `turbo` are large-v3.pt and large-v3-turbo.pt):
    the fixed name is what the Ansible role checks for, and what the engine reads the alignment heads by.
    """
    import whisper

    if name not in whisper._MODELS:  # noqa: SLF001
        raise SystemExit(f"whisper-service: {name!r} is not an openai-whisper model name: "
                         f"{', '.join(whisper.available_models())}")
    target = output / f"{name}.pt"
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".download-") as partial:
        # _download verifies the SHA-256 that the URL carries.
        downloaded = whisper._download(whisper._MODELS[name], partial, in_memory=False)  # noqa: SLF001
        os.chmod(downloaded, 0o644)
        os.replace(downloaded, target)
    # An earlier release left it under the URL's name (large-v3.pt for `large`): the engine wants one checkpoint.
    stale = output / Path(whisper._MODELS[name]).name  # noqa: SLF001
    if stale != target:
        stale.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whisper-service", description="Private Whisper speech-to-text service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the HTTP API (default); configured by WHISPER_* variables")
    check = sub.add_parser("check-config", help="validate WHISPER_* variables and print the effective configuration")
    check.add_argument("--env-file", help="also read the variables of this systemd EnvironmentFile, over the "
                       "environment's (the Ansible role validates the file it writes this way)")
    fetch = sub.add_parser("fetch-model", help="download a model by name (needs access to the model hub)")
    fetch.add_argument("name", help="e.g. base, small, large-v3")
    fetch.add_argument("output", help="directory to write the model into")
    fetch.add_argument("--engine", default="faster-whisper", choices=["faster-whisper", "openai-whisper"])
    args = parser.parse_args(argv)
    handlers = {None: cmd_serve, "serve": cmd_serve, "check-config": cmd_check_config, "fetch-model": cmd_fetch_model}
    return handlers[args.command](args)
