"""The ``dsv41`` lm-evaluation-harness model: HFLM loading our DeepSeek-V4 classes with our options.

    lm_eval --model dsv41 --model_args pretrained=PATH,moe_backend=cpu_grouped,quantization=auto ...

(lm-eval 0.4 has no plugin discovery for models, so the name exists once this module is imported:
``python -m dsv41.evals.lmeval run --model dsv41 ...`` or ``dsv41 lm-eval -- run --model dsv41 ...``
import it first; in Python ``import dsv41.evals.lm_model``.)

Options on top of HFLM's:

* ``pretrained`` — checkpoint directory or Hub id; default: the bundled checkpoint.
* ``moe_backend`` — routed-expert implementation of ``dsv41.modeling`` (``auto``, ``reference``,
  ``cpu_grouped``, ``triton``, ``cuda``).
* ``quantization`` — ``auto`` (a quantized checkpoint written by ``dsv41 quantize`` — FP8 block,
  MXFP4, int8, int4 — is detected and dequantized on load), ``none`` (plain checkpoint only),
  ``nf4`` / ``int8-bnb`` (quantize on load with bitsandbytes, which must be installed).
* ``batch_size`` defaults to 8 (HFLM: 1); requests are sorted by length, so padding stays small.

Checkpoints whose ``model_type`` is not ``deepseek_v4`` are loaded by HFLM's usual path, so the
same command also evaluates a baseline such as Llama.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none", "nf4", "int8-bnb")


def _model_type(pretrained: str) -> str | None:
    cfg = Path(pretrained) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(pretrained).model_type
    except Exception:  # noqa: BLE001 - let the real loader report the error
        return None


def load_dsv41_model(pretrained: str, dtype="auto", moe_backend: str = "auto", quantization: str = "auto",
                     revision: str | None = None):
    """Load our DeepSeek-V4 causal LM with the kit's options (used by the lm-eval model and by `compare`)."""
    import torch
    from dsv41.modeling import DeepseekV4ForCausalLM

    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization: expected one of {', '.join(QUANTIZATION_CHOICES)}, found {quantization!r}")
    torch_dtype = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16}.get(str(dtype).replace("torch.", ""), dtype)
    local = Path(pretrained).is_dir()
    if quantization in ("nf4", "int8-bnb"):
        from dsv41.quantization.bnb import load_bnb_model
        from transformers import BitsAndBytesConfig

        bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if quantization == "nf4"
               else BitsAndBytesConfig(load_in_8bit=True))
        return load_bnb_model(DeepseekV4ForCausalLM, pretrained, bnb, dtype=torch_dtype or torch.bfloat16)
    if local:
        from dsv41.quantization import is_quantized_checkpoint

        if is_quantized_checkpoint(pretrained):
            if quantization == "none":
                raise ValueError(f"{pretrained} is a quantized checkpoint but quantization=none was given")
            from dsv41.quantization import load_quantized_model

            log.info("dsv41: %s is quantized; dequantizing on load", pretrained)
            return load_quantized_model(DeepseekV4ForCausalLM, pretrained, dtype=torch_dtype or torch.bfloat16,
                                        moe_backend=moe_backend)
    kwargs = {"revision": revision} if revision and not local else {}
    return DeepseekV4ForCausalLM.from_pretrained(pretrained, dtype=torch_dtype or "auto", moe_backend=moe_backend, **kwargs)


@register_model("dsv41")
class DSV41LM(HFLM):
    """HFLM whose model is loaded by :func:`load_dsv41_model` (moe_backend, quantization options)."""

    def __init__(self, pretrained: str | None = None, moe_backend: str = "auto", quantization: str = "auto",
                 batch_size: int | str = 8, device: str | None = None, **kwargs):
        import torch

        from dsv41 import default_model_path

        self._dsv41_opts = {"moe_backend": moe_backend, "quantization": quantization}
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pretrained = pretrained or default_model_path()
        super().__init__(pretrained=pretrained, batch_size=batch_size, device=device, **kwargs)

    def _get_config(self, pretrained, *args, **kwargs):
        super()._get_config(pretrained, *args, **kwargs)
        # Our quantized checkpoints carry a quantization_config that transformers' quantizers do not
        # know; our loader handles it, so HFLM must not try to build a transformers quantizer from it.
        if isinstance(pretrained, str) and _model_type(pretrained) == "deepseek_v4" and hasattr(self._config, "quantization_config"):
            del self._config.quantization_config

    def _create_model(self, pretrained, revision="main", dtype="auto", trust_remote_code=False, **kwargs):
        if _model_type(pretrained) != "deepseek_v4":
            log.info("dsv41: %s is not a DeepSeek-V4 checkpoint; loading it with HFLM's default path", pretrained)
            return super()._create_model(pretrained, revision=revision, dtype=dtype,
                                         trust_remote_code=trust_remote_code, **kwargs)
        self._model = load_dsv41_model(pretrained, dtype=dtype, revision=revision, **self._dsv41_opts)
        return None

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update({f"dsv41_{k}": v for k, v in self._dsv41_opts.items()})
        return info
