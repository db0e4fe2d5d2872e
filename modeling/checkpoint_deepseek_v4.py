"""Checkpoint I/O for DeepSeek-V4: official release naming <-> in-memory (transformers) naming,
self-contained saving, and strict loading.

Three namings exist for the same tensors:
- official (the Hub release repos): ``embed.weight``, ``layers.0.attn.wq_a.weight``,
  ``layers.0.ffn.experts.3.w1.weight`` ... (one tensor per expert and projection);
- in-memory (this model and transformers' ``DeepseekV4ForCausalLM``): ``model.embed_tokens.weight``,
  ``model.layers.0.self_attn.q_a_proj.weight``, ``model.layers.0.mlp.experts.gate_up_proj`` ...;
- the mixed form that transformers' ``save_pretrained`` writes (in-memory prefixes, official leaves).
Loading goes through transformers' weight-conversion machinery (the ``deepseek_v4`` mapping),
saving uses the explicit table below.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

MODELING_FILES = ("configuration_deepseek_v4.py", "modeling_deepseek_v4.py", "moe_deepseek_v4.py", "checkpoint_deepseek_v4.py")
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek_v4.DeepseekV4Config",
    "AutoModel": "modeling_deepseek_v4.DeepseekV4Model",
    "AutoModelForCausalLM": "modeling_deepseek_v4.DeepseekV4ForCausalLM",
}

# in-memory leaf (under model.layers.N.) -> official leaf (under layers.N.)
_LAYER_RENAMES = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
    ("self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
    ("self_attn.compressor.indexer.kv_proj.weight", "attn.indexer.compressor.wkv.weight"),
    ("self_attn.compressor.indexer.gate_proj.weight", "attn.indexer.compressor.wgate.weight"),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    ("self_attn.compressor.indexer.kv_norm.weight", "attn.indexer.compressor.norm.weight"),
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    # MTP (next-n) layers only
    ("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
    ("e_proj.weight", "e_proj.weight"), ("h_proj.weight", "h_proj.weight"), ("norm.weight", "norm.weight"),
    ("hc_head.hc_fn", "hc_head_fn"), ("hc_head.hc_base", "hc_head_base"), ("hc_head.hc_scale", "hc_head_scale"),
]
_TOP_RENAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("lm_head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.hc_head.hc_fn", "hc_head_fn"),
    ("model.hc_head.hc_base", "hc_head_base"),
    ("model.hc_head.hc_scale", "hc_head_scale"),
]
_LAYER_KEY = re.compile(r"^model\.(layers|mtp)\.(\d+)\.(.+)$")


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory state dict -> official release naming (experts split per expert and projection)."""
    top = dict(_TOP_RENAMES)
    layer = dict(_LAYER_RENAMES)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in top:
            out[top[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise KeyError(f"no official name for tensor {key!r}")
        group, idx, leaf = match.groups()
        prefix = f"{group}.{idx}."
        if leaf == "mlp.experts.gate_up_proj":
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}ffn.experts.{e}.w1.weight"] = tensor[e, :inter]
                out[f"{prefix}ffn.experts.{e}.w3.weight"] = tensor[e, inter:]
        elif leaf == "mlp.experts.down_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}ffn.experts.{e}.w2.weight"] = tensor[e]
        elif leaf in layer:
            out[prefix + layer[leaf]] = tensor
        else:
            raise KeyError(f"no official name for tensor {key!r}")
    return out


