"""`weightshare serve MODEL --grpc ADDRESS [vLLM's own arguments]`: vLLM's OpenAI server + weight export.

One process runs vLLM's own OpenAI-compatible HTTP server unchanged (existing clients keep working)
with the weightshare worker extension in every worker, and, on the same event loop and engine
client, WeightExportService on ADDRESS (`unix:///path.sock` by default, or `host:port`).
Every argument this command does not know is passed to vLLM (`--port`, `--max-model-len`, ...).

Example: weightshare serve ./tiny-qwen3_5 --port 8000 --grpc unix:///tmp/ws.sock --update-mode strict
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import structlog

from weightshare import grpc_util
from weightshare.errors import UsageError
from weightshare.logs import configure_command_logging
from weightshare.v1 import weight_export_service_pb2 as pb

ACCEPTS_EXTRA_ARGS = True  # the rest goes to vLLM
WORKER_EXTENSION = "inference_side.worker_extension.WeightShareWorkerExtension"
log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("model", help="model directory or name, as for `vllm serve`")
    parser.add_argument(
        "--grpc", default=grpc_util.default_socket_address("inference"),
        help="address of WeightExportService: unix:///path.sock or host:port (default: %(default)s)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("WEIGHTSHARE_TOKEN"),
        help="require 'authorization: Bearer TOKEN' on every call (default: $WEIGHTSHARE_TOKEN; none). "
        "Use one whenever ADDRESS is not a unix socket or loopback",
    )
    parser.add_argument(
        "--update-mode", choices=["strict", "concurrent"], default="strict",
        help="strict: serving pauses at a step boundary during each update; concurrent: never pauses",
    )
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve a host:port beyond loopback without --token (refused otherwise: anyone reaching it could "
        "pause serving and write the weights)",
    )
    parser.add_argument("--log-level", default="INFO", help="weightshare's log level (default: %(default)s)")


def _apply_cpu_defaults(args: argparse.Namespace) -> bool:
    """On a CPU: refuse configs vLLM's CPU kernels cannot run, size the KV cache if the user did not."""
    from vllm.platforms import current_platform

    from weightshare.vllm_defaults import cpu_gdn_config_problem, cpu_serve_env_defaults

    if not current_platform.is_cpu():
        return True
    config_path = Path(args.model) / "config.json"
    if config_path.is_file():
        problem = cpu_gdn_config_problem(json.loads(config_path.read_text()))
        if problem:
            log.error("vLLM's CPU build cannot serve this model", model=args.model, problem=problem)
            return False
    chosen = cpu_serve_env_defaults(args.extra_args, dict(os.environ))
    if chosen:
        os.environ.update(chosen)
        log.info("CPU engine: no KV-cache size given, using weightshare's default (pass "
                 "--kv-cache-memory-bytes or set VLLM_CPU_KVCACHE_SPACE to choose)", **chosen)
    return True


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


def run(args: argparse.Namespace) -> int:
    configure_command_logging(args.log_level)
    check_model_argument(args.model)
    grpc_util.ensure_can_listen(args.grpc)
    grpc_util.refuse_open_exposure(args.grpc, args.token, args.allow_unauthenticated)
    from inference_side.export_server import start_export_server
    from weightshare import vllm_compat

    vllm_compat.setup_serve_process()
    vllm_compat.ensure_qwen3_5_registered()
    if not _apply_cpu_defaults(args):
        return 2
    vllm_args = vllm_compat.parse_serve_args(
        ["--model", args.model, "--worker-extension-cls", WORKER_EXTENSION, *args.extra_args],
        prog="weightshare serve (vLLM arguments)",
    )
    if getattr(vllm_args, "uds", None) is None:  # vLLM's HTTP port: refuse now, not after loading the model
        grpc_util.ensure_can_listen(f"{vllm_args.host or '0.0.0.0'}:{vllm_args.port}", flag="--port")
    mode = pb.UPDATE_MODE_STRICT if args.update_mode == "strict" else pb.UPDATE_MODE_CONCURRENT

    @contextlib.asynccontextmanager
    async def with_export(engine_client):
        # On the HTTP server's loop and engine client, for exactly the engine's lifetime.
        export = await start_export_server(engine_client, args.grpc, args.token, mode)
        try:
            yield
        finally:
            await export.stop()

    vllm_compat.run_openai_server(vllm_args, with_export)
    return 0
