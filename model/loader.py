"""Load a chat model with its tokenizer, and chat with it: the one loader that `eval_llm.py`, the
OpenAI-compatible server and the web demo share, so all three accept the same `--load_from`:

* `model` (the original MiniMind's meaning): native weights `<save_dir>/<weight>_<hidden>[_moe].pth`;
* a `.pth` file: a MiniMind state dict, its config read from the `<stem>.json` sidecar our trainers
  write beside it, else built from `--preset` / the size flags (the original's released `.pth` files
  come without one);
* an HF directory whose `config.json` says `"model_type": "minimind"` (ours from `save_pretrained`,
  or a released MiniMind2 / minimind-3 one): loaded with our own `MiniMindForCausalLM`;
* any other transformers causal-LM directory with a chat template (e.g. Qwen2.5-0.5B-Instruct):
  loaded with `AutoModelForCausalLM`.

Weights load strictly: a missing, unexpected or misshapen tensor is an error naming the file, never a
silently random layer. Default paths (`out/`, `model/`) are relative to the repo root, paths a user
passes are relative to the working directory.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from model.chat_format import Message, render_prompt
from model.cli import add_switch
from model.generate import Decoder, Sampling, Sequence, TextStream, generate
from model.model_lora import load_lora, merge_lora
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import read_weights, sidecar_path

REPO_ROOT = Path(__file__).resolve().parents[1]
NATIVE = "model"  # `--load_from model`: read <save_dir>/<weight>_<hidden>[_moe].pth
DEFAULT_SAVE_DIR = "out"
BUNDLED_TOKENIZER = REPO_ROOT / "model"


# ---------------------------------------------------------------------------------------------
# Paths, device, dtype
# ---------------------------------------------------------------------------------------------

def resolve_path(path: str | Path, default: str | None = None) -> Path:
    """A flag's default (`out`) is relative to the repo root, so scripts work from any directory;
    anything else the user typed is relative to where they are."""
    if default is not None and str(path) == default:
        return REPO_ROOT / default
    return Path(path).expanduser().resolve()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU by 25% or more. Measured, not guessed from flags:
    with AMX they run ~5x faster, with AVX512-BF16 alone anywhere from 2x faster to slower than fp32,
    and with AVX2 alone ~400x slower."""
    a32, b32 = torch.randn(512, 1024), torch.randn(1024, 1024)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best_of(a: torch.Tensor, b: torch.Tensor) -> float:
        a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_of(a16, b16) * 1.25 < best_of(a32, b32)


def add_device_args(group: argparse._ActionsContainer) -> None:
    """`--device` and `--dtype`, declared once for the trainers and the chat programs (`resolve_device`,
    `resolve_dtype`)."""
    group.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto = bf16 on CUDA (fp16 on a card without it), fp16 on MPS, bf16 on a CPU where it "
                            "measures faster than fp32, else fp32")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The one dtype policy, for training and inference alike. `auto`: bf16 on CUDA (fp16 where the
    card has no bf16; training then scales the loss), fp16 on MPS (the same loss scaling), and on CPU
    bf16 only where it measures faster than fp32, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and cpu_bf16_is_faster():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Native weights: <name>_<hidden>[_moe].pth + <same stem>.json
# ---------------------------------------------------------------------------------------------

def size_config(hidden_size: int = 512, num_hidden_layers: int = 8, use_moe: bool = False,
                preset: str | None = None) -> MiniMindConfig:
    """The config the size flags describe; a preset overrides them."""
    if preset:
        return MiniMindConfig(**PRESETS[preset])
    return MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe))


