"""Trainer side of weightshare: a separate process that attaches to vLLM's weights.

Pulls layout and handles from the inference side, binds a HuggingFace model's parameters as
zero-copy views into vLLM's memory, and trains them in place with APOLLO / APOLLO-Mini.
"""
