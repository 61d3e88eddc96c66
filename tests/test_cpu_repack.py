"""The CPU guards: vLLM's CPU kernels must compute with the live parameters, never a private copy.

- Linear GEMM dispatch: on AVX2 machines bf16 oneDNN fails and vLLM falls back to F.linear anyway,
  which could hide a broken guard; fp32 weights are repacked by oneDNN / sgl-kernel there, so the
  guard is checked with fp32.
- GDN causal conv1d: vLLM packs it only where `torch.cpu._is_avx512_bf16_supported()` (or Arm bf16)
  says so. The capability is driven here so the packing path is exercised on any CPU; the C++ conv
  kernels themselves run only where the CPU has AVX512-BF16 (skipped elsewhere, with the reason).
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


def conv_layer(dim: int = 128, width: int = 4) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(dim, 1, width, dtype=torch.bfloat16), requires_grad=False)
    layer.bias = None
    return layer


@pytest.fixture(scope="module")
def guard():
    from vllm.model_executor.layers import utils as layer_utils

    from inference_side import cpu_repack

    cpu_repack.install()
    assert cpu_repack.install() is False  # idempotent
    return layer_utils.dispatch_cpu_unquantized_gemm


def test_guard_keeps_fp32_linear_weights_live(guard):
    guarded = linear_layer()
    before = guarded.weight
    guard(guarded, remove_weight=True)
    assert guarded.weight is before and guarded.weight.numel() == 256 * 512
    x = torch.randn(3, 512)
    expected = torch.nn.functional.linear(x, before.detach().clone())
    torch.testing.assert_close(guarded.cpu_linear(x, guarded.weight, None), expected)
    with torch.no_grad():
        guarded.weight.mul_(2)  # an in-place edit reaches the GEMM
    torch.testing.assert_close(guarded.cpu_linear(x, guarded.weight, None), 2 * expected)


def test_unguarded_dispatch_keeps_no_live_fp32_weight_where_it_repacks(guard):
    """Why the guard exists: where vLLM repacks, the layer's weight stops being what the GEMM reads."""
    unguarded = linear_layer()
    before = unguarded.weight.detach().clone()
    guard.weightshare_original(unguarded, remove_weight=True)
    x = torch.randn(3, 512)
    torch.testing.assert_close(unguarded.cpu_linear(x, unguarded.weight, None), x @ before.t(), rtol=1e-4, atol=1e-4)
    # Either vLLM emptied the parameter (the GEMM reads its private copy) or it kept plain F.linear.
    assert unguarded.weight.numel() == 0 or unguarded.cpu_linear is torch.nn.functional.linear


def test_conv_weight_is_never_packed_even_where_vllm_would(guard, monkeypatch):
    from inference_side import cpu_repack

    assert cpu_repack.conv_kept_unpacked, "this vLLM lacks the GDN conv wrappers the guard patches"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    layer = conv_layer()
    before = layer.weight
    values = before.detach().clone()
    guard(layer, remove_weight=True)
    assert layer.weight is before and torch.equal(layer.weight, values)
    assert getattr(layer, "_cpu_unpacked_conv_weight", None) is None


