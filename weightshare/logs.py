"""Logging set-up, called once by each entry point: one format per run, JSON lines unless on a terminal.

On a terminal: readable lines (vLLM keeps its own format) and progress bars. Otherwise every line is a
JSON object with at least `event`, `level` and `timestamp`, so `jq` reads a whole log:
- structlog (weightshare's own logs) and the standard `logging` module (grpc, transformers, uvicorn,
  Python warnings) render through the same JSON renderer;
- vLLM's loggers, in every vLLM process, get the same formatter through a dictConfig file named by
  VLLM_LOGGING_CONFIG_PATH (which vLLM reads at import, in each process it starts);
- progress bars are off (TQDM_DISABLE);
- `relay_stdio_as_json` catches the rest (C/C++ libraries print to the file descriptors directly).
Child processes (vLLM's workers) call `configure_logging_from_env` to follow the parent's choice.
Library modules only call `structlog.get_logger(__name__)`.
"""

from __future__ import annotations

import json as jsonlib
import logging
import logging.config
import os
import sys
import tempfile

import structlog

ENV_JSON = "WEIGHTSHARE_LOG_JSON"
ENV_LEVEL = "WEIGHTSHARE_LOG_LEVEL"
_SHARED_PROCESSORS = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
]


def _level_number(level: str) -> int:
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        from weightshare.errors import UsageError

        raise UsageError(f"unknown log level {level!r} (--log-level): use DEBUG, INFO, WARNING or ERROR")
    return numeric_level


def stdlib_formatter(json: bool = True) -> structlog.stdlib.ProcessorFormatter:
    """A `logging.Formatter` that renders standard-library records like structlog's own lines."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
        foreign_pre_chain=[*_SHARED_PROCESSORS, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
    )


class _AboveProgressBars:
    """stderr for log lines on a terminal: printed above any tqdm bar instead of through it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip("\n"):  # print() writes the newline separately; tqdm.write adds its own
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    """Route structlog and stdlib logging to stderr in one format; JSON lines unless stderr is a terminal.

    Also sets the environment that makes child processes (vLLM's engine and workers) do the same.
    """
    if json is None:
        json = not sys.stderr.isatty()
    numeric_level = _level_number(level)
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr if json else _AboveProgressBars()),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr if json else _AboveProgressBars())
    handler.setFormatter(stdlib_formatter(json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    logging.captureWarnings(True)
    os.environ[ENV_JSON] = "1" if json else "0"
    os.environ[ENV_LEVEL] = level.upper()
    if json:
        os.environ.setdefault("TQDM_DISABLE", "1")
        if not os.environ.get("VLLM_LOGGING_CONFIG_PATH") and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = _write_vllm_logging_config()


def configure_command_logging(level: str = "INFO") -> None:
    """For a long-running command (serve, train): `configure_logging`, and off a terminal, the stdio relay."""
    json = not sys.stderr.isatty()
    if json:
        from weightshare.stdio_relay import relay_stdio_as_json

        relay_stdio_as_json()
    configure_logging(level, json)


def configure_logging_from_env() -> None:
    """In a child process: the parent's choice (no-op when the parent was not a weightshare command)."""
    if ENV_JSON in os.environ:
        configure_logging(os.environ.get(ENV_LEVEL, "INFO"), json=os.environ[ENV_JSON] == "1")


def _write_vllm_logging_config() -> str:
    """A dictConfig for vLLM (and uvicorn, which vLLM hands the same file) rendering JSON lines."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["json"], "level": level, "propagate": False}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "weightshare.logs.stdlib_formatter"}},
        "handlers": {"json": handler},
        "loggers": {name: dict(logger) for name in ("vllm", "uvicorn", "uvicorn.access", "uvicorn.error")},
    }
    # One file per user and level, rewritten atomically: nothing accumulates in the temp directory.
    path = os.path.join(tempfile.gettempdir(), f"weightshare-vllm-logging-{os.getuid()}-{level.lower()}.json")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path), dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        jsonlib.dump(config, f)
    os.replace(tmp, path)
    return path
