"""Command-line conventions shared by every script, kept free of torch so that a script needing no
model (the API client) starts at once."""

from __future__ import annotations

import argparse


def add_switch(group: argparse._ActionsContainer, *names: str, default: int | None = 0, help: str) -> None:
    """An on/off flag, spelled the same way in every script: `--name 1` / `--name 0` as the original
    MiniMind's flags, and `--name` alone for 1, as a `store_true` flag. The value is the int 0 or 1
    (`default` when the flag is absent; None = the script decides). Several `names` are aliases of
    the first, which names the value."""
    group.add_argument(*names, nargs="?", const=1, type=int, choices=[0, 1], default=default, help=help)
