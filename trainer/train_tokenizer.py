"""Train MiniMind's tokenizer: a byte-level BPE with 6400 ids, plus the chat template.

Byte-level means the base alphabet is the 256 byte values, so every string (Chinese, code, emoji,
runs of spaces) encodes and decodes back to itself with no unknown token. BPE then learns
merges of frequent byte sequences until the vocabulary holds `--vocab_size` ids. A small
vocabulary keeps the embedding table small (6400 x 512 is 3.3M of MiniMind2-Small's 25.8M
parameters) at the cost of more tokens per character.

    python trainer/train_tokenizer.py                       # demo data -> model/tokenizer.json
    python trainer/train_tokenizer.py --data_path my.jsonl --out_dir my_tokenizer
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from model.loader import QWEN2_SPLIT

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO_ROOT / "dataset" / "demo" / "pretrain.jsonl", REPO_ROOT / "dataset" / "demo" / "sft.jsonl"]

# Ids 0, 1, 2 in this order, as in MiniMind: padding (also the unknown token, which byte-level
# BPE never needs), the start of a chat turn (bos) and the end of a turn (eos).
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]


def pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    """`qwen2`: one piece per digit; `gpt2`: digits grouped, as MiniMind's own tokenizer."""
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

# ChatML with Qwen-style tool calling. It renders exactly the text MiniMind2's template renders
# (see ../shared/chat_template_examples.json), and one addition: an assistant message with a
# non-empty `reasoning_content` is written as "<think>\n{reasoning}\n</think>\n\n{content}".
#  * The system turn: the caller's system message, else "You are a helpful assistant" -- except
#    that when tools are given, the tools block is the system turn (after the caller's system text).
#  * Assistant tool calls: one <tool_call> block each; `arguments` may be a dict or a JSON string.
#  * Tool results: consecutive `tool` messages share one user turn, one <tool_response> each.
#  * enable_thinking=False: the generation prompt opens and closes an empty think block, so the
#    model answers directly.
CHAT_TEMPLATE = r"""
{%- macro tool_call_block(call) -%}
    {%- set function = call.function if call.function else call -%}
    {{- '<tool_call>\n{"name": "' ~ function.name ~ '", "arguments": ' -}}
    {%- if function.arguments is string -%}
        {{- function.arguments -}}
    {%- else -%}
        {{- function.arguments | tojson -}}
    {%- endif -%}
    {{- '}\n</tool_call>' -}}
{%- endmacro -%}

{%- set starts_with_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if starts_with_system -%}
        {{- messages[0].content ~ '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' ~ (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif starts_with_system -%}
    {{- '<|im_start|>system\n' ~ messages[0].content ~ '<|im_end|>\n' -}}
{%- else -%}
    {{- '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' -}}
{%- endif -%}

{%- for message in messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' ~ message.role ~ '\n' ~ content ~ '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if message.reasoning_content is string and message.reasoning_content -%}
            {{- '<think>\n' ~ message.reasoning_content.strip('\n') ~ '\n</think>\n\n' ~ content.lstrip('\n') -}}
        {%- else -%}
            {{- content -}}
        {%- endif -%}
        {%- for call in message.tool_calls or [] -%}
            {%- if content or not loop.first -%}
                {{- '\n' -}}
            {%- endif -%}
            {{- tool_call_block(call) -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' ~ content ~ '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
""".strip()


def tokenizer_config(model_max_length: int = 32768) -> dict:
    """What `transformers.AutoTokenizer` reads beside tokenizer.json: the special tokens' roles,
    that nothing is added around encoded text (the chat template places <|im_start|> itself),
    and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(token_id): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for token_id, token in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def read_texts(paths: Iterable[Path]) -> Iterator[str]:
    """The text of jsonl files in any MiniMind format: pretrain `text`, and the `content` and
    `reasoning_content` of every message in `conversations` / `chosen` / `rejected`."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}:{line_number}: not valid JSON ({error})") from None
                if not isinstance(row, dict):
                    raise SystemExit(f"{path}:{line_number}: expected a JSON object")
                if isinstance(row.get("text"), str):
                    yield row["text"]
                for key in ("conversations", "chosen", "rejected"):
                    for message in row.get(key) or []:
                        for field in ("content", "reasoning_content"):
                            if isinstance(message.get(field), str) and message[field]:
                                yield message[field]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, show_progress: bool = True,
                    split: str = "qwen2") -> Tokenizer:
    """Byte-level BPE: no normalizer (so decoding gives back the exact input), pre-splitting into
    words, single digits (or digit runs with `split="gpt2"`) and punctuation, and the 256 bytes as
    the base alphabet."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer(split)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # get ids 0, 1, 2 in list order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} did not get id {token_id}"
    return tokenizer


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", type=Path, nargs="+", default=DEFAULT_DATA,
                        help="jsonl files (pretrain, SFT, DPO or RL format) to learn merges from; "
                             "the default is the demo pretrain and SFT data")
    parser.add_argument("--vocab_size", type=int, default=6400,
                        help="ids in all, special tokens included (default 6400)")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "model",
                        help="where tokenizer.json and tokenizer_config.json go (default: <repo>/model)")
    parser.add_argument("--split", choices=["qwen2", "gpt2"], default="qwen2",
                        help="pre-tokenizer: qwen2 = every digit its own token (default; arithmetic is learnable), "
                             "gpt2 = digit runs merged, as MiniMind's tokenizer")
    args = parser.parse_args(argv)

    tokenizer = train_tokenizer(read_texts(args.data_path), args.vocab_size, split=args.split)
    save(tokenizer, args.out_dir)
    print(f"saved a {tokenizer.get_vocab_size()}-id tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
