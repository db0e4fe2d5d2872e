"""`dsv41 audit sign` / `verify` signature checks and `dsv41 audit submit --to hf://...` (offline)."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from dsv41.audit import signing as S
from dsv41.registry.testing import reid, shared_fixture
from dsv41.release import identity as identity_mod
from dsv41.release.identity import Identity
from typer.testing import CliRunner

from dsv41.cli import app


@pytest.fixture(scope="module")
def base_report(tmp_path_factory, tiny_tokenizer_dir):
    return shared_fixture(tmp_path_factory, tiny_tokenizer_dir)[1]


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.setattr(identity_mod, "DEFAULT_SCRYPT_N", 2**14)
    monkeypatch.setenv("DSV41_PASSPHRASE", "correct horse")
    ident = Identity.generate(name="alice-auditor")
    ident.save(tmp_path / "alice", "correct horse")
    return ident, tmp_path / "alice"


@pytest.fixture
def report(base_report, tmp_path):
    d = tmp_path / "report"
    shutil.copytree(base_report, d)
    return d


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_sign_then_verify(report, keys):
    ident, kdir = keys
    r = cli("audit", "sign", report, "--identity", kdir)
    assert r.exit_code == 0, r.output
    doc = json.loads((report / "report.sig.json").read_text())
    assert doc["format"] == S.SIGNATURE_FORMAT and doc["signer"]["fingerprint"] == ident.fingerprint
    assert set(doc["signature"]["signatures"]) == {"ed25519", "ml-dsa-65"}
    rep = json.loads((report / "report.json").read_text())
    assert doc["statement"]["report_sha256"] == S.report_sha256(rep)
    assert doc["statement"]["samples"]["sha256"] == rep["samples"]["sha256"]
    r = cli("audit", "verify", report, "--signer", ident.fingerprint)
    assert r.exit_code == 0, r.output
    assert "Ed25519 and ML-DSA-65 signatures both verify" in r.output and "recomputed" in r.output
    # signing twice needs --force; a pinned foreign signer fails
    assert cli("audit", "sign", report, "--identity", kdir).exit_code == 2
    other = Identity.generate(name="mallory")
    r = cli("audit", "verify", report, "--signer", other.fingerprint)
    assert r.exit_code == 1 and "not one of the trusted identities" in r.output


def test_unsigned_report(report):
    r = cli("audit", "verify", report)
    assert r.exit_code == 0 and "not signed" in r.output
    r = cli("audit", "verify", report, "--require-signature")
    assert r.exit_code == 1 and "not signed" in r.output


def test_wrong_passphrase_and_changed_samples(report, keys, monkeypatch):
    _, kdir = keys
    monkeypatch.setenv("DSV41_PASSPHRASE", "wrong")
    r = cli("audit", "sign", report, "--identity", kdir)
    assert r.exit_code == 2 and "wrong passphrase" in r.output
    monkeypatch.setenv("DSV41_PASSPHRASE", "correct horse")
    with open(report / "samples.jsonl", "a") as f:
        f.write("\n")
    r = cli("audit", "sign", report, "--identity", kdir)
    assert r.exit_code == 2 and "samples were changed" in r.output
    assert not (report / "report.sig.json").exists()


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("alg", ["ed25519", "ml-dsa-65"])
def test_each_signature_is_required(report, keys, alg):
    ident, _ = keys
    S.sign_report(report, ident)
    p = report / "report.sig.json"
    doc = json.loads(p.read_text())
    doc["signature"]["signatures"][alg] = _flip(doc["signature"]["signatures"][alg])
    p.write_text(json.dumps(doc))
    r = cli("audit", "verify", report)
    assert r.exit_code == 1 and f"{alg} signature invalid" in r.output
    other = "ml-dsa-65" if alg == "ed25519" else "ed25519"
    assert f"{other} signature invalid" not in r.output
    del doc["signature"]["signatures"][alg]
    p.write_text(json.dumps(doc))
    r = cli("audit", "verify", report)
    assert r.exit_code == 1 and f"{alg} signature missing" in r.output


def test_content_changes_after_signing_fail(report, keys, tmp_path):
    ident, _ = keys
    S.sign_report(report, ident)
    # 1) an edit that the content checks alone accept (creation time, report_id recomputed)
    rep = json.loads((report / "report.json").read_text())
    edited = reid({**rep, "created_at": "2020-01-01T00:00:00+00:00"})
    t1 = tmp_path / "t1"
    shutil.copytree(report, t1)
    (t1 / "report.json").write_text(json.dumps(edited))
    r = cli("audit", "verify", t1)
    assert r.exit_code == 1 and "report.json changed after it was signed" in r.output
    assert "metrics and fingerprints recomputed" in r.output  # the content itself was consistent
    # 2) the statement edited to match the new report: the signatures no longer verify
    doc = json.loads((t1 / "report.sig.json").read_text())
    doc["statement"] = S.make_statement(edited, (t1 / "samples.jsonl").read_bytes())
    (t1 / "report.sig.json").write_text(json.dumps(doc))
    r = cli("audit", "verify", t1)
    assert r.exit_code == 1 and "payload differs from the signed one" in r.output
    # 3) samples changed: content check and signature check both fail
    t2 = tmp_path / "t2"
    shutil.copytree(report, t2)
    lines = (t2 / "samples.jsonl").read_text().splitlines()
    (t2 / "samples.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(S.SigningError, match="samples file changed after it was signed"):
        S.verify_signed_dir(t2)
    # 4) the embedded signer identity swapped for another key: fingerprint no longer matches the signatures
    t3 = tmp_path / "t3"
    shutil.copytree(report, t3)
    doc = json.loads((t3 / "report.sig.json").read_text())
    doc["signer"] = Identity.generate(name="alice-auditor").public.to_dict()
    (t3 / "report.sig.json").write_text(json.dumps(doc))
    with pytest.raises(S.SigningError, match="signed by"):
        S.verify_signed_dir(t3)


class _FakeHub:
    def __init__(self):
        self.calls = []

    def create_commit(self, **kw):
        self.calls.append(kw)

        class _Info:
            pr_url = "https://huggingface.co/datasets/org/audits/discussions/1"

        return _Info()


def test_submit_to_hub_builds_a_pull_request(report, keys, monkeypatch):
    from dsv41.registry import client as C

    ident, _ = keys
    fake = _FakeHub()
    with pytest.raises(C.SubmitError, match="not signed"):
        C.submit_hub(report, "hf://datasets/org/audits", api=fake)
    S.sign_report(report, ident)
    C.submit_hub(report, "hf://datasets/org/audits", api=fake)
    (call,) = fake.calls
    rid = json.loads((report / "report.json").read_text())["report_id"]
    assert call["repo_id"] == "org/audits" and call["repo_type"] == "dataset" and call["create_pr"] is True
    ops = {op.path_in_repo: op for op in call["operations"]}
    assert set(ops) == {f"reports/{rid}/{n}" for n in ("report.json", "report.sig.json", "report.md", "samples.jsonl")}
    for name in ("report.json", "report.sig.json", "samples.jsonl"):
        assert ops[f"reports/{rid}/{name}"].path_or_fileobj == (report / name).read_bytes()
    assert "alice-auditor" in call["commit_message"] and rid[:16] in call["commit_message"]
    # through the CLI, with huggingface_hub's HfApi.create_commit replaced (no network)
    import huggingface_hub

    seen = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, **kw: seen.append(kw) or _FakeHub().create_commit(**kw))
    r = cli("audit", "submit", report, "--to", "hf://datasets/org/audits")
    assert r.exit_code == 0, r.output
    assert "discussions/1" in r.output and len(seen) == 1 and len(seen[0]["operations"]) == 4
    r = cli("audit", "submit", report, "--to", "hf://models/org/x")
    assert r.exit_code == 2 and "hf://datasets/ORG/NAME" in r.output
    # a tampered report is never sent
    rep = json.loads((report / "report.json").read_text())
    rep["metrics"][0]["n"] += 1
    (report / "report.json").write_text(json.dumps(rep))
    r = cli("audit", "submit", report, "--to", "hf://datasets/org/audits")
    assert r.exit_code == 2 and "not submitting" in r.output and len(seen) == 1
