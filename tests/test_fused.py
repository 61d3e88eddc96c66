"""Fused steps (updates applied during backward) equal an ordinary optimizer step, on shared-storage views.

Tiny random HF models on the CPU, no vLLM. Parameters are re-pointed into one flat storage the way
the trainer binds vLLM's merged tensors (several parameters over one buffer), each with its own
version counter (`own_tensor`), so an in-place update during backward must not break autograd.
Run as: .venv/bin/python -m pytest tests/test_fused.py -v
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer_side.fused import FusedUpdates
from trainer_side.hf_model import own_tensor
from trainer_side.loss import loss_sum, pad_micro_batch
from trainer_side.param_groups import build_optimizer, preset


class Ex:
    def __init__(self, ids, mask):
        self.input_ids, self.loss_mask = ids, mask


def into_one_storage(model: nn.Module) -> None:
    """Every parameter becomes a view of one flat buffer (like vLLM's shared memory), own counter each."""
    params = list({id(p): p for p in model.parameters()}.values())
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
    offset, replaced = 0, {}
    for p in params:
        view = flat[offset : offset + p.numel()].view_as(p)
        view.copy_(p.detach())
        replaced[id(p)] = nn.Parameter(own_tensor(view))
        offset += p.numel()
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[key] = replaced[id(p)]


def batch(vocab: int) -> tuple:
    g = torch.Generator().manual_seed(1)
    exs = [Ex(tuple(torch.randint(1, vocab, (n,), generator=g).tolist()), tuple([False] * 2 + [True] * (n - 2)))
           for n in (9, 14)]
    return pad_micro_batch(exs, torch.device("cpu")), sum(sum(e.loss_mask[1:]) for e in exs)


# Bucket sizes: per parameter (0), several buckets per backward (2,000 elements), one bucket at backward's end.
BUCKETS = [0, 2_000, 1 << 30]


@pytest.mark.parametrize("bucket_elems", BUCKETS)
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen3_5"])
def test_fused_step_equals_plain_step_on_shared_views(arch, bucket_elems, tiny_model_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path(arch, "float32"), dtype=torch.float32).train()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    into_one_storage(fused)
    (ids, attention, targets), tokens = batch(base.config.vocab_size)
    config = preset("apollo_mini", lr=1e-2, embeddings="apollo_mini")

    opt = build_optimizer(plain, config)
    for _ in range(2):  # two steps: the second uses optimizer state from the first
        opt.zero_grad()
        (loss_sum(plain, ids, attention, targets, chunk_tokens=4) / tokens).backward()
        opt.step()

    fused_opt = build_optimizer(fused, config)
    hooks = FusedUpdates(fused_opt, dict(fused.named_parameters()), bucket_elems=bucket_elems)
    for _ in range(2):
        hooks.reset()
        (loss_sum(fused, ids, attention, targets, chunk_tokens=4) / tokens).backward()
        assert not hooks.skipped and hooks.grad_norm > 0
    assert all(p.grad is None for p in fused.parameters()), "fused steps must free every gradient"
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    if arch == "llama_tied":
        assert fused.lm_head.weight is fused.model.embed_tokens.weight


def test_non_finite_gradient_leaves_that_parameter_alone(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama", "float32"), dtype=torch.float32).train()
    (ids, attention, targets), tokens = batch(model.config.vocab_size)
    opt = build_optimizer(model, preset("apollo_mini", lr=1e-2))
    hooks = FusedUpdates(opt, dict(model.named_parameters()))
    norm = model.model.layers[0].input_layernorm.weight
    norm.register_hook(lambda g: torch.full_like(g, float("nan")))
    saved_norm = norm.detach().clone()
    saved_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    (loss_sum(model, ids, attention, targets) / tokens).backward()
    assert hooks.skipped == ["model.layers.0.input_layernorm.weight"]
    assert torch.equal(norm, saved_norm)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, saved_down)


def test_a_trainable_parameter_outside_the_optimizer_is_refused(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama", "float32"), dtype=torch.float32)
    from trainer_side.apollo import Apollo

    opt = Apollo([model.lm_head.weight], lr=0.1)  # FusedUpdates takes Apollo (its hooks)
    with pytest.raises(ValueError, match="in no param group"):
        FusedUpdates(opt, dict(model.named_parameters()))


@pytest.mark.parametrize("bucket_elems", BUCKETS)
@pytest.mark.parametrize("embeddings", ["apollo_mini", "adamw"])
def test_device_side_guard_masks_exactly_what_the_host_guard_skips(tiny_model_path, embeddings, bucket_elems):
    # The CUDA path (flag decided on the device, update masked, one sync after backward) run on CPU
    # against the host check: same weights after two steps, one of them with a NaN gradient.
    from transformers import AutoModelForCausalLM

    path = tiny_model_path("llama", "float32")
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train() for _ in range(2)]
    (ids, attention, targets), tokens = batch(models[0].config.vocab_size)
    hooks = []
    for model, on_device in zip(models, (True, False), strict=True):
        opt = build_optimizer(model, preset("apollo_mini", lr=1e-2, embeddings=embeddings))
        # The host-checked side updates per parameter: the reference for every bucketing.
        hooks.append(FusedUpdates(opt, dict(model.named_parameters()), on_device=on_device,
                                  bucket_elems=bucket_elems if on_device else 0))
        poisoned = {"step": 0}

        def poison(g, poisoned=poisoned):  # NaN in the second step only
            return torch.full_like(g, float("nan")) if poisoned["step"] == 1 else g

        model.model.layers[0].input_layernorm.weight.register_hook(poison)
        model.model.layers[0].mlp.down_proj.weight.register_hook(poison)
        for step in range(2):
            poisoned["step"] = step
            hooks[-1].reset()
            (loss_sum(model, ids, attention, targets) / tokens).backward()
    device_side, host_side = hooks
    assert sorted(device_side.skipped) == sorted(host_side.skipped) == [
        "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight"]
    assert device_side.updated == host_side.updated
    assert device_side.grad_norm == pytest.approx(host_side.grad_norm, rel=1e-6)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_bucket_left_by_a_failed_backward_is_dropped_not_applied(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama", "float32"), dtype=torch.float32).train()
    (ids, attention, targets), tokens = batch(model.config.vocab_size)
    opt = build_optimizer(model, preset("apollo_mini", lr=1e-2))
    hooks = FusedUpdates(opt, dict(model.named_parameters()), bucket_elems=1 << 30)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fail(grad):
        raise RuntimeError("backward failed")

    model.model.embed_tokens.weight.register_hook(fail)  # the last gradient of backward
    with pytest.raises(RuntimeError, match="backward failed"):
        (loss_sum(model, ids, attention, targets) / tokens).backward()
    hooks.reset()
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} was written by a backward that failed"
