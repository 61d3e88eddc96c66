"""Keep every vLLM CPU weight live: no kernel-private formats, so trainer writes reach every kernel.

The one place that knows which vLLM CPU kernels keep weights in a private format, and what we do
about each (prevented here; nothing is left to re-derive at commit):

- Linear / embedding GEMMs. `layers/utils.py:dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`
  may repack a 2-D weight (oneDNN, sgl-kernel, zentorch) and replace `layer.weight` with an empty
  tensor. Prevented: the dispatch uses plain `F.linear` on the live parameter.
- Gated DeltaNet causal conv1d. On AVX512-BF16 and Arm-bf16 CPUs the same dispatch packs the 3-D
  `(dim, 1, width)` conv weight with `ops.causal_conv1d_weight_pack`, and
  `layers/mamba/ops/cpu/gdn_attention.py` then calls the C++ conv with `is_weight_packed=True`.
  The C++ kernels also take the plain `(dim, width)` weight (`is_weight_packed=False`), at the same
  speed (benchmarks/bench_cpu_conv.py), so packing is prevented and the module's two conv wrappers
  are given the unpacked view. The weight stays the parameter, in HF's shape, in shared memory.

Where vLLM keeps the dispatch and the conv wrappers, and in which versions, is known to
`weightshare/vllm_compat.py` (`replace_cpu_gemm_dispatch`, `wrap_cpu_gdn_conv`); this module decides what
replaces them. Replacing them before the model loads is enough; the worker extension calls `install()`
at import.

If a vLLM release lacks the conv wrappers, the conv weight is left to vLLM (packed), and the layout
reports it as not zero-copy (its values are then read from the checkpoint by the trainer and frozen).
"""

from __future__ import annotations

import torch

from weightshare import vllm_compat

_installed = False
conv_kept_unpacked = False
"""True once the GDN conv wrappers are patched: conv1d weights are then never packed."""


def _is_causal_conv_weight(weight: torch.Tensor) -> bool:
    return weight.ndim == 3 and weight.size(1) == 1


def _transposed_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` (dim, tokens) as the C++ prefill conv checks it: strides exactly (1, dim).

    vLLM bug (0.32 CPU): a one-token prefill slices `mixed_qkv` to (1, dim) with the row stride of the
    wider projection output; `.contiguous()` keeps it (a size-1 dim's stride does not count), and
    `causal_conv1d_fwd_cpu` then fails "expect x to be transposed", killing the engine on a one-token
    prompt. A copy with standard strides is what longer prompts already get.
    """
    if x.dim() == 2 and x.size(1) == 1 and x.stride(1) != x.size(0):
        return x.t().clone(memory_format=torch.contiguous_format).t()
    return x


def _plain_conv_call(original):
    """Wrap a gdn_attention conv wrapper so a 3-D unpacked weight runs as (dim, width), not packed."""

    def call(*, weight: torch.Tensor, is_weight_packed: bool, **kwargs):
        if _is_causal_conv_weight(weight):
            # A 3-D weight was never packed (packing yields (dim, width)): tell the kernel so.
            weight, is_weight_packed = weight.view(weight.size(0), weight.size(2)), False
        if "query_start_loc" in kwargs:  # the prefill wrapper
            kwargs["x"] = _transposed_layout(kwargs["x"])
        return original(weight=weight, is_weight_packed=is_weight_packed, **kwargs)

    call.weightshare_original = original  # type: ignore[attr-defined]
    return call


def install(keep_conv_unpacked: bool = True) -> bool:
    """Patch the dispatch (and the GDN conv wrappers) once per process; True if this call installed it.

    `keep_conv_unpacked=False` leaves conv1d packing to vLLM (for benchmarks of that design only).
    """
    global _installed, conv_kept_unpacked
    if _installed:
        return False
    # Give vLLM's CPU GDN conv wrappers unpacked weights (False where this vLLM has no such wrappers).
    conv_kept_unpacked = keep_conv_unpacked and vllm_compat.wrap_cpu_gdn_conv(_plain_conv_call)
    vllm_compat.replace_cpu_gemm_dispatch(_dispatch_keeping_weights)
    _installed = True
    return True


def _dispatch_keeping_weights(original):
    """vLLM's CPU GEMM dispatch `original`, changed to leave every linear weight live (see the module doc)."""

    def dispatch_keeping_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:
            if conv_kept_unpacked and _is_causal_conv_weight(layer.weight):
                return  # the patched conv wrappers read the weight as it is
            original(layer, remove_weight)  # MoE expert weights and the like: vLLM's own handling
            return
        # NOTE: same callable vLLM uses for layers it leaves unpacked; the weight stays the parameter.
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_keeping_weights.weightshare_original = original  # type: ignore[attr-defined]
    return dispatch_keeping_weights