def test_conv_wrappers_hand_the_kernel_the_plain_weight(guard):
    """Both GDN conv wrappers get (dim, width) views of the live weight and is_weight_packed=False."""
    from vllm.model_executor.layers.mamba.ops.cpu import gdn_attention

    from inference_side.cpu_repack import _plain_conv_call

    for name in ("_causal_conv1d_fwd_cpu", "_causal_conv1d_update_cpu"):
        assert hasattr(getattr(gdn_attention, name), "weightshare_original"), f"{name} is not patched"
    layer = conv_layer()
    seen = {}
    probe = _plain_conv_call(lambda **kw: seen.update(kw))
    probe(x=None, weight=layer.weight, is_weight_packed=True)
    assert seen["is_weight_packed"] is False
    assert seen["weight"].shape == (128, 4) and seen["weight"].data_ptr() == layer.weight.data_ptr()
    packed_like = torch.empty(128, 4, dtype=torch.bfloat16)  # what vLLM's own packing yields: left alone
    probe(x=None, weight=packed_like, is_weight_packed=True)
    assert seen["is_weight_packed"] is True and seen["weight"] is packed_like


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="vLLM's C++ GDN conv kernels need AVX512-BF16")
def test_cpp_conv_on_plain_weight_equals_packed_weight_and_torch():
    """Unpacked and packed C++ kernels and vLLM's torch conv agree (bf16 rounding) on prefill and decode."""
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.mamba.ops.cpu.causal_conv1d import causal_conv1d_fn_cpu

    torch.manual_seed(0)
    dim, width, steps = 256, 4, 12
    weight = torch.randn(dim, width, dtype=torch.bfloat16)
    packed = ops.causal_conv1d_weight_pack(weight)
    x = torch.randn(steps, dim, dtype=torch.bfloat16).transpose(0, 1)
    common = {"bias": None, "query_start_loc": torch.tensor([0, steps], dtype=torch.int32),
              "cache_indices": torch.tensor([0], dtype=torch.int32), "has_initial_state": torch.tensor([False])}
    outs = {}
    for name, w, flag in (("packed", packed, True), ("plain", weight, False)):
        state = torch.zeros(1, width - 1, dim, dtype=torch.bfloat16).transpose(1, 2)
        outs[name] = ops.causal_conv1d_fwd_cpu(x=x, weight=w, conv_states=state, silu_activation=True,
                                               is_weight_packed=flag, **common).float()
    state = torch.zeros(1, width - 1, dim, dtype=torch.bfloat16).transpose(-1, -2)
    reference = causal_conv1d_fn_cpu(x=x, weight=weight, conv_states=state, activation="silu", **common).float()
    torch.testing.assert_close(outs["plain"], outs["packed"], atol=0.07, rtol=0.02)
    torch.testing.assert_close(outs["plain"], reference, atol=0.07, rtol=0.02)

    token = torch.randn(2, dim, dtype=torch.bfloat16)
    history = torch.randn(2, width - 1, dim, dtype=torch.bfloat16)
    window = torch.cat([history.float(), token.float()[:, None]], dim=1)
    expected = torch.nn.functional.silu((window * weight.float().t()[None]).sum(1))
    for w, flag in ((packed, True), (weight, False)):
        out = ops.causal_conv1d_update_cpu(
            x=token, conv_states=history.clone().transpose(1, 2), weight=w, bias=None, silu_activation=True,
            conv_state_indices=torch.arange(2, dtype=torch.int32), is_weight_packed=flag)
        torch.testing.assert_close(out.float(), expected, atol=0.07, rtol=0.02)


def one_token_prefill_x(dim: int) -> torch.Tensor:
    """x as vLLM 0.32 hands it for a one-token prompt: a column slice of the projection output."""
    projected = torch.randn(1, 2 * dim, dtype=torch.bfloat16)
    return projected[:, :dim].contiguous().transpose(0, 1)  # .contiguous() keeps the wide row stride


def test_one_token_prefill_gets_the_strides_the_kernel_checks():
    from inference_side.cpu_repack import _transposed_layout

    x = one_token_prefill_x(128)
    assert x.stride() == (1, 256)
    fixed = _transposed_layout(x)
    assert fixed.stride() == (1, 128) and torch.equal(fixed, x)
    longer = torch.randn(3, 128, dtype=torch.bfloat16).transpose(0, 1)
    assert _transposed_layout(longer) is longer  # what longer prompts get is left alone


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="vLLM's C++ GDN conv kernels need AVX512-BF16")
def test_cpp_prefill_conv_runs_a_one_token_prompt():
    from vllm import _custom_ops as ops

    from inference_side.cpu_repack import _transposed_layout

    dim, width = 128, 4
    kwargs = {"weight": torch.randn(dim, width, dtype=torch.bfloat16), "bias": None,
                  "conv_states": torch.zeros(1, dim, width - 1, dtype=torch.bfloat16),
                  "query_start_loc": torch.tensor([0, 1], dtype=torch.int32),
                  "cache_indices": torch.tensor([0], dtype=torch.int32), "has_initial_state": torch.tensor([False]),
                  "silu_activation": True, "is_weight_packed": False}
    x = one_token_prefill_x(dim)
    with pytest.raises(RuntimeError, match="expect x to be transposed"):  # vLLM's own call, unfixed
        ops.causal_conv1d_fwd_cpu(x=x, **kwargs)
    assert ops.causal_conv1d_fwd_cpu(x=_transposed_layout(x), **kwargs).shape == (dim, 1)