def add_size_args(group: argparse._ActionsContainer, prefix: str = "", *, hidden_size: int = 512,
                  num_hidden_layers: int = 8, help_suffix: str = "") -> None:
    """The model-size flags, declared once for every script: `--{prefix}preset`, `--{prefix}hidden_size`,
    `--{prefix}num_hidden_layers`, `--{prefix}use_moe` (the distillation teacher's have prefix `teacher_`)."""
    group.add_argument(f"--{prefix}preset", default=None, choices=sorted(PRESETS),
                       help=f"a named size; overrides the size flags below{help_suffix}")
    group.add_argument(f"--{prefix}hidden_size", type=int, default=hidden_size)
    group.add_argument(f"--{prefix}num_hidden_layers", type=int, default=num_hidden_layers)
    add_switch(group, f"--{prefix}use_moe", help="1 = the mixture-of-experts layout")


def size_from_args(args: argparse.Namespace, prefix: str = "") -> MiniMindConfig:
    """The config of the size flags `add_size_args(..., prefix)` declared."""
    value = lambda name: getattr(args, f"{prefix}{name}")
    return size_config(value("hidden_size"), value("num_hidden_layers"), bool(value("use_moe")), value("preset"))


def weight_file_name(weight: str, config: MiniMindConfig) -> str:
    """MiniMind's file naming: full_sft_512.pth, pretrain_640_moe.pth, ..."""
    return f"{weight}_{config.hidden_size}{'_moe' if getattr(config, 'use_moe', False) else ''}.pth"


def lora_file(name: str, config, save_dir: str | Path = DEFAULT_SAVE_DIR) -> Path:
    """Where LoRA adapters live: <save_dir>/lora/<name>_<hidden>[_moe].pth (with their .json config)."""
    return resolve_path(save_dir, DEFAULT_SAVE_DIR) / "lora" / weight_file_name(name, config)


def load_pth(path: Path, fallback_config: MiniMindConfig, inference_rope_scaling: bool = False) -> MiniMindForCausalLM:
    """A MiniMind model with the weights of `path`, built from its sidecar's config, else from
    `fallback_config`; strictly loaded."""
    state, config, extra = read_weights(path)
    config_source = f"its sidecar {sidecar_path(path).name}" if config else "--preset / the size flags (no sidecar)"
    config = config or fallback_config
    if inference_rope_scaling:
        config.inference_rope_scaling = True
    model = MiniMindForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_problems = str(error).split("\n\t")[1:3]
        raise ValueError(f"{path} does not fit the model described by {config_source} "
                         f"(hidden {config.hidden_size}, {config.num_hidden_layers} layers, moe={config.use_moe}): "
                         f"{' '.join(first_problems)} — pass the right --preset or --hidden_size/--num_hidden_layers/--use_moe"
                         ) from None
    model.name_or_path = str(path)
    model.train_args = extra.get("train_args")  # what trained it, when a trainer of ours wrote it
    return model


# ---------------------------------------------------------------------------------------------
# HF directories
# ---------------------------------------------------------------------------------------------

def load_hf_directory(directory: Path, dtype: torch.dtype, inference_rope_scaling: bool = False) -> PreTrainedModel:
    """Ours and released MiniMind directories with our class; anything else with AutoModelForCausalLM."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: {directory} is not a transformers model directory")
    if json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == MiniMindConfig.model_type:
        extra = {"inference_rope_scaling": True} if inference_rope_scaling else {}
        model, info = MiniMindForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True, **extra)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
    problems = {key: sorted(info[key])[:3] for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"weights in {directory} do not fit its config.json: {problems}")
    return model


# How text is cut into pieces before BPE merges within them (trainer/train_tokenizer.py --split). GPT-2's split (MiniMind's tokenizer) keeps a
# run of digits together, so BPE learns "31" and " 30" as unrelated tokens and every sum or successor is a
# fact to memorise; Qwen2's split (the same regex otherwise) makes each digit its own piece, so "30" -> "31"
# is "copy 3, add one to 0" and arithmetic can be learnt digit by digit. llama.cpp knows both (pre `gpt-2`,
# `qwen2`), so either exports to GGUF.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")



def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists()


def load_tokenizer(tokenizer_path: str | Path | None = None, model_directory: Path | None = None) -> PreTrainedTokenizerBase:
    """`tokenizer_path` if given; else the model directory's own tokenizer; else the bundled one."""
    if tokenizer_path is not None:
        path = resolve_path(tokenizer_path, default=NATIVE)
        if not path.is_dir():
            raise FileNotFoundError(f"--tokenizer_path {tokenizer_path}: {path} is not a directory")
    elif model_directory is not None and has_tokenizer(model_directory):
        path = model_directory
    else:
        path = BUNDLED_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # many instruct models ship without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# int8 weights
