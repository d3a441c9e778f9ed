"""Convert a MiniMind model between its native `.pth` weights and transformers directories.

    python scripts/convert_model.py out/full_sft_512.pth hf/minimind2-small              # ours (any layout, MoE too)
    python scripts/convert_model.py out/full_sft_768.pth hf/minimind2-llama --to llama   # plain LlamaForCausalLM
    python scripts/convert_model.py out/full_sft_768.pth hf/minimind3-qwen3 --to qwen3   # plain Qwen3ForCausalLM
    python scripts/convert_model.py hf/minimind2-llama out/full_sft_768.pth              # back to .pth + .json sidecar
    python scripts/convert_model.py MiniMind2.pth hf/MiniMind2 --preset minimind2        # a .pth without sidecar
    python scripts/convert_model.py out/full_sft_512.pth out/identity_512.pth --to pth --merge_lora lora_identity
    python scripts/convert_model.py out/lora/lora_identity_512.pth hf/lora_identity --to peft  # a LoRA adapter for PEFT
    python scripts/convert_model.py out/full_sft_512.pth gguf/minimind.gguf --to gguf --outtype q8_0 --ollama 1

The source is a `.pth` (its config from the `<stem>.json` sidecar, else from --preset or the size
flags) or an HF directory: ours, a released MiniMind2 / minimind-3 one, or a Llama / Qwen3 one this
script wrote. `--to` picks what is written; it defaults to `hf` for a `.pth` and to `pth` for a directory.

* `hf`: our `MiniMindForCausalLM`. `config.json` carries an `auto_map` and `model_minimind.py` is
  copied beside the weights, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
  and `pipeline("text-generation", model=dir, trust_remote_code=True)` work without this repo.
* `llama`: transformers' own `LlamaForCausalLM`, for the MiniMind2 dense layout; `qwen3`: its
  `Qwen3ForCausalLM`, for the minimind-3 dense layout (q/k RMSNorm, explicit head_dim). Tools that only
  know those architectures (vLLM, llama.cpp's converter, ...) load these without remote code. The
  state-dict names are already Llama's / Qwen3's, so only the config is translated; YaRN
  (`inference_rope_scaling`) becomes `rope_parameters = {"rope_type": "yarn", ...}`.
* `gguf`: one file for llama.cpp and ollama (scripts/gguf_export.py says how our layouts map onto
  llama.cpp's `llama`, `qwen3` and `qwen3moe`), its matrices stored as `--outtype` f32, f16, bf16,
  q8_0 or q4_0, with the tokenizer and chat template inside. `--ollama 1` also writes a `Modelfile`
  beside it (`ollama create minimind -f Modelfile`), with `--system_prompt` as its SYSTEM.
* `pth`: the trainers' format, a state dict plus the config as `<stem>.json`.
* `peft`: the source is a LoRA adapter (`out/lora/<name>_<hidden>.pth` from trainer/train_lora.py, or
  the original's), written as PEFT's `adapter_config.json` + `adapter_model.safetensors`, for
  `PeftModel.from_pretrained(base, dir)` on the `hf` / `llama` / `qwen3` directory of its base model.

`--merge_lora` adds a LoRA adapter into the weights before they are written (W + alpha/r * B A): one
model that answers as base + adapter, at the base model's speed, loadable where adapters are not.

Every HF directory gets the tokenizer (bundled `model/`, or --tokenizer_path) with its chat template,
and a `generation_config.json` (bos 1, eos 2, pad 0; sampling at temperature 0.85, top-p 0.85, as
`eval_llm.py`). `--dtype auto` keeps the precision the source is stored in, so a conversion changes
no weight (the trainers' `.pth` files are float16, as MiniMind's releases); converting there and back
gives tensors equal to the original's, byte for byte.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
                          Qwen3Config, Qwen3ForCausalLM)

from model import loader
from model.cli import add_switch
from model.model_lora import read_lora, write_peft
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import sidecar_path, write_weights
from scripts import gguf_export

TARGETS = ("hf", "llama", "qwen3", "pth", "peft", "gguf")
DTYPES = ("auto", "float16", "bfloat16", "float32")
# Sampling defaults written into generation_config.json: those of eval_llm.py and the web demo.
SAMPLING = dict(do_sample=True, temperature=0.85, top_p=0.85, max_new_tokens=512)


# ---------------------------------------------------------------------------------------------
# Reading: any source becomes a MiniMindForCausalLM and the dtype its weights were stored in
# ---------------------------------------------------------------------------------------------

def minimind_config_from(config: PretrainedConfig) -> MiniMindConfig:
    """The MiniMind config of a Llama / Qwen3 config this script (or anyone, for the same layout) wrote."""
    problems = [f"{name}={getattr(config, name)}" for name in ("attention_bias", "mlp_bias", "use_sliding_window")
                if getattr(config, name, False)]
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    rope = dict(config.rope_parameters or {"rope_type": "default"})
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        problems.append(f"rope_type={rope['rope_type']!r}")
    yarn = rope.get("rope_type") == "yarn"
    if yarn:
        expected = MiniMindConfig(inference_rope_scaling=True).yarn
        if any(float(rope.get(key, -1)) != value for key, value in expected.items()):
            problems.append(f"YaRN parameters {rope} (MiniMind's are {expected})")
    if problems:
        raise ValueError(f"this {config.model_type} layout has no MiniMind equivalent: {', '.join(problems)}")
    return MiniMindConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None), vocab_size=config.vocab_size,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=rope.get("rope_theta", MiniMindConfig().rope_theta),
        inference_rope_scaling=yarn, qk_norm=config.model_type == "qwen3",
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings)


def read_directory(directory: Path) -> MiniMindForCausalLM:
    """Ours and released MiniMind directories load as they are; a Llama / Qwen3 one is loaded by
    transformers and its weights moved, unchanged, into the equivalent MiniMind model."""
    config_file = directory / "config.json"
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type") if config_file.exists() else None
    if model_type not in (MiniMindConfig.model_type, "llama", "qwen3"):
        raise ValueError(f"{directory}: model_type {model_type!r} — only minimind, llama and qwen3 directories convert")
    model = loader.load_hf_directory(directory, "auto")  # "auto": in the dtype the weights are stored in
    if isinstance(model, MiniMindForCausalLM):
        return model
    minimind = MiniMindForCausalLM(minimind_config_from(model.config))
    minimind.load_state_dict(model.state_dict(), strict=True)
    return minimind.to(model.dtype)


def read_source(source: Path, fallback: MiniMindConfig, inference_rope_scaling: bool = False
                ) -> tuple[MiniMindForCausalLM, torch.dtype]:
    """The model a `.pth` or an HF directory holds, and the dtype its weights are stored in."""
    if source.is_dir():
        model = read_directory(source)
        stored = model.dtype
    else:
        # mmap: a look at the stored dtype without reading the tensors twice
        state = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        stored = next(t.dtype for t in state.values() if t.is_floating_point())
        model = loader.load_pth(source, fallback)
    if inference_rope_scaling:  # only the config is written, so the config is all that needs it
        model.config.inference_rope_scaling = True
    return model.eval(), stored


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def rope_parameters(config: MiniMindConfig) -> dict:
    """transformers' spelling of MiniMind's RoPE: plain, or YaRN with attention factor 1.0."""
    if config.yarn is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": "yarn", "rope_theta": config.rope_theta, **config.yarn}


def check_layout(config: MiniMindConfig, target: str) -> None:
    """Plain Llama / Qwen3 have one layout each; anything else would load with missing tensors."""
    if target not in ("llama", "qwen3"):
        return
    if config.use_moe:
        raise ValueError(f"--to {target}: this is a MoE model ({config.n_routed_experts} experts), which "
                         f"{'Llama' if target == 'llama' else 'Qwen3'}ForCausalLM cannot hold; "
                         "use --to hf (MiniMindForCausalLM with trust_remote_code)")
    if target == "llama" and config.qk_norm:
        raise ValueError("--to llama: this is the minimind-3 layout (q/k RMSNorm), which LlamaForCausalLM "
                         "cannot hold; use --to qwen3")
    if target == "qwen3" and not config.qk_norm:
        raise ValueError("--to qwen3: this is the MiniMind2 layout (no q/k RMSNorm), which Qwen3ForCausalLM "
                         "would add as untrained weights; use --to llama")


def plain_transformers_model(model: MiniMindForCausalLM, target: str) -> PreTrainedModel:
    """The same weights in transformers' own LlamaForCausalLM or Qwen3ForCausalLM."""
    config = model.config
    check_layout(config, target)
    shared = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters(config), attention_bias=False, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    if target == "llama":
        plain = LlamaForCausalLM(LlamaConfig(**shared, mlp_bias=False))
    else:
        plain = Qwen3ForCausalLM(Qwen3Config(**shared, use_sliding_window=False))
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def default_generation_config(config: PretrainedConfig) -> GenerationConfig:
    """Stop at <|im_end|>, pad with <|endoftext|>, sample as eval_llm.py does."""
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id, **SAMPLING)


