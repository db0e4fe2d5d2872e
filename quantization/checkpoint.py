"""Checkpoint-level conversion: safetensors folder in -> safetensors folder out, streamed.

Memory stays bounded by ``chunk_bytes`` of working rows (plus one Hessian for GPTQ): the output
layout is planned from the input headers alone, every output shard is written header first, and
each input tensor is read, converted and written a block of rows at a time. The output goes to a
temporary folder next to ``out`` and is renamed into place only when complete; the input folder
is opened read-only and never modified.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import codecs as C
from .codecs import QuantizationError
from .names import canonical, is_quantizable_linear, is_routed_expert, module_of
from .safetensors_io import Checkpoint, ShardWriter, TensorInfo, read_rows, read_tensor

METHODS = ("fp8", "mxfp4", "int8", "int4-rtn", "int4-gptq")
FP8_FAMILY = ("float8_e4m3fn", "float8_e5m2")
DEFAULT_SHARD_BYTES = 2 * 1024**3
DEFAULT_CHUNK_BYTES = 64 * 1024**2
_INDEX = "model.safetensors.index.json"


@dataclass
class QuantSpec:
    """What to do. ``block`` is the FP8 block (rows, cols); ``group_size`` the int group along K
    (<= 0: one group per row); ``expert_dtype`` applies to routed experts under ``fp8``."""

    method: str
    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "ue8m0"
    expert_dtype: str = "fp8"
    group_size: int | None = None
    partial_blocks: bool = False
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    gptq_damp: float = 0.01
    calibration: dict | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantizationError(f"quantization method: expected one of {', '.join(METHODS)}, found {self.method!r}")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise QuantizationError(f"scale_fmt: expected 'float' or 'ue8m0', found {self.scale_fmt!r}")
        if self.expert_dtype not in ("fp8", "fp4"):
            raise QuantizationError(f"expert_dtype: expected 'fp8' or 'fp4', found {self.expert_dtype!r}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise QuantizationError(f"block size: expected two positive integers, found {self.block!r}")
        self.block = (int(self.block[0]), int(self.block[1]))
        if self.group_size is None:
            self.group_size = 128 if self.method == "int8" else 32
        self.hessians = {canonical(k): v for k, v in self.hessians.items()}

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4


# ----------------------------------------------------------------------------- tensor plans


@dataclass
class Plan:
    """How one input tensor becomes one or more output tensors."""

    src: TensorInfo
    kind: str  # passthrough | fp8 | fp4 | int | dequant-*
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    row_block: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def out_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, d, s in self.outputs)


def _scale_name(name: str, style: str) -> str:
    """style: 'scale' (V4 ``<module>.scale``), 'scale_inv' (V3 ``weight_scale_inv``), 'int' (``weight_scale``)."""
    if name.endswith(".weight"):
        mod = module_of(name)
        return {"scale": f"{mod}.scale", "scale_inv": f"{mod}.weight_scale_inv", "int": f"{mod}.weight_scale"}[style]
    return {"scale": f"{name}_scale_inv", "scale_inv": f"{name}_scale_inv", "int": f"{name}_scale"}[style]


def _check_float_weight(info: TensorInfo) -> None:
    if not info.dtype.is_floating_point or info.dtype.itemsize < 2:
        raise QuantizationError(
            f"tensor {info.name!r}: expected a bf16/fp16/fp32 weight to quantize, found {info.dtype} "
            "(the checkpoint looks already quantized; run `dsv41 dequantize` first)"
        )


def plan_quantize(info: TensorInfo, spec: QuantSpec) -> Plan:
    name, shape = info.name, info.shape
    expert = is_routed_expert(name) and len(shape) in (2, 3)
    dense = is_quantizable_linear(name, shape)
    if spec.method == "mxfp4":
        target = "fp4" if expert else None
    elif spec.method == "fp8":
        target = ("fp4" if spec.expert_dtype == "fp4" else "fp8") if expert else ("fp8" if dense else None)
    else:
        target = "int" if (expert or dense) else None
    if target is None:
        return Plan(info, "passthrough", [(name, info.dtype, shape)])
    _check_float_weight(info)
    *lead, rows, cols = shape
    if target == "fp8":
        bm, bn = spec.block
        if not spec.partial_blocks and (rows % bm or cols % bn):
            raise QuantizationError(
                f"tensor {name!r}: FP8 block size {bm}x{bn} does not divide shape {list(shape)} "
                "(choose a block size that divides it, e.g. --block-size 32, or allow DeepSeek's partial edge "
                "blocks with --partial-blocks)"
            )
        sdt = C.UE8M0_DTYPE if spec.scale_fmt == "ue8m0" else torch.float32
        style = "scale" if spec.scale_fmt == "ue8m0" else "scale_inv"
        return Plan(
            info,
            "fp8",
            [(name, C.FP8_DTYPE, shape), (_scale_name(name, style), sdt, C.fp8_scale_shape(shape, spec.block))],
            row_block=bm,
        )
    if target == "fp4":
        if cols % C.MX_GROUP:
            raise QuantizationError(
                f"tensor {name!r}: FP4 scale group {C.MX_GROUP} does not divide the input dimension of shape {list(shape)}"
            )
        # V4 checkpoints name FP4 expert scales like the FP8 ones of the same checkpoint.
        style = "scale_inv" if (spec.method == "fp8" and spec.scale_fmt == "float") else "scale"
        sdt = torch.float32 if style == "scale_inv" else C.UE8M0_DTYPE
        return Plan(
            info,
            "fp4",
            [(name, torch.int8, (*lead, rows, cols // 2)), (_scale_name(name, style), sdt, (*lead, rows, cols // C.MX_GROUP))],
        )
    g = C.resolve_group_size(cols, spec.group_size, name)
    if spec.bits == 4 and cols % 2:
        raise QuantizationError(f"tensor {name!r}: int4 packing needs an even input dimension, found shape {list(shape)}")
    qshape = (*lead, rows, cols // 2) if spec.bits == 4 else tuple(shape)
    qdt = torch.uint8 if spec.bits == 4 else torch.int8
    hess = None
    if spec.method == "int4-gptq":
        # stacked 3-D experts have no per-expert Hessian here: they fall back to RTN (reported)
        hess = None if lead else spec.hessians.get(canonical(name))
        if hess is not None:
            hs = tuple(hess.shape)
            ok = hs == (cols, cols) or (len(hs) == 3 and hs[1:] == (cols, cols) and rows % hs[0] == 0)
            if not ok:
                raise QuantizationError(
                    f"tensor {name!r}: GPTQ Hessian shape expected [{cols}, {cols}] (or [g, {cols}, {cols}]), found {list(hs)}"
                )
    return Plan(
        info,
        "int",
        [(name, qdt, qshape), (_scale_name(name, "int"), C.INT_SCALE_DTYPE, (*lead, rows, cols // g))],
        extra={"group": g, "hessian": hess},
    )


def _rows_per_chunk(info: TensorInfo, row_block: int, chunk_bytes: int) -> int:
    cols = info.shape[-1] if info.shape else 1
    per_row = max(1, cols * 4 * 6)  # fp32 copy plus the codecs' temporaries
    rows = max(row_block, (chunk_bytes // per_row) // row_block * row_block)
    return rows


def _iter_row_chunks(info: TensorInfo, row_block: int, chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    *lead, rows, _ = info.shape
    step = _rows_per_chunk(info, row_block, chunk_bytes)
    for li in range(math.prod(lead)):
        for r0 in range(0, rows, step):
            yield li, r0, min(rows, r0 + step)


def _run_plan(plan: Plan, writer: ShardWriter, spec: QuantSpec | None, chunk_bytes: int, dtype: torch.dtype) -> None:
    info = plan.src
    if plan.kind == "passthrough":
        if len(info.shape) >= 2 and info.nbytes > chunk_bytes:
            for li, r0, r1 in _iter_row_chunks(info, 1, chunk_bytes * 4):
                writer.write_rows(info.name, li, r0, read_rows(info, li, r0, r1))
        else:
            writer.write_rows(info.name, 0, 0, read_tensor(info))
        return
    if plan.kind.startswith("dequant"):
        _run_dequant(plan, writer, chunk_bytes, dtype)
        return
    (qname, *_), (sname, *_) = plan.outputs
    for li, r0, r1 in _iter_row_chunks(info, plan.row_block, chunk_bytes):
        w = read_rows(info, li, r0, r1)
        if plan.kind == "fp8":
            q, s = C.quantize_fp8_block(w, spec.block, spec.scale_fmt, info.name, row_offset=r0)
            srow = r0 // spec.block[0]
        elif plan.kind == "fp4":
            q, s = C.quantize_mxfp4(w, info.name, row_offset=r0)
            if plan.outputs[1][1] == torch.float32:
                s = C.ue8m0_to_float(s)  # V3-style float scales (still powers of two)
            srow = r0
        else:
            hess = plan.extra["hessian"]
            if hess is not None:
                from .gptq import gptq_quantize_weight

                C.check_finite(w, info.name, row_offset=r0)
                if hess.dim() == 3:  # grouped projection: one Hessian per block of R/g rows
                    rg = info.shape[-2] // hess.shape[0]
                    parts = []
                    for j in range(r0 // rg, (r1 - 1) // rg + 1):
                        a, b = max(r0, j * rg), min(r1, (j + 1) * rg)
                        parts.append(gptq_quantize_weight(w[a - r0 : b - r0], hess[j], 4, plan.extra["group"], spec.gptq_damp, name=info.name))
                    codes, s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                else:
                    codes, s = gptq_quantize_weight(w, hess, 4, plan.extra["group"], spec.gptq_damp, name=info.name)
                q = C.pack_int4(codes)
            else:
                q, s = C.quantize_int(w, spec.bits, plan.extra["group"], info.name, row_offset=r0)
            srow = r0
        writer.write_rows(qname, li, r0, q)
        writer.write_rows(sname, li, srow, s)


# ----------------------------------------------------------------------------- output assembly


def _assign_shards(plans: list[Plan], max_shard_bytes: int) -> list[list[Plan]]:
    shards: list[list[Plan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.out_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.out_bytes
    return shards


def _copy_side_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name.endswith(".safetensors") or item.name == _INDEX:
            continue
        if item.is_dir():
            if item.name in ("__pycache__",) or item.name.startswith("."):
                continue
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def _prepare_out(src: Path, out: Path, overwrite: bool) -> Path:
    src_r, out_r = src.resolve(), out.resolve()
    if src_r == out_r or src_r in out_r.parents:
        raise QuantizationError(f"output folder {out} must not be the input folder {src} or inside it")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QuantizationError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_checkpoint(
    src: Checkpoint,
    plans: list[Plan],
    out: Path,
    overwrite: bool,
    max_shard_bytes: int,
    chunk_bytes: int,
    spec: QuantSpec | None,
    dtype: torch.dtype,
    config_update: Callable[[dict], dict],
    metadata: dict,
    progress=None,
) -> dict:
    tmp = _prepare_out(src.path, out, overwrite)
    try:
        _copy_side_files(src.path, tmp)
        shards = _assign_shards(plans, max_shard_bytes)
        n = len(shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            entries = [o for p in shard for o in p.outputs]
            writer = ShardWriter(tmp / fname, entries, metadata={"format": "pt", **metadata})
            try:
                for p in shard:
                    _run_plan(p, writer, spec, chunk_bytes, dtype)
                    if progress is not None:
                        progress(p.src.name)
            except BaseException:
                writer.close(check=False)
                raise
            writer.close()
            for name, *_ in entries:
                weight_map[name] = fname
            total += writer.data_size
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg = config_update(cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"shards": n, "data_bytes": total}


# ----------------------------------------------------------------------------- quantize


def find_quantized_tensor(ck: Checkpoint) -> str | None:
    """Name of a tensor showing that ``ck`` is already quantized (or None)."""
    names = set(ck.tensors)
    for name, info in ck.tensors.items():
        if info.dtype in (C.FP8_DTYPE, torch.float8_e5m2, C.UE8M0_DTYPE):
            return f"{name} (dtype {info.dtype})"
        if name.endswith(("_blocks", "_scales")) and info.dtype == torch.uint8:
            return f"{name} (gpt-oss MXFP4 block tensor)"
        if name.endswith((".weight_scale_inv", ".weight_scale", "_scale_inv")):
            return f"{name} (scale tensor)"
        if name.endswith(".scale") and f"{name[:-6]}.weight" in names:
            return f"{name} (scale of {name[:-6]}.weight)"
        if name.endswith(".weight") and info.dtype in (torch.int8, torch.uint8):
            return f"{name} (dtype {info.dtype})"
    return None


def quantization_config_for(spec: QuantSpec, skipped_modules: list[str], fallback: list[str]) -> dict:
    if spec.method in ("fp8", "mxfp4"):
        qc = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(spec.block),
            "scale_fmt": "ue8m0" if spec.method == "mxfp4" else spec.scale_fmt,
            "expert_dtype": "fp4" if spec.method == "mxfp4" else spec.expert_dtype,
            "modules_to_not_convert": skipped_modules,
        }
    else:
        qc = {
            "quant_method": "dsv41_int",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "symmetric": True,
            "scale_dtype": "float16",
            "packing": "int8 codes" if spec.bits == 8 else "uint8, two two's-complement nibbles, low nibble = even input index",
            "algorithm": "gptq" if spec.method == "int4-gptq" else "rtn",
            "modules_to_not_convert": skipped_modules,
        }
        if spec.method == "int4-gptq":
            qc["gptq"] = {"damp": spec.gptq_damp, "calibration": spec.calibration or {}, "rtn_fallback": fallback}
    qc["dsv41_method"] = spec.method
    return qc


def quantize_checkpoint(
    model: str | Path,
    out: str | Path,
    spec: QuantSpec,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Quantize the checkpoint folder ``model`` into ``out`` (self-contained: side files copied,
    ``quantization_config`` added to config.json). Returns a summary dict."""
    ck = Checkpoint(model)
    cfg = ck.config()
    if cfg.get("quantization_config"):
        qm = cfg["quantization_config"].get("quant_method", "?")
        raise QuantizationError(
            f"{ck.path}/config.json: field 'quantization_config' present (quant_method {qm!r}); the checkpoint is "
            "already quantized; run `dsv41 dequantize` first"
        )
    already = find_quantized_tensor(ck)
    if already:
        raise QuantizationError(
            f"{ck.path}: tensor {already} shows the checkpoint is already quantized; run `dsv41 dequantize` first"
        )
    plans = [plan_quantize(info, spec) for info in ck.tensors.values()]
    outputs = [o[0] for p in plans for o in p.outputs]
    dupes = sorted({n for n in outputs if outputs.count(n) > 1}) if len(set(outputs)) != len(outputs) else []
    if dupes:
        raise QuantizationError(f"{ck.path}: output tensor names collide: {dupes[:5]}")
    fallback = sorted(p.src.name for p in plans if p.kind == "int" and spec.method == "int4-gptq" and p.extra["hessian"] is None)
    skipped = sorted(
        {
            module_of(p.src.name)
            for p in plans
            if p.kind == "passthrough"
            and len(p.src.shape) == 2
            and p.src.name.endswith(".weight")
            and not any(t in p.src.name.split(".")[-2] for t in ("norm", "embed"))
        }
    )
    qc = quantization_config_for(spec, skipped, fallback)

    def update(c: dict) -> dict:
        c = dict(c)
        c["quantization_config"] = qc
        return c

    result = _write_checkpoint(
        ck, plans, Path(out), overwrite, max_shard_bytes, chunk_bytes, spec, torch.bfloat16, update,
        {"dsv41_method": spec.method}, progress,
    )
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    return {
        **result,
        "method": spec.method,
        "input_bytes": ck.total_bytes(),
        "output_bytes": sum(f.stat().st_size for f in Path(out).glob("*.safetensors")),
        "tensors": counts,
        "gptq_rtn_fallback": fallback,
        "quantization_config": qc,
    }


