"""Write a checkpoint's weights back into the served memory, inside the update protocol.

A restarted trainer uses it when the served weights do not match its newest checkpoint: the trainer
died after steps its checkpoint does not cover (served version ahead), vLLM restarted from the
original weights (served version behind), or an update was aborted mid-write (weights torn). Copying
the checkpoint in, between begin and commit, makes weights, optimizer state and data cursor one
consistent state again; the examples after the checkpoint's cursor are then trained again.

Reads one tensor at a time (host memory: the largest tensor, not the model). Relies on safetensors.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from safetensors import safe_open
from torch import nn

log = structlog.get_logger(__name__)


def load_weights_into(model: nn.Module, source: Path) -> int:
    """Copies every tensor of the safetensors files in `source` into `model`'s parameters in place.

    Raises ValueError naming the first parameter the files do not cover or whose shape differs.
    Returns the number of parameters written (tied ones once).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source} holds no .safetensors files")
    written: set[int] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    param = params.get(name)
                    if param is None:
                        continue
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(f"{name}: {file.name} holds {tuple(tensor.shape)}, the model {tuple(param.shape)}")
                    param.copy_(tensor.to(device=param.device, dtype=param.dtype))
                    written.add(id(param))
    missing = [n for n, p in params.items() if id(p) not in written]
    if missing:
        raise ValueError(f"{source} does not hold {missing[0]} ({len(missing)} parameters missing)")
    if any(p.device.type == "cuda" for p in params.values()):
        torch.cuda.synchronize()  # vLLM reads from another process: every write lands before commit
    return len(written)
