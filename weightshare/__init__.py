"""weightshare: train a model while vLLM serves it, on the same memory, with no weight copy.

Shared pieces of both services live here: the generated contract stubs (`weightshare.v1`), the
command-line entry point (`weightshare.cli`), logging set-up and the tiny-model builder.
"""

CONTRACT_VERSION = "weightshare.v1"
