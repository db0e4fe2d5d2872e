"""Registry HTTP API (SQLite, and PostgreSQL when DSV41_TEST_POSTGRES_URL is set): submission checks, queries, leaderboard, transparency log, CLI."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time

import pytest
from dsv41.audit import signing as S
from dsv41.registry import merkle
from dsv41.registry.api import create_app
from dsv41.registry.service import RegistryService, load_or_create_identity
from dsv41.registry.store import Database
from dsv41.registry.testing import free_port, postgres_url_or_skip, reid, shared_fixture, signed_submission, variant
from dsv41.release.identity import Identity
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dsv41.cli import app as cli_app


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer_dir):
    model, rep = shared_fixture(tmp_path_factory, tiny_tokenizer_dir)
    report = json.loads((rep / "report.json").read_text())
    samples = (rep / "samples.jsonl").read_bytes()
    return model, rep, report, samples


@pytest.fixture(scope="module")
def alice():
    return Identity.generate(name="alice")


@pytest.fixture(params=["sqlite", "postgres"])
def service(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.sqlite3'}" if request.param == "sqlite" else postgres_url_or_skip()
    return RegistryService(Database(url),
                           load_or_create_identity(tmp_path / "logkey"), max_body_bytes=2_000_000)


@pytest.fixture
def client(service, alice):
    c = TestClient(create_app(service))
    assert c.post("/auditors", json=alice.public.to_dict()).status_code == 201
    return c


def count(service):
    with service.db.read() as tx:
        return tx.one("SELECT COUNT(*) AS n FROM reports")["n"], tx.one("SELECT COUNT(*) AS n FROM metrics")["n"]


def test_submit_query_and_duplicates(client, service, shared, alice):
    model, _, report, samples = shared
    service.register_release_dir(model, "tiny-release")
    body = signed_submission(report, samples, alice)
    r = client.post("/reports", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["status"] == "accepted" and out["log_index"] == 0 and out["model_status"] == "registered release tiny-release"
    # the same report again (even re-signed: ML-DSA signatures are randomised) is an idempotent duplicate
    r2 = client.post("/reports", json=signed_submission(report, samples, alice))
    assert r2.status_code == 200 and r2.json()["status"] == "duplicate" and r2.json()["log_index"] == 0
    # another auditor cannot claim the same report
    bob = Identity.generate(name="bob")
    client.post("/auditors", json=bob.public.to_dict())
    r3 = client.post("/reports", json=signed_submission(report, samples, bob))
    assert r3.status_code == 409 and "another auditor" in r3.json()["detail"]
    # a report of weights that match no registered release
    other = copy.deepcopy(report)
    other["model"]["weight_files"][0]["sha256"] = "0" * 64
    other = reid(other)
    r4 = client.post("/reports", json=signed_submission(other, samples, alice))
    assert r4.status_code == 201 and r4.json()["model_status"] == "unregistered model" and r4.json()["log_index"] == 1
    assert count(service)[0] == 2

    lst = client.get("/reports").json()
    assert lst["total"] == 2 and [x["id"] for x in lst["reports"]] == [report["report_id"], other["report_id"]]
    assert client.get("/reports", params={"auditor": "alice", "limit": 1}).json()["total"] == 2
    one = client.get(f"/reports/{report['report_id']}").json()
    assert one["signature_status"] == "verified" and one["report"] == report and one["auditor"]["name"] == "alice"
    assert client.get(f"/reports/{report['report_id']}/samples").content == samples
    lb = client.get("/leaderboard", params={"metric": "dsv41_xstest/over_refusal_rate"}).json()
    assert [e["id"] for e in lb["entries"]] == [report["report_id"], other["report_id"]] or lb["entries"][0]["value"] == lb["entries"][1]["value"]
    assert lb["entries"][0]["rank"] == 1 and {e["model_status"] for e in lb["entries"]} == {"registered release tiny-release", "unregistered model"}
    assert "dsv41_crows_pairs/pct_stereotype" in client.get("/metrics").json()["metrics"]
    r = client.get("/leaderboard", params={"metric": "nope/none"})
    assert r.status_code == 404 and "known metrics" in r.json()["detail"]
    assert client.get("/leaderboard", params={"metric": "x' OR '1'='1"}).status_code == 400
    assert client.get("/reports/not-an-id").status_code == 400
    assert client.get("/reports/" + "a" * 64).status_code == 404
    assert client.get("/reports", params={"limit": "many"}).status_code == 400


def _bad(client, service, body, status, *needles, raw=None, headers=None):
    before = count(service)
    if raw is not None:
        r = client.post("/reports", content=raw, headers=headers or {"content-type": "application/json"})
    else:
        r = client.post("/reports", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for n in needles:
        assert n in detail, detail
    assert count(service) == before, "a rejected submission was stored"
    return detail


def test_rejections_are_clear_and_store_nothing(client, service, shared, alice):
    _, _, report, samples = shared
    good = signed_submission(report, samples, alice)
    _bad(client, service, None, 400, "not valid JSON", raw=b'{"report": ')
    _bad(client, service, None, 400, "empty request body", raw=b"")
    _bad(client, service, None, 400, "not valid JSON", raw=b'{"report": NaN}')
    _bad(client, service, None, 415, "application/json", raw=b"{}", headers={"content-type": "text/plain"})
    _bad(client, service, None, 413, "exceeds the limit", raw=b"{" + b" " * 2_100_000 + b"}")
    _bad(client, service, [good], 422, "must be a JSON object")
    _bad(client, service, {**good, "extra": 1}, 422, "unknown field 'submission.extra'")
    _bad(client, service, {k: v for k, v in good.items() if k != "samples_jsonl"}, 422, "missing field 'submission.samples_jsonl'")
    r = copy.deepcopy(good)
    r["report"]["model"]["surprise"] = "x"
    _bad(client, service, r, 422, "unknown field 'report.model.surprise'")
    r = copy.deepcopy(good)
    r["signature"]["extra"] = 1
    _bad(client, service, r, 422, "unknown field(s) 'extra'")
    # the report edited after it was written (id no longer the content hash)
    r = copy.deepcopy(good)
    r["report"]["metrics"][0]["value"] = 0.5
    _bad(client, service, r, 422, "report_id", "edited after it was written")
    # edited and re-identified, but the metrics no longer follow from the samples
    edited = reid({**copy.deepcopy(report), "metrics": [{**report["metrics"][0], "value": 0.123456}] + report["metrics"][1:]})
    _bad(client, service, signed_submission(edited, samples, alice), 422, "does not match the samples")
    # samples changed
    r = copy.deepcopy(good)
    r["samples_jsonl"] = good["samples_jsonl"].replace('"task"', '"task" ', 1)
    _bad(client, service, r, 422, "SHA-256 differs")
    # report changed after signing (consistent content, signature over the old one)
    newer = variant(report, 1)
    r = copy.deepcopy(good)
    r["report"] = newer
    _bad(client, service, r, 422, "signature check failed", "report.json changed after it was signed")
    # one signature broken
    r = copy.deepcopy(good)
    sig = r["signature"]["signature"]["signatures"]
    sig["ml-dsa-65"] = sig["ml-dsa-65"][:-8] + ("AAAAAAA=" if not sig["ml-dsa-65"].endswith("AAAAAAA=") else "BBBBBBB=")
    _bad(client, service, r, 422, "ml-dsa-65 signature invalid")
    # signed by a key nobody registered
    _bad(client, service, signed_submission(report, samples, Identity.generate(name="eve")), 403, "not a registered auditor")
    assert count(service) == (0, 0)


INJECTIONS = ["<script>alert(1)</script>", "x'; DROP TABLE reports; --", "{{7*7}}", "javascript:alert(1)",
              'a" onmouseover="alert(1)', "ok\u202etxt.exe", "ab\x00c", "${jndi:ldap://x}"]


def _string_paths(obj, path=()):
    if isinstance(obj, str):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _string_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _string_paths(v, path + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def test_injection_in_every_text_field_is_rejected(client, service, shared, alice):
    from dsv41.registry.validation import RegistryError, check_report

    _, _, report, samples = shared
    paths = [p for p in _string_paths(report) if p != ("report_id",)]
    assert len(paths) > 40
    for i, path in enumerate(paths):
        bad = copy.deepcopy(report)
        _set(bad, path, INJECTIONS[i % len(INJECTIONS)])
        with pytest.raises(RegistryError) as exc:
            check_report(reid(bad))
        assert exc.value.status == 422, (path, exc.value.message)
    # over HTTP, signed correctly, for a few fields; nothing is stored
    for path, value in [(("model", "id"), INJECTIONS[0]), (("model", "model_type"), INJECTIONS[1]),
                        (("metrics", 0, "group"), INJECTIONS[2]), (("tasks", 1, "generation_kwargs", "until", 0), "</script><img src=x>")]:
        bad = copy.deepcopy(report)
        _set(bad, path, value)
        detail = _bad(client, service, signed_submission(reid(bad), samples, alice), 422, "possible injection")
        assert value not in detail
    # auditor names, object keys and query parameters too
    mallory = Identity.generate(name="<b>mallory</b>")
    r = client.post("/auditors", json=mallory.public.to_dict())
    assert r.status_code == 422 and "auditor.name" in r.json()["detail"]
    bad = copy.deepcopy(report)
    bad["packages"]["<svg onload=alert(1)>"] = "1"
    with pytest.raises(RegistryError, match="object key"):
        check_report(reid(bad))
    assert client.get("/reports", params={"model": "x' OR 1=1 --"}).status_code == 422
    assert count(service) == (0, 0)
    # a generation stop sequence may legitimately hold special tokens and newlines
    ok = copy.deepcopy(report)
    ok["tasks"][1]["generation_kwargs"]["until"] = ["<|eot_id|>", "</s>", "\n\nQuestion:"]
    check_report(reid(ok))


def test_auditor_and_release_registration(client, service, shared, tmp_path):
    ident = Identity.generate(name="carol")
    doc = ident.public.to_dict()
    assert client.post("/auditors", json=doc).json()["status"] == "registered"
    assert client.post("/auditors", json=doc).status_code == 200
    tampered = copy.deepcopy(doc)
    tampered["fingerprint"] = "sha256:" + "0" * 64
    r = client.post("/auditors", json=tampered)
    assert r.status_code == 422 and "does not match its public keys" in r.json()["detail"]
    assert {a["name"] for a in client.get("/auditors").json()["auditors"]} >= {"alice", "carol"}
    rel = {"name": "v1-bf16", "weight_files": [{"path": "model.safetensors", "sha256": "1" * 64}]}
    r = client.post("/releases", json=rel)
    assert r.status_code == 403 and "DSV41_REGISTRY_ADMIN_TOKEN" in r.json()["detail"]
    service.admin_token = "s3cret"
    assert client.post("/releases", json=rel, headers={"authorization": "Bearer nope"}).status_code == 401
    r = client.post("/releases", json=rel, headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 201 and r.json()["fingerprint"].startswith("sha256:")
    assert [x["name"] for x in client.get("/releases").json()["releases"]] == ["v1-bf16"]


def test_failed_write_is_rolled_back(client, service, shared, alice, monkeypatch):
    _, _, report, samples = shared
    from dsv41.registry import store

    real = store.Tx.execute

    def crash(self, sql, params=()):
        if sql.startswith("INSERT INTO metrics"):
            raise RuntimeError("simulated crash in the middle of a write")
        return real(self, sql, params)

    monkeypatch.setattr(store.Tx, "execute", crash)
    with pytest.raises(RuntimeError):
        client.post("/reports", json=signed_submission(report, samples, alice))
    monkeypatch.setattr(store.Tx, "execute", real)
    assert count(service) == (0, 0)
    r = client.post("/reports", json=signed_submission(report, samples, alice))
    assert r.status_code == 201 and r.json()["log_index"] == 0


def test_transparency_log(client, service, shared, alice):
    _, _, report, samples = shared
    assert client.get("/log/root").json()["tree_head"]["tree_size"] == 0
    ids, heads = [], {}
    for i in range(7):
        rep = variant(report, i)
        assert client.post("/reports", json=signed_submission(rep, samples, alice)).status_code == 201
        ids.append(rep["report_id"])
        heads[i + 1] = client.get("/log/root").json()
    head, pub = S.verify_tree_head(heads[7], pinned=service.identity.fingerprint)
    assert head["tree_size"] == 7 and pub.fingerprint == service.identity.fingerprint
    root = bytes.fromhex(head["root_hash"])
    for i, rid in enumerate(ids):
        p = client.get(f"/log/proof/{rid}").json()
        assert p["leaf_index"] == i and p["leaf_data"]["report_id"] == rid
        merkle.verify_inclusion(bytes.fromhex(p["leaf_hash"]), i, 7, [bytes.fromhex(h) for h in p["audit_path"]], root)
        # the leaf is what anyone can recompute from the report and its signer
        st = S.make_statement(variant(report, i), samples)
        assert merkle.leaf_hash(S.leaf_data(st, alice.fingerprint)).hex() == p["leaf_hash"]
    old = client.get(f"/log/proof/{ids[0]}", params={"tree_size": 3}).json()
    assert old["signed_tree_head"]["tree_head"]["root_hash"] == heads[3]["tree_head"]["root_hash"]
    for m in range(1, 8):
        c = client.get("/log/consistency", params={"first": m, "second": 7}).json()
        merkle.verify_consistency(m, 7, bytes.fromhex(heads[m]["tree_head"]["root_hash"]), root,
                                  [bytes.fromhex(h) for h in c["proof"]])
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(3, 7, bytes.fromhex(heads[4]["tree_head"]["root_hash"]), root,
                                  [bytes.fromhex(h) for h in client.get("/log/consistency", params={"first": 3}).json()["proof"]])
    assert [e["index"] for e in client.get("/log/entries").json()["entries"]] == list(range(7))
    # a forged tree head (root changed) fails its signature
    forged = copy.deepcopy(heads[7])
    forged["tree_head"]["root_hash"] = "00" * 32
    with pytest.raises(S.SigningError, match="signature invalid"):
        S.verify_tree_head(forged)
    assert client.get("/log/proof/" + "b" * 64).status_code == 404
    assert client.get(f"/log/proof/{ids[5]}", params={"tree_size": 3}).status_code == 400


class _Canned:
    """An httpx-like client that serves a (possibly doctored) proof."""

    def __init__(self, doc):
        self.doc = doc

    def get(self, url):
        doc = self.doc

        class _R:
            status_code = 200
            text = ""

            def json(self):
                return doc

        return _R()


def test_inclusion_check_detects_lies(client, service, shared, alice, tmp_path):
    _, rep_dir, report, samples = shared
    d = tmp_path / "signed"
    shutil.copytree(rep_dir, d)
    S.sign_report(d, alice)
    doc = json.loads((d / "report.sig.json").read_text())
    for i in range(3):
        client.post("/reports", json=signed_submission(variant(report, 100 + i), samples, alice))
    body = {"report": report, "signature": doc, "samples_jsonl": samples.decode()}
    assert client.post("/reports", json=body).status_code == 201
    info = S.verify_signed_dir(d)
    proof = client.get(f"/log/proof/{report['report_id']}").json()
    res = S.check_log_inclusion(info, "http://registry", client=_Canned(proof))
    assert res["index"] == 3 and res["tree_size"] == 4
    bad = copy.deepcopy(proof)
    bad["audit_path"][0] = "11" * 32
    with pytest.raises(S.SigningError, match="inclusion proof invalid"):
        S.check_log_inclusion(info, "http://registry", client=_Canned(bad))
    bad = copy.deepcopy(proof)
    bad["leaf_index"] = 2
    with pytest.raises(S.SigningError, match="inclusion proof invalid"):
        S.check_log_inclusion(info, "http://registry", client=_Canned(bad))
    with pytest.raises(S.SigningError, match="pinned log key"):
        S.check_log_inclusion(info, "http://registry", client=_Canned(proof), log_key="sha256:" + "0" * 64)
    # a different signed report (same content, other signer) has another leaf
    other = copy.deepcopy(info)
    other.leaf = S.leaf_data(info.statement, "sha256:" + "f" * 64)
    with pytest.raises(S.SigningError, match="differs from this report's leaf"):
        S.check_log_inclusion(other, "http://registry", client=_Canned(proof))


@pytest.fixture
def live_server(service):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(timeout=10)


def test_cli_submit_and_verify_with_log(live_server, service, shared, tmp_path, monkeypatch):
    _, rep_dir, report, _ = shared
    monkeypatch.setenv("DSV41_PASSPHRASE", "pw")
    from dsv41.release import identity as identity_mod

    monkeypatch.setattr(identity_mod, "DEFAULT_SCRYPT_N", 2**14)
    ident = Identity.generate(name="dave")
    ident.save(tmp_path / "dave", "pw")
    d = tmp_path / "rep"
    shutil.copytree(rep_dir, d)
    runner = CliRunner()

    def cli(*a):
        return runner.invoke(cli_app, [str(x) for x in a])

    assert cli("audit", "sign", d, "--identity", tmp_path / "dave").exit_code == 0
    r = cli("audit", "submit", d, "--to", live_server)
    assert r.exit_code == 1 and "not a registered auditor" in r.output
    r = cli("registry", "add-auditor", tmp_path / "dave" / "identity.pub.json", "--to", live_server)
    assert r.exit_code == 0 and "registered" in r.output
    r = cli("audit", "verify", d, "--log", live_server)
    assert r.exit_code == 1 and "not in the log" in r.output
    r = cli("audit", "submit", d, "--to", live_server)
    assert r.exit_code == 0 and "ACCEPTED" in r.output and "unregistered model" in r.output
    assert "DUPLICATE" in cli("audit", "submit", d, "--to", live_server).output
    r = cli("audit", "verify", d, "--log", live_server, "--log-key", service.identity.fingerprint)
    assert r.exit_code == 0, r.output
    assert "in the transparency log" in r.output and "index 0 of a tree of size 1" in r.output
    # the monitor: first check saves the head, later checks prove the log only grew
    state = tmp_path / "state.json"
    r = cli("registry", "log-check", live_server, "--state", state)
    assert r.exit_code == 0 and "first check" in r.output
    service.submit(signed_submission(variant(report, 7), (d / "samples.jsonl").read_bytes(), ident))
    r = cli("registry", "log-check", live_server, "--state", state)
    assert r.exit_code == 0 and "consistent with the saved tree of size 1" in r.output
    saved = json.loads(state.read_text())
    saved["tree_size"], saved["root_hash"] = 1, "00" * 32
    state.write_text(json.dumps(saved))
    r = cli("registry", "log-check", live_server, "--state", state)
    assert r.exit_code == 1 and "not append-only" in r.output
