"""Unit tests of trainer_side.checkpoint_writer: streamed safetensors checkpoints that from_pretrained loads.

Builds tiny random Llama models in-process (untied, tied, and with every parameter re-pointed into one
flat tensor as the trainer's vLLM views are), saves them with `save_model_streamed` and checks: the
single-file and sharded layouts load bit-identically with `from_pretrained`; tied embeddings are saved
once under the name transformers keeps; shared-storage views are all kept; `should_stop` interrupts
leaving only complete shards; each `save_file` call gets at most one shard of tensors, and a shard's
copies are freed before the next is written. CPU only, no vLLM, a few seconds.
Run as: .venv/bin/python -m pytest -q tests/test_checkpoint_writer.py
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from trainer_side import checkpoint_writer
from trainer_side.checkpoint_writer import CheckpointInterrupted, save_model_streamed

SMALL_SHARD = 20_000  # bytes: the tiny model (~360 kB in fp32) splits into many shards


def make_model(tie: bool = False, shared_storage: bool = False, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config)
    if shared_storage:
        # As in the trainer: every parameter a view into one flat buffer (parameters() yields tied ones once).
        params = list(model.parameters())
        flat = torch.empty(sum(p.numel() for p in params))
        offset = 0
        for p in params:
            n = p.numel()
            flat[offset:offset + n].copy_(p.data.reshape(-1))
            p.data = flat[offset:offset + n].view(p.shape)
            offset += n
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    return model


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in list(f.keys()):  # safe_open supports no iteration
                assert key not in tensors, f"{key} saved twice"
                tensors[key] = f.get_tensor(key)
    return tensors


def assert_reloads_identically(model: PreTrainedModel, out: Path) -> PreTrainedModel:
    loaded = AutoModelForCausalLM.from_pretrained(out)
    original = model.state_dict()
    reloaded = loaded.state_dict()
    assert reloaded.keys() == original.keys()
    for name, tensor in original.items():
        assert reloaded[name].dtype == tensor.dtype, name
        assert torch.equal(reloaded[name], tensor), name
    return loaded


def test_single_shard_reloads_bit_identical(tmp_path: Path) -> None:
    model = make_model()
    files = save_model_streamed(model, tmp_path)
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_reloads_identically(model, tmp_path)


def test_sharded_index_and_reload(tmp_path: Path) -> None:
    model = make_model()
    files = save_model_streamed(model, tmp_path, max_shard_bytes=SMALL_SHARD)
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert files[-1] == "model.safetensors.index.json"
    assert not (tmp_path / "model.safetensors").exists()

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = saved_tensors(tmp_path)
    assert index["weight_map"].keys() == tensors.keys() == model.state_dict().keys()
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert name in list(f.keys())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert_reloads_identically(model, tmp_path)


def test_tied_embeddings_saved_once(tmp_path: Path) -> None:
    model = make_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (tmp_path / "ours").mkdir()
    save_model_streamed(model, tmp_path / "ours", max_shard_bytes=SMALL_SHARD)
    tensors = saved_tensors(tmp_path / "ours")
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    # Same names as transformers' own save_pretrained keeps.
    model.save_pretrained(tmp_path / "hf")
    assert tensors.keys() == saved_tensors(tmp_path / "hf").keys()

    loaded = assert_reloads_identically(model, tmp_path / "ours")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("tie", [False, True])
def test_shared_storage_views_all_saved(tmp_path: Path, tie: bool) -> None:
    model = make_model(tie=tie, shared_storage=True)
    save_model_streamed(model, tmp_path, max_shard_bytes=SMALL_SHARD)
    tensors = saved_tensors(tmp_path)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
    assert set(tensors) == expected
    loaded = assert_reloads_identically(model, tmp_path)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_dtypes_kept(tmp_path: Path) -> None:
    model = make_model().to(torch.bfloat16)
    model.model.norm.weight.data = model.model.norm.weight.data.float()  # like Qwen3.5's fp32 A_log
    save_model_streamed(model, tmp_path)
    tensors = saved_tensors(tmp_path)
    for name, tensor in model.state_dict().items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_should_stop_leaves_only_complete_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    calls: list[list[str]] = []
    real_save_file = checkpoint_writer.save_file

    def recording_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict) -> None:
        calls.append(list(tensors))
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_writer, "save_file", recording_save_file)
    with pytest.raises(CheckpointInterrupted):
        save_model_streamed(model, tmp_path, max_shard_bytes=SMALL_SHARD, should_stop=lambda: len(calls) >= 1)

    assert len(calls) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 1 and shards[0].startswith("model-00001-of-")
    assert not any(n.startswith(".") for n in names), names  # no temporary file left behind
    assert "model.safetensors.index.json" not in names
    tensors = saved_tensors(tmp_path)
    assert list(tensors) == calls[0]
    original = model.state_dict()
    assert all(torch.equal(t, original[name]) for name, t in tensors.items())


def test_should_stop_at_once_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointInterrupted):
        save_model_streamed(make_model(), tmp_path, should_stop=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_host_memory_bounded_by_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tie=True, shared_storage=True)
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert largest > SMALL_SHARD  # the embedding must go alone into its own, over-size shard
    call_bytes: list[int] = []
    earlier: list[weakref.ref] = []
    real_save_file = checkpoint_writer.save_file

    def measuring_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict) -> None:
        # The previous shard's CPU copies must already be freed when the next shard is written.
        assert all(ref() is None for ref in earlier), "a previous shard's copies are still alive"
        call_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        earlier.extend(weakref.ref(t) for t in tensors.values())
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_writer, "save_file", measuring_save_file)
    save_model_streamed(model, tmp_path, max_shard_bytes=SMALL_SHARD)
    assert len(call_bytes) > 2
    assert all(b <= max(SMALL_SHARD, largest) for b in call_bytes), call_bytes
    assert sum(call_bytes) == sum(t.numel() * t.element_size() for t in saved_tensors(tmp_path).values())


def test_resave_removes_stale_weight_files(tmp_path: Path) -> None:
    model = make_model()
    save_model_streamed(model, tmp_path, max_shard_bytes=SMALL_SHARD)
    save_model_streamed(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert_reloads_identically(model, tmp_path)
