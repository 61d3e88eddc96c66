"""Param groups and optimizer for APOLLO fine-tuning of a HuggingFace causal LM, chosen by parameter name.

The 2-D weights of the attention, MLP and linear-attention projections (`q_proj`, ..., `down_proj`,
`in_proj_qkv`, ..., `out_proj`) get APOLLO or APOLLO-Mini, as in the official APOLLO scripts; the token
embedding and lm_head matrices get APOLLO-Mini, AdamW or are frozen (`ApolloConfig.embeddings`); every
other trainable parameter (norms, biases, conv1d, A_log, dt_bias, ...) gets AdamW or is frozen, by
`ApolloConfig.other_policy`. Works off `model.named_parameters()` only, so any model whose
module names follow HF's conventions fits, with no transformers import. Parameters the caller already
froze (requires_grad False) are left out and left alone.

Run as a library:
    optimizer = build_optimizer(model, preset("apollo_mini", lr=1e-5))
Tests: `.venv/bin/python -m pytest tests/test_param_groups.py -q`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from trainer_side.apollo import Apollo
from trainer_side.defaults import DEFAULT_LR

# Projection modules of HF decoder layers: attention, MLP, and gated-delta-net linear attention (Qwen3.5).
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "out_proj",
)
_OTHER_POLICIES = ("adamw", "frozen")
# Token embedding and output projection modules of HF causal LMs: large (vocab x hidden) matrices.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
_EMBEDDING_POLICIES = ("apollo_mini", "adamw", "frozen")
# APOLLO-Mini's settings (rank 1, one scale per tensor), used for the embeddings whatever the preset.
_MINI = {"rank": 1, "scale": 128.0, "scale_type": "tensor"}


@dataclass(frozen=True)
class ApolloConfig:
    """How to split a causal LM's parameters between APOLLO, AdamW and frozen, and the settings of each."""

    lr: float = DEFAULT_LR
    """Learning rate of every group (the APOLLO paper pretrains at 1e-2; fine-tuning wants far less)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates, for both the projected (APOLLO) and the full (AdamW) moments."""
    eps: float = 1e-6
    """Added to sqrt(second moment); 1e-6 is apollo-torch's default."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the APOLLO matrices (the official scripts use 0)."""
    other_weight_decay: float = 0.0
    """Decoupled weight decay of the AdamW group: 0 keeps norm weights and embeddings from shrinking."""
    rank: int = 256
    """Rank of the random projection of each gradient matrix: 256 for APOLLO, 1 for APOLLO-Mini."""
    update_proj_gap: int = 200
    """Draw a new random projection every this many steps (T in the paper)."""
    scale: float = 1.0
    """The scaled gradient is multiplied by sqrt(scale): 1 for APOLLO, 128 for APOLLO-Mini."""
    scale_type: Literal["channel", "tensor"] = "channel"
    """Gradient scaling per channel (APOLLO) or one factor per matrix (APOLLO-Mini)."""
    norm_growth_limit: float | None = 1.01
    """Gamma of the norm-growth limiter: the scaled gradient's norm grows at most this much per step."""
    proj_seed: int = 0
    """Offset of the projection seeds; 0 draws the same projections as apollo-torch."""
    target_modules: tuple[str, ...] | None = None
    """Module names whose 2-D `weight` gets APOLLO. A pattern matches a module path equal to it or
    ending in "." + pattern ("q_proj", "mlp.down_proj"); each must match some 2-D weight. None means
    DEFAULT_TARGET_MODULES, of which only some need to exist (a model may lack linear attention)."""
    other_policy: Literal["adamw", "frozen"] = "adamw"
    """What happens to trainable parameters outside the targets and the embeddings: "adamw" trains
    them with AdamW (8 bytes of fp32 state each), "frozen" sets requires_grad False and leaves them out."""
    embeddings: Literal["apollo_mini", "adamw", "frozen"] = "apollo_mini"
    """The token embedding and lm_head matrices (EMBEDDING_MODULES): "apollo_mini" (a few bytes of
    state; the default, chosen by benchmarks/bench_embedding_policy.py), "adamw" (8 bytes per
    parameter: ~20 GB for Qwen3.5-27B's two 248k x 5120 matrices) or "frozen"."""

    def __post_init__(self) -> None:
        if self.other_policy not in _OTHER_POLICIES:
            raise ValueError(f"invalid other_policy {self.other_policy!r}: must be one of {_OTHER_POLICIES}")
        if self.embeddings not in _EMBEDDING_POLICIES:
            raise ValueError(f"invalid embeddings {self.embeddings!r}: must be one of {_EMBEDDING_POLICIES}")
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or not self.target_modules
        ):
            raise ValueError(
                f"invalid target_modules {self.target_modules!r}: must be a non-empty tuple of module "
                "names, or None for the defaults"
            )


