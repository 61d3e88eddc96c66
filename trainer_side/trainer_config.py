"""`TrainerConfig`: every setting of `weightshare train`, checked and built once from the command line.

The rest of the trainer receives this object (or the parts it needs), never the argparse namespace:
one place turns flags into typed settings and refuses bad combinations with the flag named.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from trainer_side.loop import LoopConfig
from weightshare import grpc_util, update_modes
from weightshare.errors import UsageError


@dataclass(frozen=True)
class TrainerConfig:
    inference: str
    """WeightExportService address of `weightshare serve`."""
    grpc: str
    """Address TrainerService listens on."""
    state_dir: Path
    """Examples, checkpoints and the lock file (absolute)."""
    token: str | None
    """Bearer token required on TrainerService calls."""
    inference_token: str | None
    """Bearer token sent to WeightExportService."""
    name: str
    """Trainer name shown by the inference side."""
    take_over: bool
    """Take the writer lease from the trainer holding it."""
    optimizer: str
    """apollo or apollo_mini for the projection matrices."""
    other_params: str
    """adamw or frozen for norms, conv1d and the like."""
    embeddings: str
    """apollo_mini, adamw or frozen for the embedding and lm_head matrices."""
    loop: LoopConfig
    """The training loop's settings."""
    max_seq_len: int
    """Longest example accepted, in tokens."""
    update_mode: int
    """The UpdateMode the inference side must run; UPDATE_MODE_UNSPECIFIED (--update-mode auto): any."""
    torch_threads: int
    """torch CPU threads (0: 1 on CPU-served weights, else torch's choice)."""
    autostart: bool
    """Start the loop at once (else at StartTraining)."""
    metrics_port: int | None
    """Port of the Prometheus endpoint (None: off; 0: any free port)."""
    metrics_host: str
    """Address of the Prometheus endpoint."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainerConfig:
        """Checks the flags (UsageError naming the flag) and builds the config; touches nothing."""
        grpc_util.validate_address(args.inference)
        grpc_util.ensure_can_listen(args.grpc)
        grpc_util.refuse_open_exposure(args.grpc, args.token, args.allow_unauthenticated)
        if args.metrics_port:
            grpc_util.ensure_can_listen(f"{args.metrics_host}:{args.metrics_port}", flag="--metrics-port")
        if args.micro_batch_size < 0:
            raise UsageError(f"--micro-batch-size {args.micro_batch_size} must not be negative")
        if args.max_seq_len < 2:
            raise UsageError(f"--max-seq-len {args.max_seq_len} must be at least 2 (one token to predict)")
        try:
            loop = LoopConfig(
                lr=args.lr, warmup_steps=args.warmup_steps, examples_per_step=args.examples_per_step,
                max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                keep_checkpoints=args.keep_checkpoints, max_pause_s=args.max_pause,
                gradient_checkpointing=args.gradient_checkpointing, fused_step=args.fused_step,
                loss_chunk_tokens=args.loss_chunk_tokens, memory_report=args.memory_report,
                kernel_warmup=args.kernel_warmup,
                micro_batch_size=args.micro_batch_size or (args.examples_per_step if args.fused_step else 1),
            )
        except ValueError as err:
            raise UsageError(f"invalid training settings: {err}") from None
        return cls(
            inference=args.inference, grpc=args.grpc, state_dir=args.state_dir.resolve(), token=args.token,
            inference_token=args.inference_token, name=args.name, take_over=args.take_over,
            optimizer=args.optimizer, other_params=args.other_params, embeddings=args.embeddings, loop=loop,
            max_seq_len=args.max_seq_len, update_mode=update_modes.from_cli(args.update_mode), torch_threads=args.torch_threads,
            autostart=args.autostart, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        )
