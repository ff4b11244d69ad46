"""Each role's defaults/main.yml and meta/argument_specs.yml describe the same variables, with the same defaults."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())


def load(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def defaults_of(role: Path) -> dict:
    return load(role / "defaults" / "main.yml") or {}


def options_of(role: Path) -> dict:
    specs = load(role / "meta" / "argument_specs.yml")
    assert specs, f"{role.name}: meta/argument_specs.yml is missing or empty"
    main = specs.get("argument_specs", {}).get("main")
    assert main is not None, f"{role.name}: meta/argument_specs.yml has no entry point 'main'"
    return main.get("options") or {}


def is_literal(value) -> bool:
    """False for values that Ansible templates ({{ ... }} anywhere inside)."""
    if isinstance(value, str):
        return "{{" not in value and "{%" not in value
    if isinstance(value, dict):
        return all(is_literal(k) and is_literal(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_literal(v) for v in value)
    return True


def walk_options(options: dict, prefix: str = ""):
    for name, spec in options.items():
        yield prefix + name, spec
        yield from walk_options(spec.get("options") or {}, f"{prefix}{name}.")


def test_roles_found():
    assert ROLES, "no role under roles/"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_defaults_and_argument_specs_list_the_same_variables(role):
    defaults, options = set(defaults_of(role)), set(options_of(role))
    assert defaults == options, (
        f"{role.name}: only in defaults/main.yml: {sorted(defaults - options)}; "
        f"only in meta/argument_specs.yml: {sorted(options - defaults)}")


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_option_has_a_type_and_a_description(role):
    for name, spec in walk_options(options_of(role)):
        assert spec.get("type"), f"{role.name}: option {name} has no type"
        description = spec.get("description")
        assert description and all(str(line).strip() for line in (
            description if isinstance(description, list) else [description])), \
            f"{role.name}: option {name} has no description"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_variable_carries_the_role_prefix(role):
    for name in defaults_of(role):
        assert name.startswith(role.name + "_"), f"{role.name}: variable {name} lacks the prefix {role.name}_"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_literal_defaults_agree(role):
    defaults, options = defaults_of(role), options_of(role)
    for name, spec in options.items():
        if name not in defaults or "default" not in spec:
            continue
        documented, actual = spec["default"], defaults[name]
        if is_literal(documented) and is_literal(actual):
            assert documented == actual, (
                f"{role.name}: {name} defaults to {actual!r} in defaults/main.yml "
                f"but argument_specs says {documented!r}")


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_is_documented_as_default(role):
    """A variable with a value in defaults/main.yml shows that value (or its template) in argument_specs."""
    defaults, options = defaults_of(role), options_of(role)
    missing = [name for name in defaults if name in options and "default" not in options[name]]
    assert not missing, f"{role.name}: argument_specs gives no default for {missing}"