# ---------------------------------------------------------------------------------------------

class Int8Linear(torch.nn.Module):
    """A linear layer whose weight is stored as int8 with one scale per output row (symmetric:
    w ~ scale * round(w / scale), scale = max|w_row| / 127). Decoding one token reads every weight
    once, so on a CPU its speed is set by the bytes streamed from memory: int8 is a quarter of fp32.
    The matmul is torch's CPU kernel for int8 weights (`_weight_int8pack_mm`, as gpt-fast uses), which
    is fast with bf16 activations and bf16 scales; the output goes back to the input's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.bfloat16())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).bfloat16()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Every linear layer of `model` as an `Int8Linear` (the tied lm_head gets an int8 copy; the
    embedding, a lookup, stays as it is). Weight-only: activations, norms and the cache keep their dtype."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    model.quantized = "int8"
    return model


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------

def locate(load_from: str, weight: str, save_dir: str | Path, size: MiniMindConfig) -> Path:
    """The file or directory `--load_from` names, or a FileNotFoundError saying what was looked for."""
    if load_from == NATIVE:
        directory = resolve_path(save_dir, DEFAULT_SAVE_DIR)
        path = directory / weight_file_name(weight, size)
        if not path.exists():
            found = sorted(p.name for p in directory.glob("*.pth")) if directory.is_dir() else []
            raise FileNotFoundError(
                f"{path} not found (--load_from model reads <save_dir>/<weight>_<hidden>[_moe].pth; "
                f"--weight {weight}, hidden {size.hidden_size}{', moe' if size.use_moe else ''}). "
                + (f"In {directory}: {', '.join(found)}." if found else
                   "Train one first (python trainer/train_pretrain.py, then trainer/train_full_sft.py), "
                   "or point --load_from at a .pth file or an HF directory."))
        return path
    path = resolve_path(load_from)
    if not path.exists():
        raise FileNotFoundError(f"--load_from {load_from}: {path} not found (expected 'model', a .pth file or an HF directory)")
    if path.is_file() and path.suffix != ".pth":
        raise ValueError(f"--load_from {load_from}: {path} is neither a .pth file nor a directory")
    return path


def load_model_and_tokenizer(load_from: str = NATIVE, *, weight: str = "full_sft", save_dir: str | Path = DEFAULT_SAVE_DIR,
                             hidden_size: int = 512, num_hidden_layers: int = 8, use_moe: bool = False,
                             preset: str | None = None, inference_rope_scaling: bool = False,
                             tokenizer_path: str | Path | None = None, device: str = "auto",
                             dtype: str = "auto", lora_weight: str | None = None, quantize: str = "none"
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model in eval mode on its device and dtype, and its tokenizer (see the module docstring for
    what `load_from` may name), with the LoRA adapter `lora_weight` merged in if given, and its
    linear layers in int8 with `quantize="int8"` (CPU only). The size
    arguments only matter for a `.pth` without sidecar and for the file name under `--load_from model`."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    size = size_config(hidden_size, num_hidden_layers, use_moe, preset)
    source = locate(load_from, weight, save_dir, size)
    if source.is_dir():
        model = load_hf_directory(source, torch_dtype, inference_rope_scaling)
        tokenizer = load_tokenizer(tokenizer_path, source)
    else:
        model = load_pth(source, size, inference_rope_scaling)
        tokenizer = load_tokenizer(tokenizer_path)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embeddings: "
                         f"pass the model's own tokenizer with --tokenizer_path")
    if lora_weight and lora_weight.lower() != "none":
        model = merge_lora_weight(model, lora_weight, save_dir)
    model = model.to(torch_device, torch_dtype).eval()
    if quantize == "int8":
        if torch_device.type != "cpu":
            raise ValueError(f"--quantize int8 is for the CPU (torch's int8 weight kernel), not {torch_device}")
        model = quantize_int8(model)
    return model, tokenizer


def merge_lora_weight(model: PreTrainedModel, lora_weight: str, save_dir: str | Path = DEFAULT_SAVE_DIR) -> PreTrainedModel:
    """`--lora_weight`: an adapter by name (<save_dir>/lora/<name>_<hidden>[_moe].pth, as
    trainer/train_lora.py writes it), a `.pth` path, or a PEFT adapter directory, merged into the
    model's weights: the logits of base + adapter at the speed of the base model."""
    is_path = lora_weight.endswith(".pth") or Path(lora_weight).is_dir()
    path = resolve_path(lora_weight) if is_path else lora_file(lora_weight, model.config, save_dir)
    if not path.exists():
        raise FileNotFoundError(f"--lora_weight {lora_weight}: {path} not found "
                                f"(expected a name in <save_dir>/lora, a .pth file or a PEFT adapter directory)")
    dtype = model.dtype  # merged in fp32, so that only the merged weights are rounded, once
    load_lora(model.float(), path)
    return merge_lora(model).to(dtype)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a model, shared by every script that chats with one."""
    group = parser.add_argument_group("model")
    group.add_argument("--load_from", default=NATIVE,
                       help="'model' = native weights <save_dir>/<weight>_<hidden>[_moe].pth; or a .pth path; "
                            "or an HF directory (ours, a released MiniMind one, or any transformers chat model)")
    group.add_argument("--weight", default="full_sft", help="weight name under --load_from model (pretrain, full_sft, dpo, reason, grpo, ...)")
    group.add_argument("--lora_weight", default=None,
                       help="a LoRA adapter merged into the model: a name in <save_dir>/lora (<name>_<hidden>[_moe].pth, "
                            "e.g. lora_identity), a .pth path, or a PEFT adapter directory (default: none)")
    group.add_argument("--save_dir", default=DEFAULT_SAVE_DIR, help="where --load_from model looks (default: <repo>/out)")
    add_size_args(group, help_suffix=" (they matter for a .pth without .json sidecar, and for the file name "
                                     "under --load_from model)")
    add_switch(group, "--inference_rope_scaling", help="1 = YaRN: 16x longer context than trained (MiniMind models)")
    group.add_argument("--tokenizer_path", default=None, help="HF tokenizer directory (default: the model directory's own, else <repo>/model)")
    add_device_args(group)
    group.add_argument("--quantize", default="none", choices=["none", "int8"],
                       help="int8 = weight-only int8 linear layers on the CPU: a quarter of fp32's bytes per token")
    group.add_argument("--system_prompt", default=None, help="persona as a system message (default: the chat template's own)")


def load_from_args(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model_and_tokenizer(
        args.load_from, weight=args.weight, save_dir=args.save_dir, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe), preset=args.preset,
        inference_rope_scaling=bool(args.inference_rope_scaling), tokenizer_path=args.tokenizer_path,
        device=args.device, dtype=args.dtype, lora_weight=args.lora_weight, quantize=args.quantize)


def describe(model: PreTrainedModel) -> str:
    """One line for a log: where the model came from, what it is, where it runs."""
    parameters = sum(p.numel() for p in model.parameters())
    parameters += sum(b.numel() for name, b in model.named_buffers() if name.endswith("weight_int8"))
    weights = "int8 linear layers, " if getattr(model, "quantized", None) else ""
    return (f"{model.name_or_path}: {type(model).__name__}, {parameters / 1e6:.2f}M parameters, "
            f"{weights}{str(model.dtype).removeprefix('torch.')} on {model.device}")


def describe_training(model: PreTrainedModel) -> str | None:
    """How the weights were trained, from their sidecar's `train_args` (None when it has none): the
    command to rerun, the commit it ran at, and the data it read."""
    record = getattr(model, "train_args", None)
    if not record:
        return None
    data = record.get("data") or {}
    data_text = f"; data {data['path']} ({data['lines']:,} lines)" if data else ""
    return f"trained by: {record['command']} (commit {record.get('commit') or 'unknown'}{data_text})"


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def context_length(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the model's generation config's (some list several) and the tokenizer's eos."""
    configured = model.generation_config.eos_token_id
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def chat_sequence(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int], *,
                  max_new_tokens: int, temperature: float = 0.85, top_p: float = 0.85, top_k: int = 0,
                  repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> Sequence:
    """A reply for model/generate.py's decoder, with every sampling setting stated here (none inherited
    from a model's generation_config.json): it ends at the model's end-of-turn ids, its text before
    the first `stop` string. temperature 0 = greedy; top_k 0 = no top-k cut. `seed` gives it a
    generator of its own, so that a seeded reply repeats whatever else the decoder runs beside it."""
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None and temperature > 0 else None
    return Sequence(prompt, max_new_tokens, Sampling(temperature, top_k, top_p, repetition_penalty),
                    frozenset(stop_token_ids(model, tokenizer)), generator, TextStream(tokenizer, stop))


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """Replies to a left-padded batch of prompts through the decode loop, in the shape transformers'
    `generate` returns: the prompts, then each row's tokens up to its end-of-turn id, padded after it.
    temperature 0 = greedy; sampling draws from torch's global generator."""
    return generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                    sampling=Sampling(temperature, top_k, top_p), stop_ids=tuple(stop_token_ids(model, tokenizer)),
                    pad_token_id=tokenizer.pad_token_id)


