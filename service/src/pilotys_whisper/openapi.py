"""The service's OpenAPI document (openapi.yaml, shipped in the package), as served at GET /openapi.json."""

from __future__ import annotations

import copy
import functools
from importlib import resources

import yaml

from . import __version__


@functools.cache
def document() -> dict:
    """The contract as written, with the running version (read once per process; callers must not change it)."""
    spec = yaml.safe_load(resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8"))
    spec["info"]["version"] = __version__
    return spec


@functools.cache
def served(model_names: tuple[str, ...]) -> dict:
    """The document as an instance serves it: its `model` field lists the names this instance accepts."""
    spec = copy.deepcopy(document())
    spec["components"]["schemas"]["ModelName"]["enum"] = list(model_names)
    return spec
