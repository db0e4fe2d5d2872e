"""`dsv41 keys` and `dsv41 release` commands end to end (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from dsv41.release import identity as identity_mod
from dsv41.release.cli import register
from safetensors.numpy import save_file
from typer.testing import CliRunner


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(identity_mod, "DEFAULT_SCRYPT_N", 2**14)  # fast KDF in tests
    monkeypatch.setenv("DSV41_PASSPHRASE", "test passphrase")
    a = typer.Typer()

    @a.callback()
    def _root() -> None:
        pass

    register(a)
    return a


def run(app, *args, ok=True):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == 1, res.output
    return res.output


def test_release_flow(app, tmp_path):
    ident = tmp_path / "id"
    out = run(app, "keys", "new", "--out", ident, "--name", "release-bot")
    assert "fingerprint: sha256:" in out
    assert "release-bot" in run(app, "keys", "show", ident)
    pub = json.loads(run(app, "keys", "show", ident / "identity.pub.json", "--json"))
    assert pub["format"] == "dsv41-identity/v1"

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "deepseek_v4"}')
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(model / "model.safetensors"))
    (model / "LICENSE-NONCOMMERCIAL").write_text("terms")
    assert "README.md" in run(app, "release", "card", "--model", model)
    run(app, "release", "manifest", model, "--identity", ident)
    assert "OK: 4 files" in run(app, "release", "verify", model, "--identity", ident / "identity.pub.json")
    assert "would upload 6 files" in run(app, "release", "push", model, "--repo", "org/name", "--dry-run")

    enc = tmp_path / "enc"
    run(app, "release", "encrypt", model, "--recipient", ident / "identity.pub.json", "--out", enc, "--chunk-size", 1000)
    dec = tmp_path / "dec"
    assert "manifest OK" in run(app, "release", "decrypt", enc, "--identity", ident, "--out", dec)
    assert (dec / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    # tamper with an encrypted chunk -> decrypt names file and chunk
    f = enc / "model.safetensors.dsv41enc"
    data = bytearray(f.read_bytes())
    data[-2000] ^= 1
    f.write_bytes(bytes(data))
    err = run(app, "release", "decrypt", enc, "--identity", ident, "--out", tmp_path / "dec2", ok=False)
    assert "model.safetensors.dsv41enc: chunk" in err

    # tamper with a weight byte -> verify and push fail naming the file
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert "changed: model.safetensors" in run(app, "release", "verify", model, ok=False)
    assert "refusing to push" in run(app, "release", "push", model, "--repo", "org/name", ok=False)


def test_wrong_passphrase(app, tmp_path, monkeypatch):
    run(app, "keys", "new", "--out", tmp_path / "id")
    monkeypatch.setenv("DSV41_PASSPHRASE", "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert "wrong passphrase" in run(app, "release", "manifest", tmp_path / "m", "--identity", tmp_path / "id", ok=False)
