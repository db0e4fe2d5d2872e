"""Signed audit reports: ``dsv41 audit sign DIR`` and the signature part of ``dsv41 audit verify``.

``sign`` writes ``DIR/report.sig.json``::

    {
      "format": "dsv41-audit-signature/v1",
      "statement": {"type": "dsv41-audit-statement/v1", "report_id": ...,
                    "report_sha256": SHA-256 of the canonical report JSON,
                    "samples": {"file": "samples.jsonl", "sha256": ..., "size": ..., "n_records": ...}},
      "signer": {public identity of the auditor (dsv41-identity/v1)},
      "signature": {hybrid Ed25519 + ML-DSA-65 bundle, context "dsv41/audit-report/v1"}
    }

The signed bytes are ``canonical_json({"statement": statement, "report": report})``: the full
canonical JSON of ``report.json`` plus the hashes of its samples file. ``verify`` rebuilds
them from the files on disk, so any change to ``report.json``, ``samples.jsonl`` or the
statement fails; a report is valid only if BOTH signatures verify.

The transparency-log leaf of a signed report (what the registry appends, and what
``dsv41 audit verify --log URL`` looks up) is ``canonical_json`` of
``{"type": "dsv41-log-leaf/v1", "report_id", "report_sha256", "samples_sha256", "signer"}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv41.release.identity import (
    Identity,
    IdentityError,
    PublicIdentity,
    SignatureError,
    canonical_json,
    verify,
)

SIGNATURE_FILENAME = "report.sig.json"
SIGNATURE_FORMAT = "dsv41-audit-signature/v1"
STATEMENT_TYPE = "dsv41-audit-statement/v1"
LEAF_TYPE = "dsv41-log-leaf/v1"
CONTEXT = "dsv41/audit-report/v1"
TREE_HEAD_CONTEXT = "dsv41/registry-tree-head/v1"
TREE_HEAD_FORMAT = "dsv41-tree-head/v1"


class SigningError(RuntimeError):
    """The report cannot be signed, or its signature / content / log proof does not check out."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("audit report signature check FAILED:\n" + "\n".join(f"  - {p}" for p in self.problems))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def report_sha256(report: dict) -> str:
    return sha256_hex(canonical_json(report))


def count_records(samples: bytes) -> int:
    return sum(1 for line in samples.decode("utf-8").splitlines() if line.strip())


def make_statement(report: dict, samples: bytes) -> dict:
    return {
        "type": STATEMENT_TYPE,
        "report_id": report.get("report_id"),
        "report_sha256": report_sha256(report),
        "samples": {"file": report["samples"]["file"], "sha256": sha256_hex(samples), "size": len(samples),
                    "n_records": count_records(samples)},
    }


def signed_payload(statement: dict, report: dict) -> bytes:
    return canonical_json({"statement": statement, "report": report})


def leaf_data(statement: dict, signer_fingerprint: str) -> bytes:
    """Bytes of the transparency-log leaf for a signed report."""
    return canonical_json({
        "type": LEAF_TYPE,
        "report_id": statement["report_id"],
        "report_sha256": statement["report_sha256"],
        "samples_sha256": statement["samples"]["sha256"],
        "signer": signer_fingerprint,
    })


