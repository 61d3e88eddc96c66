"""Keep vLLM's CPU linear weights live: no oneDNN / sgl-kernel / zentorch repacking.

On CPU, vLLM's `layers/utils.py:dispatch_cpu_unquantized_gemm(layer, remove_weight=True)` may
repack a linear layer's weight into a kernel-private format and replace `layer.weight` with an
empty tensor, so writes to the parameter would no longer reach the GEMM. No setting turns it off.
`install()` swaps that dispatch for plain `F.linear` on 2-D weights. Callers import the function
from the module at call time (`linear.py`, `vocab_parallel_embedding.py`), so replacing the module
attribute before the model loads is enough; the worker extension does it at import.

The 3-D GDN conv1d weight is left to vLLM: on AVX512-BF16 / Arm-bf16 CPUs its forward assumes the
packed format (`mamba/ops/cpu/gdn_attention.py`: `is_weight_packed=True`), so it is packed there and
reported as not zero-copy by the layout.
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

