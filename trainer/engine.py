"""The training engine every stage shares.

A stage script (`train_pretrain.py`, `train_dpo.py`, ...) states its recipe: its flags, its data, its
loss, its extra models. Everything else lives here, once:

* flags shared by all stages (`stage_parser`), with the original MiniMind's names;
* the runtime: device, dtype, autocast, seeding, `torchrun` process groups (`setup_runtime`);
* model and tokenizer loading, weight files with their config sidecar (`load_model`, `save_weights`);
* the optimisation core (`Trainer.train_step`): one optimizer step over a window of micro-batches
  whose loss is a sum over `count` units, normalised by the units of the whole step across
  micro-batches and processes; clipping, fp16 loss scaling, warmup + cosine LR, a NaN/inf guard;
* logging (progress bar, metrics jsonl, optional wandb/swanlab), validation on held-out data
  (`--eval_data`), and atomic resume checkpoints that continue exactly where a killed run stopped;
* the supervised loop (`train`), which reads top to bottom. The RL stages have their own loop, in
  `trainer/rl.py`; both use the same `Trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tokenizers.pre_tokenizers import ByteLevel

from dataset.lm_dataset import PackedBatches, dataset_for_file, pad_rows
from model import loader
from model.cli import add_switch
from model.weights import atomic_save, previous_version, save_weights
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, next_token_nll

REPO_ROOT = loader.REPO_ROOT


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows the script's docstring as written (its usage lines, its formulas) and each flag's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default:" in (action.help or ""):  # the flag's help already says what its default means
            return action.help
        return super()._get_help_string(action)


def stage_parser(description: str, *, save_weight: str, from_weight: str, learning_rate: float, epochs: int,
                 batch_size: int, max_seq_len: int, data_file: str, accumulation_steps: int = 1,
                 log_interval: int = 100, save_interval: int = 1000) -> argparse.ArgumentParser:
    """The flags every stage shares (CONVENTIONS §4); a stage adds its own groups and passes its defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    files = parser.add_argument_group("files")
    files.add_argument("--save_dir", default="out", help="weights and metrics go here (default: <repo>/out)")
    files.add_argument("--save_weight", default=save_weight, help="name of the weights written: <save_weight>_<hidden>[_moe].pth")
    files.add_argument("--data_path", default=None,
                       help=f"training jsonl (default: <repo>/dataset/{data_file}, or the shipped demo data when absent)")
    files.add_argument("--from_weight", default=from_weight,
                       help="'none' = random init; a name in --save_dir (<name>_<hidden>[_moe].pth), a .pth path, or an HF directory")
    files.add_argument("--tokenizer_path", default="model", help="HF tokenizer directory (default: the bundled one in <repo>/model)")
    files.add_argument("--checkpoint_dir", default="checkpoints", help="resume checkpoints go here (default: <repo>/checkpoints)")
    add_switch(files, "--from_resume", help="1 = continue from the resume checkpoint if there is one")

    size = parser.add_argument_group("model size (ignored when the loaded weights carry their config)")
    loader.add_size_args(size)
    size.add_argument("--max_seq_len", type=int, default=max_seq_len, help="tokens per training row")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=epochs)
    optim.add_argument("--batch_size", type=int, default=batch_size, help="rows per micro-batch (per process)")
    optim.add_argument("--learning_rate", type=float, default=learning_rate, help="peak LR; cosine decay to 10%% of it")
    optim.add_argument("--warmup_steps", type=int, default=0, help="linear warmup, in optimizer steps")
    optim.add_argument("--accumulation_steps", type=int, default=accumulation_steps, help="micro-batches per optimizer step")
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    optim.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW's decoupled weight decay, on weight matrices only (not norms, biases or embeddings); "
                            "the original decayed every parameter at AdamW's default 0.01 (default: 0.01)")
    optim.add_argument("--max_steps", type=int, default=0, help="stop after N optimizer steps (0 = no cap); the LR schedule still spans the whole run")
    optim.add_argument("--seed", type=int, default=42)

    runtime = parser.add_argument_group("runtime")
    loader.add_device_args(runtime)
    runtime.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    runtime.add_argument("--use_compile", nargs="?", const="1", default="auto", choices=["auto", "0", "1"],
                         help="1 = torch.compile the model; auto (default) = on packed rows (fixed shape), time the first "
                              "steps eagerly, then compile if the rest of the run saves more time than compiling "
                              "costs (see COMPILE_COST)")
    runtime.add_argument("--log_interval", type=int, default=log_interval, help="log every N optimizer steps")
    runtime.add_argument("--save_interval", type=int, default=save_interval, help="save weights + resume state every N optimizer steps")
    add_switch(runtime, "--use_wandb", help="1 = log to wandb (or swanlab if wandb is absent); offline without an API key")
    runtime.add_argument("--wandb_project", default="MiniMind")
    runtime.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive non-finite losses/gradients")
    runtime.add_argument("--deepspeed", default=None, metavar="CONFIG",
                         help="train under DeepSpeed ZeRO with this config, e.g. trainer/ds_config_zero2.json; its "
                              "\"auto\" fields come from these flags (default: DDP under torchrun, else one process)")
    runtime.add_argument("--local_rank", type=int, default=-1,
                         help="set by the deepspeed launcher; the process's rank is read from LOCAL_RANK (default: -1)")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--eval_data", default=None,
                            help="held-out jsonl ({text} or {conversations}): its loss is logged as val_loss (nats/token) "
                                 "and val_bpb (bits per byte) every --eval_interval steps and at the end (default: none)")
    validation.add_argument("--eval_interval", type=int, default=100, help="optimizer steps between validations")
    return parser


def add_packing_flag(parser: argparse.ArgumentParser) -> None:
    add_switch(parser, "--pack", default=1,
                      help="1 = pack several documents into each full row (attention stays within each); "
                           "0 = one padded document per row, as the original")


def model_config(args: argparse.Namespace) -> MiniMindConfig:
    return loader.size_from_args(args)


def weight_stem(config: MiniMindConfig, name: str) -> str:
    """MiniMind's file naming without the suffix: pretrain_512, full_sft_640_moe, ..."""
    return loader.weight_file_name(name, config).removesuffix(".pth")


