"""What the trainer holds in memory, for `--memory-report` log lines and the GPU benchmarks.

The weights belong to vLLM (shared, counted once, in vLLM's process); the trainer's own cost is its
gradients, optimizer state, activations and temporaries. On CUDA the peak is the allocator's peak
since the last `torch.cuda.reset_peak_memory_stats` (the training loop resets it at each step start);
on CPU the process's peak resident set size.
"""

from __future__ import annotations

import resource

import torch
from torch import nn

GB = 1e9


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """GB held by each part: shared weights (vLLM's), copies, gradients, optimizer state, peaks."""
    params = list({id(p): p for p in model.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    report = {
        "weights_gb_shared_with_vllm": _bytes(params) / GB,
        "trainable_params_b": sum(p.numel() for p in params if p.requires_grad) / 1e9,
        "gradients_gb_held": _bytes(p.grad for p in params if p.grad is not None) / GB,
        "optimizer_state_gb": _bytes(state) / GB,
    }
    if device.type == "cuda":
        report["cuda_allocated_gb"] = torch.cuda.memory_allocated(device) / GB
        report["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
        report["cuda_reserved_gb"] = torch.cuda.memory_reserved(device) / GB
        free, total = torch.cuda.mem_get_info(device)
        report["card_used_gb"] = (total - free) / GB
    else:
        report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return {k: round(v, 3) for k, v in report.items()}
