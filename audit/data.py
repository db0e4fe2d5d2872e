"""Readers for the audit datasets in their upstream, original formats.

A data root has the layout of the upstream repositories' data files (the same layout as
``shared/datasets``)::

    bbq/*.jsonl                                   nyu-mll/BBQ data/<Category>.jsonl
    crows_pairs/*.csv                             nyu-mll/crows-pairs crows_pairs_anonymized.csv
    stereoset/*.json                              StereoSet dev.json / test.json ("intrasentence")
    winobias/{pro,anti}_stereotyped_type{1,2}.txt.test  + male/female_occupations.txt
    winogender/all_sentences.tsv + occupations-stats.tsv
    bold/prompts/*_prompt.json
    harmbench/harmbench_behaviors_text_test.csv (or _all / _val)
    advbench/harmful_behaviors.csv
    xstest/xstest_prompts.csv
    truthfulqa/v1/mc_task.json (or truthfulqa/mc_task.json)
    toxigen/prompts/<label>_<group>[_1k].txt

The default root is ``audit/probes`` (our own small probe sets in the same formats, so the
default run works offline). ``hf://datasets/OWNER/NAME[@REVISION]`` downloads a Hub dataset
repository that holds these files. Every reader raises :class:`DataError` naming the file and
the row for malformed input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PROBES_DIR = Path(__file__).resolve().parent / "probes"
ENV_DATA_DIR = "DSV41_AUDIT_DATA_DIR"

# Phrasings of the "can't be determined" option offered for every BBQ item (the ten used by
# BBQ itself; HELM and lm-eval offer all of them so that wording does not decide the answer).
BBQ_UNKNOWN_PHRASES = [
    "Unknown",
    "Cannot answer",
    "Can't be determined",
    "Cannot be determined",
    "Can't answer",
    "Not known",
    "Not enough info",
    "Not enough information",
    "Not answerable",
    "Undetermined",
]


class DataError(ValueError):
    """A data file is missing or has a malformed row (the message names file and row)."""


@dataclass
class LoadedData:
    docs: list[dict]
    files: list[Path]
    root: Path
    source: str  # "probes" | "data-dir" | "hub"
    n_total: int = 0
    extra: dict = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_root(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
    data_dir = data_dir or os.environ.get(ENV_DATA_DIR) or None
    if data_dir is None:
        return PROBES_DIR, "probes"
    s = str(data_dir)
    if s.startswith("hf://datasets/"):
        from huggingface_hub import snapshot_download

        repo = s[len("hf://datasets/") :]
        repo, _, revision = repo.partition("@")
        try:
            local = snapshot_download(repo_id=repo, repo_type="dataset", revision=revision or None)
        except Exception as exc:  # network / auth / missing repo
            raise DataError(f"cannot download dataset repository {repo!r} from the Hub: {exc}") from exc
        return Path(local), "hub"
    root = Path(s).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"--data-dir {s!r} is not a directory")
    return root, "data-dir"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: expected file {path} is missing")
    return path


def _glob(root: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{what}: no files match {root / pattern}")
    return files


def _read_csv(path: Path, required: list[str], encoding: str = "utf-8") -> list[dict]:
    text = path.read_text(encoding=encoding)
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {missing} (found {reader.fieldnames})")
    rows = []
    for i, row in enumerate(reader, start=2):
        if None in row or any(v is None for k, v in row.items() if k in required):
            raise DataError(f"{path}: row {i} has the wrong number of fields")
        row["_row"] = i
        rows.append(row)
    return rows


def stratified_limit(docs: list[dict], key, limit: int | None) -> list[dict]:
    """Keep ``limit`` docs, taking them round-robin over the groups given by ``key`` (groups in
    first-appearance order, docs in file order) so that every group stays represented."""
    if limit is None or limit <= 0 or limit >= len(docs):
        return docs
    groups: dict = defaultdict(list)
    for d in docs:
        groups[key(d)].append(d)
    out, queues = [], [list(v) for v in groups.values()]
    while len(out) < limit:
        progressed = False
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
                progressed = True
        if not progressed:
            break
    order = {id(d): i for i, d in enumerate(docs)}
    return sorted(out, key=lambda d: order[id(d)])


# ---------------------------------------------------------------------------------------------
# BBQ
# ---------------------------------------------------------------------------------------------

_BBQ_FIELDS = ["example_id", "question_polarity", "context_condition", "category", "context", "question",
               "ans0", "ans1", "ans2", "label", "answer_info", "additional_metadata"]


def _bbq_group_tokens(info: list, split: bool) -> set[str]:
    """Group tags of one answer: its answer_info elements (lower-cased); with ``split`` also
    their parts (for intersectional tags like ``F-Black``) and F/M for woman/man words."""
    toks = {str(el).lower() for el in info}
    if split:
        for el in list(toks):
            toks.update(p for p in re.split(r"[-_ ]", el) if p)
        if toks & {"woman", "girl"}:
            toks.add("f")
        if toks & {"man", "boy"}:
            toks.add("m")
    return toks


def bbq_row_to_doc(row: dict, where: str) -> dict:
    for k in _BBQ_FIELDS:
        if k not in row:
            raise DataError(f"{where}: missing field {k!r}")
    if row["context_condition"] not in ("ambig", "disambig"):
        raise DataError(f"{where}: context_condition must be ambig/disambig, got {row['context_condition']!r}")
    if row["question_polarity"] not in ("neg", "nonneg"):
        raise DataError(f"{where}: question_polarity must be neg/nonneg, got {row['question_polarity']!r}")
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {row['label']!r} is not an integer") from None
    if label not in (0, 1, 2):
        raise DataError(f"{where}: label {label} is not 0, 1 or 2")
    info = row["answer_info"]
    answers = [str(row[f"ans{i}"]) for i in range(3)]
    unk = [i for i in range(3) if str(info.get(f"ans{i}", ["", ""])[-1]).lower() == "unknown"]
    if len(unk) != 1:
        raise DataError(f"{where}: expected exactly one answer tagged 'unknown' in answer_info, found {len(unk)}")
    unk_i = unk[0]
    stereotyped = {str(g).lower() for g in row["additional_metadata"].get("stereotyped_groups", [])}
    known = [i for i in range(3) if i != unk_i]
    targets = [i for i in known if _bbq_group_tokens(info[f"ans{i}"], False) & stereotyped]
    if not targets:
        targets = [i for i in known if _bbq_group_tokens(info[f"ans{i}"], True) & stereotyped]
    if row["question_polarity"] == "neg":
        biased_orig = targets
    else:
        biased_orig = [i for i in known if i not in targets] if targets else []
    # choices: the two known answers (file order) then every unknown phrasing
    choices = [answers[i] for i in known] + list(BBQ_UNKNOWN_PHRASES)
    unknown_idx = list(range(2, 2 + len(BBQ_UNKNOWN_PHRASES)))
    if label == unk_i:
        correct = unknown_idx
    else:
        correct = [known.index(label)]
    biased = [known.index(i) for i in biased_orig]
    return {
        "item_id": f"{row['category']}:{row['example_id']}",
        "category": str(row["category"]),
        "context_condition": row["context_condition"],
        "question_polarity": row["question_polarity"],
        "context": str(row["context"]),
        "question": str(row["question"]),
        "choices": choices,
        "target": correct[0],
        "correct_idx": correct,
        "biased_idx": biased,
        "unknown_idx": unknown_idx,
    }


def load_bbq(root: Path) -> tuple[list[dict], list[Path]]:
    files = _glob(root, "bbq/*.jsonl", "BBQ")
    docs = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{f}: line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            docs.append(bbq_row_to_doc(row, where))
    return docs, files


# ---------------------------------------------------------------------------------------------
# CrowS-Pairs, StereoSet
# ---------------------------------------------------------------------------------------------

CROWS_BIAS_TYPES = ["race-color", "gender", "socioeconomic", "nationality", "religion", "age",
                    "sexual-orientation", "physical-appearance", "disability"]


def load_crows(root: Path) -> tuple[list[dict], list[Path]]:
    files = _glob(root, "crows_pairs/*.csv", "CrowS-Pairs")
    docs = []
    for f in files:
        for row in _read_csv(f, ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]):
            where = f"{f}: row {row['_row']}"
            if not row["sent_more"].strip() or not row["sent_less"].strip():
                raise DataError(f"{where}: empty sentence")
            if row["stereo_antistereo"] not in ("stereo", "antistereo"):
                raise DataError(f"{where}: stereo_antistereo must be stereo/antistereo, got {row['stereo_antistereo']!r}")
            if row["bias_type"] not in CROWS_BIAS_TYPES:
                raise DataError(f"{where}: unknown bias_type {row['bias_type']!r}")
            idx = row.get("") or str(row["_row"] - 2)
            docs.append({
                "item_id": f"{f.stem}:{idx}",
                "sent_more": row["sent_more"],
                "sent_less": row["sent_less"],
                "stereo_antistereo": row["stereo_antistereo"],
                "bias_type": row["bias_type"],
            })
    return docs, files


def load_stereoset(root: Path) -> tuple[list[dict], list[Path]]:
    files = _glob(root, "stereoset/*.json", "StereoSet")
    docs = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            examples = data["data"]["intrasentence"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{f}: not a StereoSet file with data.intrasentence ({exc})") from None
        for n, ex in enumerate(examples):
            where = f"{f}: intrasentence[{n}]"
            try:
                by_label = {s["gold_label"]: s["sentence"] for s in ex["sentences"]}
                doc = {
                    "item_id": str(ex["id"]),
                    "target": str(ex["target"]),
                    "bias_type": str(ex["bias_type"]),
                    "context": str(ex["context"]),
                    "s_stereo": by_label["stereotype"],
                    "s_anti": by_label["anti-stereotype"],
                    "s_unrel": by_label["unrelated"],
                }
            except (KeyError, TypeError) as exc:
                raise DataError(f"{where}: missing field or gold label {exc}") from None
            if len(ex["sentences"]) != 3:
                raise DataError(f"{where}: expected 3 sentences, found {len(ex['sentences'])}")
            doc["choices"] = [doc["s_stereo"], doc["s_anti"], doc["s_unrel"]]
            docs.append(doc)
    return docs, files


# ---------------------------------------------------------------------------------------------
# WinoBias, Winogender
# ---------------------------------------------------------------------------------------------

_WB_LINE = re.compile(r"^(\d+)\s+(.*)$")
_BRACKET = re.compile(r"\[([^\]]+)\]")


def _strip_det(s: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", s.strip(), flags=re.I).strip()


def winobias_parse(line: str, occupations: list[str], where: str) -> dict:
    m = _WB_LINE.match(line.strip())
    if not m:
        raise DataError(f"{where}: expected '<n> <sentence>'")
    text = m.group(2)
    mentions = _BRACKET.findall(text)
    if len(mentions) < 2:
        raise DataError(f"{where}: expected bracketed antecedent and pronoun, found {len(mentions)} bracketed mention(s)")
    gold, pronoun = _strip_det(mentions[0]).lower(), mentions[1].strip()
    sentence = _BRACKET.sub(lambda mm: mm.group(1), text)
    sentence = re.sub(r"\s+", " ", sentence).strip()
    low = sentence.lower()
    found = []
    for occ in sorted(occupations, key=len, reverse=True):
        for mm in re.finditer(r"\b" + re.escape(occ.lower()) + r"s?\b", low):
            if not any(a <= mm.start() < b for a, b, _ in found):
                found.append((mm.start(), mm.end(), occ.lower()))
    others = sorted((s, o) for s, _, o in found if o != gold and o not in gold and gold not in o)
    if not others:
        raise DataError(f"{where}: cannot find the second occupation in {sentence!r}")
    other = others[0][1]
    gold_pos = low.find(gold)
    pair = sorted([(gold_pos, gold), (others[0][0], other)])
    choices = [f" the {o}" for _, o in pair]
    return {
        "sentence": sentence,
        "pronoun": pronoun,
        "choices": choices,
        "target": [o for _, o in pair].index(gold),
    }


def load_winobias(root: Path) -> tuple[list[dict], list[Path]]:
    occ_files = [_need(root / "winobias" / f"{g}_occupations.txt", "WinoBias") for g in ("male", "female")]
    occupations = []
    for f in occ_files:
        occupations += [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    files, docs = [], []
    for typ in ("1", "2"):
        for stereo in ("pro", "anti"):
            f = _need(root / "winobias" / f"{stereo}_stereotyped_type{typ}.txt.test", "WinoBias")
            files.append(f)
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                d = winobias_parse(line, occupations, f"{f}: line {n}")
                d.update({"item_id": f"type{typ}.{stereo}.{n}", "type": f"type{typ}", "stereotype": stereo})
                docs.append(d)
    return docs, occ_files + files


_PRONOUNS = {"male": ["he", "his", "him"], "female": ["she", "her"], "neutral": ["they", "their", "them"]}


def load_winogender(root: Path) -> tuple[list[dict], list[Path]]:
    sent_f = _need(root / "winogender" / "all_sentences.tsv", "Winogender")
    stats_f = _need(root / "winogender" / "occupations-stats.tsv", "Winogender")
    stats = {}
    for n, line in enumerate(stats_f.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            stats[parts[0]] = float(parts[2])
        except (IndexError, ValueError):
            raise DataError(f"{stats_f}: line {n}: expected occupation<TAB>bergsma<TAB>bls_pct_female") from None
    docs = []
    for n, line in enumerate(sent_f.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if not line.strip():
            continue
        where = f"{sent_f}: line {n}"
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{where}: expected 2 tab-separated fields")
        sentid, sentence = parts
        bits = sentid.split(".")
        if len(bits) != 5 or bits[2] not in ("0", "1") or bits[3] not in _PRONOUNS:
            raise DataError(f"{where}: malformed sentid {sentid!r}")
        occ, part, answer, gender = bits[0], bits[1], int(bits[2]), bits[3]
        words = re.findall(r"[A-Za-z]+", sentence)
        pron = next((w for w in words if w.lower() in _PRONOUNS[gender]), None)
        if pron is None:
            raise DataError(f"{where}: no {gender} pronoun in sentence")
        if occ not in stats:
            raise DataError(f"{where}: occupation {occ!r} not in {stats_f.name}")
        if gender == "neutral":
            stereo = "neutral"
        else:
            majority = "female" if stats[occ] > 50.0 else "male"
            # pro-stereotypical: the stereotyped reading (pronoun gender = occupation majority
            # <=> the pronoun refers to the occupation) is the correct one
            stereo = "pro" if (gender == majority) == (answer == 0) else "anti"
        other = " someone" if part == "someone" else f" the {part}"
        docs.append({
            "item_id": sentid, "occupation": occ, "participant": part, "gender": gender,
            "sentence": sentence, "pronoun": pron, "choices": [f" the {occ}", other],
            "target": answer, "stereotype": stereo,
        })
    return docs, [sent_f, stats_f]


# ---------------------------------------------------------------------------------------------
# BOLD, harmful requests, XSTest, TruthfulQA, toxicity prompts
# ---------------------------------------------------------------------------------------------


def load_bold(root: Path) -> tuple[list[dict], list[Path]]:
    files = _glob(root, "bold/prompts/*_prompt.json", "BOLD")
    docs = []
    for f in files:
        domain = f.name[: -len("_prompt.json")]
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise DataError(f"{f}: expected {{group: {{entity: [prompts]}}}}")
        for group, ents in data.items():
            if not isinstance(ents, dict):
                raise DataError(f"{f}: group {group!r}: expected {{entity: [prompts]}}")
            for ent, prompts in ents.items():
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise DataError(f"{f}: {group}/{ent}: expected a list of prompt strings")
                for k, p in enumerate(prompts):
                    if not p.strip():  # a few upstream prompts are empty strings: nothing to continue
                        continue
                    docs.append({"item_id": f"{domain}/{group}/{ent}/{k}", "domain": domain,
                                 "group": group, "entity": ent, "prompt": p})
    return docs, files


def load_harmful(root: Path) -> tuple[list[dict], list[Path]]:
    docs, files = [], []
    hb = None
    for name in ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_all.csv", "harmbench_behaviors_text_val.csv"):
        if (root / "harmbench" / name).exists():
            hb = root / "harmbench" / name
            break
    if hb is not None:
        files.append(hb)
        for row in _read_csv(hb, ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"]):
            if not row["Behavior"].strip() or not row["BehaviorID"].strip():
                raise DataError(f"{hb}: row {row['_row']}: empty Behavior or BehaviorID")
            prompt = row["Behavior"].strip()
            if row["ContextString"].strip():
                prompt = row["ContextString"].strip() + "\n\n---\n\n" + prompt
            docs.append({"item_id": f"harmbench:{row['BehaviorID']}", "source": "harmbench",
                         "category": row["SemanticCategory"] or "unspecified",
                         "functional_category": row["FunctionalCategory"], "prompt": prompt})
    ab = root / "advbench" / "harmful_behaviors.csv"
    if ab.exists():
        files.append(ab)
        for row in _read_csv(ab, ["goal", "target"]):
            if not row["goal"].strip():
                raise DataError(f"{ab}: row {row['_row']}: empty goal")
            docs.append({"item_id": f"advbench:{row['_row'] - 2}", "source": "advbench", "category": "advbench",
                         "functional_category": "standard", "prompt": row["goal"].strip()})
    if not files:
        raise DataError(f"harmful requests: neither {root / 'harmbench'}/harmbench_behaviors_text_*.csv nor {ab} exists")
    return docs, files


def load_xstest(root: Path) -> tuple[list[dict], list[Path]]:
    f = _need(root / "xstest" / "xstest_prompts.csv", "XSTest")
    docs = []
    for row in _read_csv(f, ["id", "prompt", "type", "label"]):
        if row["label"] not in ("safe", "unsafe"):
            raise DataError(f"{f}: row {row['_row']}: label must be safe/unsafe, got {row['label']!r}")
        if not row["prompt"].strip():
            raise DataError(f"{f}: row {row['_row']}: empty prompt")
        docs.append({"item_id": f"xstest:{row['id']}", "type": row["type"], "label": row["label"],
                     "focus": row.get("focus") or "", "prompt": row["prompt"].strip()})
    return docs, [f]


def _tqa_targets(obj, key: str, where: str) -> tuple[list[str], list[int]]:
    t = obj.get(key)
    if not isinstance(t, dict) or not t:
        raise DataError(f"{where}: missing or empty {key}")
    choices, labels = list(t.keys()), [int(v) for v in t.values()]
    if any(v not in (0, 1) for v in labels) or 1 not in labels:
        raise DataError(f"{where}: {key} labels must be 0/1 with at least one 1")
    return choices, labels


def load_truthfulqa(root: Path) -> tuple[list[dict], list[Path]]:
    f = None
    for cand in ("truthfulqa/v1/mc_task.json", "truthfulqa/mc_task.json"):
        if (root / cand).exists():
            f = root / cand
            break
    if f is None:
        raise DataError(f"TruthfulQA: neither {root}/truthfulqa/v1/mc_task.json nor truthfulqa/mc_task.json exists")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON ({exc.msg})") from None
    docs = []
    for n, obj in enumerate(data):
        where = f"{f}: item {n}"
        if not isinstance(obj, dict) or not str(obj.get("question", "")).strip():
            raise DataError(f"{where}: missing question")
        c1, l1 = _tqa_targets(obj, "mc1_targets", where)
        c2, l2 = _tqa_targets(obj, "mc2_targets", where)
        if sum(l1) != 1:
            raise DataError(f"{where}: mc1_targets must have exactly one true answer")
        docs.append({"item_id": f"truthfulqa:{n}", "question": obj["question"], "mc1_choices": c1,
                     "mc1_labels": l1, "mc2_choices": c2, "mc2_labels": l2,
                     "mc1_target": l1.index(1)})
    return docs, [f]


_TOX_NAME = re.compile(r"^(?P<label>[a-z]+)_(?P<group>.+?)(?:_1k)?\.txt$")


def load_toxicity(root: Path) -> tuple[list[dict], list[Path]]:
    files = _glob(root, "toxigen/prompts/*.txt", "toxicity prompts")
    docs = []
    for f in files:
        m = _TOX_NAME.match(f.name)
        if not m:
            raise DataError(f"{f}: file name must be <label>_<group>[_1k].txt")
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            prompt = line.rstrip().replace("\\n", "\n")
            if not prompt.endswith("\n-"):
                prompt = prompt.rstrip("-").rstrip() + "\n-"
            docs.append({"item_id": f"{f.stem}:{n}", "label": m["label"], "group": m["group"], "prompt": prompt})
    return docs, files


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

LOADERS = {
    "bbq": (load_bbq, lambda d: (d["category"], d["context_condition"])),
    "crows_pairs": (load_crows, lambda d: d["bias_type"]),
    "stereoset": (load_stereoset, lambda d: d["bias_type"]),
    "winobias": (load_winobias, lambda d: (d["type"], d["stereotype"])),
    "winogender": (load_winogender, lambda d: (d["gender"], d["target"])),
    "bold": (load_bold, lambda d: (d["domain"], d["group"])),
    "harmful": (load_harmful, lambda d: d["category"]),
    "xstest": (load_xstest, lambda d: d["type"]),
    "truthfulqa": (load_truthfulqa, lambda d: 0),
    "toxicity": (load_toxicity, lambda d: (d["label"], d["group"])),
}


def load(dataset: str, data_dir=None, limit: int | None = None) -> LoadedData:
    if dataset not in LOADERS:
        raise DataError(f"unknown dataset {dataset!r}; known: {sorted(LOADERS)}")
    root, source = resolve_root(data_dir)
    reader, key = LOADERS[dataset]
    docs, files = reader(root)
    if not docs:
        raise DataError(f"{dataset}: no items found under {root}")
    seen = set()
    for d in docs:
        if d["item_id"] in seen:
            raise DataError(f"{dataset}: duplicate item id {d['item_id']!r} under {root}")
        seen.add(d["item_id"])
    n_total = len(docs)
    docs = stratified_limit(docs, key, int(limit) if limit else None)
    return LoadedData(docs=docs, files=files, root=root, source=source, n_total=n_total)


def as_hf_dataset(docs: list[dict]):
    """DatasetDict with one ``test`` split, as lm-eval's ``custom_dataset`` hook expects."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
