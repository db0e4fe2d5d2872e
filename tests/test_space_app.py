"""The Space's functions without a browser: chat streaming and stop, quick audit with progress,
zip submission (valid, tampered, unsafe), leaderboard filtering, escaping, and the server routes."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from dsv41.audit import signing as S
from dsv41.registry.service import RegistryService, load_or_create_identity
from dsv41.registry.store import Database
from dsv41.registry.testing import reid, shared_fixture, zip_dir
from dsv41.release.identity import Identity


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer_dir):
    return shared_fixture(tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture
def backend(tmp_path):
    from dsv41.space.app import LocalBackend

    return LocalBackend(RegistryService(Database(f"sqlite:///{tmp_path / 'r.sqlite3'}"),
                                        load_or_create_identity(tmp_path / "key")))


def test_chat_streams_and_stops(shared):
    from dsv41.space.app import Models, make_chat_fn

    model, _ = shared
    models = Models()
    chat = make_chat_fn(models)
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}]
    outs = list(chat("How are you?", history, "Be brief.", 24, 0.8, 0.9, 20, 0, str(model)))
    assert len(outs) >= 3 and all(outs[i + 1].startswith(outs[i]) for i in range(len(outs) - 1))
    assert len(outs[-1]) > len(outs[0]) > 0
    # same seed, same reply; greedy works too
    assert list(chat("How are you?", history, "Be brief.", 24, 0.8, 0.9, 20, 0, str(model)))[-1] == outs[-1]
    assert list(chat("Hi", [], "", 8, 0.0, 1.0, 0, 0, str(model)))
    # stop: closing the stream ends generation early
    tok, lm = models.get(str(model))
    produced = []
    real = lm.generate

    def spy(**kw):
        out = real(**kw)
        produced.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    lm.generate = spy
    try:
        stream = chat("Tell me everything.", [], "", 900, 0.8, 0.95, 50, 1, str(model))
        next(stream)
        stream.close()
    finally:
        lm.generate = real
    assert produced and produced[0] < 900
    import gradio as gr

    with pytest.raises(gr.Error, match="empty"):
        list(chat("   ", [], "", 8, 0.8, 0.9, 20, 0, str(model)))
    with pytest.raises(gr.Error, match="top-p"):
        list(chat("x", [], "", 8, 0.8, 1.5, 20, 0, str(model)))
    with pytest.raises(gr.Error, match="cannot load model"):
        list(chat("x", [], "", 8, 0.8, 0.9, 20, 0, str(shared[1])))


def test_quick_audit_with_progress(shared, tmp_path):
    from dsv41.space.app import make_audit_fn

    model, _ = shared
    seen = []

    def progress(*a, **kw):
        seen.append((a, kw))

    status, table, zpath = make_audit_fn(tmp_path)(str(model), ["crows_pairs"], 2, 50, progress=progress)
    assert "Audit finished" in status and seen
    assert set(table["task"]) == {"dsv41_crows_pairs"} and "pct_stereotype" in set(table["metric"])
    names = zipfile.ZipFile(zpath).namelist()
    assert any(n.endswith("/report.json") for n in names) and any(n.endswith("/samples.jsonl") for n in names)
    assert not any("/private/" in n for n in names)
    import gradio as gr

    with pytest.raises(gr.Error, match="limit"):
        make_audit_fn(tmp_path)(str(model), ["crows_pairs"], 0, 50, progress=progress)
    with pytest.raises(gr.Error, match="unknown task"):
        make_audit_fn(tmp_path)(str(model), ["rm -rf"], 2, 50, progress=progress)


def test_submit_zip_flow(shared, backend, tmp_path):
    from dsv41.space.app import leaderboard_frame, make_submit_fn, report_page

    _, rep = shared
    alice = Identity.generate(name="alice")
    pub = alice.public.save(tmp_path / "identity.pub.json")
    valid = tmp_path / "valid"
    shutil.copytree(rep, valid)
    S.sign_report(valid, alice)
    submit = make_submit_fn(backend, tmp_path / "work")
    rid = json.loads((valid / "report.json").read_text())["report_id"]
    out = submit(str(zip_dir(valid, tmp_path / "v.zip")), None)
    assert 'data-result="rejected"' in out and "not a registered auditor" in out
    out = submit(str(zip_dir(valid, tmp_path / "v.zip")), str(pub))
    assert 'data-result="accepted"' in out and "ACCEPTED" in out and rid in out and "log index 0" in out
    assert "ACCEPTED EARLIER" in submit(str(tmp_path / "v.zip"), None)
    # tampered after signing
    t = tmp_path / "tampered"
    shutil.copytree(valid, t)
    doc = json.loads((t / "report.json").read_text())
    doc["created_at"] = "2001-01-01T00:00:00+00:00"
    (t / "report.json").write_text(json.dumps(reid(doc)))
    out = submit(str(zip_dir(t, tmp_path / "t.zip")), None)
    assert 'data-result="rejected"' in out and "changed after it was signed" in out
    # unsigned, not a zip, zip-slip
    u = tmp_path / "unsigned"
    shutil.copytree(rep, u)
    assert "not signed" in submit(str(zip_dir(u, tmp_path / "u.zip")), None)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert "not a zip file" in submit(str(tmp_path / "junk.zip"), None)
    with zipfile.ZipFile(tmp_path / "slip.zip", "w") as z:
        z.writestr("../../evil/report.json", "{}")
    assert "unsafe path" in submit(str(tmp_path / "slip.zip"), None)
    assert not (tmp_path.parent / "evil").exists()
    # injected markup is rejected and the message is escaped
    inj = tmp_path / "inj"
    shutil.copytree(rep, inj)
    doc = json.loads((inj / "report.json").read_text())
    doc["model"]["id"] = "<script>alert(1)</script>"
    (inj / "report.json").write_text(json.dumps(reid(doc)))
    S.sign_report(inj, alice)
    out = submit(str(zip_dir(inj, tmp_path / "i.zip")), None)
    assert "possible injection" in out and "<script>" not in out
    # leaderboard and report page
    frame, note = leaderboard_frame(backend, "dsv41_xstest/over_refusal_rate", "all", "", False, "metric")
    assert list(frame["report id"]) == [rid] and list(frame["signature"]) == ["verified"] and "1 verified" in note
    assert leaderboard_frame(backend, "dsv41_xstest/over_refusal_rate", "all", "nobody", False, "metric")[0].empty
    assert leaderboard_frame(backend, "dsv41_xstest/over_refusal_rate", "all", "", True, "newest")[0].empty  # unregistered
    head, table, chart, raw = report_page(backend, rid)
    assert 'data-signature="verified"' in head and "index 0 of 1" in head and not table.empty and not chart.empty
    assert raw["report"]["report_id"] == rid
    head, *_ = report_page(backend, "<img src=x onerror=alert(1)>")
    assert "<img" not in head and "&lt;img" not in head  # only the error message, escaped
    # a stored report whose signature no longer verifies is shown as unverified
    with backend.service.db.write() as tx:
        row = tx.one("SELECT signature_json FROM reports WHERE id = ?", (rid,))
        sig = json.loads(row["signature_json"])
        sig["signature"]["signatures"]["ed25519"] = sig["signature"]["signatures"]["ed25519"][::-1]
        tx.execute("UPDATE reports SET signature_json = ? WHERE id = ?", (json.dumps(sig), rid))
    head, *_ = report_page(backend, rid)
    assert 'data-signature="unverified"' in head and "ed25519 signature invalid" in head


def test_server_routes(shared, tmp_path, monkeypatch):
    from dsv41.space.app import create_server
    from fastapi.testclient import TestClient

    model, _ = shared
    monkeypatch.setenv("DSV41_SPACE_MODEL", str(model))
    app = create_server(home=str(tmp_path / "home"), register_releases=[f"tiny={model}"])
    c = TestClient(app)
    assert c.get("/registry/").json()["service"] == "dsv41 audit registry"
    assert [r["name"] for r in c.get("/registry/releases").json()["releases"]] == ["tiny"]
    assert c.post("/registry/reports", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    r = c.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()


def test_space_metadata_and_cli():
    from pathlib import Path

    import gradio
    import yaml
    from typer.testing import CliRunner

    from dsv41.cli import app

    root = Path(__file__).resolve().parents[1]
    text = (root / "space" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["sdk"] == "gradio" and front["sdk_version"] == gradio.__version__
    assert (root / front["app_file"]).is_file()
    reqs = (root / "space" / "requirements.txt").read_text()
    for pkg in ("gradio==", "fastapi", "transformers", "cryptography", "lm-eval", "psycopg"):
        assert pkg in reqs, pkg
    r = CliRunner().invoke(app, ["space", "--help"])
    assert r.exit_code == 0 and "--registry-url" in r.output and "--model" in r.output
    r = CliRunner().invoke(app, ["registry", "serve", "--help"])
    assert r.exit_code == 0 and "DATABASE_URL" in r.output


def test_remote_registry_backend(shared, backend, tmp_path):
    """The Space against a registry in another server (DSV41_REGISTRY_URL)."""
    import threading
    import time

    import uvicorn

    from dsv41.registry.api import create_app
    from dsv41.registry.testing import free_port, signed_submission
    from dsv41.registry.validation import RegistryError
    from dsv41.space.app import HttpBackend, leaderboard_frame, report_page

    _, rep = shared
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backend.service), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    try:
        remote = HttpBackend(f"http://127.0.0.1:{port}")
        alice = Identity.generate(name="alice")
        assert remote.register_auditor(alice.public.to_dict())[0] == 201
        report = json.loads((rep / "report.json").read_text())
        status, out = remote.submit(signed_submission(report, (rep / "samples.jsonl").read_bytes(), alice))
        assert status == 201 and out["status"] == "accepted"
        with pytest.raises(RegistryError) as exc:
            remote.submit({"report": {}})
        assert exc.value.status == 422 and "missing field" in exc.value.message
        frame, _ = leaderboard_frame(remote, "dsv41_xstest/over_refusal_rate", "all", "", False, "metric")
        assert list(frame["report id"]) == [report["report_id"]]
        head, *_ = report_page(remote, report["report_id"])
        assert 'data-signature="verified"' in head
        assert "HTTP 404" in report_page(remote, "0" * 64)[0]
    finally:
        server.should_exit = True
        t.join(timeout=10)
