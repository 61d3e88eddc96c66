"""Build the HuggingFace model with every parameter a zero-copy view into vLLM's memory.

The model is instantiated from the served config with parameters on the `meta` device (no memory),
then each parameter is replaced by `nn.Parameter(view)` where `view` is this rank's slice of the
engine tensor that holds it. Checked by address: each bound parameter's `data_ptr()` lies inside
the exported storage. Parameters without a zero-copy view are copied, reported and frozen unless
the caller asks to train them (their updates would then not reach vLLM).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from torch import nn

from trainer_side.attach import AttachedWeights

log = structlog.get_logger(__name__)


class BindError(Exception):
    """The served layout and the HF model built from its config do not match."""


@dataclass
class SharedModel:
    model: nn.Module
    weights: AttachedWeights
    zero_copy: list[str] = field(default_factory=list)  # HF names bound as views
    copied: dict[str, str] = field(default_factory=dict)  # HF name -> why it is a copy (frozen by default)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on `meta`, buffers (rotary tables and the like) for real on the CPU."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def hf_config_from_identity(weights: AttachedWeights):
    from transformers import AutoConfig

    config_dict = json.loads(weights.identity.hf_config_json)
    if "model_type" not in config_dict:
        raise BindError("served hf_config_json has no model_type: cannot rebuild the HF config")
    try:
        return AutoConfig.for_model(**config_dict)
    except ValueError:
        raise BindError(
            f"architecture {weights.identity.architecture!r} (model_type {config_dict['model_type']!r}) is not "
            "supported by the installed transformers: upgrade transformers or train another model"
        ) from None


def build_shared_model(weights: AttachedWeights, *, train_copies: bool = False) -> SharedModel:
    from transformers import AutoModelForCausalLM

    config = hf_config_from_identity(weights)
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise BindError(
            f"architecture {weights.identity.architecture!r} is not supported by transformers: {err}"
        ) from None
    device = next(iter(weights.engine_tensors.values())).device
    owners = {}  # HF name -> (module, attribute), every alias of tied parameters included
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is None:  # e.g. bias=False layers register None
                continue
            owners[f"{module_name}.{attr}" if module_name else attr] = (module, attr)
    missing = sorted(set(owners) - set(weights.layout))
    if missing:
        raise BindError(
            f"{len(missing)} HF parameters of {weights.identity.architecture} are not in the served layout "
            f"(first: {missing[0]}): config and served model disagree"
        )
    unknown = sorted(set(weights.layout) - set(owners))
    if unknown:
        raise BindError(f"served layout names {unknown[0]!r}, which the HF model built from its config lacks")

    shared = SharedModel(model, weights)
    bound: dict[str, nn.Parameter] = {}
    # Tied aliases last, so they reuse the Parameter of the tensor they are tied to.
    for name, entry in sorted(weights.layout.items(), key=lambda item: bool(item[1].tied_to)):
        module, attr = owners[name]
        meta = module._parameters[attr]
        if entry.tied_to and entry.tied_to in bound:
            param = bound[entry.tied_to]
        elif entry.zero_copy:
            tensor = weights.hf_tensor(name)
            _check_shape(name, tensor, tuple(meta.shape), weights)
            param = nn.Parameter(own_tensor(tensor), requires_grad=True)
            _assert_shares_storage(name, param, weights)
            shared.zero_copy.append(name)
        else:
            values = _copied_values(name, entry, tuple(meta.shape), weights).to(meta.dtype)
            param = nn.Parameter(values, requires_grad=train_copies)
            shared.copied[name] = entry.not_zero_copy_reason
            log.warning("parameter is a copy, not shared: frozen" if not train_copies else
                        "parameter is a copy, not shared: its updates will not reach vLLM",
                        name=name, reason=entry.not_zero_copy_reason)
        module._parameters[attr] = param
        bound[name] = param
    for module in model.modules():  # buffers made on the CPU follow the weights' device
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    model.train()
    log.info("HF model bound to served weights", zero_copy=len(shared.zero_copy), copied=len(shared.copied))
    return shared


def rebind_shared_model(shared: SharedModel, weights: AttachedWeights, *, copy_values: bool) -> None:
    """Points every zero-copy parameter at `weights` (a re-attach to a restarted engine) in place.

    The Parameter objects stay (the optimizer's state is keyed by them); only their memory moves. With
    `copy_values`, each parameter's current values are first written into the new memory (its old
    memory must still be readable); otherwise the parameters take whatever the new engine serves.
    Raises BindError, before moving anything, if the new layout does not bind the same parameters.
    """
    params = dict(shared.model.named_parameters())
    views = {}
    for name in shared.zero_copy:
        entry = weights.layout.get(name)
        if entry is None or not entry.zero_copy:
            raise BindError(f"{name} is not zero-copy in the restarted engine's layout: restart the trainer")
        view = weights.hf_tensor(name)
        _check_shape(name, view, tuple(params[name].shape), weights)
        views[name] = view
    with torch.no_grad():
        for name, view in views.items():
            param = params[name]
            if copy_values:
                view.copy_(param)
            param.set_(view.untyped_storage(), view.storage_offset(), view.size(), view.stride())
            _assert_shares_storage(name, param, weights)
    if copy_values and next(iter(views.values())).device.type == "cuda":
        torch.cuda.synchronize()
    shared.weights = weights


def own_tensor(view: torch.Tensor) -> torch.Tensor:
    """A tensor over exactly `view`'s memory with its own autograd version counter.

    Several HF parameters are views of one vLLM tensor (q/k/v of qkv_proj, gate/up, ...); views share
    a version counter, so an in-place update of one (a fused optimizer step during backward) would
    fail the backward of the others. `set_` gives the same address with an independent counter.
    """
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        view.untyped_storage(), view.storage_offset(), view.size(), view.stride()
    )


def _tp_size(weights: AttachedWeights) -> int:
    return max(1, weights.identity.tp_size)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], weights: AttachedWeights) -> None:
    if tuple(tensor.shape) == expected:
        return
    if _tp_size(weights) > 1:
        raise BindError(
            f"{name}: served shard has shape {tuple(tensor.shape)}, the HF model expects {expected}: "
            f"vLLM runs tensor parallelism {_tp_size(weights)} and this trainer binds unsharded models only"
        )
    raise BindError(
        f"{name}: served shard has shape {tuple(tensor.shape)}, the HF model built from the served config "
        f"expects {expected}: the layout reported it zero-copy in a shape HF cannot use (a weightshare bug "
        "or an engine-private format): report it with the vLLM version"
    )


def _copied_values(name: str, entry, expected: tuple[int, ...], weights: AttachedWeights) -> torch.Tensor:
    """Correct HF values of a parameter with no zero-copy view, in the HF shape.

    Read from the served tensors when the layout gives slices (e.g. several blocks of one engine
    tensor); from the served model's safetensors when vLLM keeps it only in a private format.
    """
    if entry.slices:
        tensor = weights.hf_tensor(name)
        if tuple(tensor.shape) != expected and tensor.numel() == math.prod(expected) and _tp_size(weights) == 1:
            tensor = tensor.reshape(expected)
        _check_shape(name, tensor, expected, weights)
        return tensor.clone()
    tensor = _checkpoint_tensor(weights.identity.model, name)
    if tensor is None:
        raise BindError(
            f"{name}: {entry.not_zero_copy_reason}; its values are not readable from vLLM and no local "
            f"checkpoint at {weights.identity.model!r} holds {name}: serve a local model directory"
        )
    if tuple(tensor.shape) != expected:
        raise BindError(f"{name}: the checkpoint holds shape {tuple(tensor.shape)}, the HF model expects {expected}")
    return tensor.to(next(iter(weights.engine_tensors.values())).device)


def _checkpoint_tensor(model_dir: str, name: str) -> torch.Tensor | None:
    """`name` from the safetensors files of a local model directory, or None."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []:
        with safe_open(path, framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return f.get_tensor(name)
    return None


def _assert_shares_storage(name: str, param: nn.Parameter, weights: AttachedWeights) -> None:
    ptr = param.data_ptr()
    for storage in weights.storages.values():
        base = storage.data_ptr()
        if base <= ptr < base + storage.numel():
            return
    raise BindError(f"{name} does not point into any exported storage: it would not be shared")
