"""Our checkpoints under lm-eval: `--model hf ... trust_remote_code=True` and the registered `dsv41` model."""

from __future__ import annotations

import math

import pytest
from dsv41.evals.compare import TASKS_DIR


@pytest.fixture(scope="module")
def tiny_v4_dir(tmp_path_factory, tiny_tokenizer_dir):
    from dsv41.evals.testing import make_tiny_v4

    return make_tiny_v4(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_v4"), seed=0)


def _evaluate(model, model_args, shared_datasets, tasks=("dsv41_arc_easy", "dsv41_truthfulqa_mc2"), **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(shared_datasets)})
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=4, num_fewshot=0,
                                   task_manager=tm, log_samples=True, bootstrap_iters=0, **kw)


def _loglikelihoods(res, task):
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"][task]}


def test_hf_backend_with_trust_remote_code_and_dsv41_model_agree(tiny_v4_dir, shared_datasets):
    import dsv41.evals.lm_model  # noqa: F401 - registers "dsv41"

    hf = _evaluate("hf", f"pretrained={tiny_v4_dir},trust_remote_code=True,device=cpu,dtype=float32", shared_datasets,
                   batch_size=1)
    ours = _evaluate("dsv41", f"pretrained={tiny_v4_dir},moe_backend=reference,dtype=float32", shared_datasets,
                     batch_size=4)
    # the hf path really ran our modeling code (the checkpoint's auto_map), not transformers' class
    assert hf["config"]["model"] == "hf" and ours["config"]["model"] == "dsv41"
    assert ours["config"].get("dsv41_moe_backend") == "reference"
    for task in ("dsv41_arc_easy", "dsv41_truthfulqa_mc2"):
        a, b = _loglikelihoods(hf, task), _loglikelihoods(ours, task)
        assert a.keys() == b.keys() and len(a) == 4
        for doc_id in a:  # batch 1 vs batched (padded) requests give the same log-likelihoods
            assert all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4) for x, y in zip(a[doc_id], b[doc_id]))
        assert math.isfinite(ours["results"][task]["acc,none"])


def test_dsv41_model_generation_and_options(tiny_v4_dir, shared_datasets):
    import dsv41.evals.lm_model  # noqa: F401

    res = _evaluate("dsv41", f"pretrained={tiny_v4_dir},moe_backend=auto", shared_datasets, tasks=("dsv41_gsm8k",),
                    gen_kwargs="max_gen_toks=4", batch_size=2)
    samples = res["samples"]["dsv41_gsm8k"]
    assert len(samples) == 4 and all(isinstance(s["resps"][0][0], str) for s in samples)
    with pytest.raises(ValueError, match="quantization: expected one of"):
        _evaluate("dsv41", f"pretrained={tiny_v4_dir},quantization=fp3", shared_datasets, tasks=("dsv41_arc_easy",))
