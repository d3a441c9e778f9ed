"""A MiniMind model as one GGUF file, the format llama.cpp and ollama run, written with the `gguf` package.

A GGUF file is a header of key/value metadata (architecture, sizes, RoPE, tokenizer, chat template)
followed by named tensors. llama.cpp has no "minimind" architecture, so the model is written as the
llama.cpp architecture that computes exactly the same function, or refused with the reason:

| our layout                                    | llama.cpp architecture |
|-----------------------------------------------|------------------------|
| MiniMind2 (dense, no q/k norm)                | `llama`                |
| minimind-3 (dense, q/k RMSNorm)               | `qwen3`                |
| MoE without shared experts, q/k norm          | `qwen3moe`             |
| MoE without shared experts, no q/k norm       | `llama` with experts   |
| MoE with shared experts (MiniMind2-MoE)       | refused                |

Three facts make the difference between a file that loads and one that answers as our model does:

* RoPE pairs. We (like transformers) rotate channel i of a head together with channel i + D/2 (the
  "NeoX" layout). llama.cpp's `llama` rotates adjacent channels (2i, 2i+1), so the rows of q_proj and
  k_proj are reordered for it; its `qwen3` uses the NeoX layout and takes them as they are.
* The tokenizer is byte-level BPE (llama.cpp's model `gpt2`) and its pre-tokenizer must be named exactly:
  ours splits every digit apart with Qwen2's regex (pre `qwen2`), MiniMind's keeps GPT-2's (pre `gpt-2`);
  any other name splits digits and punctuation differently.
* llama.cpp defaults RoPE's base to 1e4, so `rope.freq_base` must say 1e6.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model.loader import QWEN2_SPLIT
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

Q = gguf.GGMLQuantizationType
# --outtype: the storage type of every matrix. q8_0 / q4_0 store blocks of 32 values as 8- / 4-bit
# integers with one fp16 scale per block (8.5 / 4.5 bits per weight).
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# Our names inside `model.layers.{i}.` -> llama.cpp's inside `blk.{i}.`.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the MoE router
}


def architecture(config: MiniMindConfig) -> str:
    """The llama.cpp architecture that computes what this layout computes, or ValueError saying why none does."""
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.n_shared_experts > 0:
        raise ValueError(
            f"this MoE layout adds {config.n_shared_experts} shared expert(s) to every token with weight 1; llama.cpp's "
            "shared-expert architectures (qwen2moe, deepseek2, ...) gate or scale the shared expert, so no llama.cpp "
            "architecture computes this model exactly (MiniMind2-MoE) — use the HF directory (--to hf) instead")
    if not config.norm_topk_prob:
        raise ValueError("this MoE layout mixes its experts with the raw router probabilities (norm_topk_prob=False); "
                         "llama.cpp's llama / qwen3moe renormalise the top-k weights to sum to 1, so the GGUF would be "
                         "a different model")
    return "qwen3moe" if config.qk_norm else "llama"


def adjacent_pair_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q_proj / k_proj weight so that llama.cpp's adjacent-pair RoPE rotates the channels we rotate.

    Within each head, our pair i is output rows (i, i + D/2); llama.cpp's pair i is rows (2i, 2i + 1).
    So new row 2i + a is old row a * D/2 + i, for a in {0, 1}."""
    rows, columns = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_tensors(model: MiniMindForCausalLM, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the model once, under llama.cpp's name and in llama.cpp's layout."""
    config = model.config
    state = model.state_dict()
    written = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:  # tied: no output.weight, and llama.cpp scores with token_embd, as we do
        yield "output.weight", state["lm_head.weight"]
    heads = {"self_attn.q_proj.weight": config.num_attention_heads, "self_attn.k_proj.weight": config.num_key_value_heads}
    for layer in range(config.num_hidden_layers):
        ours = f"model.layers.{layer}."
        for name, theirs in LAYER_TENSORS.items():
            if ours + name not in state:
                continue
            tensor = state[ours + name]
            if arch == "llama" and name in heads:
                tensor = adjacent_pair_rows(tensor, heads[name])
            written.add(ours + name)
            yield f"blk.{layer}.{theirs}", tensor
        if config.use_moe:
            # llama.cpp holds the experts of a layer as one 3-D tensor per projection: (expert, rows, columns).
            for projection in ("gate", "up", "down"):
                names = [f"{ours}mlp.experts.{expert}.{projection}_proj.weight" for expert in range(config.n_routed_experts)]
                written.update(names)
                yield f"blk.{layer}.ffn_{projection}_exps.weight", torch.stack([state[name] for name in names])
    left_out = sorted(state.keys() - written)
    if left_out:  # a weight with no GGUF name would silently change the model
        raise ValueError(f"no GGUF name for {left_out[:3]}")


def storage_type(name: str, array: np.ndarray, outtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors (norm weights) and the MoE router stay F32, as llama.cpp's own converter keeps them:
    they are tiny, and a rounded router score can send a token to another expert."""
    if array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    qtype = OUTTYPES[outtype][0]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        raise ValueError(f"--outtype {outtype} packs each row in blocks of {block} values, but the rows of {name} "
                         f"have {array.shape[-1]}: use f16, bf16 or f32")
    return qtype


def add_hyperparameters(writer: gguf.GGUFWriter, config: MiniMindConfig) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)  # every channel of a head is rotated
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.use_moe:
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if config.yarn is not None:
        yarn = config.yarn
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn["factor"])
        writer.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        # llama.cpp scales cos/sin by YaRN's usual magnitude 1 + 0.1 ln(factor); ours is attention_factor
        # (1.0), so this stored factor cancels the difference. beta_fast 32 / beta_slow 1 are llama.cpp's defaults.
        writer.add_rope_scaling_attn_factors(yarn["attention_factor"] / (1 + 0.1 * math.log(yarn["factor"])))


