"""Inference side of weightshare: runs inside the vLLM host.

Exports the served model's weights zero-copy (shared-memory files on CPU, CUDA IPC on GPU) with a
layout schema mapping vLLM's merged tensors onto HuggingFace parameters, and coordinates updates
(pause at a step boundary, commit, new weights version, prefix cache reset, resume) over gRPC.
"""
