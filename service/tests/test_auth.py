import json
import logging
import os
import time
from hashlib import sha256

import pytest

from pilotys_whisper import grants
from pilotys_whisper.auth import ANONYMOUS, KeyRing, parse_keys
from pilotys_whisper.errors import ApiError
from pilotys_whisper.settings import Settings, SettingsError

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
    bravo = ring.authenticate(f"Bearer {B}")
    assert alpha.owner == "client:pilotys" and bravo.owner != alpha.owner and bravo.kid != alpha.kid
    assert A not in alpha.kid + alpha.owner and B not in bravo.kid + bravo.owner  # ids never reveal the key


def test_a_label_is_one_client_whatever_its_key(tmp_path):
    """Job ownership follows the label, so the new key of a rotation (same label) is the same client."""
    path = tmp_path / "keys"
    path.write_text(f"{A} label=pilotys webhook_secret=s3cret\n{B} label=pilotys webhook_secret=s3cret\n")
    ring = KeyRing(keys_file=path)
    old, new = ring.authenticate(f"Bearer {A}"), ring.authenticate(f"Bearer {B}")
    assert old.owner == new.owner == "client:pilotys" and old.kid != new.kid
    assert ring.principal_for("client:pilotys").webhook_secret == "s3cret"
    # Jobs stored by earlier versions are owned by the key's id: the ring says whose client they are now.
    assert sorted(ring.adoptions()) == sorted([(sha256(A.encode()).hexdigest()[:16], "client:pilotys"),
                                               (sha256(B.encode()).hexdigest()[:16], "client:pilotys")])
    # WHISPER_API_KEY is the client "default": a new value of the variable keeps its jobs too.
    assert KeyRing(api_key=A).authenticate(f"Bearer {A}").owner == KeyRing(api_key=B).authenticate(
        f"Bearer {B}").owner == "client:default"
    # A key without a label is a client of its own: its id owns its jobs, as before, so nothing to adopt.
    path.write_text(f"{A}\n")
    ring = KeyRing(keys_file=path)
    assert ring.authenticate(f"Bearer {A}").owner == sha256(A.encode()).hexdigest()[:16]
    assert ring.adoptions() == []


def test_keys_of_one_label_sign_its_webhooks_with_one_secret(tmp_path):
    for text in (f"{A} label=p webhook_secret=one-secret\n{B} label=p webhook_secret=two-secret\n",
                 f"{A} label=p webhook_secret=one-secret\n{B} label=p\n"):
        with pytest.raises(ValueError, match="line 2 has the label of keys file line 1 but another") as caught:
            parse_keys(text)
        assert "one-secret" not in str(caught.value) and "two-secret" not in str(caught.value)
    path = tmp_path / "keys"
    path.write_text(f"{B} label=default\n")
    with pytest.raises(ValueError, match="has the label of WHISPER_API_KEY") as caught:
        KeyRing(api_key=A, keys_file=path, webhook_secret="inline-secret")
    assert "inline-secret" not in str(caught.value)


def test_a_grant_names_its_key_by_a_mac_not_by_a_hash_of_the_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{A} label=pilotys\n")
    ring = KeyRing(keys_file=path)
    alpha = ring.authenticate(f"Bearer {A}")
    token, _ = grants.issue(ring, alpha, {"language": "fr"}, idempotency_key=None, ttl_s=60)
    kid = json.loads(grants._unb64(token.split(".")[1]))["kid"]
    assert kid == alpha.kid and len(kid) == 16
    for digest in (sha256(A.encode()).hexdigest(), sha256(A.encode()).digest().hex().upper()):
        assert not digest.startswith(kid) and kid not in digest
    # Stable: another worker reading the same keys file finds the key and accepts the grant.
    elsewhere = KeyRing(keys_file=path)
    assert elsewhere.authenticate(f"Bearer {A}").kid == kid
    assert grants.verify(elsewhere, f"Bearer {token}").principal.owner == "client:pilotys"
    claims = grants._b64(json.dumps({"kid": "clé", "exp": 2**40, "idem": "x", "fields": {}}).encode())
    with pytest.raises(ApiError, match="not valid") as caught:
        grants.verify(ring, f"Bearer wug1.{claims}.AAAA")
    assert caught.value.status == 401


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
    with pytest.raises(ValueError, match="word 2 is not an option"):
        parse_keys(f"{A} colour=blue\n")
    with pytest.raises(ValueError, match="label= is given twice"):
        parse_keys(f"{A} label=a label=b\n")
    with pytest.raises(ValueError, match="line 3: the same key as line 1"):
        parse_keys(f"{A} label=a\n{B}\n{A} label=b\n")


