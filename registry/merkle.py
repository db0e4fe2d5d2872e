"""Append-only Merkle log (the tree of RFC 9162 / Certificate Transparency v2).

Leaves are hashed as ``SHA-256(0x00 || data)`` and inner nodes as ``SHA-256(0x01 || left ||
right)``; a tree of ``n`` leaves splits at the largest power of two below ``n``. Inclusion
proofs show that one leaf is in a tree with a given root; consistency proofs show that the
tree of size ``m`` is a prefix of the tree of size ``n`` (nothing was changed or removed).
All hashes are handled as raw bytes here and as lowercase hex on the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify (the message says why)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


class _Tree:
    """Root computation over a list of leaf hashes with memoised perfect subtrees."""

    def __init__(self, leaves: Sequence[bytes]):
        self.leaves = leaves
        self._memo: dict[tuple[int, int], bytes] = {}

    def root(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n == 1:
            return self.leaves[lo]
        key = (lo, hi)
        got = self._memo.get(key)
        if got is None:
            k = _split(n)
            got = node_hash(self.root(lo, lo + k), self.root(lo + k, hi))
            # memoise only perfect subtrees: they never change when the log grows
            if n & (n - 1) == 0:
                self._memo[key] = got
        return got

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n <= 1:
            return []
        k = _split(n)
        if m < k:
            return self.path(m, lo, lo + k) + [self.root(lo + k, hi)]
        return self.path(m - k, lo + k, hi) + [self.root(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [self.root(lo, hi)]
        k = _split(n)
        if m <= k:
            return self.subproof(m, lo, lo + k, complete) + [self.root(lo + k, hi)]
        return self.subproof(m - k, lo + k, hi, False) + [self.root(lo, lo + k)]


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of the given leaf hashes."""
    return _Tree(leaves).root(0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int, tree_size: int | None = None) -> list[bytes]:
    n = len(leaves) if tree_size is None else tree_size
    if not 0 < n <= len(leaves):
        raise ValueError(f"tree size {n} out of range (log has {len(leaves)} leaves)")
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} out of range for tree size {n}")
    return _Tree(leaves).path(index, 0, n)


def consistency_proof(leaves: Sequence[bytes], first: int, second: int) -> list[bytes]:
    if not 0 < first <= second <= len(leaves):
        raise ValueError(f"need 0 < first <= second <= {len(leaves)}, got first={first}, second={second}")
    return _Tree(leaves).subproof(first, 0, second, True)


def verify_inclusion(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], root: bytes) -> None:
    """Raise :class:`ProofError` unless ``leaf`` (a leaf hash) is at ``index`` of the tree with ``root``."""
    if not 0 <= index < tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of size {tree_size}")
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError("inclusion proof does not lead to the signed root hash")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Raise :class:`ProofError` unless the tree (first, first_root) is a prefix of (second, second_root)."""
    if not 0 < first <= second:
        raise ProofError(f"need 0 < first <= second, got {first}, {second}")
    if first == second:
        if proof:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError("same tree size but different root hashes: the log was rewritten")
        return
    proof = list(proof)
    if not proof:
        raise ProofError("empty consistency proof")
    if first & (first - 1) == 0:
        proof = [first_root] + proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != first_root:
        raise ProofError("consistency proof does not reproduce the earlier root: the log was rewritten")
    if sr != second_root:
        raise ProofError("consistency proof does not reproduce the later root")