# ---------------------------------------------------------------------------------------------
# Runtime: device, dtype, processes
# ---------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision: matmuls in bf16/fp16, master weights and optimizer state in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *message: Any) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(m) for m in message))

    def close(self) -> None:
        """Leave the process group together. A rank that exits with the group still open can abort
        (SIGABRT in gloo's teardown) while its peer is still finishing its last collective."""
        if dist.is_initialized():
            if self.distributed:
                dist.barrier()
            dist.destroy_process_group()

    def all_reduce(self, value: float | torch.Tensor, op: str = "sum") -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Device and dtype choice, and the process group when launched by `torchrun` (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = loader.resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if getattr(args, "deepspeed", None):
        prepare_deepspeed_environment(device, world_size)
    if (world_size > 1 or getattr(args, "deepspeed", None)) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1:
            dist.init_process_group(backend)
        else:  # DeepSpeed wants a process group even alone; an in-memory store needs no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = loader.resolve_dtype(args.dtype, device)
    if world_size > 1 and args.dtype == "auto":  # every rank must train in the same precision
        agreed = torch.tensor([dtype == torch.bfloat16], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        dtype = torch.bfloat16 if agreed.item() else (torch.float16 if device.type == "cuda" else torch.float32)
    seed_everything(args.seed + rank)
    runtime = Runtime(device=device, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world_size)
    runtime.print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, {world_size} process(es)")
    return runtime


# ---------------------------------------------------------------------------------------------
# Data, tokenizer, model, weights
# ---------------------------------------------------------------------------------------------

def resolve_data_path(args: argparse.Namespace, default_file: str, demo_file: str) -> Path:
    """`--data_path` if given; else MiniMind's file in dataset/; else the shipped demo data, saying so first."""
    if args.data_path:
        path = loader.resolve_path(args.data_path)
        if not path.exists():
            sys.exit(f"error: --data_path {path} does not exist")
        return path
    real = REPO_ROOT / "dataset" / default_file
    if real.exists():
        return real
    demo = REPO_ROOT / "dataset" / "demo" / demo_file
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[demo data] dataset/{default_file} not found: training on the shipped demo file {demo.relative_to(REPO_ROOT)}", flush=True)
    return demo


def open_dataset(dataset_class: type, data_path: Path, tokenizer, max_length: int, runtime: Runtime, **kwargs):
    """The stage's dataset, every line validated before training starts: a malformed line stops the
    run with `path:line: what is wrong` before any output is written, not hours into it."""
    try:
        dataset = dataset_class(str(data_path), tokenizer, max_length=max_length, **kwargs)
        dataset.file.check_all()
    except ValueError as error:
        sys.exit(f"error: {error}")
    examples = f", {len(dataset):,} examples" if len(dataset) != len(dataset.file) else ""  # SFT, one per reply
    runtime.print(f"data: {data_path} ({len(dataset.file):,} lines{examples})")
    return dataset


def lm_batches(args: argparse.Namespace, runtime: Runtime, dataset) -> PackedBatches:
    """Rows of `--max_seq_len` tokens for this process's share of the data, packed unless `--pack 0`."""
    return PackedBatches(dataset, args.batch_size, args.max_seq_len, pack=bool(getattr(args, "pack", 0)),
                         seed=args.seed, rank=runtime.rank, world_size=runtime.world_size,
                         num_workers=args.num_workers)


def load_tokenizer(path: str):
    return loader.load_tokenizer(path)


def save_dir(args: argparse.Namespace) -> Path:
    return loader.resolve_path(args.save_dir, default="out")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    return loader.resolve_path(args.checkpoint_dir, default="checkpoints")


def load_model(args: argparse.Namespace, runtime: Runtime, name: str | None = None,
               config: MiniMindConfig | None = None, flag: str = "--from_weight") -> torch.nn.Module:
    """Random init (`--from_weight none`), or weights by name in --save_dir, a .pth path or an HF
    directory, loaded strictly and in fp32 (the optimizer's master copy). `flag` names the flag that
    gave `name`, for the error when it cannot be loaded."""
    name = args.from_weight if name is None else name
    config = config or model_config(args)
    if name == "none":
        # The same initial weights on every rank (each rank's RNG is seeded apart): a frozen copy taken
        # before DDP broadcasts rank 0's weights (a DPO reference) must match them too.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = MiniMindForCausalLM(config)
    else:
        try:
            is_path = Path(name).suffix == ".pth" or loader.resolve_path(name).is_dir()
            source = loader.locate(name if is_path else loader.NATIVE, name, args.save_dir, config)
            model = loader.load_hf_directory(source, torch.float32) if source.is_dir() else loader.load_pth(source, config)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: {flag} {name}: {error}")
        model = model.float()
        runtime.print(f"loaded {source}")
    n_params = sum(p.numel() for p in model.parameters())
    runtime.print(f"model: {n_params / 1e6:.3f}M parameters, hidden {model.config.hidden_size}, "
                  f"{model.config.num_hidden_layers} layers{', MoE' if model.config.use_moe else ''}")
    return model.to(runtime.device)


def freeze(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """A model that is read, never trained: a DPO reference or a distillation teacher. In `eval()`
    (no dropout: it must be the same function at every step), without gradients, and stored in the
    training dtype, since it needs no fp32 master copy: half the memory under bf16."""
    return model.to(runtime.dtype).eval().requires_grad_(False)


def load_frozen_model(args: argparse.Namespace, runtime: Runtime, name: str, flag: str,
                      config: MiniMindConfig | None = None) -> torch.nn.Module:
    return freeze(load_model(args, runtime, name, config, flag), runtime)


# `--use_compile auto`: eager steps timed before deciding, and per device what torch.compile costs (seconds,
# mostly inductor's code generation) and gains (the step's speedup), from scripts/bench_train.py (README,
# "Training speed"). CPU, on the 2-core AMX Xeon at the demo's size (hidden 256, 4 layers, 16 x 256 bf16):
# 19-43 s to compile, 1.11x on pretraining rows (more on SFT rows, less consistently), so the worst cost and the
# surer gain. CUDA: 1.49x on an H100 (packed fp32, MiniMind2-Small); its compile time was not measured, 60 s assumed.
COMPILE_PROBE_STEPS = 4
COMPILE_COST = {"cpu": (43.0, 1.11), "cuda": (60.0, 1.49)}


def eager(model: torch.nn.Module) -> Callable[..., Any]:
    """The model's uncompiled call when `--use_compile` compiled it in place (`nn.Module.compile`), else the
    model itself. Validation batches are padded to their longest row, a new shape almost every batch, and
    in eval mode: a compiled forward would recompile for them, which cost the demo's SFT half a minute per
    validation."""
    module = unwrap(model)
    return module._call_impl if getattr(module, "_compiled_call_impl", None) is not None else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    wrappers = (DistributedDataParallel,) + ((sys.modules["deepspeed"].DeepSpeedEngine,) if "deepspeed" in sys.modules else ())
    model = model.module if isinstance(model, wrappers) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

class NullLogger:
    """Stands in for wandb/swanlab when they are off, so the loop never branches on it."""
    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class ExperimentLogger(NullLogger):
    """wandb if installed, else swanlab; offline unless credentials are configured (runs then sync
    later with `wandb sync`). The run id goes into the resume checkpoint, so a resumed run continues
    the same curve. Files go under `<save_dir>/`."""

    def __init__(self, project: str, name: str, config: dict, run_id: str | None, directory: Path):
        try:
            import wandb as backend
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.run = backend.init(project=project, name=name, config=config, id=run_id, resume="allow", mode=mode,
                                    dir=str(directory))
            self.run_id = self.run.id
        except ImportError:
            try:
                import swanlab as backend
            except ImportError:
                sys.exit("error: --use_wandb needs `pip install wandb` (or swanlab)")
            mode = "cloud" if os.environ.get("SWANLAB_API_KEY") else "offline"
            self.run = backend.init(project=project, experiment_name=name, config=config, mode=mode,
                                    logdir=str(directory / "swanlog"))
            self.run_id = None
        self.backend = backend

    def log(self, metrics: dict, step: int) -> None:
        self.backend.log(metrics, step=step)

    def finish(self) -> None:
        self.backend.finish()


class MetricsFile:
    """`<save_dir>/<stem>.metrics.jsonl`: one JSON object per logged step, appended across resumes.
    On resume, lines past the resumed step (logged after the last checkpoint) are dropped, since
    those steps are about to be run again."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict, replace_last: bool = False) -> None:
        """Append `record`; with `replace_last`, it takes the place of the last line (the same step, now
        with more figures), so the file still holds each step once."""
        if replace_last:
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(lines[:-1]))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Validation: held-out loss in nats per token and bits per byte
# ---------------------------------------------------------------------------------------------

def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for; 0 for special tokens, which stand for none.

    A byte-level BPE token (GPT-2, MiniMind, Qwen) is written in an alphabet of one printable character
    per byte, so its length is its byte count even when it holds half a Chinese character, which
    decoding alone would turn into a 3-byte U+FFFD. Other vocabularies are decoded token by token."""
    byte_alphabet = set(ByteLevel.alphabet())  # the 256 characters that stand for the 256 bytes
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    lengths = torch.zeros(len(tokenizer), dtype=torch.float64)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is not None and all(char in byte_alphabet for char in token):
            lengths[token_id] = len(token)
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


class Validation:
    """`--eval_data`: the model's next-token loss on held-out data, every `--eval_interval` steps.

    The file is read like eval_llm's perplexity file: `{"text"}` lines score every token,
    `{"conversations"}` lines only the assistant's replies. Two figures:

        val_loss = sum of NLL / scored tokens                              nats per token
        val_bpb  = sum of NLL over tokens that stand for text / (ln 2 * their UTF-8 bytes)

    Bits per byte does not depend on the tokenizer (a tokenizer with longer tokens has a higher loss
    per token but as many bytes to predict), so runs with different vocabularies compare. It is the
    plain cross-entropy whatever the stage trains on (DPO, RL, distillation): how well the model still
    predicts held-out text. Each process scores every world_size-th document; sums are all-reduced."""

    def __init__(self, path: Path, tokenizer, max_seq_len: int, batch_size: int, runtime: Runtime):
        try:
            self.dataset = dataset_for_file(path, tokenizer, max_seq_len)
            self.dataset.file.check_all()
        except ValueError as error:
            sys.exit(f"error: --eval_data {error}")
        self.path, self.batch_size, self.runtime = path, batch_size, runtime
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.indices = list(range(runtime.rank, len(self.dataset), runtime.world_size))
        runtime.print(f"validation: {path} ({len(self.dataset):,} lines)")

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll_sum, tokens, text_nll_sum, text_bytes = 0.0, 0.0, 0.0, 0.0
        device = self.runtime.device
        for start in range(0, len(self.indices), self.batch_size):
            items = [self.dataset[i] for i in self.indices[start:start + self.batch_size]]
            batch = pad_rows(items, max(len(item["input_ids"]) for item in items), self.dataset.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            with self.runtime.autocast():
                logits = eager(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = next_token_nll(logits, batch["labels"]).double()
            targets = batch["labels"][:, 1:]
            scored = targets != -100
            token_bytes = self.byte_lengths.to(device)[targets.clamp(min=0)] * scored
            nll_sum += float(nll.sum())
            tokens += float(scored.sum())
            text_nll_sum += float((nll * (token_bytes > 0)).sum())
            text_bytes += float(token_bytes.sum())
        model.train(was_training)
        nll_sum, tokens, text_nll_sum, text_bytes = self.runtime.all_reduce(
            [nll_sum, tokens, text_nll_sum, text_bytes]).tolist()
        return {"val_loss": nll_sum / max(tokens, 1.0), "val_bpb": text_nll_sum / (math.log(2) * max(text_bytes, 1.0))}


# ---------------------------------------------------------------------------------------------
# The optimisation core: one optimizer step over a window of micro-batches
# ---------------------------------------------------------------------------------------------

@dataclass
class LossOutput:
    """What a stage's loss function returns for one micro-batch.

    `loss_sum` is summed over `count` units (loss-bearing tokens, preference pairs, response tokens);
    the engine divides by the units of the whole optimizer step, over every micro-batch and process,
    so every unit weighs the same however the batches were cut. `aux_loss` (MoE balance) is a mean
    over the micro-batch, added to each of its units; `metrics` are averaged over the micro-batches.
    """
    loss_sum: torch.Tensor
    count: int
    aux_loss: torch.Tensor | float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


class Batches(Protocol):
    def __iter__(self): ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def estimated_batches_per_epoch(self) -> int: ...


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it at the last step (MiniMind's floor)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def labelled_tokens(batch: dict) -> int:
    """Loss-bearing tokens of a micro-batch, for the `tokens` figure of the metrics: those of every
    `*labels` tensor (`labels`, or DPO's `chosen_labels` and `rejected_labels`)."""
    return sum(int((labels[:, 1:] != -100).sum()) for key, labels in batch.items() if key.endswith("labels"))


def parameter_groups(model: torch.nn.Module, trainable: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight matrices decay; norms, biases and embeddings do not. Decay pulls a
    weight towards 0, which regularises a matrix that mixes features, but for a norm's gain it
    fights the 1 it should sit near, and for an embedding it shrinks rare tokens' rows, which get
    few gradient updates to push back (so the tied output head, the same matrix, is spared too)."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    decayed = [p for p in trainable if p.dim() >= 2 and id(p) not in embeddings]
    decayed_ids = {id(p) for p in decayed}
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": [p for p in trainable if id(p) not in decayed_ids], "weight_decay": 0.0}]


def git_commit() -> str | None:
    """The repo's commit, with "-dirty" when files differ from it; None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def train_record(args: argparse.Namespace, dataset) -> dict:
    """What produced a weight file, saved in its sidecar as `"train_args"`: the command as typed, every
    parsed flag (defaults included), the commit, and the data file with its line count. Rerunning
    `command` at `commit` on that data reproduces the run."""
    data = getattr(dataset, "file", None)
    return {"command": shlex.join([Path(sys.argv[0]).name if sys.argv else "", *sys.argv[1:]]),
            "script": Path(sys.argv[0]).name if sys.argv else None,
            "flags": {key: value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
                      for key, value in vars(args).items()},
            "commit": git_commit(),
            "data": {"path": str(data.path), "lines": len(data)} if data is not None else None}


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (`--deepspeed CONFIG`): the same loop, with optimizer state, gradients and (stage 3)
# weights partitioned over the processes
# ---------------------------------------------------------------------------------------------

def prepare_deepspeed_environment(device: torch.device, world_size: int) -> None:
    """What DeepSpeed reads from the environment, set before it is imported: its CPU backend (gloo)
    on a machine without GPUs, no compiled kernels (`DS_BUILD_OPS=0`: the optimizer is torch's
    AdamW), and the LOCAL_RANK it requires even of a single process."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    if world_size == 1:
        os.environ.setdefault("LOCAL_RANK", "0")


def import_deepspeed():
    """`deepspeed`, told that none of its C++ kernels are available. On the CPU it would otherwise
    JIT-compile a shared-memory all-reduce at start-up (minutes, and a compiler); with none, its
    collectives are torch.distributed's, as under DDP."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    return deepspeed


def deepspeed_config(args: argparse.Namespace, runtime: Runtime) -> dict:
    """The `--deepspeed` JSON with its `"auto"` fields filled from our flags, as Hugging Face's
    Trainer does: micro-batch, accumulation, global batch, clipping, and bf16/fp16 from the dtype.
    A field set to a number must agree with the flag it mirrors. The optimizer (AdamW with our
    parameter groups) and the LR schedule (`cosine_lr`, set before each step) are the engine's, so a
    config that names its own is refused; so is DeepSpeed-managed accumulation, since `train_step`
    decides where a window ends and how its loss is normalised."""
    path = loader.resolve_path(args.deepspeed)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: --deepspeed {path}: {error}")
    from_flags = {
        ("train_micro_batch_size_per_gpu",): args.batch_size,
        ("gradient_accumulation_steps",): args.accumulation_steps,
        ("train_batch_size",): args.batch_size * args.accumulation_steps * runtime.world_size,
        ("gradient_clipping",): args.grad_clip,
        ("bf16", "enabled"): runtime.dtype == torch.bfloat16,
        ("fp16", "enabled"): runtime.dtype == torch.float16,
    }
    for keys, value in from_flags.items():
        section = config
        for key in keys[:-1]:
            section = section.setdefault(key, {})
        if section.get(keys[-1], "auto") == "auto":
            section[keys[-1]] = value
        elif section[keys[-1]] != value:
            sys.exit(f"error: --deepspeed {path}: {'.'.join(keys)} is {section[keys[-1]]}, the flags give {value}; "
                     f"set it to \"auto\"")
    for key in ("optimizer", "scheduler"):
        if key in config:
            sys.exit(f"error: --deepspeed {path}: remove \"{key}\"; the engine's AdamW and LR schedule are used")
    if config.setdefault("managed_gradient_accumulation", False):
        sys.exit(f"error: --deepspeed {path}: managed_gradient_accumulation must be false (the engine ends each window)")
    if config.get("zero_optimization", {}).get("stage") not in (1, 2, 3):
        sys.exit(f"error: --deepspeed {path}: zero_optimization.stage must be 1, 2 or 3")
    left = [key for key, value in config.items() if value == "auto"]
    if left:
        sys.exit(f"error: --deepspeed {path}: no flag fills {left}")
    return config


class ZeroEngine:
    """The DeepSpeed engine under our `Trainer`, which keeps the loop, the loss normalisation, the LR
    schedule and the skip rules, and hands DeepSpeed what it is for: partitioned optimizer state
    (ZeRO-1), gradients (ZeRO-2) and weights (ZeRO-3), and their checkpoints.

    Accumulation is unmanaged: each `backward` only accumulates (ZeRO-2/3 reduce-scatter as they go),
    and `step` is the window's end, however many micro-batches it had."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        self.config = deepspeed_config(args, runtime)
        self.stage = self.config["zero_optimization"]["stage"]
        self.deepspeed = import_deepspeed()
        self.is_main = runtime.is_main

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        return self.engine

    def step(self, gradient_factor: float) -> tuple[bool, float]:
        """Clip and step; returns (applied, grad_norm). The gradients are `1 / gradient_factor` times
        too large (`train_step`'s provisional denominator), which is what a loss scale means to ZeRO's
        optimizer: it divides the gradients by the scale and clips the norm of the result. So the
        scale is divided by the factor for this step and put back after it, keeping any change that
        fp16's dynamic scaler made. ZeRO's optimizer skips a step whose gradients hold inf/NaN, on any
        process, whatever the dtype (a non-finite loss gives such gradients)."""
        optimizer = self.engine.optimizer
        scale = optimizer.loss_scale
        optimizer.loss_scale = scale / gradient_factor
        self.engine.step()
        if optimizer.loss_scale != scale / gradient_factor:  # fp16: halved on overflow, or grown
            scale = optimizer.loss_scale * gradient_factor
        optimizer.loss_scale = scale
        grad_norm = self.engine.get_global_grad_norm()
        return self.engine.was_step_applied(), float("nan") if grad_norm is None else float(grad_norm)

    def gathered(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The whole weights on every process while inside (ZeRO-3 holds a shard of each); entered by
        all processes together."""
        if self.stage != 3:
            return contextlib.nullcontext()
        return self.deepspeed.zero.GatheredParameters(list(module.parameters()))

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step}"

    def save(self, directory: Path, step: int) -> None:
        """DeepSpeed's checkpoint of weights and optimizer state, every process writing its shards, into
        a temporary directory renamed to `step<N>` once all have finished: a `step<N>` is whole."""
        temporary, final = directory / f".{self.tag(step)}.tmp", directory / self.tag(step)
        self.engine.save_checkpoint(str(directory), tag=temporary.name, save_latest=False)
        dist.barrier()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        dist.barrier()

    def load(self, directory: Path, step: int) -> None:
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=self.tag(step), load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            sys.exit(f"error: no DeepSpeed checkpoint {directory / self.tag(step)}")

    def load_on_another_process_count(self, directory: Path, step: int) -> None:
        """Load `step<N>` when it was saved by another number of processes: weights, AdamW's moments
        and step count, through DeepSpeed's universal checkpoint.

        A ZeRO checkpoint holds each process's slice of flat buffers (the fp32 master weights and each
        moment), cut for the process count that saved it, and DeepSpeed's loader refuses another count
        (ZeRO-1/2's elastic format included). `ds_to_universal` joins the slices into one tensor per
        parameter and state, which an engine told `checkpoint.load_universal` cuts again for its own
        count: one path for ZeRO-1, 2 and 3, with the moments (`zero_to_fp32` gives only the weights).
        The engine reads that setting when it loads, so it is switched on for this load only. ZeRO-3's
        universal loader gives every parameter group the hyperparameters of the first (ours differ in
        weight decay) and one step-count tensor for all of them, which AdamW then advances once per
        group at each step (its bias correction would run ahead): each group gets its own back. The
        conversion is a temporary copy of the checkpoint, written by rank 0 and removed once every
        process has loaded it."""
        from deepspeed.checkpoint.ds_to_universal import main as convert_to_universal

        universal = directory / "universal"
        if self.is_main:
            shutil.rmtree(universal, ignore_errors=True)
            conversion = argparse.Namespace(input_folder=str(directory / self.tag(step)),
                                            output_folder=str(universal / self.tag(step)),
                                            num_extract_workers=1, num_merge_workers=1,  # 1 = no worker pool
                                            keep_temp_folder=False, strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(sys.stderr):  # its progress report is not the run's output
                convert_to_universal(conversion)
        dist.barrier()
        groups = self.engine.optimizer.optimizer.param_groups
        hyperparameters = [{key: value for key, value in group.items() if key != "params"} for group in groups]
        self.engine._config.load_universal_checkpoint = True
        try:
            self.load(universal, step)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, own in zip(groups, hyperparameters):
            group.update(own)
        for state in self.engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        dist.barrier()
        if self.is_main:
            shutil.rmtree(universal)

    def prune(self, directory: Path, keep_steps: set[int]) -> None:
        """Remove the checkpoints no resume state points to any more, and what a kill left of a save
        or of a conversion (`load_on_another_process_count`)."""
        if self.is_main:
            for old in [*directory.glob("step*"), *directory.glob(".step*.tmp"), *directory.glob("universal")]:
                if old.name not in {self.tag(step) for step in keep_steps}:
                    shutil.rmtree(old)


class Trainer:
    """Owns the model's optimisation: optimizer, schedule, precision, DDP, logging, checkpoints.

    A loop uses it in four calls (see `train` below, and `trainer/rl.py`):
    `start(batches)` plans the schedule and resumes, `windows(batches)` yields the micro-batches of
    each optimizer step, `train_step(window, loss_fn)` takes that step, `finish()` saves.
    `save_if_due` writes resume checkpoints between windows; `state_objects` ride along in them.
    """

    def __init__(self, args: argparse.Namespace, runtime: Runtime, model: torch.nn.Module, *, tokenizer=None,
                 state_objects: dict[str, Any] | None = None, params: Iterable[torch.nn.Parameter] | None = None,
                 weight_saver: Callable[[torch.nn.Module, Path, dict], None] = save_weights,
                 weights_path: Path | None = None, eval_model: torch.nn.Module | None = None):
        self.args, self.runtime = args, runtime
        self.state_objects = state_objects or {}
        self.weight_saver = weight_saver
        config = unwrap(model).config
        self.stem = weight_stem(config, args.save_weight)
        self.weights_path = weights_path or save_dir(args) / f"{self.stem}.pth"
        self.resume_path = checkpoint_dir(args) / f"{self.stem}_resume.pth"
        self.zero_dir = checkpoint_dir(args) / f"{self.stem}_zero"  # DeepSpeed's checkpoints, under --deepspeed
        trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(model, trainable, args.weight_decay), lr=args.learning_rate)
        self.zero = ZeroEngine(args, runtime) if getattr(args, "deepspeed", None) else None  # DeepSpeed scales fp16 itself
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16 and self.zero is None)
        self.eval_model = eval_model or model
        self.validation = None
        if getattr(args, "eval_data", None):
            if tokenizer is None:
                raise ValueError("--eval_data needs the tokenizer: pass it to Trainer(tokenizer=...)")
            self.validation = Validation(loader.resolve_path(args.eval_data), tokenizer, args.max_seq_len,
                                         args.batch_size, runtime)
        self.model = model
        if args.use_compile == "1":
            self.model = torch.compile(self.model)
        self.compile_decided = args.use_compile != "auto" or getattr(args, "deepspeed", None) is not None
        self.probe_step_seconds: list[float] = []
        if self.zero is not None:
            self.model = self.zero.wrap(self.model, self.optimizer)
        elif runtime.distributed:
            self.model = DistributedDataParallel(self.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        self.step, self.epoch, self.epochs_completed, self.tokens, self.elapsed = 0, 0, 0, 0, 0.0
        self.bad_steps, self.skipped_steps, self.total_steps = 0, 0, 0
        self.logger_id: str | None = None
        self.resumed = False           # a resume checkpoint was loaded
        self.mid_epoch = False         # ... and the data continues where it stopped
        self.saved_step: int | None = None
        self.last_record: dict | None = None
        self.written_step: int | None = None  # the step of the metrics file's last line

    # --- the plan of the run ------------------------------------------------------------------

    def start(self, batches: Batches, steps_per_window: int = 1) -> bool:
        """Plan the LR schedule over every epoch (`steps_per_window` optimizer steps on each window: RL's
        `--ppo_epochs`), resume if asked, open the logs. Returns False (and says so) when the resumed run
        has already trained everything these flags ask for."""
        steps_per_epoch = math.ceil(batches.estimated_batches_per_epoch() / self.args.accumulation_steps)
        self.total_steps = self.args.epochs * steps_per_epoch * steps_per_window
        self.state_objects["data"] = batches  # its position is part of the resume state
        if not getattr(batches, "pack", False):
            self.compile_decided = True  # padded rows change shape every batch: compiling would recompile, not pay
        self.train_args = train_record(self.args, batches.dataset)
        if self.load_resume() and self.complete():
            self.runtime.print(f"{self.stem}: the run is complete ({self.step} steps, {self.epochs_completed} of "
                               f"{self.args.epochs} epoch(s)); nothing to train. Raise --epochs or --max_steps "
                               f"to train on from step {self.step}.")
            self.runtime.close()
            return False
        self.start_logging()
        self.model.train()
        return True

    def compile_if_it_pays(self, step_seconds: float) -> None:
        """`--use_compile auto`: after COMPILE_PROBE_STEPS eager steps (the first, which allocates, not
        counted), compile the model in place if the steps left would save more than compiling costs on
        this device: steps left x eager step time x (1 - 1 / speedup) > compile seconds. Every process
        decides on the slowest process's time, so all compile or none do."""
        if self.compile_decided:
            return
        self.probe_step_seconds.append(step_seconds)
        if len(self.probe_step_seconds) < COMPILE_PROBE_STEPS + 1:
            return
        self.compile_decided = True
        eager = self.runtime.all_reduce(float(np.median(self.probe_step_seconds[1:])), "max").item()
        compile_seconds, speedup = COMPILE_COST.get(self.runtime.device.type, (float("inf"), 1.0))
        left = self.planned_steps() - self.step
        saving = left * eager * (1 - 1 / speedup)
        verdict = "compiling" if saving > compile_seconds else "not compiling"
        self.runtime.print(f"--use_compile auto: {verdict} ({left} steps left at {eager:.2f} s would save about "
                           f"{saving:.0f} s at {speedup}x; compiling costs about {compile_seconds:.0f} s)")
        if saving > compile_seconds:
            unwrap(self.model).compile()

    def planned_steps(self) -> int:
        return min(self.total_steps, self.args.max_steps) if self.args.max_steps else self.total_steps

    def complete(self) -> bool:
        return self.epochs_completed >= self.args.epochs or (self.args.max_steps and self.step >= self.args.max_steps)

    @property
    def done(self) -> bool:
        """`--max_steps` reached (otherwise the run ends when its epochs do)."""
        return bool(self.args.max_steps) and self.step >= self.args.max_steps

    def windows(self, batches: Batches) -> Iterator[list[dict]]:
        """The micro-batches of each optimizer step, `--accumulation_steps` at a time, epoch after
        epoch from where the run stands. Every process gets the same number of windows whatever its
        share of the data: one that runs out ends the epoch for all."""
        for epoch in range(self.epoch, self.args.epochs):
            if not self.mid_epoch:
                batches.set_epoch(epoch)
            self.epoch, self.mid_epoch = epoch, False
            iterator = iter(batches)
            while True:
                window = [batch for batch in (next(iterator, None) for _ in range(self.args.accumulation_steps))
                          if batch is not None]
                if self.runtime.all_reduce(len(window), "min").item() == 0:
                    break
                yield window
            self.epochs_completed = epoch + 1

    # --- the optimizer step -------------------------------------------------------------------

    def train_step(self, window: list[dict], loss_fn: Callable[[torch.nn.Module, dict], LossOutput]) -> bool:
        """One optimizer step over `window`: the gradient of

            sum over micro-batches and processes of (loss_sum + count * aux_loss) / sum of count

        i.e. the mean over every unit of the step, however the units fall into micro-batches.

        The step's units are known only once every micro-batch has been through the model, so the
        micro-batches are backpropagated against a provisional denominator (the first micro-batch's
        units, over all processes, times the window's length: the right one when micro-batches are
        equal) and the gradients corrected by one factor at the end, before clipping. Megatron-LM's
        per-token loss does the same; the provisional scale keeps the gradients the size of a mean,
        which fp16 loss scaling relies on. DDP averages gradients over processes, hence the world
        size in the numerator. Returns whether the optimizer stepped."""
        device, world_size = self.runtime.device, self.runtime.world_size
        loss_total, units, provisional, finite, metric_sums = 0.0, 0, 0.0, True, {}
        for i, batch in enumerate(window):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.runtime.autocast():
                out = loss_fn(self.model, batch)
            if i == 0:
                provisional = max(self.runtime.all_reduce(out.count).item(), 1.0) * len(window)
            loss = (out.loss_sum + out.count * out.aux_loss) * world_size / provisional
            finite &= bool(torch.isfinite(loss))
            self.backward(loss, sync=i == len(window) - 1)
            loss_total += float(out.loss_sum.detach())
            units += out.count
            moe = {"aux_loss": float(torch.as_tensor(out.aux_loss).detach())} if unwrap(self.model).config.use_moe else {}
            for key, value in {**out.metrics, **moe}.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value) / len(window)
        loss_total, units, tokens = self.runtime.all_reduce(
            [loss_total, units, sum(labelled_tokens(batch) for batch in window)]).tolist()
        if self.zero is not None:
            stepped, grad_norm = self.zero_step(finite, provisional / max(units, 1.0))
        else:
            if provisional != max(units, 1.0):  # (fp16's loss-scaled gradients scale linearly too)
                for param in self.trainable_params():
                    if param.grad is not None:
                        param.grad.mul_(provisional / max(units, 1.0))
            stepped, grad_norm = self.optimizer_step(finite)
        if stepped:
            self.log(loss_total / max(units, 1.0), {**metric_sums, "grad_norm": grad_norm}, int(tokens))
        return stepped

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        if self.zero is not None:  # ZeRO reduces at its step; the loss is ours, not divided by the window
            self.model.backward(loss, scale_wrt_gas=False)
            return
        context = contextlib.nullcontext() if sync or not self.runtime.distributed else self.model.no_sync()
        with context:
            self.scaler.scale(loss).backward()

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.args.learning_rate, self.args.warmup_steps)

    def optimizer_step(self, loss_is_finite: bool) -> tuple[bool, float]:
        """Clip and step. Returns (stepped, grad_norm).

        Two reasons to skip a step, counted apart:
        * a NaN/inf loss or gradient on any process is a bad step: skipped, counted in `skipped_steps`
          and in the streak that stops the run after `--max_bad_steps` in a row;
        * under fp16, gradients that overflowed the loss scale are loss scaling doing its job: the
          scaler skips the step and halves its scale. Counted in `skipped_steps`, not in the streak.
        Every process takes the same decision: the loss check is all-reduced, and the gradients
        (hence their norm and the scaler's overflow check) are the same on all after DDP's all-reduce."""
        params = self.trainable_params()
        if self.runtime.all_reduce(float(loss_is_finite), "min").item() == 1.0:
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.unscale_(self.optimizer)
            max_norm = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if self.scaler.is_enabled():
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update itself if the gradients hold inf/NaN
                self.scaler.update()
                overflowed = self.scaler.get_scale() < scale
                healthy = True
            else:
                healthy, overflowed = math.isfinite(grad_norm), False
                if healthy:
                    self.optimizer.step()
        else:
            grad_norm, healthy, overflowed = float("nan"), False, False
        self.optimizer.zero_grad(set_to_none=True)
        return self.count_step(healthy, overflowed), grad_norm

    def count_step(self, healthy: bool, overflowed: bool) -> bool:
        """Count a step that was taken, skipped as bad, or skipped by fp16 loss scaling (see
        `optimizer_step`); stop the run after `--max_bad_steps` bad ones in a row. Returns whether
        the weights moved."""
        if not healthy:
            self.bad_steps += 1
            self.skipped_steps += 1
            self.runtime.print(f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= self.args.max_bad_steps:
                raise RuntimeError(f"{self.bad_steps} non-finite steps in a row: stopping (lower --learning_rate or use --dtype float32)")
            return False
        self.bad_steps = 0
        if overflowed:
            self.skipped_steps += 1
            return False
        self.step += 1
        return True

    def zero_step(self, loss_is_finite: bool, gradient_factor: float) -> tuple[bool, float]:
        """`optimizer_step` under DeepSpeed ZeRO: the same schedule, clipping and skip decisions,
        taken by DeepSpeed's optimizer on its gradient partitions. `gradient_factor` is `train_step`'s
        correction of the provisional denominator, applied before clipping like the DDP path's."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        agreed_finite = self.runtime.all_reduce(float(loss_is_finite), "min").item() == 1.0
        applied, grad_norm = self.zero.step(gradient_factor)
        healthy = agreed_finite and (applied or self.runtime.dtype == torch.float16)
        return self.count_step(healthy, overflowed=agreed_finite and not applied), grad_norm

    # --- logging ------------------------------------------------------------------------------

    def start_logging(self) -> None:
        self.metrics_file = MetricsFile(save_dir(self.args) / f"{self.stem}.metrics.jsonl",
                                        self.step if self.resumed else None) if self.runtime.is_main else None
        self.logger: NullLogger = NullLogger()
        if self.args.use_wandb and self.runtime.is_main:
            self.logger = ExperimentLogger(self.args.wandb_project, self.stem, vars(self.args), self.logger_id,
                                           save_dir(self.args))
            self.logger_id = self.logger.run_id
        self.run_start = time.perf_counter() - self.elapsed
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.progress = tqdm(total=self.planned_steps(), initial=self.step, disable=not self.runtime.is_main,
                             dynamic_ncols=True, desc=self.args.save_weight, unit="step")

    def validation_due(self) -> bool:
        interval = getattr(self.args, "eval_interval", 0)
        return self.validation is not None and (self.step >= self.planned_steps() or
                                                (interval > 0 and self.step % interval == 0))

    def log(self, loss: float, metrics: dict[str, float], window_tokens: int) -> None:
        """Progress bar every step; metrics file + logger every `--log_interval` steps, at every
        validation, and on the last step."""
        self.tokens += window_tokens
        self.window_tokens += window_tokens
        self.elapsed = time.perf_counter() - self.run_start
        now = time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        validated = self.validation(unwrap(self.eval_model)) if self.validation_due() else {}
        self.progress.update(1)
        postfix = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if validated:
            postfix["val"] = f"{validated['val_loss']:.4f}"
        self.progress.set_postfix(postfix, refresh=False)
        record = {"step": self.step, "epoch": self.epoch + 1, "loss": loss, "lr": lr, "tokens": self.tokens,
                  "tokens_per_s": tokens_per_s, "elapsed_s": self.elapsed, "skipped_steps": self.skipped_steps,
                  **metrics, **validated}
        self.last_record = record
        if self.step % self.args.log_interval == 0 or self.step >= self.planned_steps() or validated:
            self.write_record(record)
            self.window_start, self.window_tokens = now, 0

    def write_record(self, record: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(record, replace_last=self.written_step == record["step"])
        self.logger.log(record, record["step"])
        self.written_step = record["step"]

    # --- checkpoints --------------------------------------------------------------------------

    def resume_state(self) -> dict:
        """Everything a resumed run needs. Under ZeRO, weights and optimizer state are in DeepSpeed's
        checkpoint of the same step (`ZeroEngine.save`), which this state names."""
        weights = {"zero_checkpoint": self.step} if self.zero is not None else {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict()}
        return {
            **weights,
            "step": self.step, "epoch": self.epoch, "epochs_completed": self.epochs_completed,
            "epochs": self.args.epochs, "max_steps": self.args.max_steps, "tokens": self.tokens, "elapsed": self.elapsed,
            "skipped_steps": self.skipped_steps, "total_steps": self.total_steps,
            "dtype": str(self.runtime.dtype).removeprefix("torch."),
            "world_size": self.runtime.world_size, "logger_id": self.logger_id,
            "objects": {name: obj.state_dict() for name, obj in self.state_objects.items()},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def rank_resume_path(self, rank: int | None = None) -> Path:
        """Each process saves its own resume state (its RNG and data position differ)."""
        rank = self.runtime.rank if rank is None else rank
        if rank == 0:
            return self.resume_path
        return self.resume_path.with_name(f"{self.resume_path.stem}_rank{rank}.pth")

    def save(self) -> None:
        """Weights for users (rank 0) and each rank's resume state; the state it replaces is kept as
        `*.previous.pth`, for the case where a kill lands between two ranks' saves (see `load_resume`)."""
        if self.step == self.saved_step:
            return
        if self.zero is not None:
            self.zero.save(self.zero_dir, self.step)
        with self.zero.gathered(unwrap(self.model)) if self.zero is not None else contextlib.nullcontext():
            if self.runtime.is_main:
                self.weight_saver(unwrap(self.model), self.weights_path, {"train_args": self.train_args})
        atomic_save(self.resume_state(), self.rank_resume_path(), keep_previous=True)
        self.saved_step = self.step
        if self.runtime.distributed:
            dist.barrier()
        if self.zero is not None:
            self.zero.prune(self.zero_dir, set.union(*self.resume_steps_by_rank()[0]))

    def save_if_due(self, steps_before: int) -> None:
        """Save when the steps since `steps_before` crossed a multiple of `--save_interval`. Called
        between windows only, so a resumed run never needs a window (an RL rollout) that was not saved."""
        if self.step // self.args.save_interval > steps_before // self.args.save_interval:
            self.save()

    def finish(self) -> None:
        if self.validation is not None and self.last_record and "val_loss" not in self.last_record:
            # the epochs ended before the planned last step: validate the final weights now
            self.write_record({**self.last_record, **self.validation(unwrap(self.eval_model))})
        elif self.last_record and self.written_step != self.step:
            self.write_record(self.last_record)  # the last step is always in the metrics
        self.save()
        self.progress.close()
        self.logger.finish()
        self.runtime.print(f"saved {self.weights_path} after {self.step} steps, {self.tokens:,} loss-bearing tokens, "
                           f"{self.elapsed:.0f}s")
        self.runtime.close()

    def resume_steps_by_rank(self) -> tuple[list[set[int]], dict[int, Path]]:
        """The steps each rank holds a resume state for (in its current or previous file), and this
        rank's files by step."""
        path = self.rank_resume_path()
        mine = {}
        for candidate in (path, previous_version(path)):
            if candidate.exists():  # mmap: only the step is read, not the tensors
                mine.setdefault(torch.load(candidate, map_location="cpu", weights_only=False, mmap=True)["step"], candidate)
        table = torch.full((self.runtime.world_size, 2), -1.0)
        table[self.runtime.rank, :len(mine)] = torch.tensor(sorted(mine), dtype=torch.float64)
        table = self.runtime.all_reduce(table.to(self.runtime.device), "max").cpu()
        return [set(row[row >= 0].long().tolist()) for row in table], mine

    def agreed_resume_file(self) -> Path | None:
        """The resume file to load: the latest step for which every rank holds a state. Ranks save one
        after another, so a kill can leave rank 0 at step 20 and rank 1 still at step 10; each rank
        then has step 10 in its current or its previous file, and all of them go back to it."""
        held, mine = self.resume_steps_by_rank()
        path = self.rank_resume_path()
        if not set.union(*held):
            self.runtime.print(f"--from_resume 1: no resume checkpoint at {path}, starting fresh")
            return None
        common = set.intersection(*held)
        if not common:
            sys.exit(f"error: no step for which every process has a resume state in {path.parent} "
                     f"(steps per rank: {[sorted(steps) for steps in held]}); remove them to start fresh")
        step = max(common)
        if step != max(set.union(*held)):
            self.runtime.print(f"the processes' latest resume states differ (steps per rank: "
                               f"{[sorted(steps) for steps in held]}); all go back to step {step}")
        return mine[step]

    def saved_process_count(self) -> int | None:
        """How many processes wrote rank 0's latest resume state; None when there is none."""
        for candidate in (self.resume_path, previous_version(self.resume_path)):
            if candidate.exists():
                return torch.load(candidate, map_location="cpu", weights_only=False, mmap=True)["world_size"]
        return None

    def resume_files_of_every_rank(self, world_size: int) -> list[Path]:
        """The resume file of each rank of a run on `world_size` processes, at the latest step all of
        them hold (`agreed_resume_file`'s rule, read here from every rank's files: a run continuing on
        another process count needs all of them)."""
        held = []
        for rank in range(world_size):
            path = self.rank_resume_path(rank)
            held.append({torch.load(candidate, map_location="cpu", weights_only=False, mmap=True)["step"]: candidate
                         for candidate in (previous_version(path), path) if candidate.exists()})
        common = set.intersection(*(set(files) for files in held))
        if not common:
            sys.exit(f"error: no step for which every one of the {world_size} saved processes has a resume state "
                     f"in {self.resume_path.parent}")
        return [files[max(common)] for files in held]

    def continue_on_another_process_count(self, states: list[dict]) -> None:
        """Take over a run saved by `len(states)` processes (one resume state per rank) on this run's
        count, as MiniMind does: the saved step becomes the number of steps the same rows take here
        (a step takes world_size x batch x accumulation rows), so the LR schedule, planned over this
        count's steps, stands where it stood; the data goes on with the items no saved rank trained
        (`PackedBatches.load_rank_states`); rank r takes saved rank r's RNG and other state objects,
        and a rank the saved run did not have keeps its fresh seed."""
        saved = len(states)
        self.step = self.step * saved // self.runtime.world_size
        self.state_objects["data"].load_rank_states([state["objects"]["data"] for state in states])
        mine = states[min(self.runtime.rank, saved - 1)]
        for name, obj in self.state_objects.items():
            if name != "data":
                obj.load_state_dict(mine["objects"][name])
        if self.runtime.rank < saved:
            self.restore_rng(mine["rng"])
        self.runtime.print(f"the run was saved by {saved} process(es), this one has {self.runtime.world_size}: "
                           f"its step {states[0]['step']} is step {self.step} here, and the epoch goes on with the "
                           f"documents no process has trained")

    @staticmethod
    def restore_rng(rng: dict) -> None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def load_resume(self) -> bool:
        """Load the resume checkpoint if `--from_resume 1` and one exists (never a half-written one:
        saves are atomic renames, and only the final names are read). A run asked for more epochs
        than it was saved with keeps its step and plans the LR schedule over the new length."""
        if not self.args.from_resume:
            return False
        saved_world_size = self.saved_process_count()
        moved = saved_world_size not in (None, self.runtime.world_size)  # saved on another process count
        rank_files = self.resume_files_of_every_rank(saved_world_size) if moved else []
        path = rank_files[0] if moved else self.agreed_resume_file()
        if path is None:
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if ("zero_checkpoint" in state) != (self.zero is not None):
            sys.exit(f"error: {path} was written {'with' if 'zero_checkpoint' in state else 'without'} --deepspeed; "
                     f"resume it the same way")
        if self.zero is not None and moved:
            self.zero.load_on_another_process_count(self.zero_dir, state["zero_checkpoint"])
        elif self.zero is not None:
            self.zero.load(self.zero_dir, state["zero_checkpoint"])
        else:
            unwrap(self.model).load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "epoch", "tokens", "elapsed", "skipped_steps"):
            setattr(self, key, state[key])
        saved_epochs = state.get("epochs", self.args.epochs)
        if saved_epochs == self.args.epochs and not moved:
            self.total_steps = state["total_steps"]
        self.epochs_completed = state.get("epochs_completed", 0)
        self.logger_id = state["logger_id"]
        if moved:
            self.continue_on_another_process_count(
                [state, *(torch.load(file, map_location="cpu", weights_only=False) for file in rank_files[1:])])
        else:
            for name, obj in self.state_objects.items():
                obj.load_state_dict(state["objects"][name])
            self.restore_rng(state["rng"])
        if state["dtype"] != str(self.runtime.dtype).removeprefix("torch."):
            self.runtime.print(f"note: resuming a {state['dtype']} run in {self.runtime.dtype}")
        self.mid_epoch = self.epochs_completed <= self.epoch
        if not self.mid_epoch:  # the saved epoch had ended: the next one starts from its beginning
            self.epoch = self.epochs_completed
        self.runtime.print(f"resumed from {path} at step {self.step} (epoch {min(self.epoch, self.args.epochs - 1) + 1})")
        saved_max_steps = state.get("max_steps", 0)
        finished = self.epochs_completed >= saved_epochs or bool(saved_max_steps and self.step >= saved_max_steps)
        if finished and not self.complete():
            self.runtime.print(f"the saved run had finished (--epochs {saved_epochs}, --max_steps {saved_max_steps}); "
                               f"these flags ask for more (--epochs {self.args.epochs}, --max_steps {self.args.max_steps}): "
                               f"training on from step {self.step}")
        self.resumed = True
        self.saved_step = self.step
        return True


# ---------------------------------------------------------------------------------------------
# The supervised loop, and the loss of every next-token stage
# ---------------------------------------------------------------------------------------------

def train(trainer: Trainer, batches: Batches, loss_fn: Callable[[torch.nn.Module, dict], LossOutput]) -> None:
    """Epochs of: take `--accumulation_steps` micro-batches, one optimizer step on the mean of their
    loss, a checkpoint every `--save_interval` steps; stop at `--max_steps` if set."""
    if not trainer.start(batches):
        return
    for window in trainer.windows(batches):
        steps_before, started = trainer.step, time.perf_counter()
        trainer.train_step(window, loss_fn)
        trainer.compile_if_it_pays(time.perf_counter() - started)
        trainer.save_if_due(steps_before)
        if trainer.done:
            break
    trainer.finish()


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> LossOutput:
    """Summed next-token cross-entropy over labelled tokens (the model's `next_token_nll`): the loss of
    pretraining and SFT.

    Only the positions that predict a labelled token go through the vocabulary head (`logits_to_keep`
    as a mask): the same sum as over all logits, without the head's matmul and softmax on prompt
    tokens, which are 85% of the demo SFT data's tokens."""
    scored = batch["labels"][:, 1:] != -100
    predicts = torch.nn.functional.pad(scored, (0, 1))  # position t predicts token t + 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), logits_to_keep=predicts)
    loss_sum = next_token_nll(out.logits, batch["labels"], reduction="sum", kept=predicts)
    return LossOutput(loss_sum=loss_sum, count=int(scored.sum()), aux_loss=out.aux_loss)


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t] | tokens before t) for t >= 1, shape (B, T - 1), and 0 where the label is -100:
    the per-token log-likelihoods that DPO sums and RL ratios compare."""
    return -next_token_nll(logits, labels)


def train_language_model(args: argparse.Namespace, dataset_class: type, data_file: str, demo_file: str,
                         loss_fn: Callable[[torch.nn.Module, dict], LossOutput] = causal_lm_loss,
                         prepare_model: Callable[[torch.nn.Module, Runtime], dict[str, Any]] | None = None,
                         dataset_options: dict[str, Any] | None = None) -> None:
    """The recipe of every next-token stage (pretraining, SFT, reasoning, LoRA): data -> model -> train.
    `prepare_model(model, runtime)`, if given, changes the loaded model before training (LoRA adds
    adapters) and returns extra `Trainer` arguments: which `params` train, the `weight_saver`, ...
    `dataset_options` are the stage's own arguments of its dataset class (SFT: `history_mode`)."""
    data_path = resolve_data_path(args, data_file, demo_file)
    runtime = setup_runtime(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    model = load_model(args, runtime)
    trainer_options = prepare_model(model, runtime) if prepare_model else {}
    dataset = open_dataset(dataset_class, data_path, tokenizer, args.max_seq_len, runtime, **(dataset_options or {}))
    train_on(dataset, args, runtime, model, tokenizer, loss_fn, **trainer_options)


def train_on(dataset, args: argparse.Namespace, runtime: Runtime, model: torch.nn.Module, tokenizer,
             loss_fn: Callable[[torch.nn.Module, dict], LossOutput], **trainer_options: Any) -> None:
    """A supervised stage's last step: batches of `dataset`, a `Trainer` for `model`, the loop."""
    train(Trainer(args, runtime, model, tokenizer=tokenizer, **trainer_options), lm_batches(args, runtime, dataset), loss_fn)
