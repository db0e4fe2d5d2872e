"""Client side of the registry: ``dsv41 audit submit DIR --to URL | hf://datasets/ORG/NAME``.

Before anything is sent the report's signature is checked locally, so an unsigned or
tampered report never leaves the machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv41.audit import signing as S

HF_TARGET = re.compile(r"^hf://datasets/([A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)/?$")


class SubmitError(RuntimeError):
    pass


def build_submission(report_dir: str | Path) -> dict:
    """The JSON body of ``POST /reports`` for a signed report directory (signature checked first)."""
    d = Path(report_dir)
    try:
        info = S.verify_signed_dir(d)
    except S.SigningError as exc:
        raise SubmitError(f"not submitting {d}: {exc}") from None
    report = json.loads((d / "report.json").read_text(encoding="utf-8"))
    samples = (d / report["samples"]["file"]).read_text(encoding="utf-8")
    assert info.report_id == report["report_id"]
    return {"report": report, "signature": S.load_signature(d), "samples_jsonl": samples}


@dataclass
class SubmitResult:
    status: int
    body: dict

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)


def submit_http(report_dir: str | Path, url: str, *, client=None, timeout: float = 120.0) -> SubmitResult:
    import httpx

    body = json.dumps(build_submission(report_dir), ensure_ascii=False).encode("utf-8")
    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        r = client.post(url.rstrip("/") + "/reports", content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        raise SubmitError(f"cannot reach the registry at {url}: {exc}") from None
    finally:
        if own:
            client.close()
    try:
        doc = r.json()
    except ValueError:
        doc = {"detail": r.text[:500]}
    return SubmitResult(r.status_code, doc if isinstance(doc, dict) else {"detail": str(doc)})


def register_auditor_http(public_identity: dict, url: str, *, client=None, timeout: float = 30.0) -> SubmitResult:
    import httpx

    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        r = client.post(url.rstrip("/") + "/auditors", json=public_identity)
    except httpx.HTTPError as exc:
        raise SubmitError(f"cannot reach the registry at {url}: {exc}") from None
    finally:
        if own:
            client.close()
    return SubmitResult(r.status_code, r.json())


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub dataset pull request
# ---------------------------------------------------------------------------------------------


def parse_hf_target(target: str) -> str:
    m = HF_TARGET.match(target)
    if not m:
        raise SubmitError(f"--to {target!r}: expected hf://datasets/ORG/NAME")
    return m.group(1)


HUB_FILES = ("report.json", S.SIGNATURE_FILENAME, "report.md")


def hub_operations(report_dir: str | Path) -> tuple[str, list[Any]]:
    """(commit message, CommitOperationAdd list) for a signed report under ``reports/<report_id>/``."""
    from huggingface_hub import CommitOperationAdd

    d = Path(report_dir)
    sub = build_submission(d)
    rid = sub["report"]["report_id"]
    names = [n for n in HUB_FILES if (d / n).is_file()] + [sub["report"]["samples"]["file"]]
    ops = [CommitOperationAdd(path_in_repo=f"reports/{rid}/{n}", path_or_fileobj=(d / n).read_bytes()) for n in names]
    signer = sub["signature"]["signer"]
    message = (f"Add signed audit report {rid[:16]} of {sub['report']['model']['id']} "
               f"(auditor {signer.get('name') or '?'}, {signer['fingerprint'][:23]})")
    return message, ops


def submit_hub(report_dir: str | Path, target: str, *, api=None, token: str | None = None):
    """Open a pull request adding the report to the Hub dataset repo named by ``target``."""
    repo_id = parse_hf_target(target)
    message, ops = hub_operations(report_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    desc = ("Signed dsv41 audit report. Check it with `dsv41 audit verify DIR --no-weights` after downloading "
            "`reports/<id>/`; both the Ed25519 and the ML-DSA-65 signature must verify.")
    return api.create_commit(repo_id=repo_id, repo_type="dataset", operations=ops, commit_message=message,
                             commit_description=desc, create_pr=True)
