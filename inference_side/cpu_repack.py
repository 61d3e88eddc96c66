"""Keep vLLM's CPU linear weights live: no oneDNN / sgl-kernel / zentorch repacking.

On CPU, vLLM's `layers/utils.py:dispatch_cpu_unquantized_gemm(layer, remove_weight=True)` may
repack a linear layer's weight into a kernel-private format and replace `layer.weight` with an
empty tensor, so writes to the parameter would no longer reach the GEMM. No setting turns it off.
`install()` swaps that dispatch for plain `F.linear` on 2-D weights. Callers import the function
from the module at call time (`linear.py`, `vocab_parallel_embedding.py`), so replacing the module
attribute before the model loads is enough; the worker extension does it at import.

The 3-D GDN conv1d weight is left to vLLM: on AVX512-BF16 / Arm-bf16 CPUs its forward assumes the
packed format (`mamba/ops/cpu/gdn_attention.py`: `is_weight_packed=True`), so it is packed there and
reported as not zero-copy (see `packed_conv_weights`).
"""

from __future__ import annotations

import torch

_installed = False


def install() -> bool:
    """Patch the dispatch once per process; returns True if this call installed it."""
    global _installed
    if _installed:
        return False
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:
            # Not a linear layer (GDN conv1d): its CPU kernel needs vLLM's own handling.
            original(layer, remove_weight)
            return
        # NOTE: same callable vLLM uses for layers it leaves unpacked; the weight stays the parameter.
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_keeping_weights.weightshare_original = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights
    _installed = True
    return True


def packed_conv_weights(model: torch.nn.Module) -> dict[str, str]:
    """Engine parameter name -> reason, for conv1d weights vLLM packed in place on this CPU."""
    packed = {}
    for module_name, module in model.named_modules():
        if getattr(module, "_cpu_unpacked_conv_weight", None) is not None:
            packed[f"{module_name}.weight"] = (
                "vLLM's CPU conv kernel repacks this weight on AVX512-BF16/Arm-bf16 CPUs, so the "
                "parameter no longer holds the HF layout; serve on a GPU or a CPU without AVX512-BF16 "
                "to train it"
            )
    return packed


def repacked_linear_weights(model: torch.nn.Module) -> list[str]:
    """Names of linear weights that were emptied by a repacking dispatch (the guard failed)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if hasattr(module, "cpu_linear")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.numel() == 0
    ]
