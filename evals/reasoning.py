"""Data, few-shot pools and scoring for the reasoning suite's lm-eval tasks (``evals/tasks/reasoning``).

Every task reads its upstream files from a local directory (``data_dir``) laid out like
``shared/datasets`` (see :data:`LOCAL_FILES`), or from the Hugging Face Hub when no local copy is
found and the machine is online. ``data_dir`` comes from lm-eval's task metadata
(``--metadata '{"data_dir": "..."}'`` on the ``lm_eval`` command line, ``TaskManager(metadata=...)``
in Python, or ``dsv41 compare --data-dir``) or from the ``DSV41_DATA_DIR`` environment variable.
If neither source has the data, :class:`MissingDataError` names the task, every path looked at and
the Hub dataset tried.

Few-shot examples never come from the evaluated document: each task registers a pool at load time
(the upstream train / dev split when present, else the evaluated split *minus the current
document*), and :class:`PoolSampler` draws from it with lm-eval's seeded RNG. MMLU uses the first
k dev questions of the same subject, as in the original benchmark.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Where each task's upstream files are looked for, relative to data_dir (first existing wins).
LOCAL_FILES: dict[str, dict[str, list[str]]] = {
    "arc_challenge": {"test": ["arc/ARC-Challenge/ARC-Challenge-Test.jsonl", "ARC-Challenge/ARC-Challenge-Test.jsonl"],
                      "fewshot": ["arc/ARC-Challenge/ARC-Challenge-Train.jsonl", "ARC-Challenge/ARC-Challenge-Train.jsonl",
                                  "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl", "ARC-Challenge/ARC-Challenge-Dev.jsonl"]},
    "arc_easy": {"test": ["arc/ARC-Easy/ARC-Easy-Test.jsonl", "ARC-Easy/ARC-Easy-Test.jsonl"],
                 "fewshot": ["arc/ARC-Easy/ARC-Easy-Train.jsonl", "ARC-Easy/ARC-Easy-Train.jsonl",
                             "arc/ARC-Easy/ARC-Easy-Dev.jsonl", "ARC-Easy/ARC-Easy-Dev.jsonl"]},
    "gsm8k": {"test": ["gsm8k/test.jsonl", "grade_school_math/data/test.jsonl"],
              "fewshot": ["gsm8k/train.jsonl", "grade_school_math/data/train.jsonl"]},
    "hellaswag": {"test": ["hellaswag/hellaswag_val.jsonl", "hellaswag/data/hellaswag_val.jsonl"],
                  "fewshot": ["hellaswag/hellaswag_train.jsonl", "hellaswag/data/hellaswag_train.jsonl"]},
    "mmlu": {"test": ["mmlu/test", "mmlu/data/test", "data/test"], "fewshot": ["mmlu/dev", "mmlu/data/dev", "data/dev"]},
    "truthfulqa": {"test": ["truthfulqa/v1/mc_task.json", "truthfulqa/mc_task.json", "truthfulqa/data/mc_task.json"]},
}
HUB_DATASETS = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "gsm8k": ("openai/gsm8k", "main"),
    "hellaswag": ("Rowan/hellaswag", None),
    "mmlu": ("cais/mmlu", "all"),
    "truthfulqa": ("truthfulqa/truthful_qa", "multiple_choice"),
}

# Few-shot pools registered by the loaders: key -> list of docs. Read by PoolSampler.
FEWSHOT_POOLS: dict[str, list[dict]] = {}
# What each loader actually read (task -> description), for reports.
DATA_PROVENANCE: dict[str, dict] = {}


class MissingDataError(FileNotFoundError):
    """A task's data was found neither locally nor on the Hub."""

    def __init__(self, task: str, looked_at: list[str], hub: str | None, reason: str = ""):
        self.task, self.looked_at, self.hub = task, looked_at, hub
        where = "; ".join(looked_at) if looked_at else "(no --data-dir / DSV41_DATA_DIR given)"
        msg = f"task {task!r}: data not found. Looked at: {where}."
        if hub:
            msg += f" Hugging Face Hub dataset {hub!r} was not usable" + (f" ({reason})" if reason else "") + "."
        msg += (f" Put the upstream files under --data-dir (expected layout: "
                f"{', '.join(LOCAL_FILES[_family(task)]['test'])}) or run online.")
        super().__init__(msg)


