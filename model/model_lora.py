"""LoRA: fine-tune a frozen model through a low-rank change of its linear layers (Hu et al., 2021).

A linear layer computes y = W x. LoRA leaves W frozen and learns a correction of rank r:

    y = W x + (alpha / r) * B A x        A: r x in_features,  B: out_features x r,  r << both

* Only A and B train: for a 512 x 512 layer and r = 8 that is 8,192 numbers instead of 262,144, so
  the optimizer state is tiny and one base model can carry many small adapters (identity, medical, ...).
* B starts at zero, so training starts from exactly the base model; A starts random (Kaiming-uniform,
  nn.Linear's own init), otherwise B's gradient, which is proportional to A x, would be zero too.
* alpha / r scales the update so that trying another rank does not also change the effective
  learning rate. The original MiniMind used no scaling, which is alpha = r (our default: 8 and 8).
* Any nn.Linear can be adapted, square or not: targets are chosen by name (`q_proj`, `mlp.down_proj`).
* After training B A can be added into W ("merging"): the adapted model then costs nothing extra.

Files:
* ours, `out/lora/<name>_<hidden>.pth`: only the adapter tensors, with the original MiniMind's keys
  (`<layer>.lora.A.weight`, `<layer>.lora.B.weight`), and `<same stem>.json` beside it holding rank,
  alpha, dropout and targets. A file the original wrote (no sidecar, square layers only, no scaling)
  loads too: the rank is read from A's shape and alpha = rank.
* PEFT's: `adapter_config.json` + `adapter_model.safetensors` with keys
  `base_model.model.<layer>.lora_A.weight` / `.lora_B.weight`, loadable by `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.weights import atomic_save, sidecar_path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": list(self.targets)}, indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        return cls(rank=int(values["rank"]), alpha=float(values["alpha"]), dropout=float(values.get("dropout", 0.0)),
                   targets=tuple(values["targets"]))


class LoRA(nn.Module):
    """The update (alpha / r) * B A x of one linear layer."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device=None, dtype=None):
        super().__init__()
        self.A = nn.Linear(in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(config.rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = config.alpha / config.rank
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The same update as one out x in matrix, so that W + delta does in one matmul what W and
        B A did in three. Computed in fp32."""
        return self.B.weight.float() @ self.A.weight.float() * self.scale


class LoRALinear(nn.Linear):
    """A linear layer with its LoRA. It holds the very `weight` (and `bias`) Parameters of the layer
    it replaces, so the base weights keep their state-dict keys and stay shared, not copied."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora = LoRA(base.in_features, base.out_features, config, base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora(x)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A: the adapter merged in."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():  # the sum in fp32, rounded once to the weight's dtype
            self.weight.copy_(self.weight.float() + self.lora.delta_weight())
        linear.weight, linear.bias = self.weight, self.bias
        return linear


# ---------------------------------------------------------------------------------------------
# Adding, reading out and merging adapters
# ---------------------------------------------------------------------------------------------

def is_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of targets: the module's name is a target or ends with `.<target>`."""
    return any(name == target or name.endswith("." + target) for target in targets)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Give every target nn.Linear a LoRA and freeze everything else. Returns the adapted layers' names."""
    shared = {}  # parameters that several modules hold, e.g. a tied embedding and output head
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and is_target(name, config.targets)]
    if not chosen:
        raise ValueError(f"no nn.Linear matches the LoRA targets {', '.join(config.targets)}")
    for name, module in chosen:
        if len(shared[id(module.weight)]) > 1:
            raise ValueError(f"{name}.weight is tied to {shared[id(module.weight)]}: merging an adapter into it "
                             f"would change both; leave {name} out of the targets")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in chosen:
        replace_module(model, name, LoRALinear(module, config))
    model.lora_config = config
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: only the adapter tensors, keyed `<layer>.lora.A.weight` /
    `<layer>.lora.B.weight`, as fp32 on the CPU (they are small; rounding them gains nothing)."""
    return {f"{name}.lora.{key}": tensor.detach().to("cpu", torch.float32)
            for name, layer in lora_layers(model).items() for key, tensor in layer.lora.state_dict().items()}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for layer in lora_layers(model).values() for param in layer.lora.parameters()]


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: add each B A into its W and put plain nn.Linear layers back, so the model has the
    base model's structure and state-dict keys again (and runs as fast)."""
    for name, layer in lora_layers(model).items():
        replace_module(model, name, layer.to_linear())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged copy; `model` keeps its separate adapters."""
    return merge_lora(copy.deepcopy(model))


# ---------------------------------------------------------------------------------------------
# Files: ours (.pth + .json sidecar) and PEFT's
# ---------------------------------------------------------------------------------------------

def save_lora(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """`<name>.pth` with the adapter tensors and `<name>.json` with their config (plus the keys of
    `extra`, e.g. the trainer's `train_args`, which `LoRAConfig.from_dict` passes over), each written
    atomically. Pass the model itself, not a DDP or torch.compile wrapper."""
    sidecar = model.lora_config.to_json() if not extra else json.dumps({**json.loads(model.lora_config.to_json()),
                                                                        **extra}, indent=2)
    atomic_save(lora_state_dict(model), path)
    atomic_save(sidecar, sidecar_path(path))


def read_lora(source: str | Path) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """Adapter tensors (in our key names) and config from a `.pth` (ours, or the original's without
    sidecar) or a PEFT adapter directory."""
    source = Path(source)
    if source.is_dir():
        return read_peft(source)
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): tensor for key, tensor in state.items()}  # the original saved DDP names
    sidecar = sidecar_path(source)
    if sidecar.exists():
        return state, LoRAConfig.from_dict(json.loads(sidecar.read_text(encoding="utf-8")))
    a_weights = [tensor for key, tensor in state.items() if key.endswith(".lora.A.weight")]
    if not a_weights:
        raise ValueError(f"{source} holds no LoRA tensors (<layer>.lora.A.weight)")
    rank = a_weights[0].shape[0]
    targets = tuple(sorted({key.split(".lora.")[0].rpartition(".")[2] for key in state}))
    return state, LoRAConfig(rank=rank, alpha=float(rank), targets=targets)  # the original: no scaling


def load_lora(model: nn.Module, source: str | Path) -> LoRAConfig:
    """Add adapters to `model` as the file describes and load their weights; every adapter tensor of
    the file must fit a layer of the model and every adapted layer must get its tensors."""
    state, config = read_lora(source)
    apply_lora(model, config)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)  # the checks above made it exact for the adapter keys
    return config


def write_peft(state: dict[str, torch.Tensor], config: LoRAConfig, directory: str | Path) -> None:
    """Adapter tensors (our key names, as `lora_state_dict` or `read_lora` give them) written as PEFT
    writes them: `adapter_config.json` + `adapter_model.safetensors`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    (directory / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2), encoding="utf-8")
    tensors = {PEFT_PREFIX + key.replace(".lora.A.", ".lora_A.").replace(".lora.B.", ".lora_B."):
               tensor.contiguous() for key, tensor in state.items()}
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})


def read_peft(directory: Path) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """A PEFT LoRA adapter directory, as long as it uses only what plain LoRA has."""
    values = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    unsupported = [key for key in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                   "modules_to_save", "layers_to_transform", "exclude_modules") if values.get(key)]
    if values.get("peft_type") != "LORA" or values.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{directory}: only plain LoRA adapters load (found peft_type={values.get('peft_type')}, "
                         f"bias={values.get('bias')}, {', '.join(unsupported) or 'no extras'})")
    targets = values["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{directory}: target_modules is a regular expression; list the module names instead")
    state = {key.removeprefix(PEFT_PREFIX).replace(".lora_A.", ".lora.A.").replace(".lora_B.", ".lora.B."): tensor
             for key, tensor in load_file(str(directory / PEFT_WEIGHTS)).items()}
    config = LoRAConfig(rank=values["r"], alpha=values["lora_alpha"], dropout=values.get("lora_dropout", 0.0),
                        targets=tuple(targets))
    return state, config
