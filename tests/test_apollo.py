"""Unit tests of trainer_side.apollo: agreement with apollo-torch, exact resume, in-place updates, bf16.

The reference is the official implementation, `apollo_torch.APOLLOAdamW` (PyPI apollo-torch 1.0.3, a dev
dependency), run on identical float32 parameters, gradients and seeds. CPU only, a few seconds.
Run as: .venv/bin/python -m pytest tests/test_apollo.py -q
"""

from __future__ import annotations

import io

import pytest
import torch
from apollo_torch import APOLLOAdamW
from torch import nn

from trainer_side import apollo
from trainer_side.apollo import Apollo, next_seed

# Both matrix orientations (rows > cols: row channels, right projection; rows < cols: column channels,
# left projection), a square one, and a vector and a scalar for the AdamW group.
SHAPES = [(12, 6), (5, 16), (8, 8), (7,), ()]
GAP = 5  # projection refreshes before steps 5 and 10 (0-based): 12 steps cross two
STEPS = 12
LR, WEIGHT_DECAY = 1e-2, 0.1

APOLLO = {"rank": 3, "scale": 1.0, "scale_type": "channel"}
APOLLO_MINI = {"rank": 1, "scale": 128.0, "scale_type": "tensor"}


def make_params(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype)) for shape in SHAPES]


def groups(params: list[nn.Parameter], settings: dict) -> list[dict]:
    """APOLLO group for the matrices, AdamW group for the rest: the same dicts fit both optimizers."""
    return [{"params": params[:3], "update_proj_gap": GAP, **settings}, {"params": params[3:]}]


def ours(params: list[nn.Parameter], settings: dict, norm_growth_limit: float | None = 1.01) -> Apollo:
    return Apollo(
        groups(params, settings), lr=LR, weight_decay=WEIGHT_DECAY, norm_growth_limit=norm_growth_limit
    )


def train(params: list[nn.Parameter], opt: torch.optim.Optimizer, steps: range) -> None:
    """Gradients depend on the step number and on the current weights, so a drift would compound."""
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen).to(p.device) + p.detach().float()).to(p.dtype)
        opt.step()


@pytest.mark.parametrize(
    ("settings", "limiter"),
    [(APOLLO, True), (APOLLO_MINI, True), (APOLLO, False), (APOLLO_MINI, False)],
    ids=["apollo", "apollo-mini", "apollo-no-limiter", "apollo-mini-no-limiter"],
)
def test_matches_apollo_torch(settings: dict, limiter: bool) -> None:
    compare_with_apollo_torch(settings, limiter)


@pytest.mark.parametrize("settings", [APOLLO, APOLLO_MINI], ids=["apollo", "apollo-mini"])
def test_matches_apollo_torch_in_row_chunks(settings: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of one or two rows: exercises the chunked projection (summed over chunks when rows < cols),
    # channel norms and writes that large matrices go through.
    monkeypatch.setattr(apollo, "_CHUNK_ELEMS", 10)
    compare_with_apollo_torch(settings, limiter=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("settings", [APOLLO, APOLLO_MINI], ids=["apollo", "apollo-mini"])
def test_matches_apollo_torch_on_cuda(settings: dict) -> None:
    # Projections are drawn by the CUDA generator there, as apollo-torch draws them.
    compare_with_apollo_torch(settings, limiter=True, device="cuda")


def compare_with_apollo_torch(settings: dict, limiter: bool, device: str = "cpu") -> None:
    ref_params, our_params = make_params(device=device), make_params(device=device)
    ref = APOLLOAdamW(
        [{**g, "proj": "random", "proj_type": "std"} for g in groups(ref_params, settings)],
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        disable_nl=not limiter,
    )
    opt = ours(our_params, settings, norm_growth_limit=1.01 if limiter else None)
    for step in range(STEPS):
        train(ref_params, ref, range(step, step + 1))
        train(our_params, opt, range(step, step + 1))
        # Same math in fp32, but the limiter's norm comes from per-channel norms and the constant
        # factors are folded in another order: a few ulps (6e-8 each) per step; on CPU the largest
        # difference after 12 steps is 1.2e-7 of the largest weight. 1e-6 leaves room for other BLAS
        # and GPU reduction orders; a wrong seed, side, refresh step or factor is off by O(1).
        for ours_p, ref_p in zip(our_params, ref_params, strict=True):
            torch.testing.assert_close(
                ours_p, ref_p, rtol=1e-6, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}"
            )
    # The projection seed advanced as apollo-torch's did (its projector keeps the seed of the next draw).
    for ours_p, ref_p in zip(our_params[:3], ref_params[:3], strict=True):
        assert next_seed(opt.state[ours_p]["seed"]) == ref.state[ref_p]["projector"].seed
        assert opt.state[ours_p]["step"] == ref.state[ref_p]["step"] == STEPS


def test_resume_from_state_dict_is_exact() -> None:
    settings = APOLLO_MINI
    straight = make_params()
    train(straight, ours(straight, settings), range(STEPS))

    first = make_params()
    opt = ours(first, settings)
    train(first, opt, range(7))  # after the refresh at step 5, before the one at step 10
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = [nn.Parameter(t.clone()) for t in checkpoint["params"]]
    opt = ours(resumed, settings)
    opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, opt, range(7, STEPS))
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


