"""Bounded-memory safetensors reading and writing.

The reader parses the header itself and reads any row range of a tensor with ``os.pread`` (no
memory map, so pages of a shard are never resident beyond the rows asked for). The writer lays
out a shard from a known list of (name, dtype, shape), writes the header first and then accepts
row ranges of each tensor in any order (``os.pwrite``), so a shard is produced without ever
holding it in memory. Files follow the safetensors format (8-byte little-endian header length,
JSON header with ``dtype``/``shape``/``data_offsets`` and optional ``__metadata__``, data).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .codecs import QuantizationError

ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus ranged reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise QuantizationError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise QuantizationError(f"{self.path}: safetensors header length {n} exceeds {_MAX_HEADER} bytes")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as exc:
                raise QuantizationError(f"{self.path}: safetensors header is not valid JSON ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + n
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            st_dtype = entry.get("dtype")
            if st_dtype not in ST_TO_TORCH:
                raise QuantizationError(f"{self.path}: tensor {name!r} has unsupported dtype {st_dtype!r}")
            dtype = ST_TO_TORCH[st_dtype]
            shape = tuple(int(s) for s in entry["shape"])
            b, e = (int(x) for x in entry["data_offsets"])
            expected = math.prod(shape) * dtype.itemsize
            if e - b != expected or base + e > size:
                raise QuantizationError(
                    f"{self.path}: tensor {name!r} data_offsets {[b, e]} do not match shape {list(shape)} "
                    f"x {dtype.itemsize} bytes (expected {expected}) or exceed the file size {size}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, expected, self.path)

    def keys(self):
        return self.tensors.keys()


def read_bytes_into(info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buf
    view = memoryview(buf.numpy())
    fd = os.open(info.file, os.O_RDONLY)
    try:
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], info.start + offset + got)
            if n <= 0:
                raise QuantizationError(f"{info.file}: unexpected end of file reading tensor {info.name!r}")
            got += n
    finally:
        os.close(fd)
    return buf


def read_tensor(info: TensorInfo) -> torch.Tensor:
    return read_bytes_into(info, 0, info.nbytes).view(info.dtype).reshape(info.shape)


def read_rows(info: TensorInfo, lead: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of matrix number ``lead`` of a tensor viewed as ``[L, R, C]``."""
    rows, cols = info.shape[-2], info.shape[-1]
    item = info.dtype.itemsize
    off = ((lead * rows) + r0) * cols * item
    return read_bytes_into(info, off, (r1 - r0) * cols * item).view(info.dtype).reshape(r1 - r0, cols)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class ShardWriter:
    """Writes one safetensors file whose tensor list is known up front."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        off = 0
        for name, dtype, shape in entries:
            if name in self.layout:
                raise QuantizationError(f"{self.path}: duplicate output tensor {name!r}")
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self.layout[name] = (off, dtype, tuple(shape))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self.base = 8 + len(raw)
        self.data_size = off
        self.written = {name: 0 for name in self.layout}
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.base + off)

    def write_rows(self, name: str, lead: int, r0: int, t: torch.Tensor) -> None:
        """Write ``t`` (``[r, C]`` or the whole tensor when ``t.shape`` equals it) at rows
        ``r0:r0+r`` of matrix ``lead`` of ``name``."""
        off, dtype, shape = self.layout[name]
        if t.dtype != dtype:
            raise QuantizationError(f"{self.path}: tensor {name!r} expected dtype {dtype}, got {t.dtype}")
        if tuple(t.shape) == shape:
            pos = 0
        else:
            rows, cols = shape[-2], shape[-1]
            if t.dim() != 2 or t.shape[1] != cols:
                raise QuantizationError(f"{self.path}: rows for {name!r} expected [r, {cols}], got {list(t.shape)}")
            pos = ((lead * rows) + r0) * cols * dtype.itemsize
        data = tensor_bytes(t).numpy()
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.base + off + pos + done)
        self.written[name] += len(view)

    def close(self, check: bool = True) -> None:
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if not check:
            return
        for name, (_, dtype, shape) in self.layout.items():
            need = math.prod(shape) * dtype.itemsize
            if self.written[name] != need:
                raise QuantizationError(
                    f"{self.path}: tensor {name!r} received {self.written[name]} of {need} bytes"
                )


class Checkpoint:
    """A safetensors checkpoint folder (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise QuantizationError(f"{self.path}: checkpoint folder not found")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise QuantizationError(f"{self.path}: no *.safetensors file found")
        self.files = [SafetensorsFile(self.path / f) for f in files]
        self.tensors: dict[str, TensorInfo] = {}
        for sf in self.files:
            for name, info in sf.tensors.items():
                if name in self.tensors:
                    raise QuantizationError(f"{self.path}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise QuantizationError(f"{self.path}: index lists tensors absent from the shards: {missing[:5]}")

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}

    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)