def write_hf_directory(model: MiniMindForCausalLM, directory: Path, target: str, dtype: torch.dtype,
                       tokenizer_path: str | None = None) -> PreTrainedModel:
    """Weights (safetensors), config.json, generation_config.json and the tokenizer, in `directory`.
    `target` "hf" keeps our class (and copies its code), "llama" / "qwen3" use transformers' own."""
    tokenizer = loader.load_tokenizer(tokenizer_path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} "
                         "embeddings: pass the model's own tokenizer with --tokenizer_path")
    written = model if target == "hf" else plain_transformers_model(model, target)
    written = written.to(dtype)
    written.generation_config = default_generation_config(written.config)
    # For our class, save_pretrained also writes `auto_map` and copies model_minimind.py (see the
    # register_for_auto_class calls at the end of that file).
    written.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return written


def write_pth(model: MiniMindForCausalLM, path: Path, dtype: torch.dtype) -> None:
    """The trainers' format: a state dict in `dtype`, and the config as `<stem>.json` beside it."""
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
    config = copy.deepcopy(model.config)
    config.architectures, config.dtype = None, dtype  # architectures/auto_map describe an HF directory's files
    config.__dict__.pop("auto_map", None)
    write_weights(state, config, path)


def convert(source: Path, output: Path, target: str | None = None, dtype: str = "auto", *,
            fallback: MiniMindConfig | None = None, inference_rope_scaling: bool = False,
            tokenizer_path: str | None = None, merge_lora: str | None = None) -> list[Path]:
    """Convert `source` (a .pth or an HF directory) into `output`, with the LoRA adapter
    `merge_lora` merged in if given; returns the files written. With `target` "peft", `source` is
    a LoRA adapter."""
    target = target or ("pth" if source.is_dir() else "hf")
    if target == "pth" and output.suffix != ".pth":
        raise ValueError(f"--to pth writes a .pth file, not {output}")
    if target != "pth" and (output.suffix == ".pth" or output.is_file()):
        raise ValueError(f"--to {target} writes a directory, not the file {output}")
    if target == "peft":
        if merge_lora:
            raise ValueError("--to peft converts an adapter and --merge_lora merges one into a model: use one of them")
        write_peft(*read_lora(source), output)
        return sorted(output.iterdir())
    model, stored = read_source(source, fallback or MiniMindConfig(), inference_rope_scaling)
    if merge_lora:
        model = loader.merge_lora_weight(model, merge_lora)
    check_layout(model.config, target)  # before any file is written
    torch_dtype = stored if dtype == "auto" else getattr(torch, dtype)
    if target == "pth":
        write_pth(model, output, torch_dtype)
        return [output, sidecar_path(output)]
    write_hf_directory(model, output, target, torch_dtype, tokenizer_path)
    return sorted(p for p in output.iterdir() if p.is_file())


