"""Registry logic, independent of HTTP: used by the FastAPI app and in-process by the Space.

Every public method returns plain JSON-serialisable data or raises
:class:`~dsv41.registry.validation.RegistryError` (an HTTP 4xx status and a clear message).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any

from dsv41.audit import signing as S
from dsv41.registry import merkle
from dsv41.registry.store import Database
from dsv41.registry.validation import (
    AuditorRegistration,
    RegistryError,
    ReleaseRegistration,
    Submission,
    check_report,
    check_samples,
    check_text,
    parse_model,
)
from dsv41.release.identity import Identity, IdentityError, PublicIdentity, canonical_json

DEFAULT_MAX_BODY = 32 * 1024 * 1024
UNREGISTERED = "unregistered model"
_ID = re.compile(r"^[0-9a-f]{64}$")
_METRIC = re.compile(r"^[A-Za-z0-9_.\-]{1,100}(/[A-Za-z0-9_.\-]{1,100})?$")
_GROUP = re.compile(r"^[A-Za-z0-9_.\-:()+ ]{1,200}$")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def weights_fingerprint(weight_files: list[dict]) -> str:
    """One fingerprint for a set of weight files: SHA-256 over the sorted (path, sha256) pairs."""
    pairs = sorted([str(f["path"]), str(f["sha256"])] for f in weight_files)
    return "sha256:" + hashlib.sha256(b"dsv41-weights/v1\n" + canonical_json(pairs)).hexdigest()


def check_id(report_id: str) -> str:
    if not isinstance(report_id, str) or not _ID.match(report_id):
        raise RegistryError(400, "a report id is 64 lowercase hex digits (the report_id of report.json)", code="bad_id")
    return report_id


def load_or_create_identity(directory: str | Path, name: str = "dsv41-registry") -> Identity:
    """The registry's log-signing identity, kept in ``directory``.

    The passphrase comes from ``DSV41_REGISTRY_PASSPHRASE``; without it a random one is created
    next to the key (file mode 0600), which is enough for a single-host registry.
    """
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = os.environ.get("DSV41_REGISTRY_PASSPHRASE")
        pfile = d / "passphrase"
        if (d / "identity.key.json").exists():
            passphrase = env or (pfile.read_text().strip() if pfile.exists() else None)
            if not passphrase:
                raise IdentityError(f"{d}: set DSV41_REGISTRY_PASSPHRASE to unlock the registry key")
            return Identity.load(d, passphrase)
        ident = Identity.generate(name=name)
        if env:
            ident.save(d, env)
        else:
            passphrase = secrets.token_hex(32)
            fd = os.open(pfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(passphrase + "\n")
            ident.save(d, passphrase, scrypt_n=2**14)  # random passphrase: a cheap KDF is enough
        return ident


class RegistryService:
    def __init__(self, db: Database, identity: Identity, *, max_body_bytes: int = DEFAULT_MAX_BODY,
                 admin_token: str | None = None):
        self.db = db
        self.identity = identity
        self.max_body_bytes = max_body_bytes
        self.admin_token = admin_token
        self._leaves: list[bytes] = []
        self._lock = threading.Lock()
        self._head_cache: dict[int, dict] = {}

    @classmethod
    def from_env(cls, *, database_url: str | None = None, data_dir: str | None = None, **kw) -> RegistryService:
        """``DATABASE_URL`` (PostgreSQL) or SQLite under ``DSV41_REGISTRY_HOME`` (default ~/.dsv41/registry)."""
        home = Path(data_dir or os.environ.get("DSV41_REGISTRY_HOME") or Path.home() / ".dsv41" / "registry").expanduser()
        url = database_url or os.environ.get("DATABASE_URL") or f"sqlite:///{home / 'registry.sqlite3'}"
        kw.setdefault("admin_token", os.environ.get("DSV41_REGISTRY_ADMIN_TOKEN") or None)
        if "max_body_bytes" not in kw and os.environ.get("DSV41_REGISTRY_MAX_BYTES"):
            kw["max_body_bytes"] = int(os.environ["DSV41_REGISTRY_MAX_BYTES"])
        return cls(Database(url), load_or_create_identity(home / "log-identity"), **kw)

    # -- access control -------------------------------------------------------------------------

    def check_admin(self, token: str | None) -> None:
        if not self.admin_token:
            raise RegistryError(403, "release registration over HTTP is disabled: start the registry with "
                                     "DSV41_REGISTRY_ADMIN_TOKEN set, or use `dsv41 registry serve --release DIR`",
                                code="forbidden")
        if not token or not secrets.compare_digest(token, self.admin_token):
            raise RegistryError(401, "missing or wrong admin token (Authorization: Bearer TOKEN)", code="unauthorized")

    # -- auditors -------------------------------------------------------------------------------

    def register_auditor(self, doc: Any) -> tuple[int, dict]:
        reg = parse_model(AuditorRegistration, doc, "auditor")
        check_text(reg.name, "auditor.name", max_len=200)
        if not reg.name.strip():
            raise RegistryError(422, "field 'auditor.name' must not be empty", code="schema")
        try:
            pub = PublicIdentity.from_dict(reg.model_dump(), source="auditor")
        except IdentityError as exc:
            raise RegistryError(422, str(exc), code="bad_key") from None
        with self.db.write() as tx:
            row = tx.one("SELECT fingerprint, name FROM auditors WHERE fingerprint = ?", (pub.fingerprint,))
            if row:
                return 200, {"status": "already registered", "fingerprint": pub.fingerprint, "name": row["name"]}
            tx.execute("INSERT INTO auditors (fingerprint, name, identity_json, registered_at) VALUES (?, ?, ?, ?)",
                       (pub.fingerprint, pub.name, json.dumps(pub.to_dict(), sort_keys=True), now()))
        return 201, {"status": "registered", "fingerprint": pub.fingerprint, "name": pub.name}

    def list_auditors(self) -> list[dict]:
        with self.db.read() as tx:
            return tx.all("SELECT fingerprint, name, registered_at FROM auditors ORDER BY registered_at, fingerprint")

    def _auditor(self, tx, fingerprint: str) -> PublicIdentity | None:
        row = tx.one("SELECT identity_json FROM auditors WHERE fingerprint = ?", (fingerprint,))
        return PublicIdentity.from_dict(json.loads(row["identity_json"])) if row else None

    # -- releases -------------------------------------------------------------------------------

    def register_release(self, doc: Any) -> tuple[int, dict]:
        rel = parse_model(ReleaseRegistration, doc, "release")
        check_text(rel.name, "release.name", max_len=200)
        if not rel.weight_files:
            raise RegistryError(422, "field 'release.weight_files' must list at least one file", code="schema")
        files = [f.model_dump() for f in rel.weight_files]
        for i, f in enumerate(files):
            check_text(f["path"], f"release.weight_files[{i}].path")
            if not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
                raise RegistryError(422, f"field 'release.weight_files[{i}].sha256' must be 64 lowercase hex digits")
        fp = weights_fingerprint(files)
        with self.db.write() as tx:
            row = tx.one("SELECT name FROM releases WHERE fingerprint = ?", (fp,))
            if row:
                return 200, {"status": "already registered", "fingerprint": fp, "name": row["name"]}
            tx.execute("INSERT INTO releases (fingerprint, name, weight_files_json, registered_at) VALUES (?, ?, ?, ?)",
                       (fp, rel.name, json.dumps(files, sort_keys=True), now()))
        return 201, {"status": "registered", "fingerprint": fp, "name": rel.name}

    def register_release_dir(self, path: str | Path, name: str | None = None) -> dict:
        """Register the weight files of a local model directory (as an audit report lists them)."""
        from dsv41.audit.runner import file_hashes, model_files

        p = Path(path).expanduser().resolve()
        weights, _, _ = model_files(p)
        if not weights:
            raise RegistryError(422, f"{p}: no weight files found")
        _, out = self.register_release({"name": name or p.name, "weight_files": [
            {"path": f["path"], "sha256": f["sha256"], "size": f["size"]} for f in file_hashes(p, weights)]})
        return out

    def list_releases(self) -> list[dict]:
        with self.db.read() as tx:
            return tx.all("SELECT fingerprint, name, registered_at FROM releases ORDER BY registered_at, name")

    # -- submission -----------------------------------------------------------------------------

    def submit(self, doc: Any) -> tuple[int, dict]:
        sub = parse_model(Submission, doc, "submission")
        report = sub.report
        check_report(report)
        samples = sub.samples_jsonl.encode("utf-8")
        records = check_samples(report, samples)
        signer_fp = sub.signature.get("signer", {}).get("fingerprint") if isinstance(sub.signature.get("signer"), dict) else None
        if not isinstance(signer_fp, str) or not signer_fp.startswith("sha256:"):
            raise RegistryError(422, "field 'signature.signer.fingerprint' is missing: sign the report with "
                                     "`dsv41 audit sign DIR`", code="signature")
        with self.db.read() as tx:
            auditor = self._auditor(tx, signer_fp)
        if auditor is None:
            raise RegistryError(403, f"signer {signer_fp} is not a registered auditor: register the public key "
                                     "with POST /auditors first", code="unknown_auditor")
        try:
            signed = S.check_signed(report, sub.signature, samples, signer=auditor)
        except S.SigningError as exc:
            raise RegistryError(422, "signature check failed: " + "; ".join(exc.problems), code="signature") from None
        model_fp = weights_fingerprint(report["model"]["weight_files"])
        leaf_hex = merkle.leaf_hash(signed.leaf).hex()
        rid = report["report_id"]
        with self.db.write() as tx:
            row = tx.one("SELECT id, log_index, signer, leaf_hash, release_name FROM reports WHERE id = ?", (rid,))
            if row:
                if row["signer"] != signer_fp:
                    raise RegistryError(409, f"report {rid} is already registered, signed by another auditor "
                                             f"({row['signer']})", code="conflict")
                return 200, {"status": "duplicate", "id": rid, "log_index": row["log_index"],
                             "leaf_hash": row["leaf_hash"], "model_status": self._model_status(row["release_name"]),
                             "message": "this report was already accepted; nothing was stored again"}
            rel = tx.one("SELECT name FROM releases WHERE fingerprint = ?", (model_fp,))
            release = rel["name"] if rel else None
            nxt = tx.one("SELECT COALESCE(MAX(log_index), -1) + 1 AS n FROM reports")["n"]
            tx.execute(
                "INSERT INTO reports (id, log_index, leaf_hash, leaf_data, signer, auditor_name, model_id, "
                "model_fingerprint, release_name, created_at, submitted_at, suites, n_metrics, n_records, "
                "report_json, signature_json, samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rid, nxt, leaf_hex, signed.leaf.decode("utf-8"), signer_fp, auditor.name, report["model"]["id"],
                 model_fp, release, report["created_at"], now(), ",".join(report["settings"]["suites"]),
                 len(report["metrics"]), len(records), json.dumps(report, sort_keys=True),
                 json.dumps(sub.signature, sort_keys=True), samples))
            for m in report["metrics"]:
                tx.execute("INSERT INTO metrics (report_id, task, metric, grp, value, ci_low, ci_high, n, "
                           "higher_is_better) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (rid, m["task"], m["metric"], m["group"], m["value"], m["ci_low"], m["ci_high"], m["n"],
                            None if m["higher_is_better"] is None else int(m["higher_is_better"])))
        return 201, {"status": "accepted", "id": rid, "log_index": nxt, "leaf_hash": leaf_hex,
                     "model_status": self._model_status(release), "url": f"/reports/{rid}"}

    @staticmethod
    def _model_status(release: str | None) -> str:
        return f"registered release {release}" if release else UNREGISTERED

    # -- queries --------------------------------------------------------------------------------

    def _summary(self, row: dict) -> dict:
        return {
            "id": row["id"], "log_index": row["log_index"], "model_id": row["model_id"],
            "model_fingerprint": row["model_fingerprint"], "release": row["release_name"],
            "model_status": self._model_status(row["release_name"]),
            "auditor": {"name": row["auditor_name"], "fingerprint": row["signer"]},
            "created_at": row["created_at"], "submitted_at": row["submitted_at"],
            "suites": row["suites"].split(","), "n_metrics": row["n_metrics"], "n_records": row["n_records"],
        }

    _SUMMARY_COLS = ("id, log_index, model_id, model_fingerprint, release_name, auditor_name, signer, created_at, "
                     "submitted_at, suites, n_metrics, n_records")

    def list_reports(self, *, limit: int = 100, offset: int = 0, model: str | None = None,
                     auditor: str | None = None) -> dict:
        if not 1 <= limit <= 1000 or offset < 0:
            raise RegistryError(400, "limit must be 1..1000 and offset >= 0", code="bad_query")
        where, params = [], []
        if model:
            check_text(model, "query parameter 'model'", max_len=300)
            where.append("model_id = ?")
            params.append(model)
        if auditor:
            check_text(auditor, "query parameter 'auditor'", max_len=300)
            where.append("(signer = ? OR auditor_name = ?)")
            params += [auditor, auditor]
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        with self.db.read() as tx:
            total = tx.one(f"SELECT COUNT(*) AS n FROM reports{cond}", params)["n"]
            rows = tx.all(f"SELECT {self._SUMMARY_COLS} FROM reports{cond} ORDER BY log_index LIMIT ? OFFSET ?",
                          params + [limit, offset])
        return {"total": total, "limit": limit, "offset": offset, "reports": [self._summary(r) for r in rows]}

    def get_report(self, report_id: str) -> dict:
        check_id(report_id)
        with self.db.read() as tx:
            row = tx.one(f"SELECT {self._SUMMARY_COLS}, leaf_hash, report_json, signature_json FROM reports "
                         "WHERE id = ?", (report_id,))
            if row is None:
                raise RegistryError(404, f"no report with id {report_id}", code="not_found")
            auditor = self._auditor(tx, row["signer"])
        out = self._summary(row)
        report, sig = json.loads(row["report_json"]), json.loads(row["signature_json"])
        try:
            S.check_signed(report, sig, None, signer=auditor)
            out["signature_status"], out["signature_detail"] = "verified", "Ed25519 and ML-DSA-65 signatures verify"
        except S.SigningError as exc:
            out["signature_status"], out["signature_detail"] = "unverified", "; ".join(exc.problems)
        out.update(leaf_hash=row["leaf_hash"], report=report, signature=sig)
        return out

    def get_samples(self, report_id: str) -> bytes:
        check_id(report_id)
        with self.db.read() as tx:
            row = tx.one("SELECT samples FROM reports WHERE id = ?", (report_id,))
        if row is None:
            raise RegistryError(404, f"no report with id {report_id}", code="not_found")
        return bytes(row["samples"])

    def metric_names(self) -> list[str]:
        with self.db.read() as tx:
            rows = tx.all("SELECT DISTINCT task, metric FROM metrics ORDER BY task, metric")
        return [f"{r['task']}/{r['metric']}" for r in rows]

    def leaderboard(self, metric: str, *, group: str = "all", limit: int = 500) -> dict:
        if not isinstance(metric, str) or not _METRIC.match(metric):
            raise RegistryError(400, "query parameter 'metric' must look like TASK/METRIC (e.g. "
                                     "dsv41_harmful/refusal_rate) or METRIC", code="bad_query")
        if not _GROUP.match(group):
            raise RegistryError(400, "query parameter 'group' holds characters that are not allowed", code="bad_query")
        if not 1 <= limit <= 5000:
            raise RegistryError(400, "limit must be 1..5000", code="bad_query")
        task, name = metric.split("/", 1) if "/" in metric else (None, metric)
        cond, params = "m.metric = ? AND m.grp = ?", [name, group]
        if task:
            cond += " AND m.task = ?"
            params.append(task)
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT r.id, r.log_index, r.model_id, r.release_name, r.auditor_name, r.signer, r.created_at, "
                "m.task, m.metric, m.grp, m.value, m.ci_low, m.ci_high, m.n, m.higher_is_better "
                f"FROM metrics m JOIN reports r ON r.id = m.report_id WHERE {cond} ORDER BY r.log_index LIMIT ?",
                params + [limit])
        if not rows:
            known = self.metric_names()
            raise RegistryError(404, f"no report has metric {metric!r} (group {group!r}); known metrics: "
                                     + (", ".join(known[:60]) or "none yet"), code="not_found")
        hib = next((r["higher_is_better"] for r in rows if r["higher_is_better"] is not None), 1)
        rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0) if hib else (r["value"] or 0), r["log_index"]))
        entries = [{
            "rank": i + 1, "id": r["id"], "model_id": r["model_id"], "model_status": self._model_status(r["release_name"]),
            "auditor": r["auditor_name"], "auditor_fingerprint": r["signer"], "created_at": r["created_at"],
            "task": r["task"], "metric": r["metric"], "group": r["grp"], "value": r["value"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"],
        } for i, r in enumerate(rows)]
        return {"metric": metric, "group": group, "higher_is_better": bool(hib), "entries": entries}

    # -- transparency log -----------------------------------------------------------------------

    def _all_leaves(self) -> list[bytes]:
        with self._lock:
            with self.db.read() as tx:
                rows = tx.all("SELECT log_index, leaf_hash FROM reports WHERE log_index >= ? ORDER BY log_index",
                              (len(self._leaves),))
            for r in rows:
                if r["log_index"] != len(self._leaves):
                    raise RuntimeError(f"log index gap at {len(self._leaves)}")
                self._leaves.append(bytes.fromhex(r["leaf_hash"]))
            return list(self._leaves)

    def signed_tree_head(self, tree_size: int | None = None, leaves: list[bytes] | None = None) -> dict:
        leaves = leaves if leaves is not None else self._all_leaves()
        size = len(leaves) if tree_size is None else tree_size
        if not 0 <= size <= len(leaves):
            raise RegistryError(400, f"tree_size must be 0..{len(leaves)}", code="bad_query")
        cached = self._head_cache.get(size)
        if cached:
            return cached
        head = {"format": S.TREE_HEAD_FORMAT, "log_id": self.identity.fingerprint, "tree_size": size,
                "root_hash": merkle.root_hash(leaves[:size]).hex(), "timestamp": now()}
        doc = {"tree_head": head, "signature": self.identity.sign(canonical_json(head), context=S.TREE_HEAD_CONTEXT),
               "log_identity": self.identity.public.to_dict()}
        if len(self._head_cache) > 4096:
            self._head_cache.clear()
        self._head_cache[size] = doc
        return doc

    def inclusion_proof(self, report_id: str, tree_size: int | None = None) -> dict:
        check_id(report_id)
        with self.db.read() as tx:
            row = tx.one("SELECT log_index, leaf_hash, leaf_data FROM reports WHERE id = ?", (report_id,))
        if row is None:
            raise RegistryError(404, f"report {report_id} is not in the log", code="not_found")
        leaves = self._all_leaves()
        size = len(leaves) if tree_size is None else tree_size
        if not row["log_index"] < size <= len(leaves):
            raise RegistryError(400, f"tree_size must be {row['log_index'] + 1}..{len(leaves)} for this report",
                                code="bad_query")
        path = merkle.inclusion_proof(leaves, row["log_index"], size)
        return {"report_id": report_id, "leaf_index": row["log_index"], "leaf_hash": row["leaf_hash"],
                "leaf_data": json.loads(row["leaf_data"]), "tree_size": size, "audit_path": [p.hex() for p in path],
                "signed_tree_head": self.signed_tree_head(size, leaves)}

    def consistency_proof(self, first: int, second: int | None = None) -> dict:
        leaves = self._all_leaves()
        second = len(leaves) if second is None else second
        if not 0 < first <= second <= len(leaves):
            raise RegistryError(400, f"need 0 < first <= second <= {len(leaves)}", code="bad_query")
        proof = merkle.consistency_proof(leaves, first, second)
        return {"first": first, "second": second, "proof": [p.hex() for p in proof],
                "first_tree_head": self.signed_tree_head(first, leaves),
                "second_tree_head": self.signed_tree_head(second, leaves)}

    def log_entries(self, start: int = 0, end: int | None = None) -> dict:
        if start < 0 or (end is not None and end < start) or (end is not None and end - start > 1000):
            raise RegistryError(400, "need 0 <= start <= end and at most 1000 entries", code="bad_query")
        end = start + 1000 if end is None else end
        with self.db.read() as tx:
            rows = tx.all("SELECT log_index, id, leaf_hash, leaf_data FROM reports WHERE log_index >= ? AND "
                          "log_index < ? ORDER BY log_index", (start, end))
        return {"entries": [{"index": r["log_index"], "report_id": r["id"], "leaf_hash": r["leaf_hash"],
                             "leaf_data": json.loads(r["leaf_data"])} for r in rows]}
