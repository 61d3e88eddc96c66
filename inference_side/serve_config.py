"""`ServeConfig`: every setting of `weightshare serve`, checked and built once from the command line.

`inference_side/serve.py` turns its flags into this object first and passes it (or the parts it needs)
down, never the argparse namespace: one place turns flags into typed settings and refuses bad ones with
the flag named. vLLM's own arguments travel untouched in `vllm_args` (vLLM parses and checks them).
Imports neither vLLM nor torch: `weightshare serve --help` and these checks stay fast.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from weightshare import grpc_util, update_modes
from weightshare.errors import UsageError


@dataclass(frozen=True)
class ServeConfig:
    model: str
    """Model directory or hub id, as for `vllm serve`."""
    grpc: str
    """Address WeightExportService listens on: unix:///path.sock or host:port."""
    token: str | None
    """Bearer token required on every WeightExportService call (None: no token)."""
    update_mode: int
    """UpdateMode of every update: UPDATE_MODE_STRICT or UPDATE_MODE_CONCURRENT."""
    log_level: str
    """weightshare's log level."""
    vllm_args: tuple[str, ...]
    """The arguments this command does not know, for vLLM (`--port`, `--max-model-len`, ...)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        """Checks the flags (UsageError naming the flag or the model) and builds the config."""
        check_model_argument(args.model)
        grpc_util.ensure_can_listen(args.grpc)
        grpc_util.refuse_open_exposure(args.grpc, args.token, args.allow_unauthenticated)
        if args.update_mode not in update_modes.SERVED:
            raise UsageError(f"--update-mode {args.update_mode!r} is not one of {', '.join(update_modes.SERVED)}")
        return cls(
            model=args.model, grpc=args.grpc, token=args.token, update_mode=update_modes.from_cli(args.update_mode),
            log_level=args.log_level, vllm_args=tuple(getattr(args, "extra_args", None) or ()),
        )


def check_model_argument(model: str) -> None:
    """Refuses a model that is neither a local directory nor a hub id this machine could fetch."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory {model} has no config.json: pass a Hugging Face model directory")
        return
    if path.exists():
        raise UsageError(f"model {model} is a file: pass a model directory (with config.json) or a hub id")
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or not model.strip()
    if looks_like_path:
        raise UsageError(f"model directory {model} does not exist: check the path "
                         "(`weightshare make-tiny-model DIR` builds a small one)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UsageError(f"model {model} is not a local directory and HF_HUB_OFFLINE is set: download it first "
                         "or pass a model directory")
