"""Tests of trainer_side.apollo_tp: `ShardedApollo` on tensor-parallel shards equals `Apollo` on the whole.

A world of 2 and one of 4 processes (torch.multiprocessing, started by a forkserver: see START_METHOD;
gloo, a FileStore in tmp_path) each run their cases: every process builds the global parameters and
each step's global gradients from fixed seeds, keeps its shard of each (`ShardSpec`s from
inference_side.layout_tp's TP arithmetic), trains, and saves its shards; the test compares them with the
same rows or columns of a single-process `Apollo` run on the global tensors. A child's exception fails
the test with the child's traceback (`torch.multiprocessing.start_processes`). The world of 4 also runs
TP groups of 2 (`process_group`), and groups with replicated shards. CPU only, about 5 s.
Run as: .venv/bin/python -m pytest tests/test_apollo_tp.py -q
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from inference_side.layout_tp import merged_param_blocks, tp_shard
from trainer_side.apollo import Apollo
from trainer_side.apollo_tp import ShardedApollo, ShardSpec

STEPS, GAP = 5, 2  # projection refreshes before steps 2 and 4 (0-based)
LR, WEIGHT_DECAY = 1e-2, 0.1
APOLLO = {"rank": 4, "scale": 1.0, "scale_type": "channel"}
APOLLO_MINI = {"rank": 1, "scale": 128.0, "scale_type": "tensor"}

# Not "spawn": a spawned child spends ~4 s of CPU importing torch and torch._dynamo (which the optimizer's
# constructor imports), 6 children ~13 s on 2 cores. A forkserver imports them once, before any thread
# exists, and forks fresh children from itself (never from this threaded process): ~3 s for both worlds.
START_METHOD = "forkserver"

TALL, WIDE = (12, 8), (8, 12)  # rows >= cols: row channels, columns projected away; else the reverse
QKV_ROWS = (8, 4, 4)  # a merged projection's q, k, v rows: a shard holds a non-adjacent block of each
MERGED = "merged"  # sharded along rows, each rank's rows per `merged_param_blocks`
# (global shape, sharded dim): the APOLLO group, then the AdamW group. None: replicated (no spec).
MATRICES = [
    (TALL, 0),  # row channels, sharded rows: channels kept whole
    (TALL, 1),  # row channels, sharded columns: partial projections summed
    (WIDE, 0),  # column channels, sharded rows: partial projections summed
    (WIDE, 1),  # column channels, sharded columns: channels kept whole
    ((sum(QKV_ROWS), 6), MERGED),  # merged rows kept whole
    ((sum(QKV_ROWS), 24), MERGED),  # merged rows projected away
    (TALL, None),
]
VECTORS = [((16,), 0), ((6,), None)]
LAYOUT = MATRICES + VECTORS


@dataclass(frozen=True)
class Case:
    settings: dict
    world: int  # processes
    tp: int  # ranks of one TP group: a world of 4 with tp 2 runs two groups of 2
    replicas: int = 1
    mode: str = "step"  # "step", "hooks" (update in backward), "bucketed" (hooks, batched updates)
    limiter: float | None = 1.01


CASES = {
    "apollo": Case(APOLLO, world=2, tp=2),
    "apollo-mini": Case(APOLLO_MINI, world=2, tp=2),
    "apollo-no-limiter": Case(APOLLO, world=2, tp=2, limiter=None),
    "apollo-mini-hooks": Case(APOLLO_MINI, world=2, tp=2, mode="hooks"),
    "apollo-hooks-bucketed": Case(APOLLO, world=2, tp=2, mode="bucketed"),
    "tp4-apollo-mini": Case(APOLLO_MINI, world=4, tp=4),
    "tp4-replicas2-apollo": Case(APOLLO, world=4, tp=4, replicas=2),
    "tp4-replicas2-apollo-mini-hooks": Case(APOLLO_MINI, world=4, tp=4, replicas=2, mode="hooks"),
    "tp2-subgroups-apollo-mini": Case(APOLLO_MINI, world=4, tp=2),
}


def spec_for(shape: tuple[int, ...], dim: int | str | None, tp_rank: int, case: Case) -> ShardSpec | None:
    if dim is None:
        return None
    if dim == MERGED:
        local_rows = [n * case.replicas // case.tp for n in QKV_ROWS]
        blocks = merged_param_blocks(QKV_ROWS, local_rows, [0, 1, 2], tp_rank, case.tp)
        return ShardSpec(shape, 0, blocks, case.replicas)
    start, length = tp_shard(shape[dim], tp_rank, case.tp, case.replicas)
    return ShardSpec(shape, dim, [(start, 0, length)], case.replicas)


def specs(tp_rank: int, case: Case) -> list[ShardSpec | None]:
    return [spec_for(shape, dim, tp_rank, case) for shape, dim in LAYOUT]


def shard_of(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    if spec is None:
        return t.clone()
    return t.index_select(spec.dim, torch.tensor(spec.global_indices()))


def global_tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape, _ in LAYOUT]


def groups(params: list[nn.Parameter], case: Case) -> list[dict]:
    n = len(MATRICES)
    return [{"params": params[:n], "update_proj_gap": GAP, **case.settings}, {"params": params[n:]}]


def train(params: list[nn.Parameter], opt: Apollo, case: Case, cut) -> None:
    """STEPS steps, gradients `cut(i, global_grad)` from fixed global ones; hook modes mask some updates."""
    step_now = 0

    def guard(name: str, p: torch.Tensor) -> torch.Tensor:
        # At step 1 the even-numbered parameters are masked out (weights, moments, limiter all kept).
        return torch.tensor(step_now != 1 or int(name[1:]) % 2 == 1)

    if case.mode != "step":
        named = {f"p{i}": p for i, p in enumerate(params)}
        opt.attach_backward_hooks(named, guard, bucket_elems=100 if case.mode == "bucketed" else 0)
    for step_now in range(STEPS):
        grads = [cut(i, g) for i, g in enumerate(global_tensors(1000 + step_now))]
        if case.mode == "step":
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
        else:
            sum((p * g).sum() for p, g in zip(params, grads, strict=True)).backward()


def outcome(params: list[nn.Parameter], opt: Apollo) -> dict[str, list]:
    """The trained parameters, and the limiter's last scaled gradient norm of each matrix (None without)."""
    norms = [opt.state[p].get("scaled_grad_norm") for p in params[: len(MATRICES)]]
    return {"params": [p.detach() for p in params], "norms": norms}


