"""dsv41.kernels: MoE kernels (routing, token alignment, grouped expert GEMMs) in Triton and CUDA C++,
with PyTorch references.

Importing this package registers the backends that can run here:

* into ``dsv41.modeling.moe_deepseek_v4.MOE_BACKENDS`` (``moe_backend=`` in our model):
  ``triton`` (CUDA, or ``TRITON_INTERPRET=1``) and ``cuda`` (CUDA device + CUDA torch + nvcc);
* into transformers' ``ExpertsInterface`` as ``dsv41_triton``, ``dsv41_cuda`` and, always,
  ``dsv41_cpu_grouped`` / ``dsv41_reference``, so that stock transformers MoE models accept
  ``from_pretrained(..., experts_implementation="dsv41_triton")``;
* on x86-64 CPUs with AVX-512, the native few-rows-per-expert kernel (``cpu_ext.py``) into
  ``moe_deepseek_v4.NATIVE_EXPERTS``, used by ``cpu_grouped`` for decode and small batches (built on
  first use).

Nothing here raises on a CPU-only machine: a backend that cannot run is simply not registered
(:func:`backend_status` says why).
"""

from __future__ import annotations

import os

from .reference import (  # noqa: F401
    Alignment,
    QuantizedExperts,
    align_capacity,
    align_reference,
    route_reference,
)

_STATUS: dict[str, str] = {}


def triton_usable() -> tuple[bool, str]:
    """(usable, why) without importing triton unless it will be used."""
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'dsv41[gpu]')"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before triton is imported to run the Triton kernels on CPU, slowly)"


def _register() -> None:
    import torch  # noqa: F401

    from dsv41.modeling import moe_deepseek_v4 as moe

    backends = {"dsv41_cpu_grouped": moe.cpu_grouped_experts, "dsv41_reference": moe.reference_experts}
    from .cpu_ext import cpu_native_supported, native_experts

    ok, why = cpu_native_supported()
    _STATUS["cpu_native"] = why
    if ok and native_experts not in moe.NATIVE_EXPERTS:
        moe.NATIVE_EXPERTS.append(native_experts)
    ok, why = triton_usable()
    _STATUS["triton"] = why
    if ok:
        try:
            from .triton_moe import triton_experts
        except Exception as exc:  # e.g. a triton version without an API we use
            _STATUS["triton"] = f"triton kernels failed to import: {exc!r}"
        else:
            moe.MOE_BACKENDS["triton"] = triton_experts
            backends["dsv41_triton"] = triton_experts
    from .cuda_ext import cuda_available, cuda_experts, nvcc_path

    if cuda_available():
        moe.MOE_BACKENDS["cuda"] = cuda_experts
        backends["dsv41_cuda"] = cuda_experts
        _STATUS["cuda"] = f"CUDA device + nvcc at {nvcc_path()} (extension builds on first use)"
    else:
        import torch

        _STATUS["cuda"] = (
            f"needs a CUDA device, CUDA torch and nvcc (cuda available: {torch.cuda.is_available()}, "
            f"nvcc: {nvcc_path()})"
        )
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception as exc:
        _STATUS["transformers"] = f"transformers experts interface not available ({exc!r})"
        return
    for name, fn in backends.items():
        ExpertsInterface.register(name, fn)
    _STATUS["transformers"] = "registered " + ", ".join(sorted(backends))


def backend_status() -> dict[str, str]:
    """Why each optional backend is or is not registered."""
    return dict(_STATUS)


# The repository folder is also importable as a top-level ``kernels`` when the repo root is on
# sys.path (e.g. transformers probes for the HF ``kernels`` package by importing that name): only
# the real package registers anything.
if __name__ == "dsv41.kernels":
    _register()
