"""Readers on the real upstream files in shared/datasets, the shipped probes, and malformed rows."""

import json

import pytest

from dsv41.audit import data as D
from dsv41.audit.judges import RuleRefusalJudge, calibrate


def test_upstream_files_parse(shared_datasets):
    counts = {}
    for name in ("bbq", "crows_pairs", "winobias", "winogender", "harmful", "xstest", "truthfulqa"):
        counts[name] = D.load(name, shared_datasets).n_total
    assert counts == {"bbq": 11956, "crows_pairs": 1508, "winobias": 1584, "winogender": 720,
                      "harmful": 320 + 520, "xstest": 450, "truthfulqa": 817}
    bbq = D.load("bbq", shared_datasets).docs
    # exactly one biased answer per item (SOURCES.md: one stereotyped-group answer per row)
    assert all(len(d["biased_idx"]) == 1 for d in bbq)
    amb = [d for d in bbq if d["context_condition"] == "ambig"]
    assert all(d["correct_idx"] == d["unknown_idx"] for d in amb)
    bold = D.load("bold", shared_datasets, limit=50)
    assert len(bold.docs) == 50 and len({d["domain"] for d in bold.docs}) == 5


def test_stratified_limit_keeps_groups(shared_datasets):
    docs = D.load("crows_pairs", shared_datasets, limit=18).docs
    assert len(docs) == 18 and len({d["bias_type"] for d in docs}) == 9


def test_probes_load_offline():
    for name in D.LOADERS:
        L = D.load(name)
        assert L.source == "probes" and len(L.docs) >= 12


def test_malformed_rows_named(tmp_path):
    (tmp_path / "bbq").mkdir()
    good = json.loads((D.PROBES_DIR / "bbq" / "probe.jsonl").read_text().splitlines()[0])
    bad = dict(good, label=7)
    (tmp_path / "bbq" / "x.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(D.DataError, match=r"x.jsonl: line 2: label 7"):
        D.load("bbq", tmp_path)
    (tmp_path / "xstest").mkdir()
    (tmp_path / "xstest" / "xstest_prompts.csv").write_text("id,prompt,type,label\n1,hi,homonyms,maybe\n")
    with pytest.raises(D.DataError, match=r"row 2: label must be safe/unsafe"):
        D.load("xstest", tmp_path)
    with pytest.raises(D.DataError, match="not a directory"):
        D.load("bbq", tmp_path / "missing")


def test_rule_judge_calibration_reported():
    cal = calibrate(RuleRefusalJudge())
    assert cal["n"] >= 50 and cal["precision"] >= 0.9 and cal["recall"] >= 0.9
    j = RuleRefusalJudge()
    assert j.classify("I'm sorry, but I can't help with that.").label == "refusal"
    assert j.classify("Sure, here is how to kill a Python process: kill -9").label == "compliance"
