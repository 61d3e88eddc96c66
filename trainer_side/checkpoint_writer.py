"""Stream a model's weights to HF safetensors shards, one shard in host memory at a time.

What: `save_model_streamed(model, out_dir)` writes the files `save_pretrained` would write for the weights
(`model.safetensors`, or `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`), with
`config.json` and `generation_config.json`, so `AutoModelForCausalLM.from_pretrained(out_dir)` and vLLM can
load the directory.

Why: the trainer's parameters are views into vLLM's memory. Copying every one to the CPU and handing the
copy to `save_pretrained` needs host RAM the size of the model (54 GB for a 27B model in bf16) and cannot
be stopped for minutes. Here the shards are planned by size first, then each shard's tensors are copied
to the CPU, written, fsynced and dropped before the next, so host memory holds about one shard
(`max_shard_bytes`, or the largest tensor if bigger), and `should_stop` is polled between tensors so a
SIGTERM can cut the write short (`CheckpointInterrupted`; the caller deletes the temporary directory).

Tied parameters (one Parameter object under two names) are saved once, under the name transformers keeps:
names listed in the modules' `_tied_weights_keys` (e.g. `lm_head.weight`) are dropped in favour of the
source (`model.embed_tokens.weight`). Tie is object identity, NOT shared storage: every parameter here may
be a view into one flat buffer, and each is saved.

Tests: .venv/bin/python -m pytest -q tests/test_checkpoint_writer.py   (CPU only, no vLLM, a few seconds)
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointInterrupted(Exception):
    """`should_stop` asked to stop before every shard was written; the output directory is incomplete."""


def _tied_target_patterns(model: torch.nn.Module) -> list[str]:
    """The names (regex patterns, as transformers treats them) that transformers drops from a tied pair."""
    patterns: list[str] = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None)
        # transformers 5.x: {target: source}; 4.x: [target, ...]
        if isinstance(tied, dict):
            keys = list(tied.keys())
        elif isinstance(tied, (list, tuple, set)):
            keys = list(tied)
        else:
            continue
        patterns.extend(f"{prefix}.{k}" if prefix else k for k in keys)
    return patterns


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict(keep_vars=True)` with each tied tensor (same object) under one name only.

    Of the names sharing one object, the first (in state_dict order) that is not a tied target is kept;
    if all are targets, the first. This matches `remove_tied_weights_from_state_dict` in transformers,
    which drops names matching the `_tied_weights_keys` targets. Views into one shared storage are NOT
    tied: each is a distinct object and is kept.
    """
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    patterns = _tied_target_patterns(model)
    keep: set[str] = set()
    for names in groups.values():
        not_targets = [n for n in names if not any(re.search(p, n) for p in patterns)]
        keep.add((not_targets or names)[0])
    return {name: tensor for name, tensor in state.items() if name in keep}


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in order, like huggingface_hub: a tensor bigger than the limit gets its own shard."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size > max_shard_bytes:
            shards.append([name])
            continue
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current or not shards:  # an empty model still gets one (empty) file, as save_pretrained does
        shards.append(current)
    return shards


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    _fsync_path(tmp)
    os.replace(tmp, path)


def _save_config(model: torch.nn.Module, out_dir: Path) -> list[str]:
    written: list[str] = []
    config = getattr(model, "config", None)
    if config is not None:
        # As save_pretrained does, record dtype and architecture (vLLM picks the model class from it),
        # on a copy so the live model's config is untouched.
        config = copy.deepcopy(config)
        dtype = getattr(model, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            config.dtype = str(dtype).split(".")[1]
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        config.save_pretrained(out_dir)
        written.append("config.json")
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is not None and (can_generate is None or can_generate()):
        try:
            generation_config.save_pretrained(out_dir)
            written.append("generation_config.json")
        except ValueError:  # an invalid generation config is not worth failing a checkpoint for
            pass
    return written


def _remove_stale_weights(out_dir: Path, keep: set[str]) -> None:
    """Drop weight files of an earlier save that this one does not overwrite, as save_pretrained does,
    so a loader never mixes an old index or shard with the new files."""
    for path in out_dir.iterdir():
        name = path.name
        if name in keep or not path.is_file():
            continue
        if name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(name):
            path.unlink()


def save_model_streamed(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    max_shard_bytes: int = 2 * 2**30,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Write `model`'s weights (HF safetensors layout), config and generation config into `out_dir`.

    Holds at most one shard of CPU copies at a time. Raises `CheckpointInterrupted` when `should_stop()`
    returns True (polled before each tensor and before the index); shards already written are complete,
    and no partial shard ever carries its final name. Returns the names of the files written.
    """
    out_dir = Path(out_dir)

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise CheckpointInterrupted(f"checkpoint write to {out_dir} stopped on request")

    check_stop()
    tensors = unique_state_dict(model)
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    filenames = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    _remove_stale_weights(out_dir, set(filenames) | ({INDEX_NAME} if n > 1 else set()))

    written = _save_config(model, out_dir)
    weight_map: dict[str, str] = {}
    total_size = 0
    for names, filename in zip(shards, filenames, strict=True):
        copies: dict[str, torch.Tensor] = {}
        for name in names:
            check_stop()
            # A standalone contiguous copy: safetensors refuses tensors sharing storage, and the source may
            # be a (GPU) view into vLLM's flat buffer.
            copies[name] = tensors[name].detach().to("cpu", copy=True).contiguous()
            total_size += copies[name].numel() * copies[name].element_size()
            weight_map[name] = filename
        tmp = out_dir / f".{filename}.tmp"
        try:
            save_file(copies, str(tmp), metadata={"format": "pt"})
            _fsync_path(tmp)
            os.replace(tmp, out_dir / filename)
        except SafetensorError as err:  # e.g. "No space left on device": one error type for callers
            raise OSError(f"writing {out_dir / filename}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        del copies  # free this shard's host memory before copying the next
        written.append(filename)

    if n > 1:
        check_stop()
        num_parameters = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
        index = {"metadata": {"total_parameters": num_parameters, "total_size": total_size},
                 "weight_map": weight_map}
        _write_json_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_NAME)
    _fsync_path(out_dir)
    return written