def _family(task: str) -> str:
    for fam in LOCAL_FILES:
        if task == fam or task.startswith(fam):
            return fam
    return task


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    value = data_dir or os.environ.get("DSV41_DATA_DIR")
    return Path(value).expanduser() if value else None


def _find(data_dir: Path | None, rels: list[str]) -> tuple[Path | None, list[str]]:
    looked = []
    if data_dir is None:
        return None, looked
    for rel in rels:
        path = data_dir / rel
        looked.append(str(path))
        if path.exists():
            return path, looked
    return None, looked


def _offline() -> bool:
    return any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub(task: str, looked: list[str]):
    name, config = HUB_DATASETS[_family(task)]
    if _offline():
        raise MissingDataError(task, looked, name, "offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set")
    import datasets

    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:  # network errors, missing configs, gated repos
        raise MissingDataError(task, looked, name, f"{type(exc).__name__}: {exc}") from exc


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_dataset(docs: list[dict], split: str):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def _register(task: str, pool: list[dict], source: str, test_source: str, n: int, pool_is_test: bool) -> None:
    FEWSHOT_POOLS[task] = pool
    DATA_PROVENANCE[task] = {"test": test_source, "fewshot": source, "n_docs": n, "fewshot_from_test_split": pool_is_test}


# --------------------------------------------------------------------------------------------
# ARC
# --------------------------------------------------------------------------------------------


def _arc_doc(row: dict, task: str) -> dict:
    if "question" in row and isinstance(row["question"], dict):  # AI2 jsonl release
        stem, choices = row["question"]["stem"], row["question"]["choices"]
        texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
    else:  # Hub layout
        stem, texts, labels = row["question"], list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"{task}: answerKey {key!r} not among choice labels {labels} (id {row.get('id')})")
    return {"_task": task, "id": str(row.get("id", "")), "question": stem, "choices": texts, "labels": labels,
            "gold": labels.index(key)}


def _load_arc(task: str, data_dir=None, **_):
    ddir = resolve_data_dir(data_dir)
    test_path, looked = _find(ddir, LOCAL_FILES[task]["test"])
    if test_path is not None:
        test = [_arc_doc(r, task) for r in _jsonl(test_path)]
        pool_path, _ = _find(ddir, LOCAL_FILES[task]["fewshot"])
        pool = [_arc_doc(r, task) for r in _jsonl(pool_path)] if pool_path else test
        _register(task, pool, str(pool_path or test_path), str(test_path), len(test), pool_path is None)
    else:
        ds = _hub(task, looked)
        test = [_arc_doc(r, task) for r in ds["test"]]
        pool = [_arc_doc(r, task) for r in ds["train"]]
        name = "/".join(x for x in HUB_DATASETS[task] if x)
        _register(task, pool, f"hub:{name}:train", f"hub:{name}:test", len(test), False)
    return _to_dataset(test, "test")


def load_arc_challenge(**kw):
    return _load_arc("arc_challenge", **kw)


def load_arc_easy(**kw):
    return _load_arc("arc_easy", **kw)


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")
_NUM = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def _gsm_doc(row: dict, i: int) -> dict:
    answer = _CALC.sub("", row["answer"])
    target = answer.split("####")[-1].strip().replace(",", "")
    return {"_task": "gsm8k", "id": str(i), "question": row["question"], "answer": answer, "target": target}


def load_gsm8k(data_dir=None, **_):
    ddir = resolve_data_dir(data_dir)
    test_path, looked = _find(ddir, LOCAL_FILES["gsm8k"]["test"])
    if test_path is not None:
        test = [_gsm_doc(r, i) for i, r in enumerate(_jsonl(test_path))]
        pool_path, _ = _find(ddir, LOCAL_FILES["gsm8k"]["fewshot"])
        pool = [_gsm_doc(r, i) for i, r in enumerate(_jsonl(pool_path))] if pool_path else test
        _register("gsm8k", pool, str(pool_path or test_path), str(test_path), len(test), pool_path is None)
    else:
        ds = _hub("gsm8k", looked)
        test = [_gsm_doc(r, i) for i, r in enumerate(ds["test"])]
        pool = [_gsm_doc(r, i) for i, r in enumerate(ds["train"])]
        _register("gsm8k", pool, "hub:openai/gsm8k:main:train", "hub:openai/gsm8k:main:test", len(test), False)
    return _to_dataset(test, "test")


