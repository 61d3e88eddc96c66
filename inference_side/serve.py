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

from inference_side.serve_config import ServeConfig
from weightshare import grpc_util, update_modes
from weightshare.logs import configure_command_logging

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
        "--update-mode", choices=update_modes.SERVED, default=update_modes.DEFAULT_SERVED,
        help="strict: serving pauses at a step boundary during each update; concurrent: never pauses",
    )
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve a host:port beyond loopback without --token (refused otherwise: anyone reaching it could "
        "pause serving and write the weights)",
    )
    parser.add_argument("--log-level", default="INFO", help="weightshare's log level (default: %(default)s)")


def _apply_cpu_defaults(config: ServeConfig) -> bool:
    """On a CPU: refuse configs vLLM's CPU kernels cannot run, size the KV cache if the user did not."""
    from vllm.platforms import current_platform

    from weightshare.vllm_defaults import cpu_gdn_config_problem, cpu_serve_env_defaults

    if not current_platform.is_cpu():
        return True
    config_path = Path(config.model) / "config.json"
    if config_path.is_file():
        problem = cpu_gdn_config_problem(json.loads(config_path.read_text()))
        if problem:
            log.error("vLLM's CPU build cannot serve this model", model=config.model, problem=problem)
            return False
    chosen = cpu_serve_env_defaults(list(config.vllm_args), dict(os.environ))
    if chosen:
        os.environ.update(chosen)
        log.info("CPU engine: no KV-cache size given, using weightshare's default (pass "
                 "--kv-cache-memory-bytes or set VLLM_CPU_KVCACHE_SPACE to choose)", **chosen)
    return True


def run(args: argparse.Namespace) -> int:
    configure_command_logging(args.log_level)
    config = ServeConfig.from_args(args)
    from inference_side.export_server import start_export_server
    from weightshare import vllm_compat

    vllm_compat.setup_serve_process()
    vllm_compat.ensure_qwen3_5_registered()
    if not _apply_cpu_defaults(config):
        return 2
    vllm_args = vllm_compat.parse_serve_args(
        ["--model", config.model, "--worker-extension-cls", WORKER_EXTENSION, *config.vllm_args],
        prog="weightshare serve (vLLM arguments)",
    )
    if getattr(vllm_args, "uds", None) is None:  # vLLM's HTTP port: refuse now, not after loading the model
        grpc_util.ensure_can_listen(f"{vllm_args.host or '0.0.0.0'}:{vllm_args.port}", flag="--port")

    @contextlib.asynccontextmanager
    async def with_export(engine_client):
        # On the HTTP server's loop and engine client, for exactly the engine's lifetime.
        export = await start_export_server(engine_client, config.grpc, config.token, config.update_mode)
        try:
            yield
        finally:
            await export.stop()

    vllm_compat.run_openai_server(vllm_args, with_export)
    return 0
