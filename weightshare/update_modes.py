"""`--update-mode` on the command line and `weightshare.v1.UpdateMode` in the contract: one mapping.

`weightshare serve --update-mode strict|concurrent` decides the mode; `weightshare train --update-mode
auto|strict|concurrent` states what it expects (auto: whatever the inference side runs, the enum's
UNSPECIFIED). Both sides import this module (weightshare/ is the package they share).
"""

from __future__ import annotations

from weightshare.v1 import update_mode_pb2

AUTO = "auto"
_BY_NAME = {
    AUTO: update_mode_pb2.UPDATE_MODE_UNSPECIFIED,
    "strict": update_mode_pb2.UPDATE_MODE_STRICT,
    "concurrent": update_mode_pb2.UPDATE_MODE_CONCURRENT,
}
SERVED = ("strict", "concurrent")
"""`weightshare serve --update-mode` choices: the modes a server runs."""
EXPECTED = (AUTO, *SERVED)
"""`weightshare train --update-mode` choices: a mode the trainer expects, or auto."""
DEFAULT_SERVED = "strict"


def from_cli(name: str) -> int:
    """The UpdateMode of a `--update-mode` choice ("auto" is UPDATE_MODE_UNSPECIFIED)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"--update-mode {name!r} is not one of {', '.join(EXPECTED)}") from None


def cli_name(mode: int) -> str:
    """The `--update-mode` choice of an UpdateMode (UPDATE_MODE_UNSPECIFIED is "auto")."""
    for name, value in _BY_NAME.items():
        if value == mode:
            return name
    raise ValueError(f"update mode {mode} has no --update-mode name")