# ----------------------------------------------------------------------------- dequantize / load


@dataclass
class _Group:
    weight: TensorInfo
    scale: TensorInfo | None
    kind: str  # fp8 | fp4 | int8 | int4 | gptoss | plain
    out_name: str
    block: tuple[int, int] | None = None  # fp8: (rows, cols) of a scale block


def _classify(ck: Checkpoint) -> tuple[list[_Group], set[str]]:
    """Pair every quantized weight with its scale; returns groups and the consumed scale names."""
    t = ck.tensors
    qc = ck.config().get("quantization_config") or {}
    prefer = qc.get("weight_block_size") if isinstance(qc.get("weight_block_size"), (list, tuple)) else None
    used: set[str] = set()
    groups: list[_Group] = []
    for name, info in t.items():
        if name in used:
            continue
        if name.endswith("_blocks") and info.dtype == torch.uint8:
            sname = name[: -len("_blocks")] + "_scales"
            if sname not in t:
                raise QuantizationError(f"{ck.path}: tensor {name!r}: gpt-oss MXFP4 scale {sname!r} is missing")
            used.add(sname)
            groups.append(_Group(info, t[sname], "gptoss", name[: -len("_blocks")]))
            continue
        cands = []
        if name.endswith(".weight"):
            mod = module_of(name)
            cands = [f"{mod}.weight_scale_inv", f"{mod}.scale", f"{mod}.weight_scale"]
        else:
            cands = [f"{name}_scale_inv", f"{name}_scale"]
        scale = next((c for c in cands if c in t), None)
        if info.dtype in (C.FP8_DTYPE, torch.float8_e5m2):
            if scale is None:
                raise QuantizationError(
                    f"{ck.path}: tensor {name!r} is {info.dtype} but its scale is missing (expected one of {cands})"
                )
            s = t[scale]
            block = None
            if len(s.shape) >= 2 and len(info.shape) >= 2:
                bm = C._infer_block(info.shape[-2], s.shape[-2], prefer[0] if prefer else None)
                bn = C._infer_block(info.shape[-1], s.shape[-1], prefer[1] if prefer else None)
                block = (bm, bn) if bm and bn else None
            groups.append(_Group(info, s, "fp8", name, block))
        elif info.dtype in (torch.int8, torch.uint8) and (name.endswith(".weight") or scale is not None):
            if scale is None:
                raise QuantizationError(
                    f"{ck.path}: tensor {name!r} is {info.dtype} but its scale is missing (expected one of {cands})"
                )
            s = t[scale]
            if s.dtype.is_floating_point and s.dtype.itemsize >= 2 and scale.endswith(("weight_scale", "_scale")) and not scale.endswith("_scale_inv"):
                kind = "int8" if info.dtype == torch.int8 else "int4"
            else:
                kind = "fp4"
            groups.append(_Group(info, s, kind, name))
        else:
            groups.append(_Group(info, None, "plain", name))
            continue
        used.add(scale)
    # a scale whose weight was not found
    for name in t:
        if name in used:
            continue
        if name.endswith((".weight_scale_inv", ".weight_scale", "_scale_inv", "_scales")) or (
            name.endswith(".scale") and f"{name[:-6]}.weight" in t
        ):
            raise QuantizationError(f"{ck.path}: scale tensor {name!r} has no matching quantized weight")
    groups = [g for g in groups if g.weight.name not in used]
    return groups, used