def _norm_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def extract_gsm8k_answer(text: str, strict: bool) -> str | None:
    """strict: the number after the last '####'; flexible: the last number in the text."""
    if strict:
        m = re.findall(r"####\s*(" + _NUM.pattern + ")", text)
        return _norm_number(m[-1]) if m else None
    nums = _NUM.findall(text)
    return _norm_number(nums[-1]) if nums else None


def gsm8k_process_results(doc: dict, results: list[str]) -> dict:
    completion = results[0]
    gold = _norm_number(doc["target"])
    strict = extract_gsm8k_answer(completion, strict=True)
    flex = extract_gsm8k_answer(completion, strict=False)
    return {"exact_match": float(strict == gold), "exact_match_flex": float(flex == gold)}


# --------------------------------------------------------------------------------------------
# HellaSwag
# --------------------------------------------------------------------------------------------


def _hs_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"\s{2,}", " ", text)


def _hs_doc(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"_task": "hellaswag", "id": str(row.get("ind", "")), "query": _hs_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hs_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def load_hellaswag(data_dir=None, **_):
    ddir = resolve_data_dir(data_dir)
    test_path, looked = _find(ddir, LOCAL_FILES["hellaswag"]["test"])
    if test_path is not None:
        test = [_hs_doc(r) for r in _jsonl(test_path)]
        pool_path, _ = _find(ddir, LOCAL_FILES["hellaswag"]["fewshot"])
        pool = [_hs_doc(r) for r in _jsonl(pool_path)] if pool_path else test
        _register("hellaswag", pool, str(pool_path or test_path), str(test_path), len(test), pool_path is None)
    else:
        ds = _hub("hellaswag", looked)
        test = [_hs_doc(r) for r in ds["validation"]]
        pool = [_hs_doc(r) for r in ds["train"]]
        _register("hellaswag", pool, "hub:Rowan/hellaswag:train", "hub:Rowan/hellaswag:validation", len(test), False)
    return _to_dataset(test, "test")


# --------------------------------------------------------------------------------------------
# MMLU (upstream: header-less CSV "question,A,B,C,D,answer" per subject in data/{dev,test}/)
# --------------------------------------------------------------------------------------------


def _mmlu_rows(folder: Path, split: str) -> list[dict]:
    docs = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        with open(path, encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                    raise ValueError(f"mmlu: {path} line {i + 1}: expected 6 columns 'question,A,B,C,D,answer' "
                                     f"with answer in A-D (the original header-less format); got {row[:6]!r}")
                docs.append({"_task": "mmlu", "id": f"{subject}-{i}", "subject": subject, "question": row[0],
                             "choices": row[1:5], "gold": "ABCD".index(row[5].strip())})
    return docs


def _mmlu_register(test: list[dict], dev: list[dict], test_src: str, dev_src: str) -> None:
    by_subject: dict[str, list[dict]] = {}
    for d in dev:
        by_subject.setdefault(d["subject"], []).append(d)
    for subject, docs in by_subject.items():
        FEWSHOT_POOLS[f"mmlu:{subject}"] = docs
    DATA_PROVENANCE["mmlu"] = {"test": test_src, "fewshot": dev_src + " (first k dev questions of the same subject)",
                               "n_docs": len(test), "fewshot_from_test_split": False}


def load_mmlu(data_dir=None, **_):
    ddir = resolve_data_dir(data_dir)
    test_dir, looked = _find(ddir, LOCAL_FILES["mmlu"]["test"])
    if test_dir is not None and any(test_dir.glob("*_test.csv")):
        dev_dir, _dev_looked = _find(ddir, LOCAL_FILES["mmlu"]["fewshot"])
        test = _mmlu_rows(test_dir, "test")
        dev = _mmlu_rows(dev_dir, "dev") if dev_dir else []
        _mmlu_register(test, dev, str(test_dir), str(dev_dir) if dev_dir else "none (0-shot only)")
    else:
        if test_dir is not None:
            looked.append(f"{test_dir}/*_test.csv (no files)")
        ds = _hub("mmlu", looked)

        def conv(split):
            return [{"_task": "mmlu", "id": f"{r['subject']}-{i}", "subject": r["subject"], "question": r["question"],
                     "choices": list(r["choices"]), "gold": int(r["answer"])} for i, r in enumerate(ds[split])]

        test = conv("test")
        _mmlu_register(test, conv("dev"), "hub:cais/mmlu:all:test", "hub:cais/mmlu:all:dev")
    return _to_dataset(test, "test")


def mmlu_subject_name(subject: str) -> str:
    return subject.replace("_", " ")


# --------------------------------------------------------------------------------------------
# TruthfulQA (multiple choice; mc_task.json from sylinrl/TruthfulQA)
# --------------------------------------------------------------------------------------------


def _tqa_doc(question: str, mc1: dict, mc2: dict, i: int) -> dict:
    mc1_choices, mc1_labels = list(mc1.keys()), [int(v) for v in mc1.values()]
    if mc1_labels.count(1) != 1:
        raise ValueError(f"truthfulqa: question {i} has {mc1_labels.count(1)} true mc1 answers, expected 1")
    gold = mc1_labels.index(1)
    return {"_task": "truthfulqa", "id": str(i), "question": question, "mc1_choices": mc1_choices, "mc1_gold": gold,
            "mc2_choices": list(mc2.keys()), "mc2_labels": [int(v) for v in mc2.values()]}


def load_truthfulqa(data_dir=None, **_):
    ddir = resolve_data_dir(data_dir)
    path, looked = _find(ddir, LOCAL_FILES["truthfulqa"]["test"])
    if path is not None:
        rows = json.loads(path.read_text(encoding="utf-8"))
        test = [_tqa_doc(r["question"], r["mc1_targets"], r["mc2_targets"], i) for i, r in enumerate(rows)]
        src = str(path)
    else:
        ds = _hub("truthfulqa", looked)
        test = []
        for i, r in enumerate(ds["validation"]):
            mc1 = dict(zip(r["mc1_targets"]["choices"], r["mc1_targets"]["labels"]))
            mc2 = dict(zip(r["mc2_targets"]["choices"], r["mc2_targets"]["labels"]))
            test.append(_tqa_doc(r["question"], mc1, mc2, i))
        src = "hub:truthfulqa/truthful_qa:multiple_choice:validation"
    _register("truthfulqa", test, src + " (0-shot task; few-shot would draw other questions)", src, len(test), True)
    return _to_dataset(test, "test")


def truthfulqa_mc2_process_results(doc: dict, results) -> dict:
    import numpy as np

    lls = np.array([r[0] for r in results], dtype=np.float64)
    probs = np.exp(lls - lls.max())
    probs /= probs.sum()
    labels = np.array(doc["mc2_labels"])
    return {"acc": float(probs[labels == 1].sum())}


# --------------------------------------------------------------------------------------------
# Few-shot sampler
# --------------------------------------------------------------------------------------------

try:
    from lm_eval.api.samplers import ContextSampler as _Base
except ImportError:  # pragma: no cover - lm-eval is an optional dependency of the package
    _Base = object


class PoolSampler(_Base):
    """Draws few-shot examples from the pool its task registered, never the evaluated doc itself.

    The tasks set ``fewshot_split`` to their test split so that lm-eval hands the evaluated
    document to :meth:`sample`; the examples come from :data:`FEWSHOT_POOLS`. MMLU pools are per
    subject and taken in file order (first k), the others are sampled with lm-eval's seeded RNG.
    """

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        if n <= 0:
            return []
        if eval_doc is None:
            raise ValueError("PoolSampler needs the evaluated document (fewshot_split must equal test_split)")
        task = eval_doc["_task"]
        if task == "mmlu":
            pool = FEWSHOT_POOLS.get(f"mmlu:{eval_doc['subject']}", [])
            if len(pool) < n:
                raise ValueError(f"mmlu: {n}-shot needs {n} dev questions for subject {eval_doc['subject']!r}, "
                                 f"found {len(pool)} (dev files: {DATA_PROVENANCE.get('mmlu', {}).get('fewshot')})")
            return pool[:n]
        pool = FEWSHOT_POOLS.get(task)
        if pool is None:
            raise ValueError(f"{task}: no few-shot pool registered (was the task's dataset loaded?)")
        key = _doc_key(eval_doc)
        rnd = self.rnd if hasattr(self, "rnd") else random.Random(0)
        if len(pool) - 1 < n:
            raise ValueError(f"{task}: {n}-shot requested but the few-shot pool has only {len(pool)} examples")
        picked = [pool[i] for i in rnd.sample(range(len(pool)), n + 1)]
        return [d for d in picked if _doc_key(d) != key][:n]


def _doc_key(doc: dict) -> tuple:
    return doc.get("id"), doc.get("question", doc.get("query"))
