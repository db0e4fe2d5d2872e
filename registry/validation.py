"""Input checks of the registry: submission envelope, report schema, text-field policy, samples.

Every problem becomes a :class:`RegistryError` with an HTTP status (4xx) and a message that
names the offending field. Nothing that fails here is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class RegistryError(Exception):
    """A request the registry refuses; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, code: str = "invalid"):
        self.status = status
        self.message = message
        self.code = code
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# text policy
# ---------------------------------------------------------------------------------------------

MAX_TEXT = 1024
# markup, quoting and statement separators, template / shell expansion
_FORBIDDEN_CHARS = set("<>\"'`;\\")
_FORBIDDEN_SEQS = ("${", "{{", "{%", "}}", "/*", "*/")
_FORBIDDEN_PREFIXES = ("javascript:", "data:", "vbscript:")
# generation stop sequences: may also hold whitespace and special tokens
_FREEFORM = (re.compile(r"^report\.tasks\[\d+\]\.generation_kwargs(\.|\[|$)"),)
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.\-]{1,40}\|>|</?s>")
# file-system paths may carry backslashes (Windows)
_PATHS = (re.compile(r"^report\.model\.local_path$"), re.compile(r"^report\.tasks\[\d+\]\.dataset\.root$"))


def text_problem(value: str, *, allow_backslash: bool = False, max_len: int = MAX_TEXT) -> str | None:
    """Why ``value`` is not an acceptable text field, or None."""
    if len(value) > max_len:
        return f"is {len(value)} characters long (at most {max_len})"
    for ch in value:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"contains the control/format character U+{ord(ch):04X}"
        if ch in _FORBIDDEN_CHARS and not (allow_backslash and ch == "\\"):
            return f"contains {ch!r}"
    for seq in _FORBIDDEN_SEQS:
        if seq in value:
            return f"contains {seq!r}"
    low = value.strip().lower()
    for pre in _FORBIDDEN_PREFIXES:
        if low.startswith(pre):
            return f"starts with {pre!r}"
    return None


POLICY_HINT = ("markup (< >), quotes, backticks, ';', backslashes, template/comment sequences "
               "(${ {{ {% /* */) and control or format characters are not allowed in text fields")


def check_text(value: str, where: str, **kw) -> None:
    why = text_problem(value, **kw)
    if why:
        raise RegistryError(422, f"field '{where}' {why}: rejected as a possible injection ({POLICY_HINT})",
                            code="forbidden_text")