class ChatStream:
    """One reply, as text pieces while the model writes it (iterate once). Afterwards:
    `prompt_tokens`, `completion_ids` and `completion_tokens` (generated tokens, not counting the
    end-of-turn token) and `finish_reason`: "stop" (end of turn or a stop string), "length"
    (max_new_tokens reached) or "cancelled". The text ends before the first stop string. To stop
    early, `close()` it or iterate inside `with`: the next token is then never computed."""

    def __init__(self, model: PreTrainedModel, sequence: Sequence):
        self.model, self.sequence = model, sequence
        self._pieces = self._run()

    @property
    def prompt_tokens(self) -> int:
        return len(self.sequence.prompt)

    @property
    def completion_ids(self) -> list[int]:
        return self.sequence.completion

    @property
    def completion_tokens(self) -> int:
        return len(self.sequence.completion)

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> Iterator[str]:
        # A piece is handed over between two decode steps, so the caller prints (or sends) it
        # before the next token is computed, and leaving the loop stops the decoding there.
        sequence = self.sequence
        decoder = Decoder(self.model, slots=1, capacity=len(sequence.prompt) + sequence.max_new_tokens)
        try:
            decoder.add([sequence])
            while True:
                piece = sequence.text.take()
                if piece:
                    yield piece
                if not decoder.running:
                    return
                decoder.step()
        finally:
            decoder.finish(sequence)  # "cancelled" when the reader left early; a no-op once ended


def chat_stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[Message], *,
                max_new_tokens: int = 512, temperature: float = 0.85, top_p: float = 0.85, top_k: int = 0,
                repetition_penalty: float = 1.0, enable_thinking: bool | None = None,
                tools: list[dict] | None = None, seed: int | None = None, stop: list[str] | None = None) -> ChatStream:
    """Answer the conversation `messages` (already fitted to the context, see `chat_format.fit_history`),
    streaming text pieces. temperature 0 = greedy; `seed` makes sampling repeatable; the reply
    ends before the first of the `stop` strings."""
    prompt = render_prompt(tokenizer, messages, enable_thinking=enable_thinking, tools=tools)
    sequence = chat_sequence(model, tokenizer, tokenizer(prompt, add_special_tokens=False).input_ids,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    return ChatStream(model, sequence)
