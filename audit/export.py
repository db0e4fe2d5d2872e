"""``dsv41 audit export DIR --format eee|hf-eval-results``.

* ``eee``: one Every Eval Ever aggregate record (``eval.schema.json`` of the ``every-eval-ever``
  package), one ``evaluation_results`` entry per (task, metric, group) with its 95% bootstrap CI.
* ``hf-eval-results``: ``.eval_results/<task>.yaml`` entries for a Hugging Face model repository
  (``dataset.id`` + ``task_id`` + ``value``, with ``date``, ``source`` and ``notes``).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

# Hub dataset ids of the upstream datasets (the ones lm-eval's built-in tasks read where it has them)
HF_DATASET_IDS = {
    "bbq": "oskarvanderwal/bbq", "crows_pairs": "jannalu/crows_pairs_multilingual",
    "truthfulqa": "truthfulqa/truthful_qa", "stereoset": "McGill-NLP/stereoset", "winobias": "uclanlp/wino_bias",
    "winogender": "oskarvanderwal/winogender", "bold": "AlexaAI/bold", "harmful": "walledai/HarmBench",
    "xstest": "walledai/XSTest", "toxicity": "toxigen/toxigen-data",
}
PROBES_DATASET_ID = "dsv41/audit-probes"

_RANGES = {
    "acc": (0, 1), "acc_ambig": (0, 1), "acc_disambig": (0, 1), "acc_pro": (0, 1), "acc_anti": (0, 1),
    "bias_score_ambig": (-1, 1), "bias_score_disambig": (-1, 1), "gap": (-1, 1), "pct_stereotype": (0, 1),
    "likelihood_diff": (0, "Infinity"), "ss": (0, 100), "lms": (0, 100), "icat": (0, 100), "sentiment": (-1, 1),
    "negative_rate": (0, 1), "sentiment_spread": (0, 2), "refusal_rate": (0, 1), "compliance_rate": (0, 1),
    "over_refusal_rate": (0, 1), "unsafe_refusal_rate": (0, 1), "unsafe_compliance_rate": (0, 1),
    "mc1": (0, 1), "mc2": (0, 1), "toxicity": (0, 1), "toxic_rate": (0, 1),
}


def _load(report_dir) -> dict:
    p = Path(report_dir) / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return json.loads(p.read_text(encoding="utf-8"))


def _dataset_of(report, task) -> dict:
    t = next(t for t in report["tasks"] if t["name"] == task)
    return t["dataset"]


def to_eee(report: dict, *, organization: str = "dsv41 audit", relationship: str = "third_party") -> dict:
    from dsv41.audit.scoring import TASK_DATASET

    created = _dt.datetime.fromisoformat(report["created_at"])
    m = report["model"]
    results = []
    for row in report["metrics"]:
        if row["value"] is None:
            continue
        ds = _dataset_of(report, row["task"])
        lo, hi = _RANGES.get(row["metric"], (None, None))
        metric_cfg = {
            "evaluation_description": f"{row['metric']} on {row['task']} ({'all items' if row['group'] == 'all' else 'group ' + row['group']})",
            "metric_id": f"dsv41.audit.{row['metric']}",
            "metric_name": row["metric"],
            "lower_is_better": row["higher_is_better"] is False,
            "score_type": "continuous", "min_score": lo, "max_score": hi,
            "additional_details": {"group": row["group"],
                                   "direction": {True: "higher is better", False: "lower is better",
                                                 None: "closer to the unbiased reference is better"}[row["higher_is_better"]]},
        }
        score = {"score": row["value"],
                 "details": {"n": str(row["n"])},
                 "uncertainty": {"num_samples": row["n"],
                                 "num_bootstrap_samples": report["settings"]["bootstrap_iters"]}}
        if row["ci_low"] is not None:
            score["uncertainty"]["confidence_interval"] = {
                "lower": row["ci_low"], "upper": row["ci_high"], "confidence_level": report["settings"]["ci_level"],
                "method": "percentile bootstrap over items"}
        details = {"files_sha256": ",".join(f"{f['path']}={f['sha256']}" for f in ds["files"]),
                   "n_items_evaluated": str(ds["n_items_evaluated"])}
        if ds["source"] == "probes":
            source = {"dataset_name": f"dsv41 audit probes ({TASK_DATASET[row['task']]})", "source_type": "other",
                      "additional_details": details}
        else:
            source = {"dataset_name": TASK_DATASET[row["task"]], "source_type": "hf_dataset",
                      "hf_repo": HF_DATASET_IDS[TASK_DATASET[row["task"]]], "samples_number": ds["n_items_evaluated"],
                      "additional_details": details | {"read_from": ds["source"]}}
        results.append({
            "evaluation_result_id": f"{row['task']}/{row['metric']}/{row['group']}",
            "evaluation_name": f"{row['task']}/{row['metric']}" + ("" if row["group"] == "all" else f"/{row['group']}"),
            "source_data": source, "evaluation_timestamp": report["created_at"],
            "metric_config": metric_cfg, "score_details": score,
        })
    return {
        "schema_version": _eee_schema_version(),
        "evaluation_id": f"dsv41-audit/{m['id']}/{int(created.timestamp())}",
        "evaluation_timestamp": report["created_at"],
        "retrieved_timestamp": str(int(created.timestamp())),
        "source_metadata": {"source_name": "dsv41 audit", "source_type": "evaluation_run",
                            "source_organization_name": organization, "evaluator_relationship": relationship,
                            "additional_details": {"report_id": report["report_id"],
                                                   "report_schema": report["schema_version"],
                                                   "samples_sha256": report["samples"]["sha256"],
                                                   "judge": report["judge"]["primary"]}},
        "eval_library": {"name": "lm_eval", "version": report["packages"].get("lm_eval", "unknown"),
                         "additional_details": {"wrapper": "dsv41.audit", "wrapper_version": report["dsv41_version"]}},
        "model_info": {
            "name": Path(m["id"]).name or m["id"], "id": m["id"] if m["source"] == "hub" else f"local/{Path(m['id']).name}",
            "inference_platform": "HuggingFace transformers",
            "additional_details": {"deployment_type": "self_deployed", "model_availability": "open_weights",
                                   "revision": m["revision"] or "local",
                                   "weights_sha256": ",".join(f"{w['path']}={w['sha256']}" for w in m["weight_files"]),
                                   "config_sha256": m["config_sha256"] or ""},
        },
        "evaluation_results": results,
    }


def _eee_schema_version() -> str:
    try:
        from every_eval_ever.schema import get_schema_version

        return get_schema_version()
    except Exception:
        return "0.3.0"


def to_hf_eval_results(report: dict) -> dict[str, list[dict]]:
    from dsv41.audit.scoring import TASK_DATASET

    date = report["created_at"][:10]
    out: dict[str, list[dict]] = {}
    for row in report["metrics"]:
        if row["group"] != "all" or row["value"] is None:
            continue
        ds = _dataset_of(report, row["task"])
        key = TASK_DATASET[row["task"]]
        ds_id = PROBES_DATASET_ID if ds["source"] == "probes" else HF_DATASET_IDS[key]
        ci = "" if row["ci_low"] is None else f"; 95% bootstrap CI [{row['ci_low']}, {row['ci_high']}]"
        out.setdefault(row["task"], []).append({
            "dataset": {"id": ds_id, "task_id": f"{row['task']}/{row['metric']}"},
            "value": row["value"], "date": date,
            "source": {"name": "dsv41 audit", "url": "https://github.com/EleutherAI/lm-evaluation-harness"},
            "evaluation_framework": "lm-evaluation-harness",
            "notes": f"n={row['n']}{ci}; report_id {report['report_id']}; data from {ds['source']}",
        })
    return out


def export(report_dir, fmt: str, out_dir=None) -> list[Path]:
    import yaml

    report = _load(report_dir)
    dest = Path(out_dir) if out_dir else Path(report_dir) / "export"
    if fmt == "eee":
        dest.mkdir(parents=True, exist_ok=True)
        p = dest / "eee_aggregate.json"
        p.write_text(json.dumps(to_eee(report), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return [p]
    if fmt == "hf-eval-results":
        base = dest / ".eval_results"
        base.mkdir(parents=True, exist_ok=True)
        paths = []
        for task, entries in to_hf_eval_results(report).items():
            p = base / f"{task}.yaml"
            p.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")
            paths.append(p)
        return paths
    raise ValueError(f"unknown export format {fmt!r} (use eee or hf-eval-results)")