def _read_report_dir(report_dir: str | Path) -> tuple[Path, dict, bytes]:
    d = Path(report_dir)
    rp = d / "report.json"
    if not rp.is_file():
        raise SigningError(f"{rp} does not exist (not a finished audit report directory)")
    try:
        report = json.loads(rp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SigningError(f"{rp}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("samples"), dict) \
            or not isinstance(report["samples"].get("file"), str):
        raise SigningError(f"{rp}: not an audit report (no samples.file)")
    name = report["samples"]["file"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise SigningError(f"{rp}: samples.file must be a plain file name, got {name!r}")
    sp = d / name
    if not sp.is_file():
        raise SigningError(f"samples file {sp} is missing")
    return d, report, sp.read_bytes()


def sign_report(report_dir: str | Path, identity: Identity, *, overwrite: bool = False) -> Path:
    """Sign ``report.json`` + the hashes of its samples file; write ``report.sig.json``."""
    d, report, samples = _read_report_dir(report_dir)
    if sha256_hex(samples) != report["samples"].get("sha256"):
        raise SigningError(f"{report['samples']['file']}: SHA-256 differs from report.samples.sha256; "
                           "refusing to sign a report whose samples were changed")
    out = d / SIGNATURE_FILENAME
    if out.exists() and not overwrite:
        raise SigningError(f"{out} already exists (use --force to replace the signature)")
    statement = make_statement(report, samples)
    doc = {
        "format": SIGNATURE_FORMAT,
        "statement": statement,
        "signer": identity.public.to_dict(),
        "signature": identity.sign(signed_payload(statement, report), context=CONTEXT),
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


@dataclass
class SignedReport:
    report_id: str
    signer: PublicIdentity
    statement: dict
    leaf: bytes

    @property
    def leaf_hash_hex(self) -> str:
        from dsv41.registry.merkle import leaf_hash

        return leaf_hash(self.leaf).hex()


def check_signed(report: dict, sigdoc: Any, samples: bytes | None, *,
                 signer: PublicIdentity | None = None) -> SignedReport:
    """Check a signature document against an in-memory report and samples file.

    ``signer``: the public identity to verify with (e.g. the registered auditor key); default
    the identity embedded in the signature document (proves integrity, not who signed it).
    ``samples``: the samples file bytes; ``None`` trusts the hash recorded in the report.
    """
    if not isinstance(sigdoc, dict):
        raise SigningError("signature document: expected a JSON object")
    if sigdoc.get("format") != SIGNATURE_FORMAT:
        raise SigningError(f"signature document: field 'format' must be {SIGNATURE_FORMAT!r}, got {sigdoc.get('format')!r}")
    unknown = sorted(set(sigdoc) - {"format", "statement", "signer", "signature"})
    if unknown:
        raise SigningError(f"signature document: unknown field(s) {', '.join(map(repr, unknown))}")
    try:
        embedded = PublicIdentity.from_dict(sigdoc.get("signer"), source="signature document field 'signer'")
    except IdentityError as exc:
        raise SigningError(str(exc)) from None
    pub = signer or embedded
    if embedded.fingerprint != pub.fingerprint:
        raise SigningError(f"signed by {embedded.fingerprint}, expected {pub.name!r} ({pub.fingerprint})")
    claimed = sigdoc.get("statement")
    if not isinstance(claimed, dict):
        raise SigningError("signature document: missing field 'statement'")
    problems = []
    if samples is not None:
        statement = make_statement(report, samples)
        if statement["samples"]["sha256"] != report.get("samples", {}).get("sha256"):
            problems.append("samples file: SHA-256 differs from report.samples.sha256 (samples were changed)")
    else:
        statement = {
            "type": STATEMENT_TYPE, "report_id": report.get("report_id"), "report_sha256": report_sha256(report),
            "samples": {"file": report["samples"]["file"], "sha256": report["samples"]["sha256"],
                        "size": (claimed.get("samples") or {}).get("size"),
                        "n_records": report["samples"].get("n_records")},
        }
    if claimed != statement:
        if claimed.get("report_sha256") != statement["report_sha256"]:
            problems.append("report.json changed after it was signed (canonical SHA-256 differs)")
        if (claimed.get("samples") or {}).get("sha256") != statement["samples"]["sha256"]:
            problems.append("samples file changed after it was signed (SHA-256 differs)")
        if not problems:
            problems.append("the signed statement does not match the report files")
    try:
        verify(signed_payload(statement, report), sigdoc.get("signature"), pub, context=CONTEXT)
    except SignatureError as exc:
        problems.append(str(exc))
    if problems:
        raise SigningError(problems)
    return SignedReport(report_id=str(report.get("report_id")), signer=pub, statement=statement,
                        leaf=leaf_data(statement, pub.fingerprint))


def load_signature(report_dir: str | Path) -> dict:
    p = Path(report_dir) / SIGNATURE_FILENAME
    if not p.is_file():
        raise SigningError(f"{p} not found: the report is not signed (dsv41 audit sign DIR)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SigningError(f"{p}: not valid JSON ({exc})") from None


def verify_signed_dir(report_dir: str | Path, *, trusted: list[str] | None = None) -> SignedReport:
    """Verify ``report.sig.json`` against the files; ``trusted``: allowed signer fingerprints
    or paths of public identity files (empty/None = any signer)."""
    _, report, samples = _read_report_dir(report_dir)
    sigdoc = load_signature(report_dir)
    if trusted:
        fps = set()
        for t in trusted:
            if t.startswith("sha256:"):
                fps.add(t)
            else:
                try:
                    fps.add(PublicIdentity.load(t).fingerprint)
                except IdentityError as exc:
                    raise SigningError(str(exc)) from None
        signer_fp = (sigdoc.get("signer") or {}).get("fingerprint") if isinstance(sigdoc, dict) else None
        if signer_fp not in fps:
            raise SigningError(f"signer {signer_fp!r} is not one of the trusted identities {sorted(fps)}")
    return check_signed(report, sigdoc, samples)


# ---------------------------------------------------------------------------------------------
# transparency log client side
# ---------------------------------------------------------------------------------------------


def verify_tree_head(doc: Any, *, pinned: str | None = None) -> tuple[dict, PublicIdentity]:
    """Check a signed tree head ``{"tree_head", "signature", "log_identity"}``; returns (head, key)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tree_head"), dict):
        raise SigningError("log: the signed tree head is malformed")
    try:
        pub = PublicIdentity.from_dict(doc.get("log_identity"), source="log identity")
    except IdentityError as exc:
        raise SigningError(str(exc)) from None
    if pinned and pub.fingerprint != pinned:
        raise SigningError(f"log: tree head signed by {pub.fingerprint}, expected the pinned log key {pinned}")
    head = doc["tree_head"]
    if head.get("format") != TREE_HEAD_FORMAT or head.get("log_id") != pub.fingerprint:
        raise SigningError("log: tree head has the wrong format or log id")
    try:
        verify(canonical_json(head), doc.get("signature"), pub, context=TREE_HEAD_CONTEXT)
    except SignatureError as exc:
        raise SigningError(f"log: tree head signature invalid: {exc}") from None
    return head, pub


def check_log_inclusion(info: SignedReport, url: str, *, log_key: str | None = None, client=None,
                        timeout: float = 30.0) -> dict:
    """Fetch ``GET URL/log/proof/{report_id}`` and check that this exact signed report is in the
    registry's log under a validly signed tree head. Returns {index, tree_size, root_hash, log_id}."""
    import httpx
    from dsv41.registry import merkle

    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        try:
            r = client.get(url.rstrip("/") + f"/log/proof/{info.report_id}")
        except httpx.HTTPError as exc:
            raise SigningError(f"log: cannot reach {url}: {exc}") from None
        if r.status_code == 404:
            raise SigningError(f"log: report {info.report_id} is not in the log at {url}")
        if r.status_code != 200:
            raise SigningError(f"log: {url} answered HTTP {r.status_code}: {r.text[:300]}")
        try:
            proof = r.json()
        except ValueError:
            raise SigningError(f"log: {url} did not answer JSON") from None
    finally:
        if own:
            client.close()
    head, pub = verify_tree_head(proof.get("signed_tree_head"), pinned=log_key)
    mine = info.leaf_hash_hex
    if proof.get("leaf_hash") != mine:
        raise SigningError(f"log: the logged leaf {proof.get('leaf_hash')} differs from this report's leaf {mine} "
                           "(the report or its signer changed since it was logged)")
    try:
        path = [bytes.fromhex(h) for h in proof.get("audit_path", [])]
        size, index = int(head["tree_size"]), int(proof["leaf_index"])
        if int(proof.get("tree_size", -1)) != size:
            raise SigningError("log: proof and tree head are for different tree sizes")
        merkle.verify_inclusion(bytes.fromhex(mine), index, size, path, bytes.fromhex(head["root_hash"]))
    except (merkle.ProofError, KeyError, TypeError, ValueError) as exc:
        raise SigningError(f"log: inclusion proof invalid: {exc}") from None
    return {"index": index, "tree_size": size, "root_hash": head["root_hash"], "log_id": pub.fingerprint,
            "timestamp": head.get("timestamp")}


# ---------------------------------------------------------------------------------------------
# command line: dsv41 audit sign / submit, and the signature part of dsv41 audit verify
# ---------------------------------------------------------------------------------------------


def check_signatures_cli(report_dir: str, *, require: bool, signer: list[str] | None, log: str | None,
                         log_key: str | None) -> None:
    import typer

    if not (Path(report_dir) / SIGNATURE_FILENAME).is_file():
        if require:
            typer.echo(f"FAILED: {Path(report_dir) / SIGNATURE_FILENAME} not found: the report is not signed "
                       "(dsv41 audit sign DIR)", err=True)
            raise typer.Exit(1)
        typer.echo("WARNING: the report is not signed (no report.sig.json); only its content was checked. "
                   "Use --require-signature to make this an error.", err=True)
        return
    try:
        info = verify_signed_dir(report_dir, trusted=signer or None)
    except SigningError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    who = info.signer.name or "unnamed"
    typer.echo(f"OK: signed by {who} ({info.signer.fingerprint}); Ed25519 and ML-DSA-65 signatures both verify"
               + ("" if signer else " (signer not pinned: pass --signer to check who signed)"))
    if log:
        try:
            res = check_log_inclusion(info, log, log_key=log_key)
        except SigningError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
        typer.echo(f"OK: in the transparency log of {log} at index {res['index']} of a tree of size "
                   f"{res['tree_size']} (root {res['root_hash'][:16]}…, signed by log {res['log_id'][:23]}…)")


def register_commands(audit) -> None:
    """Add ``sign`` and ``submit`` to the ``dsv41 audit`` group."""
    import typer

    @audit.command("sign")
    def sign_cmd(
        report_dir: str = typer.Argument(..., help="Finished report directory (report.json + samples.jsonl)."),
        identity: str = typer.Option(None, "--identity", help="Identity directory or identity.key.json "
                                     "[default: $DSV41_IDENTITY or ~/.dsv41/identity]."),
        passphrase_env: str = typer.Option("DSV41_PASSPHRASE", "--passphrase-env",
                                           help="Environment variable holding the passphrase (else prompted)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing report.sig.json."),
    ) -> None:
        """Sign the canonical report JSON and the samples-file hashes with Ed25519 + ML-DSA-65."""
        import os

        from dsv41.release.identity import default_identity_dir

        passphrase = os.environ.get(passphrase_env) or typer.prompt("Passphrase", hide_input=True)
        try:
            ident = Identity.load(identity or default_identity_dir(), passphrase)
            out = sign_report(report_dir, ident, overwrite=force)
        except (IdentityError, SigningError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"signed by {ident.name or 'unnamed'} ({ident.fingerprint})")
        typer.echo(str(out))

    @audit.command("submit")
    def submit_cmd(
        report_dir: str = typer.Argument(..., help="Signed report directory."),
        to: str = typer.Option(..., "--to", help="Registry URL (http[s]://...) or hf://datasets/ORG/NAME (opens a PR)."),
        token: str = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token for hf:// targets."),
    ) -> None:
        """Submit a signed report to a registry, or open a pull request on a Hub dataset repo."""
        from dsv41.registry.client import SubmitError, submit_http, submit_hub

        try:
            if to.startswith("hf://"):
                info = submit_hub(report_dir, to, token=token)
                typer.echo(f"opened pull request: {getattr(info, 'pr_url', None) or info}")
                return
            if not to.startswith(("http://", "https://")):
                raise SubmitError(f"--to {to!r}: expected an http(s):// registry URL or hf://datasets/ORG/NAME")
            res = submit_http(report_dir, to)
        except SubmitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if not res.ok:
            typer.echo(f"REJECTED (HTTP {res.status}): {res.body.get('detail')}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{res.body['status'].upper()}: report {res.body['id']} at log index {res.body['log_index']} "
                   f"({res.body['model_status']})")
