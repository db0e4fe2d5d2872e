"""Reasoning-suite data loaders (real files from shared/datasets), scoring and missing-data errors."""

from __future__ import annotations

import json
import random

import pytest
from dsv41.evals import reasoning


def test_loaders_read_the_real_upstream_files(shared_datasets):
    arc_c = reasoning.load_arc_challenge(data_dir=shared_datasets)["test"]
    arc_e = reasoning.load_arc_easy(data_dir=shared_datasets)["test"]
    assert (len(arc_c), len(arc_e)) == (1172, 2376)  # official test split sizes
    # some ARC questions label their choices 1-4 instead of A-D: the gold index still points at answerKey
    raw = [json.loads(line) for line in (shared_datasets / "arc/ARC-Easy/ARC-Easy-Test.jsonl").read_text().splitlines()]
    digit = next(i for i, r in enumerate(raw) if r["question"]["choices"][0]["label"] == "1")
    assert arc_e[digit]["labels"][arc_e[digit]["gold"]] == raw[digit]["answerKey"]
    # few-shot pool = the disjoint Dev split (no Train file in shared/)
    assert reasoning.DATA_PROVENANCE["arc_easy"]["fewshot"].endswith("ARC-Easy-Dev.jsonl")
    assert len(reasoning.FEWSHOT_POOLS["arc_easy"]) == 570

    gsm = reasoning.load_gsm8k(data_dir=shared_datasets)["test"]
    assert len(gsm) == 1319 and gsm[0]["target"] == "18" and "<<" not in gsm[0]["answer"]
    tqa = reasoning.load_truthfulqa(data_dir=shared_datasets)["test"]
    assert len(tqa) == 817  # the v1 set behind published MC1/MC2 numbers
    assert all(d["mc1_gold"] == 0 for d in tqa) and all(1 in d["mc2_labels"] for d in tqa)


def test_missing_data_names_task_and_path(shared_datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(reasoning.MissingDataError) as err:
        reasoning.load_hellaswag(data_dir=shared_datasets)
    msg = str(err.value)
    assert "'hellaswag'" in msg and str(shared_datasets / "hellaswag" / "hellaswag_val.jsonl") in msg
    assert "Rowan/hellaswag" in msg and "offline" in msg
    with pytest.raises(reasoning.MissingDataError, match=r"'mmlu'.*" + str(tmp_path / "mmlu" / "test")):
        reasoning.load_mmlu(data_dir=tmp_path)


def test_missing_data_error_through_lm_eval(shared_datasets, tiny_tokenizer_dir):
    """The error surfaces unchanged when lm-eval builds the task."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(reasoning_tasks_dir()), include_defaults=False, metadata={"data_dir": str(shared_datasets)})
    with pytest.raises(reasoning.MissingDataError, match="hellaswag"):
        tm.load(["dsv41_hellaswag"])


def reasoning_tasks_dir():
    from dsv41.evals.compare import TASKS_DIR

    return TASKS_DIR


def test_mmlu_and_hellaswag_upstream_formats(tmp_path):
    """Files written in the upstream formats (MMLU: header-less CSV per subject; HellaSwag: jsonl)."""
    for split, rows in (("dev", [["1+1?", "1", "2", "3", "4", "B"], ["2+2?", "4", "5", "6", "7", "A"]]),
                        ("test", [["3+3?", "5", "6", "7", "8", "B"]])):
        folder = tmp_path / "mmlu" / split
        folder.mkdir(parents=True)
        (folder / f"elementary_mathematics_{split}.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    ds = reasoning.load_mmlu(data_dir=tmp_path)["test"]
    assert ds[0] == {"_task": "mmlu", "id": "elementary_mathematics-0", "subject": "elementary_mathematics",
                     "question": "3+3?", "choices": ["5", "6", "7", "8"], "gold": 1}
    sampler = reasoning.PoolSampler([])
    shots = sampler.sample(2, eval_doc=ds[0])
    assert [s["question"] for s in shots] == ["1+1?", "2+2?"]  # first k dev questions of the subject
    with pytest.raises(ValueError, match="3-shot needs 3 dev questions"):
        sampler.sample(3, eval_doc=ds[0])
    (tmp_path / "mmlu" / "test" / "bad_test.csv").write_text("q,a,b,c,d\n")
    with pytest.raises(ValueError, match="bad_test.csv line 1"):
        reasoning.load_mmlu(data_dir=tmp_path)

    hs = tmp_path / "hellaswag"
    hs.mkdir()
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "endings": [", the man [title] continues.", " leaves.", " sits.", " runs."], "label": 2}
    (hs / "hellaswag_val.jsonl").write_text(json.dumps(row) + "\n")
    doc = reasoning.load_hellaswag(data_dir=tmp_path)["test"][0]
    assert doc["query"] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert doc["gold"] == 2 and doc["choices"][0] == ", the man. continues."


def test_pool_sampler_never_returns_the_evaluated_doc(shared_datasets):
    ds = reasoning.load_gsm8k(data_dir=shared_datasets)["test"]  # no train file: pool = test split
    assert reasoning.DATA_PROVENANCE["gsm8k"]["fewshot_from_test_split"]
    pool = reasoning.FEWSHOT_POOLS["gsm8k"]
    sampler = reasoning.PoolSampler([])
    sampler.rnd = random.Random(0)
    for i in range(0, 1319, 7):
        shots = sampler.sample(8, eval_doc=ds[i])
        assert len(shots) == 8 and all(s["id"] != ds[i]["id"] for s in shots)
    # the draw is reproducible for a given seed
    a = reasoning.PoolSampler([]).set_rnd(5).sample(3, eval_doc=pool[0])
    b = reasoning.PoolSampler([]).set_rnd(5).sample(3, eval_doc=pool[0])
    assert a == b


@pytest.mark.parametrize("completion, strict, flex", [
    ("She pays 5 * 3 = 15 dollars.\n#### 18", 1.0, 1.0),
    ("The answer is 18.", 0.0, 1.0),
    ("#### 1,800", 0.0, 0.0),
    ("#### 18.0\nQuestion", 1.0, 1.0),
    ("18 apples, then 20", 0.0, 0.0),
])
def test_gsm8k_scoring(completion, strict, flex):
    doc = {"target": "18"}
    assert reasoning.gsm8k_process_results(doc, [completion]) == {"exact_match": strict, "exact_match_flex": flex}


def test_truthfulqa_mc2_is_normalised_mass_on_true_answers():
    import math

    doc = {"mc2_labels": [1, 1, 0]}
    lls = [(math.log(0.2), False), (math.log(0.2), False), (math.log(0.6), False)]
    assert reasoning.truthfulqa_mc2_process_results(doc, lls)["acc"] == pytest.approx(0.4)
