"""`ServeConfig` (inference_side/serve_config.py) and the one `--update-mode` mapping (weightshare/update_modes.py).

The flags are parsed by `weightshare serve`'s own argument parser, then turned into the typed config: its
defaults, the mapping to UpdateMode, the untouched vLLM arguments, and each refusal naming what to fix.
No vLLM is started or imported. Run as: .venv/bin/python -m pytest tests/test_serve_config.py -v
"""

from __future__ import annotations

import argparse
import dataclasses
import socket

import pytest

from inference_side import serve
from inference_side.serve_config import ServeConfig
from weightshare import update_modes
from weightshare.errors import UsageError
from weightshare.v1 import update_mode_pb2


@pytest.fixture
def model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def parse(*argv: str, extra: tuple[str, ...] = ()) -> argparse.Namespace:
    """What `weightshare serve ARGV` hands `serve.run` (weightshare/cli.py adds the unknown flags as extra_args)."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    args.extra_args = list(extra)
    return args


def test_defaults_and_vllm_arguments(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WEIGHTSHARE_TOKEN", raising=False)
    address = f"unix://{tmp_path}/export.sock"
    config = ServeConfig.from_args(parse(str(model_dir), "--grpc", address,
                                         extra=("--port", "8000", "--max-model-len", "512")))
    assert config == ServeConfig(
        model=str(model_dir), grpc=address, token=None, update_mode=update_mode_pb2.UPDATE_MODE_STRICT,
        log_level="INFO", vllm_args=("--port", "8000", "--max-model-len", "512"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.update_mode = update_mode_pb2.UPDATE_MODE_CONCURRENT  # type: ignore[misc]


def test_update_mode_and_token(model_dir, tmp_path):
    config = ServeConfig.from_args(parse(str(model_dir), "--grpc", f"unix://{tmp_path}/s.sock",
                                         "--update-mode", "concurrent", "--token", "t0k"))
    assert config.update_mode == update_mode_pb2.UPDATE_MODE_CONCURRENT and config.token == "t0k"
    args = parse(str(model_dir), "--grpc", f"unix://{tmp_path}/s.sock")
    args.update_mode = "auto"  # a trainer's choice, not a server's
    with pytest.raises(UsageError, match="--update-mode 'auto' is not one of strict, concurrent"):
        ServeConfig.from_args(args)


@pytest.mark.parametrize(("model", "problem"), [
    ("missing", "does not exist"), ("file", "is a file"), ("empty-dir", "has no config.json"),
])
def test_bad_model_is_refused_naming_it(tmp_path, model, problem):
    path = tmp_path / model
    if model == "file":
        path.write_text("x")
    elif model == "empty-dir":
        path.mkdir()
    with pytest.raises(UsageError, match=problem) as info:
        ServeConfig.from_args(parse(str(path), "--grpc", f"unix://{tmp_path}/s.sock"))
    assert str(path) in str(info.value)


def test_open_address_needs_a_token_or_the_explicit_flag(model_dir, monkeypatch):
    monkeypatch.delenv("WEIGHTSHARE_TOKEN", raising=False)
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"0.0.0.0:{port}"
    with pytest.raises(UsageError, match="token"):
        ServeConfig.from_args(parse(str(model_dir), "--grpc", address))
    assert ServeConfig.from_args(parse(str(model_dir), "--grpc", address, "--token", "t")).token == "t"
    assert ServeConfig.from_args(parse(str(model_dir), "--grpc", address, "--allow-unauthenticated")).token is None


def test_busy_or_malformed_grpc_address_names_the_flag(model_dir):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(UsageError, match="--grpc"):
            ServeConfig.from_args(parse(str(model_dir), "--grpc", f"127.0.0.1:{port}"))
    with pytest.raises(UsageError, match="absolute"):
        ServeConfig.from_args(parse(str(model_dir), "--grpc", "unix://relative.sock"))


def test_update_mode_names_map_both_ways():
    assert update_modes.SERVED == ("strict", "concurrent") and update_modes.EXPECTED == ("auto", "strict", "concurrent")
    assert update_modes.from_cli("auto") == update_mode_pb2.UPDATE_MODE_UNSPECIFIED
    for name in update_modes.EXPECTED:
        assert update_modes.cli_name(update_modes.from_cli(name)) == name
    for value in update_mode_pb2.UpdateMode.values():  # every enum value has a flag name
        assert update_modes.from_cli(update_modes.cli_name(value)) == value
    with pytest.raises(ValueError, match="'sometimes' is not one of auto, strict, concurrent"):
        update_modes.from_cli("sometimes")


@pytest.mark.parametrize(("flag", "mode"), [
    ("auto", update_mode_pb2.UPDATE_MODE_UNSPECIFIED), ("strict", update_mode_pb2.UPDATE_MODE_STRICT),
    ("concurrent", update_mode_pb2.UPDATE_MODE_CONCURRENT),
])
def test_train_reads_its_update_mode_through_the_same_mapping(tmp_path, flag, mode):
    from trainer_side import train
    from trainer_side.trainer_config import TrainerConfig

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path / "state"), "--grpc", f"unix://{tmp_path}/t.sock",
                              "--update-mode", flag])
    assert TrainerConfig.from_args(args).update_mode == mode
