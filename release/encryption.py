"""Encrypted weights for gated access: AES-256-GCM, streamed in chunks, keys wrapped with ML-KEM-768.

``encrypt_path(src, out, recipients)`` (``dsv41 release encrypt``) seals every file of a model
directory (or one file) into ``<name>.dsv41enc``; ``decrypt_path`` (``dsv41 release decrypt``)
reverses it with a recipient's private identity. Files are processed in chunks, so files
larger than memory work.

File format (version 1)::

    magic   b"DSV41ENC\\x01"
    u32     length of the header (big endian)
    header  canonical JSON:
              format      "dsv41-encrypted-file/v1"
              file        the file's path relative to the encrypted directory (POSIX)
              cipher      "AES-256-GCM", kem "ML-KEM-768", chunk_size (plaintext bytes)
              recipients  [{kem_key_id, identity, kem_ciphertext, wrapped_key}]
    chunks  AES-256-GCM(ciphertext || 16-byte tag) of each chunk_size slice of the plaintext;
            the last chunk may be shorter (an empty file has one empty chunk)

Keys: a fresh random 256-bit file key per file. For each recipient, ML-KEM-768 encapsulation
gives a shared secret; HKDF-SHA256 (info binds the KEM ciphertext) turns it into a one-time
key-encryption key that wraps the file key with AES-256-GCM (AAD binds the file name).

Chunks: chunk ``i`` uses nonce ``u64(i) || u8(final) || 000000`` and AAD
``"dsv41-enc/v1" || SHA-256(magic || header) || u64(i) || u8(final)``, where ``final`` is 1
only for the last chunk. So a changed byte, a changed header, reordered or duplicated chunks,
a truncated file and appended data are all detected, and the error names file and chunk.
Decryption writes to a temporary file and only renames it into place once every chunk
has verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dsv41.release.errors import DecryptionError, ReleaseError
from dsv41.release.identity import (
    Identity,
    PublicIdentity,
    _b64,
    _unb64,
    canonical_json,
    kem_key_id,
)

MAGIC = b"DSV41ENC\x01"
FORMAT = "dsv41-encrypted-file/v1"
SUFFIX = ".dsv41enc"
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024
MAX_HEADER = 1024 * 1024
TAG = 16
_WRAP_NONCE = bytes(12)  # the key-encryption key is used exactly once


@dataclass(frozen=True)
class Recipient:
    """An ML-KEM-768 public key to encrypt to, with the identity fingerprint if known."""

    public_key: mlkem.MLKEM768PublicKey
    identity: str | None = None
    label: str = ""

    @property
    def key_id(self) -> str:
        return kem_key_id(self.public_key)


def load_recipient(path: str | os.PathLike) -> Recipient:
    """A recipient from a public identity (``identity.pub.json``, its directory) or an ML-KEM-768 PEM."""
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".json":
        pub = PublicIdentity.load(path)
        return Recipient(pub.mlkem768, pub.fingerprint, pub.name or str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReleaseError(f"recipient key not found: {path}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ReleaseError(f"{path}: not a public identity JSON or a PEM public key ({exc})") from None
    if not isinstance(key, mlkem.MLKEM768PublicKey):
        raise ReleaseError(f"{path}: holds a {type(key).__name__}, not an ML-KEM-768 public key")
    return Recipient(key, None, str(path))


def _as_recipient(r) -> Recipient:
    if isinstance(r, Recipient):
        return r
    if isinstance(r, PublicIdentity):
        return Recipient(r.mlkem768, r.fingerprint, r.name)
    if isinstance(r, mlkem.MLKEM768PublicKey):
        return Recipient(r)
    if isinstance(r, (str, os.PathLike)):
        return load_recipient(r)
    raise TypeError(f"not a recipient: {r!r}")


def _kek(shared_secret: bytes, kem_ciphertext: bytes) -> bytes:
    info = b"dsv41-enc/v1 key wrap|" + hashlib.sha256(kem_ciphertext).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def _wrap_aad(name: str) -> bytes:
    return b"dsv41-enc/v1 file key|" + name.encode("utf-8")


def _nonce(index: int, final: bool) -> bytes:
    return struct.pack(">QB", index, 1 if final else 0) + b"\x00\x00\x00"


def _aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return b"dsv41-enc/v1" + header_hash + struct.pack(">QB", index, 1 if final else 0)


# ---------------------------------------------------------------------------------------------
# encryption
# ---------------------------------------------------------------------------------------------


def encrypt_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipients: Sequence,
    *,
    name: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Path:
    """Encrypt one file to ``dst`` for ``recipients`` (PublicIdentity, Recipient, ML-KEM key or path)."""
    src, dst = Path(src), Path(dst)
    recips = [_as_recipient(r) for r in recipients]
    if not recips:
        raise ReleaseError("at least one recipient is needed to encrypt")
    if not (1 <= chunk_size <= MAX_CHUNK_SIZE):
        raise ReleaseError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    name = name or src.name
    file_key = AESGCM.generate_key(bit_length=256)
    entries = []
    for r in recips:
        shared, kem_ct = r.public_key.encapsulate()
        wrapped = AESGCM(_kek(shared, kem_ct)).encrypt(_WRAP_NONCE, file_key, _wrap_aad(name))
        entries.append(
            {"kem_key_id": r.key_id, "identity": r.identity, "kem_ciphertext": _b64(kem_ct), "wrapped_key": _b64(wrapped)}
        )
    header = canonical_json(
        {
            "format": FORMAT,
            "file": name,
            "cipher": "AES-256-GCM",
            "kem": "ML-KEM-768",
            "chunk_size": chunk_size,
            "recipients": entries,
        }
    )
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    header_hash = hashlib.sha256(MAGIC + header).digest()
    aes = AESGCM(file_key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    total = src.stat().st_size
    n_chunks = max(1, -(-total // chunk_size))
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(prefix)
            for index in range(n_chunks):
                block = fin.read(chunk_size)
                final = index == n_chunks - 1
                fout.write(aes.encrypt(_nonce(index, final), block, _aad(header_hash, index, final)))
            if fin.read(1):
                raise ReleaseError(f"{src}: file grew while it was being encrypted")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def _walk_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".git" not in p.relative_to(root).parts:
            files.append(p)
    return files


def encrypt_path(
    src: str | os.PathLike,
    out: str | os.PathLike,
    recipients: Sequence,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Path]:
    """Encrypt a model directory (every file, into ``out/<rel>.dsv41enc``) or a single file."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    recips = [_as_recipient(r) for r in recipients]
    if src.is_file():
        dst = out if out.suffix == SUFFIX else out / (src.name + SUFFIX)
        return [encrypt_file(src, dst, recips, chunk_size=chunk_size)]
    if not src.is_dir():
        raise ReleaseError(f"{src}: no such file or directory")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ReleaseError(f"{out}: the output directory must be outside {src}")
    written = []
    for f in _walk_files(src):
        rel = f.relative_to(src).as_posix()
        written.append(encrypt_file(f, out / (rel + SUFFIX), recips, name=rel, chunk_size=chunk_size))
    if not written:
        raise ReleaseError(f"{src}: no files to encrypt")
    return written


