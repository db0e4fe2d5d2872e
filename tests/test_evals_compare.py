"""`dsv41 compare` end to end on two tiny models, the built-in Llama 3 70B baseline, and the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsv41.cli import app


@pytest.fixture(scope="module")
def two_tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    from dsv41.evals.testing import make_tiny_v4

    root = tmp_path_factory.mktemp("cmp_models")
    a = make_tiny_v4(tiny_tokenizer_dir, root / "tiny-a", seed=0)
    # a second, different tiny model (other seed, wider experts) as the baseline
    b = make_tiny_v4(tiny_tokenizer_dir, root / "tiny-b", seed=1, moe_intermediate_size=48)
    return a, b


def test_tiny_end_to_end_compare_writes_every_file(two_tiny_models, shared_datasets, tmp_path):
    a, b = two_tiny_models
    out = tmp_path / "report"
    res = CliRunner().invoke(app, [
        "compare", "--model", str(a), "--baseline", str(b), "--suite", "reasoning", "--data-dir", str(shared_datasets),
        "--limit", "10", "--num-fewshot", "1", "--max-gen-toks", "4", "--skip-missing", "--out", str(out),
        "--bootstrap-iters", "500", "--batch-size", "8",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare.json").read_text())
    tasks = ["dsv41_arc_challenge", "dsv41_arc_easy", "dsv41_gsm8k", "dsv41_truthfulqa_mc1", "dsv41_truthfulqa_mc2"]
    assert report["settings"]["tasks"] == tasks
    assert set(report["settings"]["skipped_missing_data"]) == {"dsv41_hellaswag", "dsv41_mmlu"}
    for f in ("compare.json", "compare.md", "compare.png", "lm_eval/model.json", "lm_eval/baseline.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("model", "baseline"):
        for task in tasks:
            lines = (out / "samples" / label / f"{task}.jsonl").read_text().splitlines()
            assert len(lines) == 10 and "prompt_hash" in json.loads(lines[0])
    for task in tasks:
        s = report["tasks"][task]
        assert s["n"] == 10 and s["identical_prompts"] and s["paired"]["n_pairs"] == 10
        assert s["num_fewshot"] == (0 if "truthfulqa" in task else 1)
        lo, hi = s["model"]["ci95"]
        assert lo <= s["model"]["score"] <= hi and 0 <= s["paired"]["p_value"] <= 1
    eff = report["efficiency"]
    assert eff["model"]["total_params"] < eff["baseline"]["total_params"]  # wider experts in the baseline
    measured = eff["measured"]
    assert measured["model"]["decode_tokens_per_s"] > 0 and measured["baseline"]["peak_memory_bytes"] > 0
    md = (out / "compare.md").read_text()
    assert "*measured*" in md and "skipped dsv41_hellaswag" in md and "Measured on this machine" in md


def test_builtin_llama_baseline_is_published_only_here(two_tiny_models, shared_datasets, tmp_path):
    a, _ = two_tiny_models
    out = tmp_path / "llama"
    res = CliRunner().invoke(app, ["compare", "--model", str(a), "--baseline", "llama-3-70b", "--suite", "arc_challenge",
                                   "--data-dir", str(shared_datasets), "--limit", "10", "--num-fewshot", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare.json").read_text())
    assert report["baseline"]["kind"] == "builtin-published" and report["baseline"]["backend"] is None
    task = report["tasks"]["dsv41_arc_challenge"]
    assert "baseline" not in task  # nothing measured for Llama on this machine ...
    published = task["published_baseline"]  # ... only its published numbers, each with shots and source
    card = [p for p in published if not p.get("third_party")]
    assert {(p["variant"], p["score"], p["shots"]) for p in card} == {("base", 93.0, 25), ("instruct", 94.4, 0)}
    assert all(p["source"].startswith("https://") for p in published)
    md = (out / "compare.md").read_text()
    assert "*Published* scores of llama-3-70b" in md and "not measured" in md
    # efficiency against the built-in Llama config: analytic only (no weights to run)
    assert report["efficiency"]["baseline"]["name"] == "llama-3-70b"
    assert "skipped" in report["efficiency"]["measured"]
    # the flat results feed the release model card: measured rows for our model, published rows with sources
    kinds = {(r["model"].split(" (")[0], r["kind"]) for r in report["results"]}
    assert kinds == {(a.name, "measured"), ("llama-3-70b", "published")}
    from dsv41.release.card import write_model_card

    import shutil

    model_dir = tmp_path / "release"
    shutil.copytree(a, model_dir)
    card = write_model_card(model_dir, evals=out, license_file=Path(__file__).resolve().parents[1] / "LICENSE-NONCOMMERCIAL", force=True)
    text = (model_dir / "README.md").read_text()
    assert card.n_model_index >= 1 and "dsv41_arc_challenge" in text and "published" in text


def test_missing_task_data_fails_before_running(two_tiny_models, shared_datasets, tmp_path):
    a, b = two_tiny_models
    res = CliRunner().invoke(app, ["compare", "--model", str(a), "--baseline", str(b), "--suite", "hellaswag,arc_easy",
                                   "--data-dir", str(shared_datasets), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "'dsv41_hellaswag'" in res.output and str(shared_datasets / "hellaswag" / "hellaswag_val.jsonl") in res.output
    assert not (tmp_path / "x").exists()


def test_paired_tests():
    from dsv41.evals.compare import mcnemar_exact, sign_flip_test

    a = np.array([1] * 10 + [0] * 10)
    b = np.array([0] * 10 + [0] * 10)
    r = mcnemar_exact(a, b)  # 10 discordant pairs all favouring the model: p = 2 * 0.5**10
    assert r["model_only_correct"] == 10 and r["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(b, b)["p_value"] == 1.0
    rng = np.random.default_rng(0)
    diff = np.array([0.5, 0.4, 0.3, 0.2, 0.1])  # all 32 sign patterns: only the all-positive and all-negative are as extreme
    assert sign_flip_test(diff, rng)["p_value"] == pytest.approx(2 / 32)
