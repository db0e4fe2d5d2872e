"""Per-tensor description of a checkpoint folder (headers only; no tensor data is read)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import _classify
from .safetensors_io import Checkpoint

_DT = {
    "float8_e4m3fn": "fp8-e4m3",
    "float8_e8m0fnu": "ue8m0",
}


def inspect_checkpoint(path: str | Path) -> dict:
    ck = Checkpoint(path)
    groups, _ = _classify(ck)
    fmt: dict[str, str] = {}
    for g in groups:
        if g.kind == "plain":
            continue
        w, s = g.weight, g.scale
        if g.kind == "fp8":
            desc = f"fp8-e4m3 block {g.block[0]}x{g.block[1]}" if g.block else "fp8-e4m3 block ?"
            sdesc = "fp8 scale ue8m0" if str(s.dtype).endswith(("e8m0fnu", "uint8")) else f"fp8 scale {str(s.dtype).split('.')[-1]}"
        elif g.kind == "fp4":
            desc, sdesc = "fp4-e2m1 (2/byte) g32", "fp4 scale " + ("ue8m0" if "e8m0" in str(s.dtype) or "uint8" in str(s.dtype) else "float32")
        elif g.kind in ("int8", "int4"):
            cols = w.shape[-1] * (2 if g.kind == "int4" else 1)
            desc, sdesc = f"{g.kind} g{cols // s.shape[-1]}", f"{g.kind} scale fp16"
        else:
            desc, sdesc = "mxfp4 gpt-oss blocks", "mxfp4 gpt-oss scales (e8m0)"
        fmt[w.name] = desc
        fmt[s.name] = sdesc
    rows = []
    by_fmt: dict[str, int] = {}
    for name in sorted(ck.tensors):
        info = ck.tensors[name]
        dt = str(info.dtype).replace("torch.", "")
        f = fmt.get(name, _DT.get(dt, dt))
        rows.append({"name": name, "dtype": dt, "format": f, "shape": list(info.shape), "bytes": info.nbytes, "file": info.file.name})
        key = f.split(" g")[0] if f.startswith(("int8 g", "int4 g")) else f
        by_fmt[key] = by_fmt.get(key, 0) + info.nbytes
    return {
        "path": str(path),
        "files": len(ck.files),
        "n_tensors": len(rows),
        "total_bytes": sum(r["bytes"] for r in rows),
        "file_bytes": ck.total_bytes(),
        "bytes_by_format": by_fmt,
        "quantization_config": ck.config().get("quantization_config"),
        "tensors": rows,
    }