# ---------------------------------------------------------------------------------------------
# decryption
# ---------------------------------------------------------------------------------------------


def _read_header(f, label: str) -> tuple[dict, bytes]:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise DecryptionError(f"{label}: not a dsv41 encrypted file (bad magic)")
    raw_len = f.read(4)
    if len(raw_len) != 4:
        raise DecryptionError(f"{label}: truncated header")
    (length,) = struct.unpack(">I", raw_len)
    if length > MAX_HEADER:
        raise DecryptionError(f"{label}: header length {length} exceeds {MAX_HEADER}")
    header = f.read(length)
    if len(header) != length:
        raise DecryptionError(f"{label}: truncated header")
    try:
        doc = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecryptionError(f"{label}: header is not valid JSON ({exc}); the header was altered") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DecryptionError(f"{label}: header field 'format' is not {FORMAT!r}")
    for key in ("file", "chunk_size", "recipients"):
        if key not in doc:
            raise DecryptionError(f"{label}: header lacks field {key!r}")
    if not isinstance(doc["chunk_size"], int) or not (1 <= doc["chunk_size"] <= MAX_CHUNK_SIZE):
        raise DecryptionError(f"{label}: header field 'chunk_size' is invalid: {doc['chunk_size']!r}")
    return doc, header


def _unwrap(doc: dict, identity: Identity, label: str) -> bytes:
    my_id = identity.public.kem_key_id()
    entries = [e for e in doc["recipients"] if isinstance(e, dict) and e.get("kem_key_id") == my_id]
    if not entries:
        raise DecryptionError(
            f"{label}: not encrypted for identity {identity.name!r} (ML-KEM key {my_id}); "
            f"recipients: {', '.join(str(e.get('kem_key_id')) for e in doc['recipients'] if isinstance(e, dict))}"
        )
    for entry in entries:
        try:
            kem_ct = _unb64(entry.get("kem_ciphertext"), "kem_ciphertext")
            wrapped = _unb64(entry.get("wrapped_key"), "wrapped_key")
            shared = identity.decapsulate(kem_ct)
            return AESGCM(_kek(shared, kem_ct)).decrypt(_WRAP_NONCE, wrapped, _wrap_aad(str(doc["file"])))
        except (InvalidTag, ValueError):
            continue
    raise DecryptionError(f"{label}: cannot unwrap the file key (header altered or file renamed inside the header)")


