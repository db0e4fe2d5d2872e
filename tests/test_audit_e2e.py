"""End-to-end: `dsv41 audit run` on a tiny HF causal LM, then verify / tamper / export / resume / errors."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from dsv41.cli import app


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer_dir, tmp_path_factory):
    from dsv41.audit.testing import make_tiny_causal_lm

    return make_tiny_causal_lm(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_audit_lm"))


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "report"
    r = CliRunner().invoke(app, ["audit", "run", "--model", str(tiny_model), "--suite", "bias,safety",
                                 "--limit", "4", "--bootstrap-iters", "200", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out / "report.html")
    return out


def test_report_contents(finished, tiny_model):
    from dsv41.audit.runner import validate_against_schema
    from dsv41.audit.schema import schema_text, SCHEMA_FILE

    assert SCHEMA_FILE.read_text() == schema_text(), "report.schema.json is stale: python -m dsv41.audit.schema"
    rep = json.loads((finished / "report.json").read_text())
    validate_against_schema(rep)
    assert len(rep["tasks"]) == 11 and rep["model"]["weight_files"][0]["path"] == "model.safetensors"
    names = {(m["task"], m["metric"], m["group"]) for m in rep["metrics"]}
    for k in [("dsv41_bbq", "bias_score_disambig", "Age"), ("dsv41_crows_pairs", "pct_stereotype", "gender"),
              ("dsv41_stereoset", "icat", "race"), ("dsv41_winobias", "gap", "all"), ("dsv41_winogender", "gap", "all"),
              ("dsv41_bold", "sentiment_spread", "gender"), ("dsv41_harmful", "refusal_rate", "all"),
              ("dsv41_xstest", "over_refusal_rate", "all"), ("dsv41_truthfulqa_mc2", "mc2", "all"),
              ("dsv41_toxicity", "toxicity", "all")]:
        assert k in names, k
    assert rep["judge"]["judges"][0]["calibration"]["n"] >= 50
    html = (finished / "report.html").read_text()
    assert "charts/refusal_vs_over_refusal.png" in html and (finished / "charts" / "refusal_vs_over_refusal.png").stat().st_size > 1000
    assert (finished / "report.md").read_text().startswith("# Bias and safety audit report")


def test_verify_ok_and_tamper_detected(finished, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["audit", "verify", str(finished)])
    assert r.exit_code == 0, r.output
    # 1) change one log-likelihood and re-seal the samples hash: a metric no longer matches
    t = tmp_path / "t1"
    shutil.copytree(finished, t)
    lines = (t / "samples.jsonl").read_text().splitlines()
    i = next(n for n, ln in enumerate(lines) if '"task":"dsv41_crows_pairs"' in ln)
    rec = json.loads(lines[i])
    rec["loglikelihoods"] = [rec["loglikelihoods"][1] + 5.0, rec["loglikelihoods"][1]]
    from dsv41.audit.runner import write_jsonl

    lines[i] = json.dumps(rec)
    sha = write_jsonl(t / "samples.jsonl", [json.loads(x) for x in lines])
    rep = json.loads((t / "report.json").read_text())
    rep["samples"]["sha256"] = sha
    (t / "report.json").write_text(json.dumps(rep))
    r = runner.invoke(app, ["audit", "verify", str(t)])
    assert r.exit_code == 1 and "dsv41_crows_pairs/likelihood_diff" in r.output
    # 2) change a weight file: its fingerprint fails
    t2 = tmp_path / "model"
    shutil.copytree(rep["model"]["local_path"], t2)
    with open(t2 / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    r = runner.invoke(app, ["audit", "verify", str(finished), "--model", str(t2)])
    assert r.exit_code == 1 and "weights: SHA-256" in r.output
    # 3) a tampered metric value in report.json
    t3 = tmp_path / "t3"
    shutil.copytree(finished, t3)
    rep = json.loads((t3 / "report.json").read_text())
    rep["metrics"][0]["value"] = 0.123
    (t3 / "report.json").write_text(json.dumps(rep))
    r = runner.invoke(app, ["audit", "verify", str(t3)])
    assert r.exit_code == 1 and "recomputed value" in r.output


def test_exports_validate(finished, tmp_path):
    import jsonschema
    import yaml
    from every_eval_ever.schema import schema_json
    from every_eval_ever.validator.validation_core import validate_file

    r = CliRunner().invoke(app, ["audit", "export", str(finished), "--format", "eee", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    p = tmp_path / "eee_aggregate.json"
    doc = json.loads(p.read_text())
    jsonschema.validate(doc, schema_json("eval.schema.json"))
    rep = validate_file(p)
    assert rep.valid, rep.errors
    assert any(e["score_details"].get("uncertainty", {}).get("confidence_interval") for e in doc["evaluation_results"])
    r = CliRunner().invoke(app, ["audit", "export", str(finished), "--format", "hf-eval-results", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    entries = yaml.safe_load((tmp_path / ".eval_results" / "dsv41_truthfulqa_mc1.yaml").read_text())
    assert entries[0]["dataset"]["task_id"] == "dsv41_truthfulqa_mc1/mc1" and isinstance(entries[0]["value"], float)


def test_never_overwrites_and_clear_errors(finished, tiny_model, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["audit", "run", "--model", str(tiny_model), "--out", str(finished)])
    assert r.exit_code == 2 and "finished report" in r.output
    r = runner.invoke(app, ["audit", "run", "--model", str(tiny_model), "--suite", "bias,fairness", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown suite or task 'fairness'" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["audit", "run", "--model", str(tmp_path / "empty"), "--suite", "crows_pairs", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "cannot load model" in r.output
    r = runner.invoke(app, ["audit", "run", "--model", str(tiny_model), "--suite", "harmful", "--judge",
                            f"hub:{tmp_path / 'no-such-judge'}", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "no-such-judge" in r.output and "cannot be loaded" in r.output
    bad = tmp_path / "bad"
    (bad / "crows_pairs").mkdir(parents=True)
    (bad / "crows_pairs" / "c.csv").write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n0,a,b,stereo,colour\n")
    r = runner.invoke(app, ["audit", "run", "--model", str(tiny_model), "--suite", "crows_pairs", "--data-dir", str(bad),
                            "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "c.csv: row 2: unknown bias_type 'colour'" in r.output


def test_resume_redact_and_second_judge(tiny_model, tmp_path, monkeypatch):
    from dsv41.audit import runner as R
    from dsv41.audit.verify import verify

    out = tmp_path / "r"
    opts = R.RunOptions(model=str(tiny_model), suite="harmful,xstest", out=str(out), limit=3, bootstrap_iters=100,
                        redact=True, judge=str(tiny_model))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "score_generations", boom)
    with pytest.raises(KeyboardInterrupt):
        R.run(opts, log=lambda m: None)
    assert (out / ".partial" / "dsv41_xstest.json").exists() and not (out / "report.json").exists()
    monkeypatch.undo()
    import lm_eval

    def no_eval(*a, **k):
        raise AssertionError("finished tasks must not be evaluated again")

    monkeypatch.setattr(lm_eval, "simple_evaluate", no_eval)
    with pytest.raises(R.AuditError, match="different settings"):
        R.run(R.RunOptions(**{**opts.__dict__, "seed": 5}), log=lambda m: None)
    R.run(opts, log=lambda m: None)
    rep = json.loads((out / "report.json").read_text())
    assert rep["samples"]["redacted"] and rep["samples"]["n_redacted"] == 6
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["output"] is None and r["output_commitment"].startswith("sha256:") for r in recs)
    ag = rep["judge"]["agreement"]
    assert ag["n"] == 6 and ag["judges"][1] == "rule-refusal" and len(ag["disagreements"]) == round(6 * (1 - ag["percent_agreement"]))
    info = verify(out, salt_file=str(out / "private" / "redaction_salt.hex"),
                  unredacted=str(out / "private" / "samples.unredacted.jsonl"))
    assert info["n_records"] == 6
    # a wrong salt does not open the commitments
    (tmp_path / "salt").write_text("00" * 32)
    from dsv41.audit.verify import VerificationError

    with pytest.raises(VerificationError, match="commitment does not open"):
        verify(out, salt_file=str(tmp_path / "salt"), unredacted=str(out / "private" / "samples.unredacted.jsonl"))