def test_updates_write_into_existing_storage() -> None:
    # Parameters as views of one flat buffer, as when they are bound to vLLM's memory.
    buffer = torch.zeros(sum(torch.Size(s).numel() for s in SHAPES))
    params, offset = [], 0
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        params.append(nn.Parameter(buffer[offset : offset + n].view(shape)))
        offset += n
    ptrs = [p.data_ptr() for p in params]
    opt = ours(params, APOLLO)
    train(params, opt, range(STEPS))
    assert [p.data_ptr() for p in params] == ptrs
    assert torch.equal(torch.cat([p.detach().flatten() for p in params]), buffer)
    assert buffer.abs().sum() > 0


def test_bf16_params_get_fp32_state() -> None:
    params = make_params(torch.bfloat16)
    before = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    opt = ours(params, APOLLO)
    train(params, opt, range(STEPS))
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.bfloat16
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b)
    assert [p.data_ptr() for p in params] == ptrs
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    # The base class would cast the loaded moments to bf16; ours keeps them fp32.
    opt.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("settings", [APOLLO, APOLLO_MINI], ids=["apollo", "apollo-mini"])
@pytest.mark.parametrize("weight_decay", [0.0, WEIGHT_DECAY], ids=["no-decay", "decay"])
def test_bf16_update_is_fp32_math_rounded_once(settings: dict, weight_decay: float) -> None:
    # An fp32 twin, rounded to bf16 after every step, must match the bf16 run exactly: the bf16 run
    # does all its math in fp32 and rounds once per step (a bf16 step size or factor would not match).
    bf16 = make_params(torch.bfloat16)
    twin = [nn.Parameter(p.detach().float()) for p in bf16]
    opt_bf16 = Apollo(groups(bf16, settings), lr=LR, weight_decay=weight_decay)
    opt_twin = Apollo(groups(twin, settings), lr=LR, weight_decay=weight_decay)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p, t in zip(bf16, twin, strict=True):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            t.grad = p.grad.float()
        opt_bf16.step()
        opt_twin.step()
        with torch.no_grad():
            for p, t in zip(bf16, twin, strict=True):
                t.copy_(t.bfloat16())
                assert torch.equal(p.float(), t), f"step {step}"