def check_all_text(obj: Any, where: str) -> None:
    """Apply the text policy to every string (and every object key) below ``obj``."""
    if isinstance(obj, str):
        if any(p.search(where) for p in _FREEFORM):
            # stop sequences: whitespace and tokenizer special tokens (<|eot_id|>, </s>) are normal there
            obj = _SPECIAL_TOKEN.sub("", obj).replace("\n", " ").replace("\r", " ").replace("\t", " ")
        check_text(obj, where, allow_backslash=any(p.search(where) for p in _PATHS))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{where}.{k}"
            if not any(p.search(sub) for p in _FREEFORM):
                check_text(str(k), f"{where} (an object key)", max_len=200)
            check_all_text(v, sub)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_all_text(v, f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------
# JSON bodies
# ---------------------------------------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    if not body:
        raise RegistryError(400, "empty request body: send a JSON object", code="malformed_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(400, f"request body is not UTF-8 (byte {exc.start})", code="malformed_json") from None

    def _no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError) as exc:
        raise RegistryError(400, f"request body is not valid JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        raise RegistryError(400, "request body is nested too deeply", code="malformed_json") from None


def _loc(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def pydantic_message(exc: ValidationError, prefix: str) -> str:
    msgs = []
    for err in exc.errors()[:5]:
        where = _loc(prefix, err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            msgs.append(f"unknown field '{where}'")
        elif err.get("type") == "missing":
            msgs.append(f"missing field '{where}'")
        else:
            msgs.append(f"field '{where}': {err.get('msg')}")
    more = len(exc.errors()) - 5
    return "; ".join(msgs) + (f" (and {more} more)" if more > 0 else "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Submission(_Strict):
    report: dict
    signature: dict
    samples_jsonl: str


class AuditorRegistration(_Strict):
    format: str
    name: str
    created: str | None = None
    fingerprint: str
    public_keys: dict[str, str]


class WeightFile(_Strict):
    path: str
    sha256: str
    size: int | None = None


class ReleaseRegistration(_Strict):
    name: str
    weight_files: list[WeightFile]


def parse_model(model: type[BaseModel], doc: Any, prefix: str) -> BaseModel:
    if not isinstance(doc, dict):
        raise RegistryError(422, f"'{prefix}' must be a JSON object, got {type(doc).__name__}", code="schema")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise RegistryError(422, pydantic_message(exc, prefix), code="schema") from None


# ---------------------------------------------------------------------------------------------
# report and samples
# ---------------------------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VALIDATOR = None


def _schema_validator():
    """The report JSON Schema (audit/report.schema.json), compiled once."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema
        from dsv41.audit.schema import SCHEMA_FILE

        schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
        _VALIDATOR = jsonschema.validators.validator_for(schema)(schema)
    return _VALIDATOR


def check_report(report: dict) -> None:
    """Schema (pydantic + JSON Schema), text policy, file names, and the content-derived id."""
    from dsv41.audit.schema import Report, canonical_json

    parse_model(Report, report, "report")
    errors = sorted(_schema_validator().iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        exc = errors[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise RegistryError(422, f"report does not match the JSON Schema at 'report{path}': "
                                 f"{exc.message.splitlines()[0][:300]}", code="schema")
    check_all_text(report, "report")
    name = report["samples"]["file"]
    if "/" in name or name in (".", ".."):
        raise RegistryError(422, "field 'report.samples.file' must be a plain file name", code="schema")
    hashes = [("report.report_id", report["report_id"]), ("report.samples.sha256", report["samples"]["sha256"])]
    hashes += [(f"report.model.weight_files[{i}].sha256", f["sha256"]) for i, f in enumerate(report["model"]["weight_files"])]
    for where, h in hashes:
        if not _HEX64.match(h):
            raise RegistryError(422, f"field '{where}' must be 64 lowercase hex digits", code="schema")
    for i, f in enumerate(report["model"]["weight_files"]):
        if f["path"].startswith("/") or ".." in f["path"].split("/"):
            raise RegistryError(422, f"field 'report.model.weight_files[{i}].path' must be a relative path "
                                     "inside the model directory", code="schema")
    expected = hashlib.sha256(canonical_json({k: v for k, v in report.items() if k != "report_id"}).encode()).hexdigest()
    if report["report_id"] != expected:
        raise RegistryError(422, "field 'report.report_id' is not the SHA-256 of the report's canonical JSON "
                                 "(the report was edited after it was written)", code="content")


def check_samples(report: dict, samples: bytes, *, max_records: int = 200_000) -> list[dict]:
    """The samples file matches the report's hash and count, and every metric recomputes."""
    if hashlib.sha256(samples).hexdigest() != report["samples"]["sha256"]:
        raise RegistryError(422, "samples_jsonl: SHA-256 differs from report.samples.sha256 (the samples were "
                                 "changed)", code="content")
    records = []
    for i, line in enumerate(samples.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RegistryError(422, f"samples_jsonl line {i}: not valid JSON ({exc})", code="content") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("task"), str):
            raise RegistryError(422, f"samples_jsonl line {i}: not a sample record (no 'task')", code="content")
        records.append(rec)
        if len(records) > max_records:
            raise RegistryError(422, f"samples_jsonl has more than {max_records} records", code="content")
    if len(records) != report["samples"]["n_records"]:
        raise RegistryError(422, f"samples_jsonl has {len(records)} records, report.samples.n_records says "
                                 f"{report['samples']['n_records']}", code="content")
    recompute_metrics(report, records)
    return records


def recompute_metrics(report: dict, records: list[dict]) -> None:
    from dsv41.audit.scoring import compute_metrics

    s = report["settings"]
    again = []
    try:
        for task in s["tasks"]:
            again += compute_metrics(task, [r for r in records if r["task"] == task],
                                     seed=s["seeds"]["bootstrap"], iters=s["bootstrap_iters"])
    except Exception as exc:  # malformed records make the metric code fail
        raise RegistryError(422, f"metrics cannot be recomputed from samples_jsonl: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}", code="content") from None
    def key(m):
        return m["task"], m["metric"], m["group"]

    have = {key(m): m for m in report["metrics"]}
    got = {key(m): m for m in again}
    for k in sorted(set(have) | set(got)):
        if have.get(k) != got.get(k):
            what = "missing from the report" if k not in have else (
                "not computable from the samples" if k not in got else
                f"reported {have[k]['value']}, recomputed {got[k]['value']}")
            raise RegistryError(422, f"metric {'/'.join(k)} does not match the samples ({what})", code="content")
