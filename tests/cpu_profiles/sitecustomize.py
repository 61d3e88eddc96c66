"""Tests only: a Python process started with this folder on PYTHONPATH sees a CPU with fewer features.

`WEIGHTSHARE_TEST_CPU_PROFILE=avx2` hides AVX512 and AMX from the checks vLLM's CPU backend makes when it
picks kernels and weight formats (`torch.cpu._is_avx512_bf16_supported()` and its kin: the GDN causal
conv1d packing, the bf16 linear dispatch, the attention kernels), so an AVX512 or AMX machine runs the
code paths an AVX2-only machine takes. Set ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 beside it
to cap oneDNN's and ATen's own kernels too. C++ code that vLLM compiled for the build machine's ISA is not
affected: this emulates the choices, not the instructions. Every process that starts with this folder on
its path (vLLM's engine core and workers, the trainer) is affected, which is the point: they inherit the
environment. Python runs this file at start-up because it is named sitecustomize.
"""

import os

_HIDDEN_FEATURES = {
    "avx2": ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
             "_is_amx_tile_supported", "_is_amx_fp16_supported"),
    "avx512_bf16": ("_is_amx_tile_supported", "_is_amx_fp16_supported"),
}

_profile = os.environ.get("WEIGHTSHARE_TEST_CPU_PROFILE")
if _profile:
    import torch

    for _name in _HIDDEN_FEATURES[_profile]:
        if hasattr(torch.cpu, _name):
            setattr(torch.cpu, _name, lambda: False)
