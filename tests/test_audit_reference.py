"""Our CrowS-Pairs, BBQ and TruthfulQA MC numbers equal lm-eval's built-in tasks on the same model
and the same local files (the built-in YAMLs are included unchanged; only the dataset is redirected)."""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

LIMIT = 60


@pytest.fixture(scope="module")
def hflm(tiny_tokenizer_dir, tmp_path_factory):
    from dsv41.audit.testing import make_tiny_causal_lm
    from lm_eval.models.huggingface import HFLM

    d = make_tiny_causal_lm(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_lm"))
    return HFLM(pretrained=str(d), device="cpu", batch_size=16, max_length=1024)


def _builtin(name):
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / name


def _run(hflm, tasks, include, metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsv41.audit.runner import TASKS_DIR

    tm = TaskManager(include_path=[str(TASKS_DIR), str(include)], include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=hflm, tasks=tasks, task_manager=tm, limit=LIMIT, log_samples=True,
                                   bootstrap_iters=0, verbosity="ERROR")


def test_crows_pairs_equals_builtin(hflm, shared_datasets, tmp_path):
    csv_file = shared_datasets / "crows_pairs" / "crows_pairs_anonymized.csv"
    (tmp_path / "ref.yaml").write_text(
        f"include: {_builtin('crows_pairs/crows_pairs_english.yaml')}\ntask: ref_crows\ntag: []\n"
        f"dataset_path: csv\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {csv_file}\n")
    data = tmp_path / "data"
    (data / "crows_pairs").mkdir(parents=True)
    os.symlink(csv_file, data / "crows_pairs" / csv_file.name)
    res = _run(hflm, ["ref_crows", "dsv41_crows_pairs"], tmp_path, {"data_dir": str(data)})
    ref, ours = res["results"]["ref_crows"], res["results"]["dsv41_crows_pairs"]
    assert ours["pct_stereotype,none"] == pytest.approx(ref["pct_stereotype,none"], abs=1e-12)
    assert ours["likelihood_diff,none"] == pytest.approx(ref["likelihood_diff,none"], rel=1e-9)
    # and the report path (metrics recomputed from our sample records) gives the same number
    from dsv41.audit.runner import _records_from_samples
    from dsv41.audit.scoring import compute_metrics

    rows = compute_metrics("dsv41_crows_pairs", _records_from_samples("dsv41_crows_pairs", res["samples"]["dsv41_crows_pairs"]),
                           seed=1, iters=0)
    pct = next(r for r in rows if r["metric"] == "pct_stereotype" and r["group"] == "all")
    assert pct["value"] == pytest.approx(ref["pct_stereotype,none"], abs=1e-6)


def test_bbq_equals_builtin(hflm, shared_datasets, tmp_path):
    f = shared_datasets / "bbq" / "Age.jsonl"
    (tmp_path / "ref.yaml").write_text(
        f"include: {_builtin('bbq/bbq_multiple_choice.yaml')}\ntask: ref_bbq\ntag: []\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {f}\n")
    data = tmp_path / "data"
    (data / "bbq").mkdir(parents=True)
    os.symlink(f, data / "bbq" / f.name)
    res = _run(hflm, ["ref_bbq", "dsv41_bbq"], tmp_path, {"data_dir": str(data)})
    ref, ours = res["results"]["ref_bbq"], res["results"]["dsv41_bbq"]
    pairs = [("acc", "acc"), ("acc_ambig", "accuracy_amb"), ("acc_disambig", "accuracy_disamb"),
             ("bias_score_ambig", "amb_bias_score"), ("bias_score_disambig", "disamb_bias_score"),
             ("bias_score_disambig_Age", "disamb_bias_score_Age"), ("bias_score_ambig_Age", "amb_bias_score_Age")]
    import math

    compared = 0
    for o, r in pairs:
        if isinstance(ours[f"{o},none"], float) and math.isnan(ours[f"{o},none"]):
            # documented convention difference: no non-unknown answer at all -> the score is undefined
            # (we report null); lm-eval reports 0.0 for that case
            assert ref[f"{r},none"] == 0.0, (o, r)
            continue
        assert ours[f"{o},none"] == pytest.approx(ref[f"{r},none"], abs=1e-12), (o, r)
        compared += 1
    assert compared >= 5


def test_truthfulqa_mc_equals_builtin(hflm, shared_datasets, tmp_path):
    src = shared_datasets / "truthfulqa" / "v1" / "mc_task.json"
    items = json.loads(src.read_text())
    # the built-in task reads the HF layout {"mc1_targets": {"choices", "labels"}}: same content, converted
    hf = tmp_path / "tqa_hf.jsonl"
    hf.write_text("".join(json.dumps({"question": it["question"], **{
        k: {"choices": list(it[k]), "labels": list(it[k].values())} for k in ("mc1_targets", "mc2_targets")}}) + "\n"
        for it in items))
    for n in ("mc1", "mc2"):
        (tmp_path / f"ref_{n}.yaml").write_text(
            f"include: {_builtin(f'truthfulqa/truthfulqa_{n}.yaml')}\ntask: ref_tqa_{n}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {hf}\n")
    data = tmp_path / "data"
    (data / "truthfulqa" / "v1").mkdir(parents=True)
    os.symlink(src, data / "truthfulqa" / "v1" / "mc_task.json")
    res = _run(hflm, ["ref_tqa_mc1", "ref_tqa_mc2", "dsv41_truthfulqa_mc1", "dsv41_truthfulqa_mc2"], tmp_path,
               {"data_dir": str(data)})
    R = res["results"]
    assert R["dsv41_truthfulqa_mc1"]["mc1,none"] == pytest.approx(R["ref_tqa_mc1"]["acc,none"], abs=1e-12)
    assert R["dsv41_truthfulqa_mc2"]["mc2,none"] == pytest.approx(R["ref_tqa_mc2"]["acc,none"], abs=1e-9)
