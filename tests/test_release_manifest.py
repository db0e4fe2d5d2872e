"""Signed weight manifest (OpenSSF Model Signing + hybrid co-signature), verification, push."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from dsv41.release.errors import ManifestError, ManifestMismatch, PushRefused
from dsv41.release.identity import Identity
from dsv41.release.manifest import (
    COSIGNATURE_FILENAME,
    SIGNATURE_FILENAME,
    read_manifest,
    sign_model_dir,
    verify_model_dir,
)
from safetensors.numpy import save_file


def make_fake_model(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "hidden_size": 16}))
    rng = np.random.default_rng(0)
    save_file({"embed.weight": rng.standard_normal((32, 16)).astype(np.float32)}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def signer() -> Identity:
    return Identity.generate(name="release-bot")


@pytest.fixture
def signed_model(tmp_path, signer):
    model = make_fake_model(tmp_path / "model")
    sign_model_dir(model, signer)
    return model


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_sign_and_verify(signed_model, signer):
    info = verify_model_dir(signed_model, public_identity=signer.public)
    assert info.pinned and set(info.files) == {"config.json", "model.safetensors"}
    assert read_manifest(signed_model) == info.files
    bundle = json.loads((signed_model / SIGNATURE_FILENAME).read_text())
    assert bundle["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert statement["predicate"]["serialization"]["hash_type"] == "sha256"


def test_upstream_model_signing_verifies_it(signed_model, signer, tmp_path):
    import model_signing

    pem = tmp_path / "signer.pem"
    pem.write_bytes(signer.public.public_pem("ecdsa-p256"))
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pem).verify(
        signed_model, signed_model / SIGNATURE_FILENAME
    )


def test_one_byte_in_weights_is_detected(signed_model):
    _flip_byte(signed_model / "model.safetensors", -3)
    with pytest.raises(ManifestMismatch) as err:
        verify_model_dir(signed_model)
    assert err.value.changed == ["model.safetensors"] and not err.value.missing and not err.value.extra
    assert "changed: model.safetensors" in str(err.value)


def test_missing_and_extra_files_are_named(signed_model):
    (signed_model / "config.json").unlink()
    (signed_model / "sub").mkdir()
    (signed_model / "sub" / "evil.py").write_text("print('hi')")
    with pytest.raises(ManifestMismatch) as err:
        verify_model_dir(signed_model)
    assert err.value.missing == ["config.json"] and err.value.extra == ["sub/evil.py"]


def test_tampered_manifest_payload_is_detected(signed_model):
    """Rewrite a digest inside the signed statement (as an attacker replacing weights would)."""
    sig_path = signed_model / SIGNATURE_FILENAME
    bundle = json.loads(sig_path.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig_path.write_text(json.dumps(bundle))
    with pytest.raises(ManifestError, match=COSIGNATURE_FILENAME.replace(".", r"\.") + ".*does not verify"):
        verify_model_dir(signed_model)


def test_tampered_ossf_signature_is_detected(signed_model):
    sig_path = signed_model / SIGNATURE_FILENAME
    bundle = json.loads(sig_path.read_text())
    raw = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[10] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sig_path.write_text(json.dumps(bundle))
    with pytest.raises(ManifestError, match=r"model\.sig: OpenSSF model signature does not verify"):
        verify_model_dir(signed_model)


@pytest.mark.parametrize("alg", ["ml-dsa-65", "ed25519"])
def test_tampered_cosignature_is_detected(signed_model, alg):
    path = signed_model / COSIGNATURE_FILENAME
    doc = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(doc["hybrid_signature"]["signatures"][alg]))
    raw[len(raw) // 2] ^= 0x01
    doc["hybrid_signature"]["signatures"][alg] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=f"{alg} signature invalid"):
        verify_model_dir(signed_model)


def test_signature_files_missing(signed_model):
    (signed_model / COSIGNATURE_FILENAME).unlink()
    with pytest.raises(ManifestError, match=r"model\.sig\.pq\.json: missing"):
        verify_model_dir(signed_model)
    (signed_model / SIGNATURE_FILENAME).unlink()
    with pytest.raises(ManifestError, match=r"model\.sig: missing"):
        verify_model_dir(signed_model)


def test_resigned_by_someone_else_fails_when_pinned(signed_model, signer, monkeypatch):
    mallory = Identity.generate("mallory")
    _flip_byte(signed_model / "model.safetensors", -1)
    sign_model_dir(signed_model, mallory)
    assert not verify_model_dir(signed_model).pinned  # consistent, but not from a trusted signer
    with pytest.raises(ManifestError, match="not a trusted signer"):
        verify_model_dir(signed_model, public_identity=signer.public)
    monkeypatch.setenv("DSV41_TRUSTED_SIGNERS", signer.fingerprint)
    with pytest.raises(ManifestError, match="not a trusted signer"):
        verify_model_dir(signed_model)


def test_swapping_in_another_identity_breaks_ossf_signature(signed_model):
    """Replacing the co-signature with a valid one from another key must not pass."""
    mallory = Identity.generate("mallory")
    other = signed_model.parent / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((signed_model / name).read_bytes())
    sign_model_dir(other, mallory)
    (signed_model / COSIGNATURE_FILENAME).write_bytes((other / COSIGNATURE_FILENAME).read_bytes())
    with pytest.raises(ManifestError, match=r"model\.sig"):
        verify_model_dir(signed_model)


def test_symlinked_files_verify(tmp_path, signer):
    """Hugging Face cache snapshots are symlinks to blobs."""
    blobs = make_fake_model(tmp_path / "blobs")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(blobs / name, snap / name)
    sign_model_dir(snap, signer)
    verify_model_dir(snap)
    _flip_byte(blobs / "model.safetensors", -2)
    with pytest.raises(ManifestMismatch, match="changed: model.safetensors"):
        verify_model_dir(snap)


# ---------------------------------------------------------------------------------------------
# push (no network: the Hub calls are intercepted)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import HfApi

    calls = {"create_repo": [], "create_commit": [], "validate_yaml": []}
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)  # single-commit path
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls["create_repo"].append((repo_id, kw)))
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: calls["validate_yaml"].append(content))

    def fake_commit(self, **kw):
        calls["create_commit"].append(kw)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_commit", fake_commit)
    return calls


def test_push_uploads_exactly_the_signed_files(signed_model, signer, hub_calls):
    from dsv41.release.push import push_release
    from huggingface_hub import CommitOperationAdd

    # a stray file after signing would fail verification, so put strays where the manifest
    # ignores them (huggingface_hub's local cache) and check they are not uploaded
    (signed_model / ".cache" / "huggingface").mkdir(parents=True)
    (signed_model / ".cache" / "huggingface" / "x.lock").write_text("")
    out = push_release(signed_model, "org/dsv41-test", public_identity=signer.public, create_pr=True)
    assert out == "commit-info"
    assert hub_calls["create_repo"][0][0] == "org/dsv41-test"
    (commit,) = hub_calls["create_commit"]
    ops = commit["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted(
        ["config.json", "model.safetensors", SIGNATURE_FILENAME, COSIGNATURE_FILENAME]
    )
    assert commit["repo_id"] == "org/dsv41-test" and commit["create_pr"] is True
    assert signer.fingerprint in commit["commit_message"]


def test_push_refuses_tampered_model(signed_model, hub_calls):
    from dsv41.release.push import push_release

    _flip_byte(signed_model / "model.safetensors", -5)
    with pytest.raises(PushRefused, match="changed: model.safetensors"):
        push_release(signed_model, "org/dsv41-test")
    assert hub_calls["create_commit"] == [] and hub_calls["create_repo"] == []


def test_push_refuses_unsigned_model(tmp_path, hub_calls):
    from dsv41.release.push import push_release

    model = make_fake_model(tmp_path / "unsigned")
    with pytest.raises(PushRefused, match=r"model\.sig: missing"):
        push_release(model, "org/dsv41-test")
    with pytest.raises(PushRefused, match="ORG/NAME"):
        push_release(model, "not-a-repo")
    assert hub_calls["create_commit"] == []