def test_backward_hooks_match_step_and_free_grads() -> None:
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))

    def settings(m: nn.Sequential) -> list[dict]:
        matrices = [m[0].weight, m[2].weight]
        return [{"params": matrices, **APOLLO}, {"params": [m[0].bias, m[2].bias]}]

    stepped, hooked = model(), model()
    opt = Apollo(settings(stepped), lr=LR)
    hooked_opt = Apollo(settings(hooked), lr=LR)
    handles = hooked_opt.attach_backward_hooks(hooked)
    for _ in range(3):
        stepped(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        hooked(x).square().sum().backward()
        assert all(p.grad is None for p in hooked.parameters())
    for a, b in zip(stepped.parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a, b)
    for h in handles:
        h.remove()


def test_backward_hooks_refuse_a_param_outside_the_optimizer() -> None:
    m = nn.Linear(4, 4)
    opt = Apollo([m.weight], rank=1)
    with pytest.raises(ValueError, match="'bias'"):
        opt.attach_backward_hooks(m)


def test_params_without_grad_are_skipped() -> None:
    params = make_params()
    opt = ours(params, APOLLO)
    params[0].grad = torch.ones_like(params[0])
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    assert "step" not in opt.state[params[1]] and opt.state[params[0]]["step"] == 1


def test_state_bytes_of_apollo_mini() -> None:
    params = make_params()
    opt = ours(params, APOLLO_MINI)
    train(params, opt, range(2))
    # Rank 1: two moments of (rows, 1) or (1, cols) plus one limiter norm per matrix, fp32; the AdamW
    # vector and the scalar hold two full moments each.
    expected = 4 * (2 * 12 + 1 + 2 * 16 + 1 + 2 * 8 + 1) + 4 * 2 * (7 + 1)
    assert opt.optimizer_state_bytes() == expected


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"rank": 0}, "rank 0"),
        ({"scale_type": "row"}, "scale_type 'row'"),
        ({"update_proj_gap": 0}, "update_proj_gap 0"),
        ({"norm_growth_limit": 0.5}, "norm_growth_limit 0.5"),
    ],
)
def test_invalid_settings_are_named(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Apollo([nn.Parameter(torch.zeros(4, 4))], **{"rank": 1, **bad})


def test_rank_on_a_vector_is_refused() -> None:
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        Apollo([{"params": [nn.Parameter(torch.zeros(7))], "rank": 1}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_decay", [0.0, WEIGHT_DECAY], ids=["no-decay", "decay"])
def test_batched_mini_step_equals_the_per_matrix_step(dtype: torch.dtype, weight_decay: float) -> None:
    # step()'s multi-tensor path for tensor-scaled groups against `_update` one matrix at a time, with
    # matrices that miss gradients on some steps (limiter state for some matrices, not others).
    batched, single = make_params(dtype), make_params(dtype)
    opt_batched = Apollo(groups(batched, APOLLO_MINI), lr=LR, weight_decay=weight_decay)
    opt_single = Apollo(groups(single, APOLLO_MINI), lr=LR, weight_decay=weight_decay, foreach=False)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for i, (a, b) in enumerate(zip(batched, single, strict=True)):
            grad = None if (step + i) % 4 == 0 else torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        opt_batched.step()
        opt_single.step()
        for a, b in zip(batched, single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    for p_a, p_b in zip(batched, single, strict=True):
        sa, sb = opt_batched.state[p_a], opt_single.state[p_b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb[key], rtol=1e-5, atol=1e-7)
            else:
                assert value == sb[key]
    # The batched state saves and resumes like the per-matrix one.
    buffer = io.BytesIO()
    torch.save(opt_batched.state_dict(), buffer)
    buffer.seek(0)
    opt_batched.load_state_dict(torch.load(buffer))


def test_small_projections_are_kept_and_follow_their_seed() -> None:
    params = make_params()
    opt = ours(params, APOLLO_MINI)
    train(params, opt, range(GAP + 1))  # crosses one refresh
    for p in params[:3]:
        seed, proj = opt._projections[p]
        assert seed == opt.state[p]["seed"]
        assert torch.equal(proj, apollo.projection(seed, tuple(p.shape), 1, p.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_decay", [0.0, WEIGHT_DECAY], ids=["no-decay", "decay"])
def test_batched_adamw_step_equals_the_per_tensor_step(dtype: torch.dtype, weight_decay: float) -> None:
    # The AdamW group (vectors, scalars, here also the matrices) in multi-tensor ops against one at a time.
    batched, single = make_params(dtype), make_params(dtype)
    opt_batched = Apollo([{"params": batched}], lr=LR, weight_decay=weight_decay)
    opt_single = Apollo([{"params": single}], lr=LR, weight_decay=weight_decay, foreach=False)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for i, (a, b) in enumerate(zip(batched, single, strict=True)):
            grad = None if (step + i) % 5 == 0 else torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        opt_batched.step()
        opt_single.step()
        for a, b in zip(batched, single, strict=True):
            assert torch.equal(a, b), f"step {step}"
