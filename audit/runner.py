"""``dsv41 audit run``: evaluate a causal LM on the audit tasks through lm-eval and write the report.

Output directory layout::

    report.json   report.md   report.html   charts/*.png   samples.jsonl
    private/      (only with --redact: the salt and the unredacted samples; do not publish)
    .partial/     (while running: per-task results, so an interrupted run resumes)

``report.json`` is written last; once it exists the directory is never written again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import secrets
import shutil
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path

from dsv41.audit import data as D
from dsv41.audit import judges as J
from dsv41.audit import metrics as M
from dsv41.audit.schema import SCHEMA_VERSION, Report, canonical_json
from dsv41.audit.scoring import (
    GENERATION_TASKS, RECORD_FIELDS, REDACTABLE_TASKS, TASK_DATASET, TASK_SUITE, compute_metrics,
)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SUITES = {
    "bias": ["dsv41_bbq", "dsv41_crows_pairs", "dsv41_stereoset", "dsv41_winobias", "dsv41_winogender", "dsv41_bold"],
    "safety": ["dsv41_harmful", "dsv41_xstest", "dsv41_truthfulqa_mc1", "dsv41_truthfulqa_mc2", "dsv41_toxicity"],
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")
REDACTION_SCHEME = "sha256(salt_hex || '\\x1f' || task || '\\x1f' || item_id || '\\x1f' || output_utf8)"


class AuditError(RuntimeError):
    """A user-facing error of the audit (bad suite, unloadable model, finished report, ...)."""


def resolve_tasks(suite_arg: str) -> tuple[list[str], list[str]]:
    """``bias,safety`` or task names (``bbq`` or ``dsv41_bbq``) -> (suites, tasks)."""
    suites, tasks = [], []
    for part in [p.strip() for p in suite_arg.split(",") if p.strip()]:
        if part in SUITES:
            suites.append(part)
            tasks += SUITES[part]
            continue
        name = part if part.startswith("dsv41_") else f"dsv41_{part}"
        if name not in TASK_SUITE:
            known = sorted(SUITES) + sorted(t[len("dsv41_"):] for t in TASK_SUITE)
            raise AuditError(f"unknown suite or task {part!r}; choose from: {', '.join(known)}")
        suites.append(TASK_SUITE[name])
        tasks.append(name)
    if not tasks:
        raise AuditError("no suite given (use --suite bias,safety)")
    return sorted(set(suites)), list(dict.fromkeys(tasks))


def file_hashes(root: Path, files) -> list[dict]:
    out = []
    for f in sorted(Path(f) for f in files):
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        out.append({"path": rel, "sha256": D.sha256_file(f), "size": f.stat().st_size})
    return out


def model_files(local: Path) -> tuple[list[Path], Path | None, list[Path]]:
    weights = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                     and ".cache" not in p.parts)
    config = local / "config.json"
    toks = sorted(local / n for n in TOKENIZER_FILES if (local / n).is_file())
    return weights, (config if config.is_file() else None), toks


def resolve_model_dir(model_id: str, revision: str | None) -> tuple[Path, str, str | None]:
    p = Path(model_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise AuditError(f"cannot load model {model_id!r}: not a directory")
        return p.resolve(), "local", None
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=model_id, revision=revision)
    except Exception as exc:
        raise AuditError(f"cannot load model {model_id!r}: not a local directory and not downloadable "
                         f"from the Hub ({type(exc).__name__}: {exc})") from exc
    rev = Path(local).name  # snapshot folder name is the commit hash
    return Path(local), "hub", rev


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("dsv41", "torch", "transformers", "lm_eval", "datasets", "numpy", "accelerate", "pydantic"):
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class RunOptions:
    model: str
    suite: str = "bias,safety"
    out: str = "audit-report"
    limit: int | None = None
    data_dir: str | None = None
    revision: str | None = None
    judge: str = "rule"
    toxicity_scorer: str = "lexicon"
    redact: bool = False
    seed: int = 1234
    bootstrap_iters: int = M.DEFAULT_BOOTSTRAP_ITERS
    batch_size: int = 8
    device: str | None = None
    chat_template: str = "auto"  # auto | on | off (generation tasks only)
    num_fewshot: int = 0
    trust_remote_code: bool | None = None
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def config_key(self) -> dict:
        """What decides the results (a resumed run must match it)."""
        return {k: getattr(self, k) for k in ("model", "suite", "limit", "data_dir", "revision", "seed",
                                              "batch_size", "chat_template", "num_fewshot", "dtype")}


def _load_lm(opts: RunOptions, local: Path, source: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = opts.trust_remote_code if opts.trust_remote_code is not None else (source == "local")
    try:
        tok = AutoTokenizer.from_pretrained(local, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=trust, dtype=getattr(torch, opts.dtype))
    except Exception as exc:
        raise AuditError(f"cannot load model {opts.model!r} from {local}: {type(exc).__name__}: {exc}") from exc
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=opts.batch_size, device=device,
              max_length=getattr(model.config, "max_position_embeddings", None) or 2048)
    return model, tok, lm, device


def _records_from_samples(task: str, samples: list[dict]) -> list[dict]:
    recs = []
    for s in sorted(samples, key=lambda x: x["doc_id"]):
        doc = s["doc"]
        rec = {
            "task": task, "item_id": str(doc["item_id"]), "doc_id": int(s["doc_id"]),
            "doc_sha256": hashlib.sha256(canonical_json(doc).encode()).hexdigest(),
            "prompt": s["arguments"][0][0],
            "fields": {k: doc[k] for k in RECORD_FIELDS[task]},
        }
        if task in GENERATION_TASKS:
            rec["output"] = s["filtered_resps"][0]
            rec["scores"] = {}
        else:
            rec["choices"] = [a[1] for a in s["arguments"]]
            rec["loglikelihoods"] = [float(r[0]) for r in s["filtered_resps"]]
        recs.append(rec)
    return recs


def score_generations(records: list[dict], judges: list, primary: str, tox_scorer) -> None:
    """Fill ``scores`` of generation records: judge labels, refusal flag, sentiment, toxicity."""
    rule = J.RuleRefusalJudge()
    tox_batch = [r for r in records if r["task"] == "dsv41_toxicity"]
    if tox_batch:
        try:
            vals = tox_scorer.score([r["output"] for r in tox_batch])
        except J.JudgeError:
            raise
        except Exception as exc:
            raise J.JudgeError(f"toxicity scorer {tox_scorer.name!r} failed: {exc}") from exc
        for r, v in zip(tox_batch, vals):
            r["scores"]["toxicity"] = float(v)
    for r in records:
        if r["task"] == "dsv41_bold":
            r["scores"]["sentiment"] = J.lexicon_sentiment(r["output"])
        if r["task"] in ("dsv41_harmful", "dsv41_xstest"):
            labels = {}
            for j in judges:
                labels[j.name] = j.judge(r["prompt"], r["output"], item=f"{r['task']}/{r['item_id']}")
            r["scores"]["judges"] = labels
            r["scores"]["rule"] = rule.classify(r["output"]).rule
            r["scores"]["refused"] = int(labels[primary] == J.REFUSAL)


def judge_agreement(records: list[dict], names: list[str]) -> dict | None:
    if len(names) < 2:
        return None
    a, b = names[0], names[1]
    rs = [r for r in records if "judges" in r.get("scores", {})]
    la = [r["scores"]["judges"][a] for r in rs]
    lb = [r["scores"]["judges"][b] for r in rs]
    dis = [{"task": r["task"], "item_id": r["item_id"], "labels": dict(r["scores"]["judges"])}
           for r, x, y in zip(rs, la, lb) if x != y]
    return {"judges": [a, b], "n": len(rs), "kappa": M.rounded(M.cohens_kappa(la, lb)) if rs else None,
            "percent_agreement": M.rounded(sum(x == y for x, y in zip(la, lb)) / len(rs)) if rs else None,
            "disagreements": dis}


def commitment(salt_hex: str, task: str, item_id: str, output: str) -> str:
    msg = "\x1f".join([salt_hex, task, item_id, output]).encode("utf-8")
    return "sha256:" + hashlib.sha256(msg).hexdigest()


def redact_records(records: list[dict], salt_hex: str) -> tuple[list[dict], int]:
    out, n = [], 0
    for r in records:
        if r["task"] in REDACTABLE_TASKS and r.get("output") is not None:
            r = dict(r)
            r["output_commitment"] = commitment(salt_hex, r["task"], r["item_id"], r["output"])
            r["output"] = None
            n += 1
        out.append(r)
    return out, n


def write_jsonl(path: Path, records: list[dict]) -> str:
    text = "".join(canonical_json(r) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(opts: RunOptions, log=print) -> Path:
    """Run the audit; returns the path of report.html."""
    suites, tasks = resolve_tasks(opts.suite)
    out = Path(opts.out).expanduser().resolve()
    if (out / "report.json").exists():
        raise AuditError(f"{out / 'report.json'} is a finished report; refusing to overwrite it "
                         "(choose another --out directory)")
    partial = out / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    cfg_path = partial / "run_config.json"
    key = opts.config_key()
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise AuditError(f"{out} holds a partial run with different settings ({', '.join(diff)}); "
                             "use the same settings to resume or another --out directory")
        log(f"resuming the partial run in {out}")
    else:
        cfg_path.write_text(json.dumps(key, sort_keys=True, indent=1))

    # validate data before loading the model: malformed rows fail fast, naming the row
    loaded = {t: D.load(TASK_DATASET[t], opts.data_dir, opts.limit) for t in tasks}

    local, source, revision = resolve_model_dir(opts.model, opts.revision)
    weights, config, tok_files = model_files(local)
    if not weights:
        raise AuditError(f"cannot load model {opts.model!r}: no weight files in {local}")
    judges = [J.make_judge(opts.judge, device="cpu")] if opts.judge != "rule" else []
    judges.append(J.RuleRefusalJudge())
    primary = judges[0].name
    tox = J.make_toxicity_scorer(opts.toxicity_scorer)

    model, tok, lm, device = _load_lm(opts, local, source)
    has_chat = bool(getattr(tok, "chat_template", None))
    use_chat = {"on": True, "off": False}.get(opts.chat_template, has_chat)
    if opts.chat_template == "on" and not has_chat:
        raise AuditError(f"--chat-template on, but the tokenizer of {opts.model!r} has no chat template")

    import lm_eval
    from lm_eval.tasks import TaskManager
    from tqdm.auto import tqdm

    task_infos, all_records = [], []
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"data_dir": opts.data_dir, "limit": opts.limit})
    bar = tqdm(tasks, desc="audit tasks", unit="task")
    for task in bar:
        bar.set_postfix_str(task)
        done = partial / f"{task}.json"
        if done.exists():
            saved = json.loads(done.read_text())
        else:
            chat = bool(use_chat and task in GENERATION_TASKS)
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=tm, log_samples=True, bootstrap_iters=0,
                num_fewshot=opts.num_fewshot or None, apply_chat_template=chat,
                random_seed=opts.seed, numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
                fewshot_random_seed=opts.seed, verbosity="ERROR",
            )
            cfg = res["configs"][task]
            saved = {
                "records": _records_from_samples(task, res["samples"][task]),
                "version": str(res["versions"][task]),
                "output_type": cfg["output_type"],
                "num_fewshot": int(res["n-shot"].get(task, 0) or 0),
                "apply_chat_template": chat,
                "generation_kwargs": cfg.get("generation_kwargs") if cfg["output_type"] == "generate_until" else None,
            }
            _atomic_write(done, json.dumps(saved, sort_keys=True))
        L = loaded[task]
        task_files = [TASKS_DIR / f"{task}.yaml", TASKS_DIR / "utils.py"]
        task_infos.append({
            "name": task, "suite": TASK_SUITE[task], "version": saved["version"],
            "output_type": saved["output_type"], "num_fewshot": saved["num_fewshot"],
            "apply_chat_template": saved["apply_chat_template"], "generation_kwargs": saved["generation_kwargs"],
            "task_files": file_hashes(TASKS_DIR, task_files),
            "dataset": {"source": L.source, "root": str(L.root) if L.source != "probes" else "audit/probes",
                        "files": file_hashes(L.root, L.files), "n_items_available": L.n_total,
                        "n_items_evaluated": len(saved["records"])},
        })
        all_records += saved["records"]

    log("scoring generations and computing metrics ...")
    score_generations(all_records, judges, primary, tox)
    metrics = []
    for task in tasks:
        metrics += compute_metrics(task, [r for r in all_records if r["task"] == task],
                                   seed=opts.seed, iters=opts.bootstrap_iters)

    rule = J.RuleRefusalJudge()
    cal = J.calibrate(rule)
    cal = {k: (M.rounded(v) if isinstance(v, float) else v) for k, v in cal.items()}
    judge_descs = []
    for j in judges:
        d = {"name": j.name, "kind": j.kind, "version": str(j.version)}
        if j.kind == "rule":
            d["calibration"] = cal
        judge_descs.append(d)

    published, n_red = all_records, 0
    salt = None
    if opts.redact:
        salt = secrets.token_hex(32)
        published, n_red = redact_records(all_records, salt)
        priv = out / "private"
        priv.mkdir(exist_ok=True)
        (priv / "redaction_salt.hex").write_text(salt + "\n")
        write_jsonl(priv / "samples.unredacted.jsonl", all_records)
    samples_sha = write_jsonl(out / "samples.jsonl", published)

    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "schema_version": SCHEMA_VERSION,
        "report_id": "",
        "status": "complete",
        "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "dsv41_version": package_versions().get("dsv41", "unknown"),
        "packages": package_versions(),
        "model": {
            "id": opts.model, "revision": revision, "source": source, "local_path": str(local),
            "weight_files": file_hashes(local, weights),
            "config_sha256": D.sha256_file(config) if config else None,
            "tokenizer_files": file_hashes(local, tok_files),
            "model_type": getattr(model.config, "model_type", None),
            "num_parameters": int(n_params), "dtype": opts.dtype,
        },
        "settings": {
            "suites": suites, "tasks": tasks, "limit": opts.limit,
            "seeds": {"random": opts.seed, "numpy": opts.seed, "torch": opts.seed, "fewshot": opts.seed,
                      "bootstrap": opts.seed},
            "bootstrap_iters": opts.bootstrap_iters, "ci_level": M.CI_LEVEL, "batch_size": opts.batch_size,
            "device": device, "apply_chat_template": opts.chat_template, "num_fewshot": opts.num_fewshot,
        },
        "tasks": task_infos,
        "judge": {
            "primary": primary, "judges": judge_descs,
            "agreement": judge_agreement(all_records, [j.name for j in judges]),
            "toxicity_scorer": {"name": tox.name, "version": str(tox.version)},
            "sentiment_scorer": dict(J.SENTIMENT_SCORER),
        },
        "metrics": metrics,
        "samples": {"file": "samples.jsonl", "sha256": samples_sha, "n_records": len(published),
                    "redacted": bool(opts.redact), "redaction_scheme": REDACTION_SCHEME if opts.redact else None,
                    "n_redacted": n_red},
    }
    report["report_id"] = hashlib.sha256(canonical_json({k: v for k, v in report.items()
                                                         if k != "report_id"}).encode()).hexdigest()
    Report.model_validate(report)
    validate_against_schema(report)

    from dsv41.audit.render import render_all

    html = render_all(out, report, all_records if not opts.redact else published)
    _atomic_write(out / "report.json", json.dumps(report, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return html


def validate_against_schema(report: dict) -> None:
    import jsonschema

    from dsv41.audit.schema import SCHEMA_FILE

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.validate(report, schema)
