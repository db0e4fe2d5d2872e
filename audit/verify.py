"""``dsv41 audit verify DIR``: re-check a finished report from its files.

Checks: the report validates against the versioned JSON Schema; the samples file has the
recorded SHA-256 and record count; every per-record score that can be recomputed from the
published text is recomputed (rule judge label, lexicon sentiment, lexicon toxicity) and every
metric with its bootstrap CI is recomputed from the records; the SHA-256 of every weight file,
the config, the tokenizer files, the task files and the dataset files are recomputed; optionally
the redaction commitments are opened with the auditor's salt and unredacted samples.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsv41.audit import data as D
from dsv41.audit import judges as J
from dsv41.audit.runner import TASKS_DIR, commitment, validate_against_schema
from dsv41.audit.schema import Report
from dsv41.audit.scoring import compute_metrics


class VerificationError(RuntimeError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("audit report verification FAILED:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_hashes(root: Path, entries: list[dict], what: str, problems: list[str]) -> None:
    for e in entries:
        p = root / e["path"]
        if not p.is_file():
            problems.append(f"{what}: {p} is missing")
        elif D.sha256_file(p) != e["sha256"]:
            problems.append(f"{what}: SHA-256 of {p} differs from the report")


def verify(report_dir: str | Path, *, model_dir: str | None = None, data_dir: str | None = None,
           salt_file: str | None = None, unredacted: str | None = None, check_weights: bool = True) -> dict:
    d = Path(report_dir)
    problems: list[str] = []
    rp = d / "report.json"
    if not rp.is_file():
        raise VerificationError([f"{rp} does not exist (an unfinished or wrong directory)"])
    report = json.loads(rp.read_text(encoding="utf-8"))
    try:
        validate_against_schema(report)
        Report.model_validate(report)
    except Exception as exc:  # jsonschema / pydantic
        raise VerificationError([f"report.json does not match the schema: {str(exc).splitlines()[0]}"]) from exc

    sp = d / report["samples"]["file"]
    if not sp.is_file():
        raise VerificationError([f"samples file {sp} is missing"])
    raw = sp.read_bytes()
    import hashlib

    if hashlib.sha256(raw).hexdigest() != report["samples"]["sha256"]:
        problems.append(f"{sp.name}: SHA-256 differs from report.samples.sha256 (samples were changed)")
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if len(records) != report["samples"]["n_records"]:
        problems.append(f"{sp.name}: {len(records)} records, report says {report['samples']['n_records']}")

    # per-record scores that can be recomputed from published text
    rule = J.RuleRefusalJudge()
    lexicon_tox = report["judge"]["toxicity_scorer"]["name"] == J.LexiconToxicity.name
    for r in records:
        out = r.get("output")
        sc = r.get("scores", {})
        where = f"{r['task']}/{r['item_id']}"
        if out is None:
            continue
        if "judges" in sc:
            lab = rule.classify(out).label
            if sc["judges"].get(rule.name) != lab:
                problems.append(f"{where}: rule judge says {lab!r}, record says {sc['judges'].get(rule.name)!r}")
        if "sentiment" in sc and abs(J.lexicon_sentiment(out) - sc["sentiment"]) > 1e-12:
            problems.append(f"{where}: sentiment {sc['sentiment']} != recomputed {J.lexicon_sentiment(out)}")
        if lexicon_tox and "toxicity" in sc and abs(J.LexiconToxicity().score([out])[0] - sc["toxicity"]) > 1e-12:
            problems.append(f"{where}: toxicity {sc['toxicity']} != recomputed")
    for r in records:
        if "judges" in r.get("scores", {}) and r["scores"].get("refused") != int(
                r["scores"]["judges"].get(report["judge"]["primary"]) == J.REFUSAL):
            problems.append(f"{r['task']}/{r['item_id']}: 'refused' does not follow from the primary judge label")

    # metrics from records
    s = report["settings"]
    recomputed = []
    for task in s["tasks"]:
        recomputed += compute_metrics(task, [r for r in records if r["task"] == task],
                                      seed=s["seeds"]["bootstrap"], iters=s["bootstrap_iters"])
    key = lambda m: (m["task"], m["metric"], m["group"])  # noqa: E731
    have = {key(m): m for m in report["metrics"]}
    again = {key(m): m for m in recomputed}
    for k in sorted(set(have) | set(again)):
        if k not in again:
            problems.append(f"metric {k} is in the report but cannot be computed from the samples")
        elif k not in have:
            problems.append(f"metric {k} follows from the samples but is missing from the report")
        elif have[k] != again[k]:
            a, b = have[k], again[k]
            problems.append(f"metric {'/'.join(k)}: report value={a['value']} CI=[{a['ci_low']}, {a['ci_high']}] n={a['n']}, "
                            f"recomputed value={b['value']} CI=[{b['ci_low']}, {b['ci_high']}] n={b['n']}")

    # judge agreement
    ag = report["judge"].get("agreement")
    if ag:
        from dsv41.audit.runner import judge_agreement

        if judge_agreement(records, ag["judges"]) != ag:
            problems.append("judge agreement (kappa / disagreements) does not match the samples")

    # fingerprints
    if check_weights:
        mdir = Path(model_dir) if model_dir else Path(report["model"]["local_path"])
        if not mdir.is_dir():
            problems.append(f"model directory {mdir} not found (pass --model DIR, or --no-weights to skip)")
        else:
            _check_hashes(mdir, report["model"]["weight_files"], "weights", problems)
            _check_hashes(mdir, report["model"]["tokenizer_files"], "tokenizer", problems)
            cfg = mdir / "config.json"
            if report["model"]["config_sha256"] and (not cfg.is_file() or D.sha256_file(cfg) != report["model"]["config_sha256"]):
                problems.append(f"config: SHA-256 of {cfg} differs from the report")
    for t in report["tasks"]:
        _check_hashes(TASKS_DIR, t["task_files"], f"task files of {t['name']}", problems)
        ds = t["dataset"]
        if ds["source"] == "probes":
            root = D.PROBES_DIR
        elif data_dir:
            root = Path(data_dir)
        else:
            root = Path(ds["root"])
        if root.is_dir():
            _check_hashes(root, ds["files"], f"data of {t['name']}", problems)
        else:
            problems.append(f"data of {t['name']}: {root} not found (pass --data-dir)")

    # redaction commitments
    if salt_file and unredacted:
        salt = Path(salt_file).read_text().strip()
        full = {(r["task"], r["item_id"]): r for r in
                (json.loads(x) for x in Path(unredacted).read_text(encoding="utf-8").splitlines() if x.strip())}
        for r in records:
            if r.get("output_commitment"):
                f = full.get((r["task"], r["item_id"]))
                if f is None or commitment(salt, r["task"], r["item_id"], f["output"]) != r["output_commitment"]:
                    problems.append(f"{r['task']}/{r['item_id']}: redaction commitment does not open")

    if problems:
        raise VerificationError(problems)
    return {"report_id": report["report_id"], "n_metrics": len(report["metrics"]), "n_records": len(records)}
