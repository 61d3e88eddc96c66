"""Training loss: chunked cross-entropy equals the full-logits loss, padding changes nothing.

Tiny random HF models on the CPU, no vLLM. Run as: .venv/bin/python -m pytest tests/test_loss.py -v
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from trainer_side.loss import loss_sum, pad_micro_batch


@dataclass
class Ex:
    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]


def reference_loss(model, example: Ex) -> torch.Tensor:
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    per_token = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return (per_token * torch.tensor(example.loss_mask[1:])).sum()


def examples(n: int, vocab: int, seed: int = 0) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 5 * i
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        mask = [j >= length // 3 for j in range(length)]
        out.append(Ex(tuple(ids), tuple(mask)))
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3_5"])
def model(request, tiny_model_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_path(request.param, "bfloat16"), dtype=torch.float32)
    return m.train()


@pytest.mark.parametrize("chunk", [0, 3, 1024])
def test_chunked_padded_loss_and_grads_equal_per_example_full_logits(model, chunk):
    batch = examples(3, model.config.vocab_size)
    model.zero_grad()
    expected = sum(reference_loss(model, e) for e in batch)
    expected.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ids, attention, targets = pad_micro_batch(batch, torch.device("cpu"))
    assert ids.shape == (3, max(len(e.input_ids) for e in batch))
    got = loss_sum(model, ids, attention, targets, chunk_tokens=chunk)
    got.backward()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-5, msg=name)


def test_padding_positions_are_never_targets():
    batch = [Ex((5, 6, 7, 8), (True, True, True, True)), Ex((5, 6), (True, True))]
    ids, attention, targets = pad_micro_batch(batch, torch.device("cpu"), pad_id=3)
    assert ids[1].tolist() == [5, 6, 3, 3] and attention[1].tolist() == [1, 1, 0, 0]
    assert targets[1].tolist() == [True, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's fused linear cross-entropy is a CUDA (Triton) kernel")
def test_fused_linear_ce_equals_chunked_loss_and_grads(model):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    cuda_model = model.to("cuda")
    ids, attention, targets = pad_micro_batch(examples(3, model.config.vocab_size), torch.device("cuda"))
    results = []
    for fused in (False, True):
        cuda_model.zero_grad()
        loss = loss_sum(cuda_model, ids, attention, targets, chunk_tokens=3, fused_linear_ce=fused)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in cuda_model.named_parameters() if p.grad is not None}))
    model.to("cpu")
    (chunked, chunked_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, chunked, rtol=1e-4, atol=1e-3)
    assert fused_grads.keys() == chunked_grads.keys()
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
