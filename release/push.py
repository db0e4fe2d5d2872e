"""Upload a signed release to the Hugging Face Hub (``dsv41 release push``).

The directory must verify first (:func:`dsv41.release.manifest.verify_model_dir`); then exactly
the signed files plus ``model.sig`` and ``model.sig.pq.json`` are uploaded with
``HfApi.upload_folder`` (which sends large files through the Hub's LFS/Xet storage), so a
stray file in the directory can neither be pushed unsigned nor silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dsv41.release.errors import ManifestError, PushRefused
from dsv41.release.identity import PublicIdentity
from dsv41.release.manifest import (
    COSIGNATURE_FILENAME,
    SIGNATURE_FILENAME,
    verify_model_dir,
)


def _glob_literal(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclass
class PushPlan:
    repo_id: str
    folder: Path
    files: list[str]  # every path that will be in the commit
    signer: str
    pinned: bool


def plan_push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    public_identity: PublicIdentity | None = None,
    trusted_fingerprints: Iterable[str] | None = None,
) -> PushPlan:
    """Verify ``path`` and return what a push would upload; raises :class:`PushRefused`."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushRefused(f"--repo must be ORG/NAME, got {repo_id!r}")
    try:
        info = verify_model_dir(path, public_identity=public_identity, trusted_fingerprints=trusted_fingerprints)
    except ManifestError as exc:
        raise PushRefused(f"refusing to push {path}: the manifest does not verify:\n{exc}") from None
    files = sorted(info.files) + [SIGNATURE_FILENAME, COSIGNATURE_FILENAME]
    return PushPlan(repo_id, info.path, files, info.signer.fingerprint, info.pinned)


def push_release(
    path: str | os.PathLike,
    repo_id: str,
    *,
    public_identity: PublicIdentity | None = None,
    trusted_fingerprints: Iterable[str] | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api=None,
):
    """Verify, then create the repo if needed and upload the signed files. Returns the CommitInfo."""
    from huggingface_hub import HfApi

    plan = plan_push(path, repo_id, public_identity=public_identity, trusted_fingerprints=trusted_fingerprints)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(plan.folder),
        allow_patterns=[_glob_literal(f) for f in plan.files],
        commit_message=commit_message or f"Release: {len(plan.files)} signed files (signer {plan.signer})",
        revision=revision,
        create_pr=create_pr,
    )