def _dequant_rows(g: _Group, w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = g.weight.name
    if g.kind == "fp8":
        return C.dequantize_fp8_block(w, s, dtype, n, g.block)
    if g.kind == "fp4":
        return C.dequantize_mxfp4(w, s, dtype, n)
    if g.kind == "int8":
        return C.dequantize_int(w, s, 8, dtype, n)
    if g.kind == "int4":
        return C.dequantize_int(w, s, 4, dtype, n)
    if g.kind == "gptoss":
        return C.dequantize_gptoss_mxfp4(w, s, dtype, n)
    raise AssertionError(g.kind)


def _out_shape(g: _Group) -> tuple[int, ...]:
    w = g.weight
    if g.kind == "gptoss":
        return (*w.shape[:-2], w.shape[-2] * 32)
    if g.kind in ("fp4", "int4"):
        return (*w.shape[:-1], w.shape[-1] * 2)
    return tuple(w.shape)


def _validate_group(g: _Group) -> None:
    w, s = g.weight, g.scale
    n = w.name
    if g.kind == "plain":
        return
    shape = _out_shape(g)
    *lead, rows, cols = shape if g.kind != "gptoss" else (1, 1)
    if g.kind == "fp8":
        ok = len(s.shape) == len(shape) and tuple(s.shape[:-2]) == tuple(lead) and g.block is not None
        expected = f"[{', '.join(map(str, lead))}{', ' if lead else ''}ceil({rows}/bm), ceil({cols}/bn)]"
    elif g.kind == "fp4":
        ok = tuple(s.shape) == (*lead, rows, cols // C.MX_GROUP) and cols % C.MX_GROUP == 0
        expected = str([*lead, rows, cols // C.MX_GROUP])
    elif g.kind in ("int8", "int4"):
        ok = len(s.shape) == len(shape) and tuple(s.shape[:-1]) == (*lead, rows) and s.shape[-1] >= 1 and cols % s.shape[-1] == 0
        expected = f"[{', '.join(map(str, (*lead, rows)))}, {cols}/group]"
    else:
        ok = tuple(w.shape[:-1]) == tuple(s.shape) and w.shape[-1] == 16
        expected = str(list(w.shape[:-1]))
    if not ok:
        raise QuantizationError(
            f"tensor {n!r} ({g.kind}): scale {s.name!r} shape expected {expected}, found {list(s.shape)}"
        )


def plan_dequantize(ck: Checkpoint) -> list[Plan]:
    groups, _ = _classify(ck)
    plans = []
    for g in groups:
        _validate_group(g)
        if g.kind == "plain":
            plans.append(Plan(g.weight, "passthrough", [(g.weight.name, g.weight.dtype, g.weight.shape)]))
        else:
            plans.append(Plan(g.weight, f"dequant-{g.kind}", [(g.out_name, None, _out_shape(g))], extra={"group": g}))
    return plans


def _materialize_dtype(plans: list[Plan], dtype: torch.dtype) -> None:
    for p in plans:
        if p.kind.startswith("dequant"):
            p.outputs = [(n, dtype, s) for n, _, s in p.outputs]


def _dequant_tensor(g: _Group, dtype: torch.dtype) -> torch.Tensor:
    return _dequant_rows(g, read_tensor(g.weight), read_tensor(g.scale), dtype)


def _run_dequant(plan: Plan, writer: ShardWriter, chunk_bytes: int, dtype: torch.dtype) -> None:
    g: _Group = plan.extra["group"]
    name = plan.outputs[0][0]
    w = g.weight
    if g.kind in ("fp4", "int8", "int4") and len(w.shape) >= 2:
        # row-local formats: stream rows of weight and scale together
        s_info = g.scale
        for li, r0, r1 in _iter_row_chunks(w, 1, chunk_bytes):
            out = _dequant_rows(g, read_rows(w, li, r0, r1), read_rows(s_info, li, r0, r1), dtype)
            writer.write_rows(name, li, r0, out)
        return
    if g.kind == "fp8" and len(w.shape) >= 2:
        bm = g.block[0]
        for li, r0, r1 in _iter_row_chunks(w, bm, chunk_bytes):
            s = read_rows(g.scale, li, r0 // bm, math.ceil(r1 / bm))
            out = _dequant_rows(g, read_rows(w, li, r0, r1), s, dtype)
            writer.write_rows(name, li, r0, out)
        return
    writer.write_rows(name, 0, 0, _dequant_tensor(g, dtype))


def dequantize_checkpoint(
    model: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Any supported quantized checkpoint -> plain ``dtype`` weights (other tensors unchanged);
    ``quantization_config`` is removed from config.json."""
    ck = Checkpoint(model)
    plans = plan_dequantize(ck)
    _materialize_dtype(plans, dtype)

    def update(c: dict) -> dict:
        c = dict(c)
        c.pop("quantization_config", None)
        return c

    result = _write_checkpoint(ck, plans, Path(out), overwrite, max_shard_bytes, chunk_bytes, None, dtype, update, {}, progress)
    return {**result, "dequantized": sum(p.kind.startswith("dequant") for p in plans)}


def iter_dequantized_tensors(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(official name, tensor)`` one tensor at a time, dequantizing quantized weights to
    ``dtype``; unquantized tensors keep their stored dtype."""
    for name, tensor, _ in iter_checkpoint_tensors(path, dtype):
        yield name, tensor


@dataclass
class RawQuantized:
    """A quantized weight as stored: ``kind`` (fp8 | fp4 | int8 | int4 | gptoss), codes, scale and,
    for fp8, the scale block ``(rows, cols)``."""

    kind: str
    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None


def quantized_groups(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int] | None, tuple[int, ...]]]:
    """``{weight name: (kind, dequantized shape, fp8 block, scale shape)}`` for every quantized
    weight of a checkpoint (headers only, nothing is read)."""
    groups, _ = _classify(Checkpoint(path))
    out = {}
    for g in groups:
        if g.kind != "plain":
            _validate_group(g)
            out[g.out_name] = (g.kind, _out_shape(g), g.block, tuple(g.scale.shape))
    return out


def iter_checkpoint_tensors(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, keep=None
) -> Iterator[tuple[str, torch.Tensor | None, RawQuantized | None]]:
    """Yield ``(name, tensor, None)`` one tensor at a time, quantized weights dequantized to
    ``dtype`` -- or ``(name, None, RawQuantized)`` for the quantized weights whose name
    ``keep(name)`` accepts (read as stored, scale included)."""
    ck = Checkpoint(path)
    for p in plan_dequantize(ck):
        if p.kind == "passthrough":
            yield p.src.name, read_tensor(p.src), None
            continue
        g = p.extra["group"]
        name = p.outputs[0][0]
        if keep is not None and keep(name):
            yield name, None, RawQuantized(g.kind, read_tensor(g.weight), read_tensor(g.scale), g.block)
        else:
            yield name, _dequant_tensor(g, dtype), None


def load_dequantized_state_dict(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint in any supported format, dequantized tensor by tensor
    (peak memory: the result plus one tensor's working set)."""
    return dict(iter_dequantized_tensors(path, dtype))


def checkpoint_format(path: str | Path) -> dict:
    """Summary of the formats found: ``{"quantized": bool, "formats": {kind: count}, "quantization_config": ...}``."""
    ck = Checkpoint(path)
    groups, _ = _classify(ck)
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.kind] = counts.get(g.kind, 0) + 1
    return {
        "quantized": any(k != "plain" for k in counts),
        "formats": counts,
        "quantization_config": ck.config().get("quantization_config"),
    }


def is_quantized_checkpoint(path: str | Path) -> bool:
    return checkpoint_format(path)["quantized"]