def convert_to_gguf(source: Path, output: Path, outtype: str = "f16", *, fallback: MiniMindConfig | None = None,
                    inference_rope_scaling: bool = False, tokenizer_path: str | None = None,
                    merge_lora: str | None = None, ollama: bool = False, system_prompt: str | None = None) -> list[Path]:
    """`source` as the GGUF file `output`, plus a `Modelfile` beside it with `ollama`; returns the files written."""
    if output.suffix != ".gguf":
        raise ValueError(f"--to gguf writes a .gguf file, not {output}")
    model, _ = read_source(source, fallback or MiniMindConfig(), inference_rope_scaling)
    if merge_lora:
        model = loader.merge_lora_weight(model, merge_lora)
    tokenizer = loader.load_tokenizer(tokenizer_path, source if source.is_dir() else None)
    gguf_export.write_gguf(model, tokenizer, output, outtype)
    if not ollama:
        return [output]
    modelfile = output.with_name("Modelfile")
    modelfile.write_text(gguf_export.ollama_modelfile(output.name, system_prompt), encoding="utf-8")
    return [output, modelfile]


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a .pth file (config from its <stem>.json sidecar) or an HF directory")
    parser.add_argument("output", help="the HF directory to write, or the .pth file (with --to pth)")
    parser.add_argument("--to", choices=TARGETS, default=None,
                        help="hf = MiniMindForCausalLM (trust_remote_code), llama / qwen3 = transformers' own classes, "
                             "pth = native weights, peft = a LoRA adapter source in PEFT's format "
                             "(default: hf for a .pth source, pth for a directory)")
    parser.add_argument("--merge_lora", default=None, metavar="ADAPTER",
                        help="merge this LoRA adapter into the weights written: a name in out/lora (lora_identity), "
                             "a .pth from trainer/train_lora.py (or the original's), or a PEFT adapter directory")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="precision of the written weights; auto = as stored in the source, i.e. lossless (default)")
    parser.add_argument("--tokenizer_path", default=None, help="HF tokenizer directory to bundle (default: <repo>/model)")
    add_switch(parser, "--inference_rope_scaling", help="1 = turn YaRN on in the written config (16x the trained context)")
    gguf_group = parser.add_argument_group("--to gguf")
    gguf_group.add_argument("--outtype", choices=sorted(gguf_export.OUTTYPES), default="f16",
                            help="storage of the GGUF's matrices (norms stay f32)")
    add_switch(gguf_group, "--ollama", help="1 = also write an ollama Modelfile")
    gguf_group.add_argument("--system_prompt", default=None, help="the Modelfile's SYSTEM (default: none, so our "
                                                                   "template's own default system prompt)")
    size = parser.add_argument_group("size of a .pth without .json sidecar (the original's releases)")
    loader.add_size_args(size)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source, output = loader.resolve_path(args.source), loader.resolve_path(args.output)
    if not source.exists():
        sys.exit(f"error: {args.source}: {source} not found")
    fallback = loader.size_from_args(args)
    try:
        if args.to == "gguf":
            files = convert_to_gguf(source, output, args.outtype, fallback=fallback,
                                    inference_rope_scaling=bool(args.inference_rope_scaling),
                                    tokenizer_path=args.tokenizer_path, merge_lora=args.merge_lora,
                                    ollama=bool(args.ollama), system_prompt=args.system_prompt)
        else:
            files = convert(source, output, args.to, args.dtype, fallback=fallback,
                            inference_rope_scaling=bool(args.inference_rope_scaling), tokenizer_path=args.tokenizer_path,
                            merge_lora=args.merge_lora)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"converted {source} -> {output}")
    for path in files:
        print(f"  {human_size(path.stat().st_size):>10}  {path.name}")


if __name__ == "__main__":
    main()
