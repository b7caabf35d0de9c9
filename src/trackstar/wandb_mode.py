"""Which W&B mode a run or a tables upload uses (no stage imports: ``tables`` uses it too).

``auto`` is online when credentials exist, else offline; ``WANDB_MODE=offline``,
``disabled`` or ``dryrun`` in the environment wins over any configured mode.
"""

from __future__ import annotations

import netrc
import os

MODES = ("auto", "online", "offline", "disabled")


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in h for h in hosts)


def resolve_mode(mode: str) -> str:
    """The W&B mode of a run: ``WANDB_MODE=offline|disabled`` (the user's word for this
    shell) wins over any ``logger.mode``; ``WANDB_MODE=online`` settles ``auto``."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not one of {MODES}.")
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "offline", "dryrun"):
        return "offline" if env == "dryrun" else env
    if mode == "auto":
        return "online" if env == "online" or logged_in() else "offline"
    return mode
