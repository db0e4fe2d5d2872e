"""Pydantic models of ``report.json``; ``report.schema.json`` (next to this file) is generated from
them (``python -m dsv41.audit.schema`` rewrites it; a test checks that it is up to date).

The report is canonicalisable for signing: keys are written sorted, metric floats are rounded
to 6 decimals, NaN is written as null, and nothing in it changes after it is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "dsv41.audit.report/1.0"
SCHEMA_FILE = Path(__file__).resolve().parent / "report.schema.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileHash(_Strict):
    path: str = Field(description="path relative to the model directory or data root")
    sha256: str
    size: int


class ModelInfo(_Strict):
    id: str = Field(description="path or Hub id given to --model")
    revision: str | None = Field(description="Hub revision (commit) or null for a local directory")
    source: Literal["local", "hub"]
    local_path: str = Field(description="directory the weights were read from when the audit ran")
    weight_files: list[FileHash] = Field(description="SHA-256 of every weight file")
    config_sha256: str | None
    tokenizer_files: list[FileHash]
    model_type: str | None
    num_parameters: int
    dtype: str


class DatasetInfo(_Strict):
    source: Literal["probes", "data-dir", "hub"]
    root: str
    files: list[FileHash]
    n_items_available: int
    n_items_evaluated: int


class TaskInfo(_Strict):
    name: str
    suite: Literal["bias", "safety"]
    version: str
    output_type: str
    num_fewshot: int
    apply_chat_template: bool
    generation_kwargs: dict | None
    task_files: list[FileHash] = Field(description="task YAML and utils.py hashes")
    dataset: DatasetInfo


class MetricValue(_Strict):
    task: str
    metric: str
    group: str = Field(description="'all' or the group/category the metric is restricted to")
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    higher_is_better: bool | None


class Calibration(_Strict):
    file_sha256: str
    n: int
    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float | None
    tp: int
    fp: int
    fn: int
    tn: int
    errors: list[str]


class JudgeDesc(_Strict):
    name: str
    kind: Literal["rule", "model"]
    version: str
    calibration: Calibration | None = None


class Disagreement(_Strict):
    task: str
    item_id: str
    labels: dict[str, str]


class Agreement(_Strict):
    judges: list[str]
    n: int
    kappa: float | None
    percent_agreement: float | None
    disagreements: list[Disagreement]


class JudgeInfo(_Strict):
    primary: str
    judges: list[JudgeDesc]
    agreement: Agreement | None
    toxicity_scorer: dict[str, str]
    sentiment_scorer: dict[str, str]


class Seeds(_Strict):
    random: int
    numpy: int
    torch: int
    fewshot: int
    bootstrap: int


class Settings(_Strict):
    suites: list[str]
    tasks: list[str]
    limit: int | None
    seeds: Seeds
    bootstrap_iters: int
    ci_level: float
    batch_size: int
    device: str
    apply_chat_template: str
    num_fewshot: int


class SamplesInfo(_Strict):
    file: str
    sha256: str
    n_records: int
    redacted: bool
    redaction_scheme: str | None
    n_redacted: int


class Report(_Strict):
    schema_version: Literal["dsv41.audit.report/1.0"] = SCHEMA_VERSION
    report_id: str
    status: Literal["complete"]
    created_at: str
    dsv41_version: str
    packages: dict[str, str]
    model: ModelInfo
    settings: Settings
    tasks: list[TaskInfo]
    judge: JudgeInfo
    metrics: list[MetricValue]
    samples: SamplesInfo


def json_schema() -> dict:
    schema = Report.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://dsv41.example/schemas/audit-report-1.0.json"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_FILE) -> Path:
    path.write_text(schema_text(), encoding="utf-8")
    return path


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace variance, UTF-8; the form to hash or sign."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


if __name__ == "__main__":  # pragma: no cover
    print(write_schema())
