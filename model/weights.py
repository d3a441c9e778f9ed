"""MiniMind's weight files, read and written in this one place.

A weight file is `<name>.pth`, a state dict saved with `torch.save` (half precision from the
trainers, as the original MiniMind's releases), with `<name>.json` beside it: the model config as
`MiniMindConfig.to_json_string()` writes it, so loading never depends on remembering the size flags.
The sidecar may also carry, at its top level, what produced the weights (`SIDECAR_EXTRAS`, e.g. the
trainer's `train_args`); it still loads with `MiniMindConfig.from_json_file`, and `read_weights`
hands those keys back apart from the config.

Every file is written atomically (`atomic_save`): a kill at any moment leaves the old file or the new
one, never half of one, so a training run stopped during a save still has loadable weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from model.model_minimind import MiniMindConfig

# Top-level sidecar keys that describe how the weights were made, not the model. Reading takes them
# out of the config: left in, `from_json_file` would make them config attributes, and every model
# loaded from the file would carry its parent's training flags into the files it is saved to.
SIDECAR_EXTRAS = ("train_args",)


def atomic_save(obj: Any, path: str | Path, keep_previous: bool = False) -> None:
    """Write `obj` to `path` (str and bytes as they are, anything else with `torch.save`) through a
    temporary file that is fsynced, then renamed over `path`: a kill at any moment leaves either the
    old file or the new one. With `keep_previous`, the file being replaced is kept as
    `previous_version(path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        if isinstance(obj, (str, bytes)):
            handle.write(obj.encode() if isinstance(obj, str) else obj)
        else:
            torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous_version(path))
    os.replace(tmp, path)


def previous_version(path: str | Path) -> Path:
    """Where `atomic_save(..., keep_previous=True)` keeps the file it replaced: `<stem>.previous<suffix>`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside a `.pth`: `<stem>.json`."""
    return Path(path).with_suffix(".json")


def write_weights(state: dict[str, torch.Tensor], config: MiniMindConfig, path: str | Path,
                  extra: dict | None = None) -> None:
    """`state` as `path` and `config` as its sidecar, with the keys of `extra` (from `SIDECAR_EXTRAS`)
    added at the sidecar's top level. Without `extra` the sidecar is exactly `config.to_json_string()`."""
    unknown = sorted(set(extra or {}) - set(SIDECAR_EXTRAS))
    if unknown:
        raise ValueError(f"sidecar keys {unknown} would be read back as config; the extras are {SIDECAR_EXTRAS}")
    sidecar = config.to_json_string()
    if extra:  # in to_json_string's own layout
        sidecar = json.dumps({**json.loads(sidecar), **extra}, indent=2, sort_keys=True) + "\n"
    atomic_save(state, path)
    atomic_save(sidecar, sidecar_path(path))


def save_weights(model: torch.nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """The trainers' weight file: `model`'s state dict in half precision (as the original's), its
    config beside it, plus `extra` (e.g. `{"train_args": {...}}`). Pass the model itself, not a
    DDP or torch.compile wrapper, whose state-dict keys carry a prefix."""
    state = {name: tensor.detach().to("cpu", torch.float16) for name, tensor in model.state_dict().items()}
    write_weights(state, model.config, path, extra)


def read_sidecar(path: str | Path) -> tuple[MiniMindConfig | None, dict]:
    """The config of a `.pth`'s sidecar (None when it has none: the original's releases) and the
    sidecar's `SIDECAR_EXTRAS`, which the config does not keep."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None, {}
    config = MiniMindConfig.from_json_file(str(sidecar))
    extra = {key: vars(config).pop(key) for key in SIDECAR_EXTRAS if key in vars(config)}
    return config, extra


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], MiniMindConfig | None, dict]:
    """A `.pth` state dict (on the CPU, as stored), the config of its sidecar (None when it has none)
    and the sidecar's extras (`{}` when none)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, *read_sidecar(path)