def from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official naming -> in-memory naming (the inverse of :func:`to_official`)."""
    top = {v: k for k, v in _TOP_RENAMES}
    layer = {v: k for k, v in _LAYER_RENAMES}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    expert_key = re.compile(r"^((?:layers|mtp)\.\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
    for key, tensor in state_dict.items():
        if key in top:
            out[top[key]] = tensor
            continue
        m = expert_key.match(key)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
            continue
        m = re.match(r"^((?:layers|mtp)\.\d+)\.(.+)$", key)
        if m is None or m.group(2) not in layer:
            raise KeyError(f"unknown tensor {key!r} in an official-naming checkpoint")
        out[f"model.{m.group(1)}.{layer[m.group(2)]}"] = tensor
    for idx in sorted({i for i, _ in experts}):
        w1, w2, w3 = (experts.get((idx, w), {}) for w in ("w1", "w2", "w3"))
        n = max(len(w1), len(w2), len(w3))
        for name, group in (("w1", w1), ("w2", w2), ("w3", w3)):
            missing = sorted(set(range(n)) - set(group))
            if missing:
                raise KeyError(f"missing tensor {idx}.ffn.experts.{missing[0]}.{name}.weight")
        out[f"model.{idx}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w1[e], w3[e]], dim=0) for e in range(n)])
        out[f"model.{idx}.mlp.experts.down_proj"] = torch.stack([w2[e] for e in range(n)])
    return out


def register_conversion_mapping() -> None:
    """Let transformers' loader apply its ``deepseek_v4`` key conversion to our (custom-code)
    classes too. The mapping registered is transformers' own, so its own classes are unaffected."""
    from transformers import conversion_mapping as cm

    mapping = cm.get_checkpoint_conversion_mapping("deepseek_v4")
    if mapping is not None and "deepseek_v4" not in cm.USER_REGISTERED_MAPPINGS:
        cm.register_checkpoint_conversion_mapping("deepseek_v4", mapping, overwrite=True)


