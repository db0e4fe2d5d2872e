"""DeepSeek-V4.1 open release kit.

One import package whose sub-packages live in the repository's top-level concern folders:
``dsv41.modeling`` (modeling/), ``dsv41.kernels`` (kernels/), ``dsv41.quantization``
(quantization/), ``dsv41.evals`` (evals/), ``dsv41.audit`` (audit/), ``dsv41.space``
(space/) and ``dsv41.release`` (release/).
"""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
# The bundled, trained tiny checkpoint: the default model of every command.
BUNDLED_CHECKPOINT = PACKAGE_ROOT / "checkpoints" / "dsv41-tiny"


def default_model_path() -> str:
    """Path of the default model (the bundled checkpoint)."""
    return str(BUNDLED_CHECKPOINT)