OLD = "OLDKEY-9f3a2b7c4d5e6f01"
NEW = "NEWKEY-0a1b2c3d4e5f6789=="  # base64 keys end with "=": not an option either
SECRET = "whsec-5e6f7a8b9c0d1e2f"
# Lines an operator may well write by mistake, each holding keys or secrets that must not be repeated.
BAD_LINES = [
    f"{OLD} {NEW}", f"{OLD}\t{NEW}", f"{OLD} label=pilotys {NEW}", f"{OLD} {NEW} label=pilotys",
    f"{OLD} webhook_secret {SECRET}", f"{OLD} webhook-secret={SECRET}", f"{OLD} secret={SECRET}",
    f"{OLD} label=pilotys label={NEW}", f"{OLD} ={NEW}", f"{OLD} webhook_secret={SECRET} webhook_secret={NEW}",
    f"{OLD[:10]} label=pilotys", NEW[:12], f"{OLD} {SECRET}",
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_no_error_message_quotes_a_key(tmp_path, caplog, line):
    """Keys-file errors reach the journal (start-up, reload, check-config): they say where, never what."""
    tokens = [OLD, NEW, SECRET, OLD[:10], NEW[:12]]
    path = tmp_path / "keys"
    path.write_text(f"{B} label=ok\n{line}\n")
    messages = []
    with pytest.raises(ValueError) as caught:
        parse_keys(path.read_text())
    messages.append(str(caught.value))
    with pytest.raises(ValueError) as caught:
        KeyRing(keys_file=path)
    messages.append(str(caught.value))
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"WHISPER_API_KEYS_FILE": str(path)})
    messages.append(str(caught.value))
    # Reloaded while running: the previous keys stay, and the log says why without the line.
    path.write_text(f"{B} label=ok\n")
    ring = KeyRing(keys_file=path, recheck_s=0)
    path.write_text(f"{B} label=ok\n{line}\n")
    _touch_later(path)
    with caplog.at_level(logging.ERROR, logger="pilotys_whisper.auth"):
        assert ring.authenticate(f"Bearer {B}")
    messages.append(caplog.text)
    assert "line 2" in messages[0] and "keeping the previous keys" in messages[-1]
    for message in messages:
        for token in tokens:
            assert token not in message, (token, message)


@pytest.mark.parametrize("value", [f"{OLD} {NEW}", f"{OLD},{NEW}"[:15], f"{OLD}\t{NEW}"])
def test_no_error_message_quotes_the_environment_key(value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"WHISPER_API_KEY": value, "WHISPER_WEBHOOK_SECRET": SECRET,
                           "WHISPER_WEBHOOK_TIMEOUT_S": "x"})
    message = str(caught.value)
    assert "WHISPER_API_KEY='********'" in message
    for token in (OLD, NEW, SECRET, value):
        assert token not in message


def test_a_keys_file_that_is_not_text_is_refused_without_its_bytes(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(f"{B}\n".encode() + b"\xff\xfe" + OLD.encode() + b"\n")
    with pytest.raises(ValueError, match=r"line 2: not UTF-8 text") as caught:
        KeyRing(keys_file=path)
    assert "0xff" not in str(caught.value) and OLD not in str(caught.value)


def _touch_later(path):
    # mtime resolution: make sure the change is seen as one.
    later = time.time() + 2
    os.utime(path, (later, later))
