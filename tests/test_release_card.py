"""Model card: Hub metadata validated with huggingface_hub's parser, results with sources."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from dsv41.release.card import CARD_MARKER, write_model_card
from dsv41.release.errors import CardInputError, ReleaseError
from safetensors.numpy import save_file


@pytest.fixture
def model(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "hidden_size": 16, "n_routed_experts": 4})
    )
    save_file({"a": np.zeros((8, 16), np.float32), "b": np.zeros((3,), np.float32)}, str(m / "model.safetensors"))
    (m / "LICENSE-NONCOMMERCIAL").write_text("non-commercial license text\n")
    return m


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit_report(model):
    fh = lambda p: {"path": p.name, "sha256": _sha(p), "size": p.stat().st_size}
    ds = {"source": "probes", "root": "probes", "files": [], "n_items_available": 10, "n_items_evaluated": 10}
    task = lambda name, suite: {
        "name": name, "suite": suite, "version": "1", "output_type": "multiple_choice", "num_fewshot": 0,
        "apply_chat_template": False, "generation_kwargs": None, "task_files": [], "dataset": ds,
    }
    metric = lambda task, metric, group, value: {
        "task": task, "metric": metric, "group": group, "value": value, "ci_low": value - 0.1 if value is not None else None,
        "ci_high": value + 0.1 if value is not None else None, "n": 10, "higher_is_better": None,
    }
    return {
        "schema_version": "dsv41.audit.report/1.0",
        "report_id": "r-0001",
        "status": "complete",
        "created_at": "2025-01-01T00:00:00Z",
        "dsv41_version": "0.1.0",
        "packages": {},
        "model": {
            "id": str(model), "revision": None, "source": "local", "local_path": str(model),
            "weight_files": [fh(model / "model.safetensors")], "config_sha256": _sha(model / "config.json"),
            "tokenizer_files": [], "model_type": "deepseek_v4", "num_parameters": 131, "dtype": "float32",
        },
        "settings": {
            "suites": ["bias", "safety"], "tasks": ["crows_pairs_probe", "refusal_probe"], "limit": None,
            "seeds": {"random": 0, "numpy": 0, "torch": 0, "fewshot": 0, "bootstrap": 0}, "bootstrap_iters": 100,
            "ci_level": 0.95, "batch_size": 1, "device": "cpu", "apply_chat_template": "auto", "num_fewshot": 0,
        },
        "tasks": [task("crows_pairs_probe", "bias"), task("refusal_probe", "safety")],
        "judge": {"primary": "rule-based", "judges": [], "agreement": None, "toxicity_scorer": {}, "sentiment_scorer": {}},
        "metrics": [
            metric("crows_pairs_probe", "pct_stereotype", "all", 0.55),
            metric("crows_pairs_probe", "pct_stereotype", "gender", 0.6),
            metric("refusal_probe", "refusal_rate", "all", 0.8),
            metric("refusal_probe", "refusal_rate", "weapons", None),
        ],
        "samples": {"file": "samples.jsonl", "sha256": "0" * 64, "n_records": 20, "redacted": False,
                    "redaction_scheme": None, "n_redacted": 0},
    }


def evals_report():
    return {
        "model": "dsv41-tiny",
        "baseline": "llama-3-70b",
        "results": [
            {"task": "arc_easy", "metric": "acc", "model": "dsv41-tiny", "value": 0.31, "kind": "measured",
             "ci_low": 0.25, "ci_high": 0.37, "num_fewshot": 0},
            {"task": "arc_easy", "metric": "acc", "model": "llama-3-70b", "value": 0.86, "kind": "published",
             "source": "Meta Llama 3 model card", "num_fewshot": 0},
        ],
        "efficiency": {"active_params": {"dsv41-tiny": 100, "llama-3-70b": 70e9}},
    }


@pytest.fixture
def inputs(tmp_path, model):
    audits = tmp_path / "audits" / "run1"
    audits.mkdir(parents=True)
    report = audit_report(model)
    try:  # keep the fixture a valid report of the audit package when that package is present
        from dsv41.audit.schema import Report
    except ImportError:
        pass
    else:
        Report.model_validate(report)
    (audits / "report.json").write_text(json.dumps(report))
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "compare.json").write_text(json.dumps(evals_report()))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"training_data_summary": "tinyshakespeare (public domain)", "energy_kwh": 0.01}))
    return tmp_path / "audits", evals, facts


def test_card_validates_with_huggingface_hub(model, inputs):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    audits, evals, facts = inputs
    res = write_model_card(model, audits=audits, evals=evals, facts=facts, repo_id="org/dsv41-tiny")
    card = ModelCard.load(res.path, ignore_metadata_errors=False)
    d = card.data
    assert d.license == "other" and d.license_name and d.license_link == "LICENSE-NONCOMMERCIAL"
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation"
    # model-index: our measured result + the two "all" audit metrics; never the published baseline
    _, results = model_index_to_eval_results(d.to_dict()["model-index"])
    assert sorted((r.dataset_type, r.metric_type, r.metric_value) for r in results) == [
        ("arc_easy", "acc", 0.31), ("crows_pairs_probe", "pct_stereotype", 0.55), ("refusal_probe", "refusal_rate", 0.8)
    ]
    assert all(r.source_name and r.source_url.startswith("https://huggingface.co/org/dsv41-tiny/blob/main/evidence/") for r in results)
    assert {r.source_name for r in results} == {"dsv41 compare (measured): evidence/evals/compare.json", "dsv41 audit report r-0001"}
    text = card.text
    assert CARD_MARKER in text
    for section in ("## Intended use", "## Out-of-scope use", "## Bias and safety findings", "## Compute and efficiency",
                    "## EU AI Act", "Training data summary:** tinyshakespeare", "Copyright policy", "published"):
        assert section in text, section
    assert "byte-identical" in text  # audited weights are the released ones
    assert (model / "evidence" / "audits" / "r-0001" / "report.json").is_file()
    assert (model / "evidence" / "evals" / "compare.json").is_file()
    assert any("copyright_policy" in w for w in res.warnings)


def test_card_then_manifest_covers_evidence(model, inputs):
    from dsv41.release.identity import Identity
    from dsv41.release.manifest import sign_model_dir

    audits, evals, facts = inputs
    write_model_card(model, audits=audits, evals=evals, facts=facts)
    info = sign_model_dir(model, Identity.generate("x"))
    assert {"README.md", "LICENSE-NONCOMMERCIAL", "evidence/audits/r-0001/report.json"} <= set(info.files)


def test_audit_of_other_weights_is_flagged(model, inputs):
    audits, _, _ = inputs
    save_file({"a": np.ones((8, 16), np.float32)}, str(model / "model.safetensors"))
    res = write_model_card(model, audits=audits)
    assert "differ" in res.path.read_text() and any("not the weights" in w for w in res.warnings)


def test_missing_field_is_named(model, inputs, tmp_path):
    audits, evals, _ = inputs
    report = json.loads((audits / "run1" / "report.json").read_text())
    del report["metrics"][1]["value"]
    (audits / "run1" / "report.json").write_text(json.dumps(report))
    with pytest.raises(CardInputError, match=r"report\.json: metrics\[1\]: missing field 'value'"):
        write_model_card(model, audits=audits)
    bad = evals_report()
    del bad["results"][1]["source"]  # a published number without its source
    (evals / "compare.json").write_text(json.dumps(bad))
    with pytest.raises(CardInputError, match=r"compare\.json: results\[1\]: missing field 'source'"):
        write_model_card(model, evals=evals)
    with pytest.raises(CardInputError, match="--evals: no compare"):
        write_model_card(model, evals=tmp_path / "model")


def test_license_and_existing_readme(model, tmp_path):
    (model / "LICENSE-NONCOMMERCIAL").unlink()
    (model / "README.md").write_text("hand-written")
    with pytest.raises(ReleaseError, match="README.md: exists"):
        write_model_card(model)
    lic = tmp_path / "LIC"
    lic.write_text("terms")
    write_model_card(model, force=True, license_file=lic)
    assert (model / "LICENSE-NONCOMMERCIAL").read_text() == "terms"
    write_model_card(model)  # our own card may be regenerated