def reference(case: Case) -> dict[str, list]:
    """The global parameters after `Apollo` trained them in one process."""
    params = [nn.Parameter(t) for t in global_tensors(0)]
    opt = Apollo(groups(params, case), lr=LR, weight_decay=WEIGHT_DECAY, norm_growth_limit=case.limiter)
    train(params, opt, case, lambda i, g: g)
    return outcome(params, opt)


def train_shards(case: Case, tp_rank: int, process_group: dist.ProcessGroup | None) -> dict[str, list]:
    """This rank's shards after `ShardedApollo` trained them."""
    shard_specs = specs(tp_rank, case)
    params = [nn.Parameter(shard_of(t, s)) for t, s in zip(global_tensors(0), shard_specs, strict=True)]
    opt = ShardedApollo(
        groups(params, case),
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        norm_growth_limit=case.limiter,
        process_group=process_group,
    )
    for p, spec in zip(params, shard_specs, strict=True):
        opt.set_shard(p, spec)
    train(params, opt, case, lambda i, g: shard_of(g, shard_specs[i]))
    return outcome(params, opt)


def tp_groups(world: int, tp: int) -> list[dist.ProcessGroup | None]:
    """One process group per TP group of consecutive ranks (None: the world), created alike on every rank."""
    if tp == world:
        return [None]
    return [dist.new_group(list(range(start, start + tp))) for start in range(0, world, tp)]


def run_rank(rank: int, world: int, store: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name in names:
            case = CASES[name]
            process_groups = tp_groups(world, case.tp)
            results[name] = train_shards(case, rank % case.tp, process_groups[rank // case.tp])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_world(world: int, tmp: Path) -> list[dict[str, dict[str, list]]]:
    names = [name for name, case in CASES.items() if case.world == world]
    args = (world, str(tmp / "store"), str(tmp), names)
    mp.start_processes(run_rank, args=args, nprocs=world, start_method=START_METHOD)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, dict[str, list]]]]:
    """Each world's results, run once for the module: per rank, per case, its `outcome`."""
    # Takes effect where this session's forkserver is not running yet (else the children import these).
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", __name__])
    return {world: run_world(world, tmp_path_factory.mktemp(f"world{world}")) for world in (2, 4)}


@pytest.mark.parametrize("name", list(CASES))
def test_shards_match_the_unsharded_optimizer(name: str, worlds: dict) -> None:
    case = CASES[name]
    expected = reference(case)
    results = [by_case[name] for by_case in worlds[case.world]]
    for rank, result in enumerate(results):
        shard_specs = specs(rank % case.tp, case)
        pairs = zip(result["params"], expected["params"], shard_specs, strict=True)
        for i, (got, full, spec) in enumerate(pairs):
            # The same fp32 math with sums split over ranks: rounding only (a wrong projection part,
            # reduction or replica count is off by O(1)).
            where = f"rank {rank} param {i}"
            torch.testing.assert_close(
                got, shard_of(full, spec), rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
            )
        # The limiter's norm is the global matrix's, bit for bit the same on every rank of the TP group.
        first_of_group = results[rank - rank % case.tp]
        for got, same, full in zip(result["norms"], first_of_group["norms"], expected["norms"], strict=True):
            assert (got is None) == (full is None) == (case.limiter is None)
            if got is not None:
                assert torch.equal(got, same)
                torch.testing.assert_close(got, full, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("settings", [APOLLO, APOLLO_MINI], ids=["apollo", "apollo-mini"])
def test_without_specs_it_is_apollo(settings: dict) -> None:
    case = Case(settings, world=1, tp=1)
    plain = [nn.Parameter(t) for t in global_tensors(0)]
    sharded = [nn.Parameter(t) for t in global_tensors(0)]
    opts = [
        Apollo(groups(plain, case), lr=LR, weight_decay=WEIGHT_DECAY),
        ShardedApollo(groups(sharded, case), lr=LR, weight_decay=WEIGHT_DECAY),
    ]
    for params, opt in zip([plain, sharded], opts, strict=True):
        train(params, opt, case, lambda i, g: g)
    for a, b in zip(plain, sharded, strict=True):
        assert torch.equal(a, b)


def test_a_spec_must_fit_its_parameter() -> None:
    with pytest.raises(ValueError, match="tile"):
        ShardSpec((8, 4), 0, [(0, 0, 2), (4, 3, 2)])
    with pytest.raises(ValueError, match="overlap"):
        ShardSpec((8, 4), 0, [(0, 0, 2), (1, 2, 2)])
    with pytest.raises(ValueError, match="outside"):
        ShardSpec((8, 4), 1, [(3, 0, 2)])
    p = nn.Parameter(torch.zeros(4, 4))
    opt = ShardedApollo([p], rank=1)
    with pytest.raises(ValueError, match="local shape"):
        opt.set_shard(p, ShardSpec((8, 4), 0, [(0, 0, 2)]))
