"""Helpers for tests and demos: a small real audit report, signed variants of it, free ports."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import socket
from pathlib import Path

from dsv41.audit import signing as S
from dsv41.release.identity import Identity

_CACHE: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_report(model_dir: str | Path, out: str | Path, *, suite: str = "crows_pairs,xstest", limit: int = 3,
                bootstrap_iters: int = 50) -> Path:
    """Run a real (small) ``dsv41 audit run`` once per process and cache the directory."""
    key = json.dumps([str(model_dir), suite, limit, bootstrap_iters])
    if key in _CACHE and (_CACHE[key] / "report.json").is_file():
        return _CACHE[key]
    from dsv41.audit.runner import RunOptions, run

    out = Path(out)
    run(RunOptions(model=str(model_dir), suite=suite, out=str(out), limit=limit, bootstrap_iters=bootstrap_iters,
                   batch_size=4), log=lambda m: None)
    _CACHE[key] = out
    return out


def reid(report: dict) -> dict:
    """Recompute ``report_id`` after editing a report (as the runner computes it)."""
    from dsv41.audit.schema import canonical_json

    report = dict(report)
    report["report_id"] = hashlib.sha256(canonical_json({k: v for k, v in report.items()
                                                         if k != "report_id"}).encode()).hexdigest()
    return report


def variant(report: dict, i: int) -> dict:
    """A distinct valid report: same content, another creation time (so another report_id)."""
    r = copy.deepcopy(report)
    r["created_at"] = f"2026-01-{1 + i // 86400 % 28:02d}T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}+00:00"
    return reid(r)


def signed_submission(report: dict, samples: bytes, identity: Identity) -> dict:
    """The body of ``POST /reports`` for an in-memory report, signed by ``identity``."""
    statement = S.make_statement(report, samples)
    sig = {"format": S.SIGNATURE_FORMAT, "statement": statement, "signer": identity.public.to_dict(),
           "signature": identity.sign(S.signed_payload(statement, report), context=S.CONTEXT)}
    return {"report": report, "signature": sig, "samples_jsonl": samples.decode("utf-8")}


def copy_signed(report_dir: str | Path, dest: str | Path, identity: Identity) -> Path:
    """Copy a report directory and sign the copy."""
    dest = Path(dest)
    shutil.copytree(report_dir, dest, ignore=shutil.ignore_patterns(S.SIGNATURE_FILENAME, "private", ".partial"))
    S.sign_report(dest, identity)
    return dest


def zip_dir(report_dir: str | Path, zip_path: str | Path) -> Path:
    import zipfile

    report_dir, zip_path = Path(report_dir), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(report_dir.rglob("*")):
            if p.is_file():
                z.write(p, f"{report_dir.name}/{p.relative_to(report_dir).as_posix()}")
    return zip_path


def shared_fixture(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """(tiny model directory, unsigned report directory), built once per test session."""
    if "shared_report" not in _CACHE:
        from dsv41.audit.testing import make_tiny_causal_lm

        base = tmp_path_factory.mktemp("dsv41_registry_shared")
        _CACHE["shared_model"] = make_tiny_causal_lm(tokenizer_dir, base / "model")
        _CACHE["shared_report"] = make_report(_CACHE["shared_model"], base / "report")
    return _CACHE["shared_model"], _CACHE["shared_report"]


def postgres_url_or_skip() -> str:
    """DSV41_TEST_POSTGRES_URL with the registry tables dropped (a clean database), or skip the test."""
    import os

    import pytest

    url = os.environ.get("DSV41_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DSV41_TEST_POSTGRES_URL is not set (start a server with: eval \"$(.ci/postgres.sh start)\")")
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS metrics, reports, releases, auditors CASCADE")
    return url
