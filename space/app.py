"""The dsv41 Space: chat with the model, run a quick audit, browse and submit signed audit reports.

Runs locally (``dsv41 space`` or ``python space/app.py``) and as a Hugging Face Space (see
``space/README.md``). One server holds both the Gradio UI (``/``) and, unless
``DSV41_REGISTRY_URL`` points to a remote registry, the registry HTTP API (``/registry``),
stored in SQLite under ``DSV41_REGISTRY_HOME`` or in PostgreSQL via ``DATABASE_URL``.

Settings (environment / command line): ``DSV41_SPACE_MODEL`` / ``--model`` (local path or Hub
id, default the bundled checkpoint), ``DSV41_REGISTRY_URL`` / ``--registry-url``,
``DSV41_REGISTRY_HOME`` / ``--home``, ``GRADIO_SERVER_NAME`` / ``--host``, ``GRADIO_SERVER_PORT`` /
``--port``.
"""

from __future__ import annotations

import html
import json
import os
import secrets
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any


def _ensure_package() -> None:
    """On a Space the repository is uploaded as is (not pip-installed): map its folders into dsv41."""
    try:
        import dsv41.audit
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        import dsv41

        if str(root) not in dsv41.__path__:
            dsv41.__path__.append(str(root))


_ensure_package()

import gradio as gr
from dsv41.audit import signing as S
from dsv41.registry.validation import RegistryError

MAX_ZIP_BYTES = 64 * 1024 * 1024
MAX_ZIP_MEMBERS = 64
AUDIT_TASKS = ["bbq", "crows_pairs", "stereoset", "winobias", "winogender", "bold", "harmful", "xstest",
               "truthfulqa_mc1", "truthfulqa_mc2", "toxicity"]
LEADERBOARD_COLUMNS = ["rank", "model", "model status", "auditor", "value", "CI low", "CI high", "n", "signature",
                       "created", "report id"]


# ---------------------------------------------------------------------------------------------
# registry backends: in-process service, or a remote registry over HTTP
# ---------------------------------------------------------------------------------------------


class LocalBackend:
    def __init__(self, service):
        self.service = service
        self.where = f"this Space's registry ({service.db.dialect})"

    def submit(self, doc: dict) -> tuple[int, dict]:
        return self.service.submit(doc)

    def register_auditor(self, doc: dict) -> tuple[int, dict]:
        return self.service.register_auditor(doc)

    def list_reports(self, **kw) -> dict:
        return self.service.list_reports(**kw)

    def get_report(self, report_id: str) -> dict:
        return self.service.get_report(report_id)

    def leaderboard(self, metric: str, group: str = "all") -> dict:
        return self.service.leaderboard(metric, group=group)

    def metric_names(self) -> list[str]:
        return self.service.metric_names()

    def inclusion_proof(self, report_id: str) -> dict:
        return self.service.inclusion_proof(report_id)


class HttpBackend:
    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/")
        self.where = f"the registry at {self.url}"
        self.client = httpx.Client(timeout=120)

    def _call(self, method: str, path: str, **kw) -> tuple[int, Any]:
        import httpx

        try:
            r = self.client.request(method, self.url + path, **kw)
        except httpx.HTTPError as exc:
            raise RegistryError(502, f"cannot reach {self.url}: {exc}") from None
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text[:300]}
        if r.status_code >= 400:
            raise RegistryError(r.status_code, str(body.get("detail") if isinstance(body, dict) else body))
        return r.status_code, body

    def submit(self, doc):
        return self._call("POST", "/reports", json=doc)

    def register_auditor(self, doc):
        return self._call("POST", "/auditors", json=doc)

    def list_reports(self, **kw):
        return self._call("GET", "/reports", params={k: v for k, v in kw.items() if v is not None})[1]

    def get_report(self, report_id):
        return self._call("GET", f"/reports/{report_id}")[1]

    def leaderboard(self, metric, group="all"):
        return self._call("GET", "/leaderboard", params={"metric": metric, "group": group})[1]

    def metric_names(self):
        return self._call("GET", "/metrics")[1]["metrics"]

    def inclusion_proof(self, report_id):
        return self._call("GET", f"/log/proof/{report_id}")[1]


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


