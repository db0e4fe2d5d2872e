"""Encrypted weights: AES-256-GCM chunks, file key wrapped with ML-KEM-768 per recipient."""

from __future__ import annotations

import os

import pytest
from dsv41.release.encryption import (
    SUFFIX,
    decrypt_file,
    decrypt_path,
    encrypt_file,
    encrypt_path,
    load_recipient,
)
from dsv41.release.errors import DecryptionError
from dsv41.release.identity import Identity

CHUNK = 1024
N_BYTES = 10 * CHUNK + 123  # 11 chunks, the last one short
TAG = 16


@pytest.fixture(scope="module")
def alice():
    return Identity.generate("alice")


@pytest.fixture(scope="module")
def bob():
    return Identity.generate("bob")


@pytest.fixture
def model(tmp_path):
    m = tmp_path / "model"
    (m / "sub").mkdir(parents=True)
    (m / "sub" / "model.safetensors").write_bytes(os.urandom(N_BYTES))
    (m / "config.json").write_text('{"model_type": "deepseek_v4"}')
    (m / "empty.txt").write_bytes(b"")
    (m / "exact.bin").write_bytes(os.urandom(2 * CHUNK))
    return m


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_for_every_recipient(tmp_path, model, alice, bob):
    enc = tmp_path / "enc"
    written = encrypt_path(model, enc, [alice.public, bob.public], chunk_size=CHUNK)
    assert sorted(p.relative_to(enc).as_posix() for p in written) == sorted(f + SUFFIX for f in _files(model))
    big = (enc / "sub" / f"model.safetensors{SUFFIX}").read_bytes()
    assert model.joinpath("sub/model.safetensors").read_bytes()[:64] not in big  # actually encrypted
    for who in (alice, bob):
        out = tmp_path / f"dec-{who.name}"
        decrypt_path(enc, out, who)
        assert _files(out) == _files(model)


def test_not_a_recipient(tmp_path, model, alice, bob):
    enc = tmp_path / "enc"
    encrypt_path(model, enc, [alice.public], chunk_size=CHUNK)
    with pytest.raises(DecryptionError, match="not encrypted for identity 'bob'"):
        decrypt_path(enc, tmp_path / "out", bob)


def test_recipient_from_files(tmp_path, alice):
    pub = alice.public.save(tmp_path / "alice.pub.json")
    assert load_recipient(pub).key_id == alice.public.kem_key_id()
    pem = tmp_path / "kem.pem"
    pem.write_bytes(alice.public.public_pem("ml-kem-768"))
    assert load_recipient(pem).key_id == alice.public.kem_key_id()
    ed = tmp_path / "ed.pem"
    ed.write_bytes(alice.public.public_pem("ed25519"))
    with pytest.raises(Exception, match="not an ML-KEM-768 public key"):
        load_recipient(ed)


@pytest.fixture
def sealed(tmp_path, alice):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(N_BYTES))
    dst = encrypt_file(src, tmp_path / ("w.bin" + SUFFIX), [alice.public], chunk_size=CHUNK)
    data = dst.read_bytes()
    header_end = len(data) - (N_BYTES + 11 * TAG)
    return src, dst, data, header_end


def _decrypt_fails(dst, alice, tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(DecryptionError) as err:
        decrypt_file(dst, out, alice)
    assert not out.exists() and not (tmp_path / "out.bin.partial").exists()  # nothing unauthenticated left
    return str(err.value)


def test_round_trip_file_larger_than_chunk(tmp_path, sealed, alice):
    src, dst, _, _ = sealed
    decrypt_file(dst, tmp_path / "plain.bin", alice)
    assert (tmp_path / "plain.bin").read_bytes() == src.read_bytes()


def test_flipped_byte_names_file_and_chunk(tmp_path, sealed, alice):
    _, dst, data, h = sealed
    step = CHUNK + TAG
    bad = bytearray(data)
    bad[h + 3 * step + 100] ^= 0x01
    dst.write_bytes(bytes(bad))
    msg = _decrypt_fails(dst, alice, tmp_path)
    assert str(dst) in msg and "chunk 3" in msg and "altered" in msg


def test_truncation_is_detected(tmp_path, sealed, alice):
    _, dst, data, h = sealed
    dst.write_bytes(data[: h + 10 * (CHUNK + TAG)])  # drop the final chunk exactly at a boundary
    msg = _decrypt_fails(dst, alice, tmp_path)
    assert "chunk 9" in msg and "truncated" in msg
    dst.write_bytes(data[:h])
    assert "chunk 0" in _decrypt_fails(dst, alice, tmp_path)


def test_reordered_chunks_are_detected(tmp_path, sealed, alice):
    _, dst, data, h = sealed
    step = CHUNK + TAG
    c = [data[h + i * step : h + (i + 1) * step] for i in range(11)]
    c[4], c[5] = c[5], c[4]
    dst.write_bytes(data[:h] + b"".join(c))
    msg = _decrypt_fails(dst, alice, tmp_path)
    assert "chunk 4" in msg and "reordered" in msg


def test_appended_data_is_detected(tmp_path, sealed, alice):
    _, dst, data, h = sealed
    dst.write_bytes(data + b"\x00" * 7)  # the last chunk no longer ends where it was sealed
    assert "chunk 10" in _decrypt_fails(dst, alice, tmp_path)
    full = data[: h + 10 * (CHUNK + TAG)]
    dst.write_bytes(full[:-(CHUNK + TAG)] + full[-(CHUNK + TAG) :] + data[h + 10 * (CHUNK + TAG) :] + full[-(CHUNK + TAG) :])
    msg = _decrypt_fails(dst, alice, tmp_path)  # a duplicated chunk after the final one
    assert "chunk 10" in msg


def test_header_tampering_is_detected(tmp_path, sealed, alice):
    _, dst, data, h = sealed
    text = data[:h]
    assert b'"chunk_size":1024' in text
    dst.write_bytes(data.replace(b'"chunk_size":1024', b'"chunk_size":1025', 1))
    assert str(dst) in _decrypt_fails(dst, alice, tmp_path)


def test_swapped_files_are_detected(tmp_path, model, alice):
    enc = tmp_path / "enc"
    encrypt_path(model, enc, [alice.public], chunk_size=CHUNK)
    a, b = enc / ("config.json" + SUFFIX), enc / ("empty.txt" + SUFFIX)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with pytest.raises(DecryptionError, match="renamed or swapped"):
        decrypt_path(enc, tmp_path / "out", alice)
