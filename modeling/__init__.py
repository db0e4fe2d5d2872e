"""DeepSeek-V4 model for transformers: config, reference PyTorch model, checkpoint I/O.

The public classes are imported on first use (PEP 562), so that light sub-modules such as the CLI
do not pay for importing torch and transformers; the first access also registers our classes with
transformers' Auto* factories (keyed by *our* config class, leaving transformers' own
``deepseek_v4`` registration untouched).
"""

from __future__ import annotations

_PUBLIC = {
    "DeepseekV4Config": "configuration_deepseek_v4",
    "DeepseekV4Model": "modeling_deepseek_v4",
    "DeepseekV4ForCausalLM": "modeling_deepseek_v4",
    "DeepseekV4PreTrainedModel": "modeling_deepseek_v4",
    "DeepseekV4Cache": "modeling_deepseek_v4",
}
__all__ = list(_PUBLIC)
_registered = False


def _register_auto_classes() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoModel, AutoModelForCausalLM

    from .configuration_deepseek_v4 import DeepseekV4Config
    from .modeling_deepseek_v4 import DeepseekV4ForCausalLM, DeepseekV4Model

    AutoModel.register(DeepseekV4Config, DeepseekV4Model, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekV4Config, DeepseekV4ForCausalLM, exist_ok=True)
    _registered = True


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dsv41.modeling' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    _register_auto_classes()
    value = getattr(module, name)
    globals()[name] = value
    return value
