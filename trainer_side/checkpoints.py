"""Trainer checkpoints: step-numbered directories in the state dir, written atomically, found and pruned.

A checkpoint `state_dir/checkpoints/step-NNNNNNNN` holds the weights as HF safetensors with the config
(streamed shard by shard: trainer_side/checkpoint_writer.py), the served model's tokenizer (saved by the
tokenizer itself, so it is complete whatever the served model's path was: a hub id, a relative path),
`optimizer.pt` and `trainer_state.json` (counters, data cursor). vLLM and `from_pretrained` load the
directory as it is. It is written to a temporary directory, fsync'd and renamed into place, so a crash
never leaves a half checkpoint; complete ones are those with `trainer_state.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from trainer_side.checkpoint_writer import save_model_streamed

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def checkpoint_dir_for(state_dir: Path, step: int) -> Path:
    return Path(state_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def complete_checkpoints(state_dir: Path) -> list[Path]:
    """The complete step-numbered checkpoints of `state_dir`, oldest first."""
    root = Path(state_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete step-numbered checkpoint in `state_dir`, or None."""
    done = complete_checkpoints(state_dir)
    return done[-1] if done else None


def read_checkpoint_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint: counters, `cursor` and the rest `write_checkpoint` was given."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def write_checkpoint(
    target: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, state: dict,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Writes a whole checkpoint to `target` atomically (an existing one is replaced only once complete).

    `tokenizer` (or None) is saved with `save_pretrained`; `should_stop()` true cuts the weights short
    (CheckpointInterrupted) and leaves nothing behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # Streamed shard by shard: host memory holds one shard, not the model (54 GB at 27B).
        save_model_streamed(model, tmp, should_stop=should_stop)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # re-saving the same step: move the old one aside, then swap
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune_checkpoints(state_dir: Path, keep: int) -> None:
    """Deletes all but the newest `keep` complete checkpoints (0 keeps all) and any crash leftovers."""
    done = complete_checkpoints(state_dir)
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(state_dir) / CHECKPOINTS_DIR
    for stale in root.glob(".tmp-*") if root.is_dir() else []:  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