def save_checkpoint(model, save_directory, naming: str = "official", max_shard_size: str | int = "2GB", safe_serialization: bool = True, **kwargs) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if naming not in ("official", "transformers"):
        raise ValueError(f"naming must be 'official' or 'transformers', got {naming!r}")
    if not safe_serialization:
        raise ValueError("only safetensors checkpoints are written (safe_serialization=False is not supported)")
    kept = [n for n, m in model.named_modules() if getattr(m, "fmt", None) in ("fp8", "mxfp4")]
    if kept:
        raise ValueError(
            f"{kept[0]} holds routed experts kept in {model.get_submodule(kept[0]).fmt}; save_pretrained writes dense "
            "weights: reload with quantized_experts='dequantize', or write a quantized checkpoint with `dsv41 quantize`"
        )
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if naming == "official":
        state = {k: v.contiguous() for k, v in to_official(state).items()}
    for stale in list(save_directory.glob("model*.safetensors")) + list(save_directory.glob("model.safetensors.index.json")):
        stale.unlink()
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, save_directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": split.tensor_to_filename}
        (save_directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    config = model.config
    config.architectures = ["DeepseekV4ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    use_mtp, config.use_mtp = config.use_mtp, False  # MTP weights are saved; loading them stays opt-in
    try:
        config.save_pretrained(save_directory)
    finally:
        config.use_mtp = use_mtp
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    here = Path(__file__).resolve().parent
    for name in MODELING_FILES:
        shutil.copyfile(here / name, save_directory / name)


def checkpoint_keys(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (file, shape) for a local safetensors checkpoint, read from headers only."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"checkpoint file {file} is missing (listed in {index.name if index.exists() else 'the default layout'})")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    out[key] = (name, tuple(f.get_slice(key).get_shape()))
        except Exception as exc:  # safetensors raises several error types for damaged files
            raise ValueError(f"cannot read safetensors file {file}: {exc} (the file is corrupted or not a safetensors file)") from exc
    return out


def _expected_checkpoint_shapes(model) -> dict[str, tuple[int, ...]]:
    state = {k: v for k, v in model.state_dict().items() if ".mtp." not in k}
    return {k: tuple(v.shape) for k, v in to_official(state).items()}, {k: tuple(v.shape) for k, v in state.items()}


def check_checkpoint_against_model(path, model) -> None:
    """Raise ValueError naming every missing, unexpected or wrongly shaped tensor (official,
    in-memory or mixed naming is recognised)."""
    found = checkpoint_keys(path)
    official, memory = _expected_checkpoint_shapes(model)
    ignore = re.compile(r"(^|\.)mtp\.")
    found = {k: v for k, v in found.items() if not ignore.search(k)}
    names = set(found)
    # The naming the checkpoint uses is the one that explains most of its tensor names. Other
    # layouts (e.g. the mixed form transformers writes) are checked by transformers' loader instead.
    expected = max((memory, official), key=lambda candidate: len(names & set(candidate)))
    if len(names & set(expected)) < 0.5 * len(names):
        return
    problems = []
    for key in sorted(set(expected) - names):
        problems.append(f"missing tensor {key} (expected shape {list(expected[key])})")
    for key in sorted(names - set(expected)):
        problems.append(f"unexpected tensor {key} with shape {list(found[key][1])} in {found[key][0]}")
    for key in sorted(names & set(expected)):
        if tuple(found[key][1]) != tuple(expected[key]):
            problems.append(f"tensor {key} in {found[key][0]} has shape {list(found[key][1])}, the config expects {list(expected[key])}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model config:\n  " + "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _single_device(device_map):
    """The one device of a ``device_map`` (str, int, torch.device, or a dict naming one device)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"quantized checkpoints load onto one device; device_map names {sorted(map(str, devices))}"
            )
        (device_map,) = devices
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device_map)


def strict_load(super_from_pretrained, cls, path, args, kwargs, moe_backend, verify_manifest):
    register_conversion_mapping()
    quantized_experts = kwargs.pop("quantized_experts", "auto")
    local = Path(str(path))
    if verify_manifest:
        from dsv41.release.manifest import verify_model_dir

        if not local.is_dir():  # a Hub id: verify the downloaded snapshot that will be loaded
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(path), revision=kwargs.get("revision")))
            path = str(local)
        verify_model_dir(local)
    quantized = False
    if local.is_dir():
        config_file = local / "config.json"
        if config_file.exists():
            quantized = "quantization_config" in json.loads(config_file.read_text())
        if not quantized and not kwargs.get("quantization_config"):
            from .configuration_deepseek_v4 import DeepseekV4Config

            config = kwargs.get("config") or DeepseekV4Config.from_pretrained(local)
            skeleton = _meta_model(cls, config)
            check_checkpoint_against_model(local, skeleton)
    if quantized:
        # FP8 / FP4 / int8 / int4 checkpoints: dequantized tensor by tensor into the model's dtype
        from dsv41.quantization import load_quantized_model

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype", torch.bfloat16))
        dtype = torch.bfloat16 if dtype in (None, "auto") else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model = load_quantized_model(cls, local, dtype=dtype, moe_backend=moe_backend, quantized_experts=quantized_experts,
                                     device=_single_device(kwargs.get("device_map")))
        model.set_moe_backend(moe_backend or model.config.moe_backend)
        return (model, {}) if kwargs.get("output_loading_info") else model
    kwargs.setdefault("output_loading_info", False)
    want_info = kwargs.pop("output_loading_info")
    model, info = super_from_pretrained(path, *args, output_loading_info=True, **kwargs)
    problems = [f"missing tensor {k}" for k in info.get("missing_keys", [])]
    problems += [f"unexpected tensor {k}" for k in info.get("unexpected_keys", []) if not re.search(r"(^|\.)mtp\.", k)]
    problems += [f"tensor {m}" for m in info.get("mismatched_keys", [])]
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: " + "; ".join(map(str, problems[:20])))
    if getattr(model.model, "mtp", None) is not None:
        load_mtp(model, local)
    if moe_backend is not None:
        model.set_moe_backend(moe_backend)
    else:
        model.set_moe_backend(model.config.moe_backend)
    return (model, info) if want_info else model


def load_mtp(model, path) -> None:
    """Read the MTP (next-n) tensors of a local checkpoint (official ``mtp.N.*`` or in-memory
    ``model.mtp.N.*`` naming) into ``model.model.mtp``; every MTP parameter must be present."""
    from safetensors import safe_open

    found = checkpoint_keys(path)
    names = [k for k in found if re.match(r"^(model\.)?mtp\.", k)]
    tensors = {}
    for key in names:
        with safe_open(str(Path(path) / found[key][0]), framework="pt") as f:
            tensors[key] = f.get_tensor(key)
    if names and not names[0].startswith("model."):
        tensors = from_official(tensors)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("model.mtp.")}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint {path} has no tensor for MTP parameter {missing[0]} ({len(missing)} missing); load with use_mtp=False")
    for key, tensor in tensors.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"MTP tensor {key} has shape {list(tensor.shape)}, the config expects {list(expected[key].shape)}")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in expected}, strict=False)


def _meta_model(cls, config):
    with torch.device("meta"):
        return cls(config)
