"""Hybrid identity (Ed25519 + ML-DSA-65): keys, passphrase-encrypted storage, sign/verify."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from dsv41.release.identity import (
    Identity,
    IdentityError,
    PublicIdentity,
    SignatureError,
    canonical_json,
    is_valid,
    verify,
)

CTX = "dsv41/test/v1"
FAST_KDF = 2**14


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate(name="alice")


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_sign_verify_round_trip_json_bundle(alice):
    payload = canonical_json({"b": 1, "a": [1.5, "x"]})
    bundle = json.loads(json.dumps(alice.sign(payload, context=CTX)))  # JSON-serialisable
    verify(payload, bundle, alice.public, context=CTX)
    assert set(bundle["signatures"]) == {"ed25519", "ml-dsa-65"}
    assert bundle["signer"] == alice.fingerprint


@pytest.mark.parametrize("alg", ["ed25519", "ml-dsa-65"])
def test_each_signature_is_required(alice, alg):
    payload = b"report bytes"
    bundle = alice.sign(payload, context=CTX)
    bad = json.loads(json.dumps(bundle))
    bad["signatures"][alg] = _flip(bad["signatures"][alg])
    with pytest.raises(SignatureError, match=f"{alg} signature invalid"):
        verify(payload, bad, alice.public, context=CTX)
    dropped = json.loads(json.dumps(bundle))
    del dropped["signatures"][alg]
    with pytest.raises(SignatureError, match=f"{alg} signature missing"):
        verify(payload, dropped, alice.public, context=CTX)


def test_payload_context_and_signer_are_bound(alice):
    bundle = alice.sign(b"payload", context=CTX)
    with pytest.raises(SignatureError, match="payload differs"):
        verify(b"payloaD", bundle, alice.public, context=CTX)
    with pytest.raises(SignatureError, match="context"):
        verify(b"payload", bundle, alice.public, context="dsv41/other/v1")
    mallory = Identity.generate("mallory")
    with pytest.raises(SignatureError, match="signed by"):
        verify(b"payload", bundle, mallory.public, context=CTX)
    # a forged digest field does not help: the signatures cover the payload itself
    forged = dict(bundle, payload_sha256=__import__("hashlib").sha256(b"other").hexdigest())
    assert not is_valid(b"other", forged, alice.public, context=CTX)


def test_save_load_with_passphrase(tmp_path, alice):
    pub_path, key_path = alice.save(tmp_path / "id", "correct horse", scrypt_n=FAST_KDF)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    text = key_path.read_text()
    assert "PRIVATE KEY" not in text  # no cleartext key material
    loaded = Identity.load(tmp_path / "id", "correct horse")
    assert loaded.fingerprint == alice.fingerprint
    bundle = loaded.sign(b"x", context=CTX)
    verify(b"x", bundle, PublicIdentity.load(pub_path), context=CTX)
    with pytest.raises(IdentityError, match="wrong passphrase"):
        Identity.load(key_path, "wrong")
    with pytest.raises(IdentityError, match="already exists"):
        alice.save(tmp_path / "id", "correct horse", scrypt_n=FAST_KDF)


def test_tampered_public_identity_is_rejected(tmp_path, alice):
    pub_path = alice.public.save(tmp_path / "pub.json")
    doc = json.loads(pub_path.read_text())
    other = Identity.generate("mallory").public.to_dict()
    doc["public_keys"]["ml-dsa-65"] = other["public_keys"]["ml-dsa-65"]
    pub_path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="fingerprint"):
        PublicIdentity.load(pub_path)
    del doc["public_keys"]["ed25519"]
    pub_path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="public_keys.ed25519"):
        PublicIdentity.load(pub_path)


def test_tampered_private_file_is_rejected(tmp_path, alice):
    _, key_path = alice.save(tmp_path, "pw", scrypt_n=FAST_KDF)
    doc = json.loads(key_path.read_text())
    doc["encrypted_private_keys"]["ciphertext"] = _flip(doc["encrypted_private_keys"]["ciphertext"])
    key_path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="altered"):
        Identity.load(key_path, "pw")


def test_empty_passphrase_refused(tmp_path, alice):
    with pytest.raises(IdentityError, match="empty passphrase"):
        alice.save(tmp_path, "", scrypt_n=FAST_KDF)