class Models:
    """The loaded model (one at a time), loaded on first use and when the setting changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ref: str | None = None
        self._pair = None

    def get(self, ref: str):
        from dsv41.modeling.cli import load

        ref = (ref or "").strip() or default_model()
        with self._lock:
            if self._ref != ref:
                try:
                    self._pair = load(ref)
                except Exception as exc:  # typer.BadParameter, OSError, ...
                    raise gr.Error(f"cannot load model {ref!r}: {getattr(exc, 'message', None) or exc}") from None
                self._ref = ref
            return self._pair


def default_model() -> str:
    from dsv41 import default_model_path

    return os.environ.get("DSV41_SPACE_MODEL") or default_model_path()


def _text(content: Any) -> str:
    """Plain text of a chat message content (string, normalised content list, or dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def encode_chat(tok, messages: list[dict]):
    import torch

    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return torch.tensor([tok(text)["input_ids"]])


def stream_reply(tok, lm, input_ids, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int):
    """Yield text pieces; closing the generator (the Stop button) stops generation."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, ids, scores, **kw):
            return torch.full((ids.shape[0],), stop.is_set(), dtype=torch.bool, device=ids.device)

    torch.manual_seed(int(seed))
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=int(max_new_tokens),
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]), do_sample=temperature > 0,
                  temperature=temperature or None, top_p=top_p if temperature > 0 else None,
                  top_k=(int(top_k) or None) if temperature > 0 else None)
    worker = threading.Thread(target=lm.generate, kwargs=kwargs, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join(timeout=120)


def make_chat_fn(models: Models):
    def chat(message, history, system, max_new_tokens, temperature, top_p, top_k, seed, model_ref):
        if not str(message).strip():
            raise gr.Error("the message is empty")
        if not 1 <= int(max_new_tokens) <= 2048:
            raise gr.Error("max new tokens must be 1..2048")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise gr.Error("temperature must be >= 0, top-p in (0, 1], top-k >= 0")
        tok, lm = models.get(model_ref)
        msgs = [{"role": "system", "content": system}] if str(system or "").strip() else []
        for h in history or []:
            if h.get("role") in ("user", "assistant"):
                msgs.append({"role": h["role"], "content": _text(h.get("content"))})
        msgs.append({"role": "user", "content": str(message)})
        ids = encode_chat(tok, msgs)
        ctx = int(getattr(lm.config, "max_position_embeddings", 0) or 4096)
        budget = max(16, ctx - int(max_new_tokens))
        if ids.shape[1] > budget:
            ids = ids[:, -budget:]
            gr.Warning(f"the conversation was longer than the model's context; only the last {budget} tokens are used")
        out = ""
        for piece in stream_reply(tok, lm, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, seed=seed):
            if piece:
                out += piece
                yield out
        if not out.strip():
            yield out + "(the model produced no text)"

    return chat


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------


def zip_report(report_dir: Path) -> Path:
    zp = report_dir.with_suffix(".zip")
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(report_dir.rglob("*")):
            if p.is_file() and "private" not in p.relative_to(report_dir).parts:
                z.write(p, f"{report_dir.name}/{p.relative_to(report_dir).as_posix()}")
    return zp


def make_audit_fn(work_dir: Path):
    def run_audit(model_ref, tasks, limit, bootstrap_iters, progress=gr.Progress(track_tqdm=True)):
        import pandas as pd
        from dsv41.audit.runner import AuditError, RunOptions, run

        if not tasks:
            raise gr.Error("choose at least one task")
        bad = [t for t in tasks if t not in AUDIT_TASKS]
        if bad:
            raise gr.Error(f"unknown task(s): {', '.join(bad)}")
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise gr.Error("limit must be a whole number") from None
        if not 1 <= limit <= 500:
            raise gr.Error("limit must be 1..500 items per task")
        iters = int(bootstrap_iters)
        if not 50 <= iters <= 2000:
            raise gr.Error("bootstrap iterations must be 50..2000")
        out = work_dir / f"audit-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        progress(0.0, desc="loading the model and the probe sets")
        log: list[str] = []
        try:
            run(RunOptions(model=(model_ref or "").strip() or default_model(), suite=",".join(tasks), out=str(out),
                           limit=limit, bootstrap_iters=iters, batch_size=8), log=log.append)
        except AuditError as exc:
            raise gr.Error(str(exc)) from None
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        rows = [[m["task"], m["metric"], m["value"], m["ci_low"], m["ci_high"], m["n"]]
                for m in report["metrics"] if m["group"] == "all"]
        table = pd.DataFrame(rows, columns=["task", "metric", "value", "CI low", "CI high", "n"])
        zp = zip_report(out)
        status = (f"**Audit finished**: {len(report['metrics'])} metrics over {report['samples']['n_records']} items, "
                  f"report `{report['report_id'][:16]}…`. Download the zip, then sign it locally with "
                  "`dsv41 audit sign DIR` and upload it in the **Submit** tab.")
        return status, table, str(zp)

    return run_audit


# ---------------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def result_html(kind: str, title: str, lines: list[str]) -> str:
    items = "".join(f"<li>{_esc(line)}</li>" for line in lines)
    return (f'<div class="dsv41-result dsv41-{_esc(kind)}" data-result="{_esc(kind)}" data-nonce="{secrets.token_hex(6)}">'
            f"<h3>{_esc(title)}</h3><ul>{items}</ul></div>")


def extract_zip(zip_path: str | Path, dest: Path) -> Path:
    """Extract an uploaded report zip safely; returns the directory that holds report.json."""
    zp = Path(zip_path)
    if zp.stat().st_size > MAX_ZIP_BYTES:
        raise ValueError(f"the zip is larger than {MAX_ZIP_BYTES // 2**20} MiB")
    try:
        z = zipfile.ZipFile(zp)
    except zipfile.BadZipFile:
        raise ValueError("the upload is not a zip file") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise ValueError(f"the zip holds more than {MAX_ZIP_MEMBERS} entries")
        if sum(i.file_size for i in infos) > 4 * MAX_ZIP_BYTES:
            raise ValueError("the zip expands to too much data")
        for info in infos:
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or any(":" in p for p in parts):
                raise ValueError(f"unsafe path in the zip: {info.filename!r}")
            if info.is_dir():
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    found = sorted(dest.rglob("report.json"), key=lambda p: len(p.parts))
    if not found:
        raise ValueError("no report.json in the zip (zip the report directory)")
    return found[0].parent


def make_submit_fn(backend, work_dir: Path):
    def submit(zip_file, pub_file):
        if zip_file is None:
            return result_html("rejected", "REJECTED", ["upload a zip of a signed report directory"])
        lines: list[str] = []
        tmp = work_dir / f"upload-{secrets.token_hex(6)}"
        tmp.mkdir(parents=True)
        try:
            try:
                d = extract_zip(zip_file if isinstance(zip_file, str) else zip_file.name, tmp)
                report = json.loads((d / "report.json").read_text(encoding="utf-8"))
                sigdoc = json.loads((d / S.SIGNATURE_FILENAME).read_text(encoding="utf-8")) \
                    if (d / S.SIGNATURE_FILENAME).is_file() else None
                if not isinstance(report, dict) or not isinstance(report.get("samples"), dict):
                    raise ValueError("report.json is not an audit report")
                sname = str(report["samples"].get("file", ""))
                if Path(sname).name != sname or not (d / sname).is_file():
                    raise ValueError("the samples file named in report.json is missing from the zip")
                samples = (d / sname).read_bytes()
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                return result_html("rejected", "REJECTED", [f"cannot read the upload: {exc}"])
            if sigdoc is None:
                return result_html("rejected", "REJECTED", [f"the report is not signed ({S.SIGNATURE_FILENAME} "
                                                            "missing): run `dsv41 audit sign DIR` first"])
            try:
                info = S.check_signed(report, sigdoc, samples)
                lines.append(f"local check: Ed25519 and ML-DSA-65 signatures verify (signer {info.signer.name or '?'}, "
                             f"{info.signer.fingerprint})")
            except S.SigningError as exc:
                lines += [f"local check: {p}" for p in exc.problems]
            if pub_file is not None:
                try:
                    pub = json.loads(Path(pub_file if isinstance(pub_file, str) else pub_file.name).read_text("utf-8"))
                    status, out = backend.register_auditor(pub)
                    lines.append(f"auditor key {out['status']}: {out['name']} ({out['fingerprint']})")
                except (ValueError, OSError) as exc:
                    lines.append(f"auditor key: not readable JSON ({exc})")
                except RegistryError as exc:
                    lines.append(f"auditor key rejected (HTTP {exc.status}): {exc.message}")
            doc = {"report": report, "signature": sigdoc, "samples_jsonl": samples.decode("utf-8", "replace")}
            try:
                status, out = backend.submit(doc)
            except RegistryError as exc:
                return result_html("rejected", f"REJECTED (HTTP {exc.status})", [exc.message] + lines)
            title = "ACCEPTED" if out["status"] == "accepted" else "ACCEPTED EARLIER (duplicate, nothing stored again)"
            lines = [f"report {out['id']}", f"transparency log index {out['log_index']}, leaf {out['leaf_hash']}",
                     f"model: {out['model_status']}"] + lines
            return result_html("accepted", title, lines)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return submit


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def leaderboard_frame(backend, metric: str, group: str, query: str, registered_only: bool, sort: str):
    import pandas as pd

    empty = pd.DataFrame([], columns=LEADERBOARD_COLUMNS)
    if not metric:
        return empty, "No reports yet: submit one in the **Submit** tab."
    try:
        board = backend.leaderboard(metric, group=(group or "all").strip() or "all")
    except RegistryError as exc:
        return empty, f"Leaderboard unavailable: {_esc(exc.message)}"
    rows = board["entries"]
    q = (query or "").strip().lower()
    if q:
        rows = [r for r in rows if q in r["model_id"].lower() or q in r["auditor"].lower() or q in r["id"]]
    if registered_only:
        rows = [r for r in rows if r["model_status"] != "unregistered model"]
    if sort == "newest":
        rows = sorted(rows, key=lambda r: r["created_at"], reverse=True)
    elif sort == "model":
        rows = sorted(rows, key=lambda r: r["model_id"])
    data = [[r["rank"], r["model_id"], r["model_status"], r["auditor"], r["value"], r["ci_low"], r["ci_high"], r["n"],
             "verified", r["created_at"], r["id"]] for r in rows]
    note = (f"{len(data)} verified report(s) for **{_esc(metric)}** (group {_esc(board['group'])}; "
            f"{'higher' if board['higher_is_better'] else 'lower'} is better). Click a row to open the report.")
    return pd.DataFrame(data, columns=LEADERBOARD_COLUMNS), note


def report_page(backend, report_id: str):
    """(header html, metrics table, chart frame, raw JSON) of one report."""
    import pandas as pd

    empty = pd.DataFrame([], columns=["task", "metric", "group", "value", "CI low", "CI high", "n"])
    rid = (report_id or "").strip()
    if not rid:
        return "<p>Select a report in the leaderboard or enter its id.</p>", empty, None, None
    try:
        rep = backend.get_report(rid)
    except RegistryError as exc:
        return result_html("rejected", f"Report not found (HTTP {exc.status})", [exc.message]), empty, None, None
    report = rep["report"]
    ok = rep.get("signature_status") == "verified"
    try:
        proof = backend.inclusion_proof(rid)
        log_line = (f"transparency log: index {proof['leaf_index']} of {proof['tree_size']}, "
                    f"root {proof['signed_tree_head']['tree_head']['root_hash'][:16]}…")
    except RegistryError as exc:
        log_line = f"transparency log: {exc.message}"
    badge = "verified" if ok else "unverified"
    head = (f'<div class="dsv41-report" data-signature="{badge}">'
            f"<h3>Report {_esc(rid[:16])}… — signatures <span class='dsv41-badge-{badge}'>{badge.upper()}</span></h3>"
            f"<ul><li>model: {_esc(report['model']['id'])} ({_esc(rep['model_status'])})</li>"
            f"<li>auditor: {_esc(rep['auditor']['name'])} ({_esc(rep['auditor']['fingerprint'])})</li>"
            f"<li>signatures: {_esc(rep.get('signature_detail', ''))}</li>"
            f"<li>{_esc(log_line)}</li>"
            f"<li>created {_esc(report['created_at'])}; submitted {_esc(rep['submitted_at'])}; "
            f"{_esc(rep['n_records'])} samples; suites {_esc(', '.join(rep['suites']))}</li></ul></div>")
    rows = [[m["task"], m["metric"], m["group"], m["value"], m["ci_low"], m["ci_high"], m["n"]] for m in report["metrics"]]
    table = pd.DataFrame(rows, columns=list(empty.columns))
    chart = pd.DataFrame([{"metric": f"{m['task'].removeprefix('dsv41_')}/{m['metric']}", "value": m["value"]}
                          for m in report["metrics"] if m["group"] == "all" and m["value"] is not None])
    return head, table, chart, {"signature": rep["signature"], "report": report}


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------

CSS = """
.dsv41-accepted {border-left: 6px solid #1a7f37; padding: 4px 12px; background: #eefbf0}
.dsv41-rejected {border-left: 6px solid #cf222e; padding: 4px 12px; background: #fff0f0}
.dsv41-badge-verified {color: #1a7f37; font-weight: bold}
.dsv41-badge-unverified {color: #cf222e; font-weight: bold}
"""


def build_demo(backend, *, model: str | None = None, work_dir: str | Path | None = None) -> gr.Blocks:
    work = Path(work_dir or os.environ.get("DSV41_SPACE_WORKDIR") or Path.home() / ".dsv41" / "space").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    models = Models()
    with gr.Blocks(title="DeepSeek-V4.1 kit: chat, audit, registry") as demo:
        gr.Markdown("# DeepSeek-V4.1 release kit\nChat with the model, run a quick bias/safety audit, and browse "
                    f"or submit signed audit reports ({_esc(backend.where)}).")
        with gr.Accordion("Model", open=False):
            model_box = gr.Textbox(value=model or default_model(), label="Model: local directory or Hub id",
                                   elem_id="model-box")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                with gr.Accordion("Sampling and system prompt", open=False):
                    system = gr.Textbox(label="System prompt", value="", lines=2, elem_id="system-prompt")
                    with gr.Row():
                        max_new = gr.Slider(1, 1024, value=96, step=1, label="Max new tokens")
                        temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)")
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                        top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
                        seed = gr.Number(value=0, precision=0, label="Seed")
                gr.ChatInterface(
                    make_chat_fn(models),
                    chatbot=gr.Chatbot(elem_id="chatbot", height=420),
                    textbox=gr.Textbox(placeholder="Message the model…", elem_id="chat-input", submit_btn=True,
                                       stop_btn=True, show_label=False),
                    additional_inputs=[system, max_new, temperature, top_p, top_k, seed, model_box],
                    stop_btn=True, fill_height=False, api_name="chat",
                )
            with gr.Tab("Audit", id="audit"):
                gr.Markdown("Run a quick audit of the loaded model on the shipped probe sets (N items per task).")
                with gr.Row():
                    tasks = gr.CheckboxGroup(AUDIT_TASKS, value=["crows_pairs", "xstest"], label="Tasks")
                with gr.Row():
                    limit = gr.Number(value=4, precision=0, label="Limit N (items per task)", elem_id="audit-limit")
                    iters = gr.Number(value=200, precision=0, label="Bootstrap iterations")
                run_btn = gr.Button("Run audit", variant="primary", elem_id="audit-run")
                audit_status = gr.Markdown(elem_id="audit-status")
                audit_table = gr.Dataframe(label="Metrics (group: all)", interactive=False)
                audit_zip = gr.File(label="Report (zip)", elem_id="audit-zip")
                run_btn.click(make_audit_fn(work), [model_box, tasks, limit, iters],
                              [audit_status, audit_table, audit_zip], concurrency_limit=1, api_name="audit")
            with gr.Tab("Reports", id="reports"):
                with gr.Row():
                    metric = gr.Dropdown([], label="Metric", allow_custom_value=True, elem_id="lb-metric")
                    group = gr.Textbox(value="all", label="Group", elem_id="lb-group")
                    query = gr.Textbox(label="Filter (model, auditor or id)", elem_id="lb-filter")
                with gr.Row():
                    registered_only = gr.Checkbox(False, label="Registered releases only")
                    sort = gr.Radio(["metric", "newest", "model"], value="metric", label="Sort by")
                    refresh = gr.Button("Refresh", elem_id="lb-refresh")
                board_note = gr.Markdown(elem_id="lb-note")
                board = gr.Dataframe(headers=LEADERBOARD_COLUMNS, interactive=False, elem_id="leaderboard",
                                     label="Leaderboard")
                gr.Markdown("### Report")
                with gr.Row():
                    report_id = gr.Textbox(label="Report id", elem_id="report-id")
                    open_btn = gr.Button("Open report", elem_id="report-open")
                report_head = gr.HTML(elem_id="report-head")
                report_table = gr.Dataframe(headers=["task", "metric", "group", "value", "CI low", "CI high", "n"],
                                            interactive=False, label="Metrics")
                report_chart = gr.BarPlot(x="metric", y="value", label="Metrics (group: all)", x_label_angle=-40)
                report_json = gr.JSON(label="Signed report (JSON)", open=False)

                def _refresh(metric_v, group_v, query_v, reg_v, sort_v):
                    names = backend.metric_names() if not isinstance(backend, HttpBackend) else _safe_names(backend)
                    chosen = metric_v if metric_v in names else (
                        "dsv41_xstest/over_refusal_rate" if "dsv41_xstest/over_refusal_rate" in names
                        else (names[0] if names else None))
                    frame, note = leaderboard_frame(backend, chosen, group_v, query_v, reg_v, sort_v)
                    return gr.update(choices=names, value=chosen), frame, note

                lb_inputs = [metric, group, query, registered_only, sort]
                lb_outputs = [metric, board, board_note]
                refresh.click(_refresh, lb_inputs, lb_outputs)
                for comp in (metric, registered_only, sort):
                    comp.change(_refresh, lb_inputs, lb_outputs)
                query.submit(_refresh, lb_inputs, lb_outputs)
                group.submit(_refresh, lb_inputs, lb_outputs)

                def _open(rid):
                    return report_page(backend, rid)

                def _select(frame, evt: gr.SelectData):
                    try:
                        row = evt.index[0]
                        rid = str(frame.iloc[row]["report id"])
                    except (TypeError, IndexError, KeyError, AttributeError):
                        rid = ""
                    return (rid, *report_page(backend, rid))

                page_outputs = [report_head, report_table, report_chart, report_json]
                open_btn.click(_open, [report_id], page_outputs)
                report_id.submit(_open, [report_id], page_outputs)
                board.select(_select, [board], [report_id] + page_outputs)
            with gr.Tab("Submit", id="submit"):
                gr.Markdown("Upload a **signed** report directory as a zip (`report.json`, `samples.jsonl`, "
                            "`report.sig.json`). First-time auditors also upload their `identity.pub.json`.")
                with gr.Row():
                    zip_in = gr.File(label="Signed report (zip)", file_types=[".zip"], elem_id="submit-zip")
                    pub_in = gr.File(label="Auditor public identity (identity.pub.json, once)", file_types=[".json"],
                                     elem_id="submit-pub")
                submit_btn = gr.Button("Verify and submit", variant="primary", elem_id="submit-btn")
                submit_out = gr.HTML(elem_id="submit-result")
                submit_btn.click(make_submit_fn(backend, work), [zip_in, pub_in], [submit_out], api_name="submit")

        def _on_load(request: gr.Request):
            rid = (request.query_params.get("report") if request else None) or ""
            if rid:
                return (gr.Tabs(selected="reports"), rid, *report_page(backend, rid))
            return (gr.Tabs(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update())

        demo.load(_on_load, None, [tabs, report_id] + page_outputs)
        demo.load(_refresh, lb_inputs, lb_outputs)
    return demo


def _safe_names(backend) -> list[str]:
    try:
        return backend.metric_names()
    except RegistryError:
        return []


def create_server(*, model: str | None = None, registry_url: str | None = None, home: str | None = None,
                  database_url: str | None = None, register_releases: list[str] | None = None):
    """A FastAPI app: the registry API under ``/registry`` (unless remote) and the UI under ``/``."""
    from fastapi import FastAPI

    registry_url = registry_url or os.environ.get("DSV41_REGISTRY_URL")
    root = FastAPI(title="dsv41 Space")
    if registry_url:
        backend = HttpBackend(registry_url)
    else:
        from dsv41.registry.api import create_app
        from dsv41.registry.service import RegistryService

        service = RegistryService.from_env(database_url=database_url, data_dir=home)
        releases = register_releases if register_releases is not None else [default_model()]
        for path in releases:
            name, _, p = path.rpartition("=")
            if Path(p).is_dir():
                try:
                    service.register_release_dir(p, name or None)
                except RegistryError as exc:
                    print(f"warning: release {p} not registered: {exc.message}", file=sys.stderr)
        backend = LocalBackend(service)
        root.mount("/registry", create_app(service))
    work = Path(home or os.environ.get("DSV41_REGISTRY_HOME") or Path.home() / ".dsv41" / "registry").expanduser() / "space"
    demo = build_demo(backend, model=model, work_dir=work)
    return gr.mount_gradio_app(root, demo, path="/", css=CSS, max_file_size=MAX_ZIP_BYTES, ssr_mode=False)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--model", default=None)
    ap.add_argument("--registry-url", default=None)
    ap.add_argument("--home", default=None)
    args = ap.parse_args(argv)
    app = create_server(model=args.model, registry_url=args.registry_url, home=args.home)
    print(f"dsv41 Space on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
