"""Memory modes that break CUDA IPC are named with what to change (runs without a GPU).

Run as: .venv/bin/python -m pytest tests/test_cuda_ipc_guard.py
"""

from __future__ import annotations

from inference_side.cuda_ipc import sharing_blockers


def test_expandable_segments_and_sleep_mode_are_refused(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    reasons = sharing_blockers(enable_sleep_mode=True)
    assert len(reasons) == 2
    assert "expandable_segments" in reasons[0] and "start vLLM without it" in reasons[0]
    assert "--enable-sleep-mode" in reasons[1]


def test_plain_allocator_is_accepted(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert sharing_blockers(enable_sleep_mode=False) == []