def decrypt_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    identity: Identity,
    *,
    expected_name: str | None = None,
) -> Path:
    """Decrypt one ``.dsv41enc`` file to ``dst``; raises :class:`DecryptionError` naming file and chunk."""
    src, dst = Path(src), Path(dst)
    label = str(src)
    size = src.stat().st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        with open(src, "rb") as fin:
            doc, header = _read_header(fin, label)
            if expected_name is not None and doc["file"] != expected_name:
                raise DecryptionError(
                    f"{label}: holds the encryption of {doc['file']!r}, not {expected_name!r} (file renamed or swapped)"
                )
            aes = AESGCM(_unwrap(doc, identity, label))
            header_hash = hashlib.sha256(MAGIC + header).digest()
            step = doc["chunk_size"] + TAG
            remaining = size - fin.tell()
            if remaining < TAG:
                raise DecryptionError(f"{label}: chunk 0: missing (file truncated after its header)")
            index = 0
            with open(tmp, "wb") as fout:
                while remaining > 0:
                    final = remaining <= step
                    block = fin.read(min(step, remaining))
                    remaining -= len(block)
                    if len(block) < TAG:
                        raise DecryptionError(f"{label}: chunk {index}: truncated ({len(block)} bytes)")
                    try:
                        fout.write(aes.decrypt(_nonce(index, final), block, _aad(header_hash, index, final)))
                    except InvalidTag:
                        raise DecryptionError(_diagnose(aes, block, header_hash, index, final, label)) from None
                    index += 1
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def _diagnose(aes: AESGCM, block: bytes, header_hash: bytes, index: int, final: bool, label: str) -> str:
    """Message for a chunk that failed authentication, telling truncation / reordering apart."""
    base = f"{label}: chunk {index}: authentication failed"
    if final:
        try:
            aes.decrypt(_nonce(index, False), block, _aad(header_hash, index, False))
            return f"{base}: file truncated after chunk {index} (the final chunk is missing)"
        except InvalidTag:
            pass
    for other in range(max(0, index - 16), index + 17):
        for flag in (False, True):
            if (other, flag) == (index, final):
                continue
            try:
                aes.decrypt(_nonce(other, flag), block, _aad(header_hash, other, flag))
            except InvalidTag:
                continue
            if other == index:
                return f"{base}: data appended after the final chunk {index}"
            return f"{base}: chunks reordered (found chunk {other} at position {index})"
    return f"{base}: the data was altered or truncated"


def decrypt_path(src: str | os.PathLike, out: str | os.PathLike, identity: Identity) -> list[Path]:
    """Decrypt a directory made by :func:`encrypt_path` (or a single ``.dsv41enc`` file)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if src.is_file():
        dst = out / src.name[: -len(SUFFIX)] if out.is_dir() else out
        return [decrypt_file(src, dst, identity)]
    if not src.is_dir():
        raise ReleaseError(f"{src}: no such file or directory")
    files = [p for p in sorted(src.rglob("*" + SUFFIX)) if p.is_file()]
    if not files:
        raise ReleaseError(f"{src}: no {SUFFIX} files to decrypt")
    written = []
    for f in files:
        rel = f.relative_to(src).as_posix()[: -len(SUFFIX)]
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise DecryptionError(f"{f}: unsafe path {rel!r}")
        written.append(decrypt_file(f, out / rel, identity, expected_name=rel))
    return written


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SUFFIX",
    "Recipient",
    "decrypt_file",
    "decrypt_path",
    "encrypt_file",
    "encrypt_path",
    "load_recipient",
]
