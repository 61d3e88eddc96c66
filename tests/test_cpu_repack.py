"""The CPU repack guard: vLLM's CPU GEMM dispatch must leave linear weights as the live parameters.

On AVX2 machines bf16 oneDNN fails and vLLM falls back to F.linear anyway, which could hide a broken
guard; fp32 weights are repacked by oneDNN / sgl-kernel there, so this test uses fp32 and checks both
the unpatched behaviour (repacks, empties the weight) and the patched one (keeps it).
Run as: .venv/bin/python -m pytest tests/test_cpu_repack.py -v
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


def linear_layer(rows: int = 256, cols: int = 512) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(rows, cols), requires_grad=False)
    layer.bias = None
    return layer


def test_guard_keeps_fp32_linear_weights_live():
    from vllm.model_executor.layers import utils as layer_utils

    from inference_side import cpu_repack

    cpu_repack.install()
    patched = layer_utils.dispatch_cpu_unquantized_gemm
    original = patched.weightshare_original

    # What vLLM does without the guard (documents why it exists): the weight may be emptied.
    unguarded = linear_layer()
    original(unguarded, remove_weight=True)
    print("unguarded weight numel after dispatch:", unguarded.weight.numel())

    guarded = linear_layer()
    before = guarded.weight
    patched(guarded, remove_weight=True)
    assert guarded.weight is before and guarded.weight.numel() == 256 * 512
    x = torch.randn(3, 512)
    expected = torch.nn.functional.linear(x, before.detach().clone())
    torch.testing.assert_close(guarded.cpu_linear(x, guarded.weight, None), expected)
    with torch.no_grad():
        guarded.weight.mul_(2)  # an in-place edit reaches the GEMM
    torch.testing.assert_close(guarded.cpu_linear(x, guarded.weight, None), 2 * expected)
    assert cpu_repack.install() is False  # idempotent
