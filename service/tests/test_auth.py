import os
import time

import pytest

from pilotys_whisper.auth import ANONYMOUS, KeyRing, parse_keys

A = "alpha-key-0123456789"
B = "bravo-key-0123456789"


def test_no_key_configured_means_open():
    assert KeyRing().authenticate(None) is ANONYMOUS


def test_inline_key():
    ring = KeyRing(api_key=A)
    assert ring.authenticate(f"Bearer {A}").label == "default"
    assert ring.authenticate(f"bearer {A}") is not None  # the scheme is case-insensitive
    assert ring.authenticate(f"Bearer {B}") is None
    assert ring.authenticate(A) is None  # no scheme
    assert ring.authenticate("Bearer ") is None
    assert ring.authenticate(None) is None


def test_keys_file_with_options_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# PILOTYS production\n{A} label=pilotys webhook_secret=s3cret\n\n{B}\n")
    ring = KeyRing(keys_file=path)
    alpha = ring.authenticate(f"Bearer {A}")
    assert alpha.label == "pilotys" and alpha.webhook_secret == "s3cret"
    assert ring.authenticate(f"Bearer {B}").label.startswith("key-")
    assert alpha.key_id != ring.authenticate(f"Bearer {B}").key_id
    assert A not in alpha.key_id  # ids never reveal the key


def test_rotation_without_restart(tmp_path):
    path = tmp_path / "keys"
    path.write_text(A + "\n")
    ring = KeyRing(keys_file=path, recheck_s=0)
    assert ring.authenticate(f"Bearer {A}")
    # Add the new key: both work while clients switch over.
    path.write_text(f"{A}\n{B}\n")
    _touch_later(path)
    assert ring.authenticate(f"Bearer {A}") and ring.authenticate(f"Bearer {B}")
    # Remove the old key.
    path.write_text(B + "\n")
    _touch_later(path)
    assert ring.authenticate(f"Bearer {A}") is None
    assert ring.authenticate(f"Bearer {B}")


def test_a_broken_keys_file_keeps_the_previous_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text(A + "\n")
    ring = KeyRing(keys_file=path, recheck_s=0)
    path.write_text("short\n")
    _touch_later(path)
    assert ring.authenticate(f"Bearer {A}"), "a bad edit must not lock every client out"


def test_parse_rejects_short_keys_and_unknown_options():
    with pytest.raises(ValueError, match="at least 16"):
        parse_keys("abc\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse_keys(f"{A} colour=blue\n")


def _touch_later(path):
    # mtime resolution: make sure the change is seen as one.
    later = time.time() + 2
    os.utime(path, (later, later))
