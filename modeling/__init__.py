"""DeepSeek-V4 model for transformers: config, reference PyTorch model, checkpoint I/O."""

from .configuration_deepseek_v4 import DeepseekV4Config
from .modeling_deepseek_v4 import DeepseekV4Cache, DeepseekV4ForCausalLM, DeepseekV4Model, DeepseekV4PreTrainedModel


def _register_auto_classes() -> None:
    """Map *our* config class to our models in the Auto* registries. transformers' own
    ``deepseek_v4`` entries (keyed by its config class) are left untouched."""
    from transformers import AutoModel, AutoModelForCausalLM

    AutoModel.register(DeepseekV4Config, DeepseekV4Model, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekV4Config, DeepseekV4ForCausalLM, exist_ok=True)


_register_auto_classes()

__all__ = ["DeepseekV4Config", "DeepseekV4Model", "DeepseekV4ForCausalLM", "DeepseekV4PreTrainedModel", "DeepseekV4Cache"]