def llama_cpp_pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[dict, str]:
    """The tokenizer's own description (tokenizer.json), and the name of the llama.cpp pre-tokenizer that
    reproduces it exactly: `qwen2` (ours, `train_tokenizer.py --split qwen2`) or `gpt-2` (MiniMind's)."""
    description = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = description.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    plain_bpe = description["model"]["type"] == "BPE" and description.get("normalizer") is None
    if plain_bpe and pre.get("type") == "ByteLevel" and pre.get("use_regex") and not pre.get("add_prefix_space"):
        return description, "gpt-2"
    if (plain_bpe and steps and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern") == {"Regex": QWEN2_SPLIT} and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space")):
        return description, "qwen2"
    raise ValueError(f"{tokenizer.name_or_path}: only a byte-level BPE tokenizer with no normalizer and Qwen2's or "
                     f"GPT-2's split (ours, MiniMind's) has an exact llama.cpp equivalent; this one has pre_tokenizer "
                     f"{pre} and normalizer {description.get('normalizer')}")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Tokens by id, their types, the merges, the special ids and the chat template.

    Special tokens are CONTROL: llama.cpp then reads `<|im_start|>` in text as one token only when asked
    to parse specials, and leaves it out of detokenised text unless asked, as transformers does."""
    description, pre_name = llama_cpp_pre_tokenizer(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings: "
                         "pass the model's own tokenizer with --tokenizer_path")
    # Embedding rows past the tokenizer are never produced; llama.cpp still wants a token for each.
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(pair) for pair in description["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # our prompts carry their own <|im_start|>
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path, outtype: str) -> None:
    """Write `model` and `tokenizer` to `path`. Everything is checked and converted in memory first, and
    the file is written under a temporary name then renamed, so a refusal or a crash leaves no partial file."""
    config = model.config
    arch = architecture(config)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(path.stem)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for name, tensor in gguf_tensors(model, arch):
        array = tensor.detach().to("cpu", torch.float32).numpy()
        qtype = storage_type(name, array, outtype)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# ollama
# ---------------------------------------------------------------------------------------------

# Our chat template (model/tokenizer_config.json) in ollama's Go template language. ollama puts the
# Modelfile's SYSTEM first in .Messages when a request has no system message, so, as in ours, a leading
# system message opens the prompt and later ones stay in place. The tool list is written with ollama's
# JSON formatting, which may space keys differently from Python's json.dumps.
OLLAMA_TEMPLATE = """\
{{- $system := "" }}
{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ $system = (index .Messages 0).Content }}{{ end }}
{{- if .Tools }}<|im_start|>system
{{ if $system }}{{ $system }}

{{ end }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{{ . }}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if $system }}<|im_start|>system
{{ $system }}<|im_end|>
{{ else }}<|im_start|>system
You are a helpful assistant<|im_end|>
{{ end }}
{{- $previous := "" }}
{{- range $index, $message := .Messages }}
{{- if and (eq $previous "tool") (ne .Role "tool") }}<|im_end|>
{{ end }}
{{- if or (eq .Role "user") (and (eq .Role "system") $index) }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}
{{- range $call_index, $call := .ToolCalls }}
{{- if or $message.Content $call_index }}
{{ end }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else if eq .Role "tool" }}
{{- if ne $previous "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- end }}
{{- $previous = .Role }}
{{- end }}
{{- if eq $previous "tool" }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def ollama_modelfile(gguf_file: str, system_prompt: str | None = None) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`, next to `gguf_file`.

    Generation stops at <|im_end|>, and at <|im_start|> in case a weak model starts a new turn itself."""
    lines = [f"FROM ./{gguf_file}", "", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', "",
             'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    if system_prompt:
        lines += ["", f'SYSTEM """{system_prompt}"""']
    return "\n".join(lines) + "\n"
