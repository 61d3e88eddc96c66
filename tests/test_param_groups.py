"""Unit tests of trainer_side.param_groups: which parameter lands in which group, by name.

Uses a tiny stand-in for a HF hybrid causal LM (Qwen3.5-like: full- and linear-attention layers, tied
embeddings) built from small nn.Modules with HF's module names; no transformers import. CPU, < 1 s.
Run as: .venv/bin/python -m pytest tests/test_param_groups.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer_side.param_groups import ApolloConfig, build_optimizer, build_param_groups, preset

H, I, V = 8, 12, 16  # hidden, intermediate, vocab


class RMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(H, H, bias=True)  # biased like Qwen2's: the bias is not APOLLO's
        self.k_proj = nn.Linear(H, H // 2, bias=False)
        self.v_proj = nn.Linear(H, H // 2, bias=False)
        self.o_proj = nn.Linear(H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.q_proj(x) * torch.cat([k, v], -1).tanh())


class LinearAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj_qkv = nn.Linear(H, 3 * H, bias=False)
        self.in_proj_z = nn.Linear(H, H, bias=False)
        self.in_proj_b = nn.Linear(H, 2, bias=False)
        self.in_proj_a = nn.Linear(H, 2, bias=False)
        self.conv1d = nn.Conv1d(3 * H, 3 * H, kernel_size=4, groups=3 * H, padding=3, bias=False)
        self.A_log = nn.Parameter(torch.zeros(2))
        self.dt_bias = nn.Parameter(torch.ones(2))
        self.norm = RMSNorm()
        self.out_proj = nn.Linear(H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, H)
        qkv = self.conv1d(self.in_proj_qkv(x).transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        gate = (
            (self.in_proj_b(x) + self.in_proj_a(x) * self.A_log.exp() + self.dt_bias).sigmoid().mean(-1, True)
        )
        return self.out_proj(self.norm(qkv[..., :H] * gate) * self.in_proj_z(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, linear: bool) -> None:
        super().__init__()
        if linear:
            self.linear_attn = LinearAttention()
        else:
            self.self_attn = Attention()
        self.mlp = MLP()
        self.input_layernorm = RMSNorm()
        self.post_attention_layernorm = RMSNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self.linear_attn if hasattr(self, "linear_attn") else self.self_attn
        x = x + mixer(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList([DecoderLayer(linear=True), DecoderLayer(linear=False)])
        self.norm = RMSNorm()


class ForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TextModel()
        self.lm_head = nn.Linear(H, V, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tie_word_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (batch, seq) -> (batch, seq, V)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


APOLLO_NAMES = (
    {
        f"model.layers.0.linear_attn.{m}.weight"
        for m in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
    }
    | {f"model.layers.1.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")}
)


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_adamw_embeddings_split_and_tied_weight_once() -> None:
    model = ForCausalLM()
    groups = build_param_groups(model, preset("apollo", embeddings="adamw"))
    assert [g["name"] for g in groups] == ["apollo", "adamw"]
    apollo, adamw = groups
    assert names(model, apollo["params"]) == APOLLO_NAMES
    assert names(model, adamw["params"]) == {n for n, _ in model.named_parameters()} - APOLLO_NAMES
    assert "model.layers.1.self_attn.q_proj.bias" in names(model, adamw["params"])
    tied = model.lm_head.weight
    assert sum(p is tied for g in groups for p in g["params"]) == 1
    assert apollo["rank"] == 256 and apollo["scale_type"] == "channel" and adamw["rank"] is None


def test_default_embeddings_get_apollo_mini_once() -> None:
    model = ForCausalLM()
    groups = build_param_groups(model, preset("apollo"))
    assert [g["name"] for g in groups] == ["apollo", "embeddings", "adamw"]
    _, embeddings, adamw = groups
    assert names(model, embeddings["params"]) == {"model.embed_tokens.weight"}  # tied lm_head: same Parameter
    assert (embeddings["rank"], embeddings["scale"], embeddings["scale_type"]) == (1, 128.0, "tensor")
    assert "model.embed_tokens.weight" not in names(model, adamw["params"])
    frozen = build_param_groups(ForCausalLM(), preset("apollo", embeddings="frozen"))
    assert [g["name"] for g in frozen] == ["apollo", "adamw"]


def test_frozen_policy_freezes_the_rest() -> None:
    model = ForCausalLM()
    groups = build_param_groups(model, preset("apollo_mini", other_policy="frozen", embeddings="frozen"))
    assert [g["name"] for g in groups] == ["apollo"]
    assert names(model, groups[0]["params"]) == APOLLO_NAMES
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == APOLLO_NAMES


def test_caller_frozen_parameters_are_left_out() -> None:
    model = ForCausalLM()
    model.model.layers[0].mlp.requires_grad_(False)
    groups = build_param_groups(model, preset("apollo"))
    all_names = set().union(*(names(model, g["params"]) for g in groups))
    assert not any(".layers.0.mlp." in n for n in all_names)


def test_explicit_targets_each_must_match() -> None:
    model = ForCausalLM()
    groups = build_param_groups(model, preset("apollo", target_modules=("mlp.down_proj",)))
    assert names(model, groups[0]["params"]) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    with pytest.raises(ValueError, match="'qkv_proj'"):
        build_param_groups(model, preset("apollo", target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(ValueError, match="'conv1d'"):  # a 3-D weight is no matrix for APOLLO
        build_param_groups(model, preset("apollo", target_modules=("q_proj", "conv1d")))


def test_model_without_any_default_target_is_refused() -> None:
    with pytest.raises(ValueError, match="Sequential"):
        build_param_groups(nn.Sequential(nn.Linear(4, 4)), preset("apollo"))


def test_invalid_config_values_are_named() -> None:
    with pytest.raises(ValueError, match="'train'"):
        ApolloConfig(other_policy="train")
    with pytest.raises(ValueError, match="'q_proj'"):
        ApolloConfig(target_modules="q_proj")
    with pytest.raises(ValueError, match="'apollo_max'"):
        preset("apollo_max")
    with pytest.raises(ValueError, match="'lora'"):
        ApolloConfig(embeddings="lora")


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_built_optimizer_trains_every_trainable_parameter(name: str) -> None:
    model = ForCausalLM()
    opt = build_optimizer(model, preset(name, lr=1e-2, rank=2 if name == "apollo" else 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