PRESETS = {
    "apollo": ApolloConfig(),
    "apollo_mini": ApolloConfig(rank=1, scale=128.0, scale_type="tensor"),
}


def preset(name: str, **overrides: Any) -> ApolloConfig:
    """The preset called `name` ("apollo" or "apollo_mini"), with the given fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def build_param_groups(model: nn.Module, config: ApolloConfig) -> list[dict[str, Any]]:
    """Param groups for `Apollo`: an "apollo" group and, with other_policy "adamw", an "adamw" group.

    Each group carries all its settings (lr, betas, eps, weight_decay, and the APOLLO ones), so it
    does not depend on the optimizer's defaults. A weight tied under two names (embed_tokens and
    lm_head) is included once. With other_policy "frozen" this sets requires_grad False on the
    parameters it leaves out.
    """
    targets = config.target_modules or DEFAULT_TARGET_MODULES
    matched = dict.fromkeys(targets, 0)
    apollo_params, other_params, embedding_params, frozen = [], [], [], []
    # named_parameters() yields a tied Parameter once, under its first name.
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module, _, leaf = name.rpartition(".")
        hits = [t for t in targets if module == t or module.endswith("." + t)]
        is_embedding = module.rpartition(".")[2] in EMBEDDING_MODULES and leaf == "weight" and p.dim() == 2
        if is_embedding and config.embeddings != "adamw":
            (embedding_params if config.embeddings == "apollo_mini" else frozen).append(p)
        elif hits and leaf == "weight" and p.dim() == 2:
            apollo_params.append(p)
            for t in hits:
                matched[t] += 1
        elif config.other_policy == "adamw":
            other_params.append(p)
        else:
            frozen.append(p)

    if config.target_modules is not None:
        unmatched = [t for t, n in matched.items() if n == 0]
        if unmatched:
            raise ValueError(
                f"target_modules pattern(s) {unmatched} matched no trainable 2-D weight of "
                f"{type(model).__name__}"
            )
    if not apollo_params:
        raise ValueError(
            f"no trainable 2-D weight of {type(model).__name__} is in a module named like {list(targets)}: "
            "set ApolloConfig.target_modules to this model's projection names"
        )
    for p in frozen:
        p.requires_grad_(False)

    common = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    groups = [
        {
            "name": "apollo",
            "params": apollo_params,
            **common,
            "weight_decay": config.weight_decay,
            "rank": config.rank,
            "update_proj_gap": config.update_proj_gap,
            "scale": config.scale,
            "scale_type": config.scale_type,
            "norm_growth_limit": config.norm_growth_limit,
        }
    ]
    if embedding_params:
        groups.append(
            {
                "name": "embeddings",
                "params": embedding_params,
                **common,
                "weight_decay": config.other_weight_decay,
                **_MINI,
                "update_proj_gap": config.update_proj_gap,
                "norm_growth_limit": config.norm_growth_limit,
            }
        )
    if other_params:
        groups.append(
            {
                "name": "adamw",
                "params": other_params,
                **common,
                "weight_decay": config.other_weight_decay,
                "rank": None,
            }
        )
    return groups


def build_optimizer(model: nn.Module, config: ApolloConfig) -> Apollo:
    """`Apollo` over `build_param_groups(model, config)`, seeded with `config.proj_seed`."""
    return Apollo(build_param_groups(model, config), seed=config.proj_seed)
