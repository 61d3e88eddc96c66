"""weightshare: train a model while vLLM serves it, on the same memory, with no weight copy.

Shared pieces of both services live here: the generated contract stubs (`weightshare.v1`), the
command-line entry point (`weightshare.cli`), logging set-up and the tiny-model builder.
"""

CONTRACT_VERSION = "weightshare.v1"


def protos_dir():
    """Directory holding `weightshare/v1/*.proto`: the source tree's, or the one installed with the wheel."""
    import sys
    from pathlib import Path

    for candidate in (Path(__file__).resolve().parent.parent / "protos",
                      Path(sys.prefix) / "share" / "weightshare" / "protos"):
        if (candidate / "weightshare" / "v1").is_dir():
            return candidate
    raise FileNotFoundError("weightshare's .proto files are neither in a source tree nor installed")
