"""Log monitor: the registry's log only ever grows (``dsv41 registry log-check URL``)."""

from __future__ import annotations

import json
from pathlib import Path

from dsv41.audit.signing import SigningError, verify_tree_head
from dsv41.registry import merkle


class LogCheckError(RuntimeError):
    pass


def check_log(url: str, state_file: str | Path, *, log_key: str | None = None, client=None) -> str:
    """Verify the current signed tree head; if ``state_file`` holds an earlier head of the same
    log, verify a consistency proof from it; then save the new head."""
    import httpx

    own = client is None
    client = client or httpx.Client(timeout=30)
    base = url.rstrip("/")
    try:
        cur = client.get(base + "/log/root").json()
        try:
            head, pub = verify_tree_head(cur, pinned=log_key)
        except SigningError as exc:
            raise LogCheckError(str(exc)) from None
        sp = Path(state_file)
        old = json.loads(sp.read_text()) if sp.is_file() else None
        note = "first check; tree head saved"
        if old:
            if old["log_id"] != head["log_id"]:
                raise LogCheckError(f"log identity changed from {old['log_id']} to {head['log_id']}")
            m, n = int(old["tree_size"]), int(head["tree_size"])
            if n < m:
                raise LogCheckError(f"the log shrank from {m} to {n} entries")
            if m > 0:
                if m == n:
                    proof = []
                else:
                    r = client.get(base + "/log/consistency", params={"first": m, "second": n})
                    if r.status_code != 200:
                        raise LogCheckError(f"consistency proof unavailable: HTTP {r.status_code} {r.text[:200]}")
                    proof = [bytes.fromhex(h) for h in r.json()["proof"]]
                try:
                    merkle.verify_consistency(m, n, bytes.fromhex(old["root_hash"]), bytes.fromhex(head["root_hash"]), proof)
                except merkle.ProofError as exc:
                    raise LogCheckError(f"log is not append-only: {exc}") from None
            note = f"consistent with the saved tree of size {m}"
    finally:
        if own:
            client.close()
    Path(state_file).write_text(json.dumps(head, indent=1, sort_keys=True) + "\n")
    return f"OK: tree size {head['tree_size']}, root {head['root_hash']}, log {pub.fingerprint}: {note}"
