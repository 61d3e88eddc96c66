"""Micro-batches and the training loss: right-padded batches, cross-entropy in chunks of target positions.

- `pad_micro_batch` right-pads several examples into one (B, T) batch with an attention mask. Right
  padding keeps every real token's causal context unchanged (also in Gated DeltaNet layers, which zero
  padded positions), and padded positions are never targets.
- `loss_sum` runs the decoder once, then computes the summed cross-entropy of the target positions
  only, `chunk_tokens` positions at a time, each chunk under activation checkpointing: the logits of
  one chunk (chunk x vocab, fp32) exist at a time, in forward and in backward. At a 248k vocabulary and
  2,048 tokens the full fp32 logits alone would be 2 GB, plus their gradient. Models whose logits are
  post-processed (soft-capping, scaling) take HF's own forward instead.
- `fused_linear_ce=True` (CUDA, `liger-kernel` installed) runs the head and cross-entropy as liger's
  fused linear cross-entropy instead: the head's gradients are computed during forward, never the whole
  logits. Off by default: at a 248k vocabulary liger cuts the tokens into chunks of ~BT/49 (16 tokens at
  512), and on an H100 its 32 skinny matmuls over the 2.5 GB head took ~140 ms of a 620 ms fused step of
  16 Qwen3.5-27B layers, where the chunked path computes one chunk of 1,024 tokens (BENCHMARKS.md).

Relies on torch only (the model is any HF causal LM). Tests: tests/test_loss.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Config attributes of HF models whose logits are more than hidden @ lm_head.T (+ bias).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def pad_micro_batch(
    examples: Sequence, device: torch.device, pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, loss_mask), each (B, T_max); examples have `input_ids`, `loss_mask`."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    targets = torch.zeros((len(examples), longest), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    return ids.to(device), attention.to(device), targets.to(device)


def _uses_plain_logits(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and hasattr(model, "get_decoder")


def _chunk_ce_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (chunk, vocab)
    return F.cross_entropy(logits, labels, reduction="sum")


def fused_linear_ce_available(device: torch.device) -> bool:
    """liger-kernel's fused linear cross-entropy runs here (CUDA and the package importable)."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def loss_sum(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, chunk_tokens: int = 1024,
    fused_linear_ce: bool = False,
) -> Tensor:
    """Sum over target positions of -log p(token | earlier tokens): a 0-d fp32 tensor with a graph.

    input_ids, attention_mask, loss_mask: (B, T). Position t is a target when loss_mask[:, t] is True
    (t >= 1; position 0 has nothing before it). `chunk_tokens` <= 0 computes all logits at once.
    `fused_linear_ce`: use liger's kernel (see the module docstring; needs `fused_linear_ce_available`).
    """
    labels = input_ids[:, 1:]
    targets = loss_mask[:, 1:] & attention_mask[:, 1:].bool()
    if not _uses_plain_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="none")
        return (per_token * targets).sum()
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden[:, :-1][targets]  # (N, H): only target positions get logits
    picked_labels = labels[targets]
    head = model.get_output_embeddings()
    if fused_linear_ce:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            picked, head.weight, picked_labels, bias=head.bias, reduction="sum"
        ).float()
    if chunk_tokens <= 0 or picked.shape[0] <= chunk_tokens:
        return _chunk_ce_sum(picked, head.weight, head.bias, picked_labels)
    total = picked.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], chunk_tokens):
        end = start + chunk_tokens
        # Recomputed in backward, so no chunk's logits outlive its own forward.
        total = total + checkpoint(
            _chunk_ce_sum, picked[start:end], head.weight, head.bias, picked_labels[start:end], use_reentrant=False
        )
    return total
