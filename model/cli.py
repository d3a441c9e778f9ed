"""Command-line conventions shared by every script, kept free of torch so that a script needing no
model (the API client) starts at once."""

from __future__ import annotations

import argparse

from model.chat_format import DEFAULT_HISTORY_UTTERANCES, HISTORY_MODES


def add_switch(group: argparse._ActionsContainer, *names: str, default: int | None = 0, help: str) -> None:
    """An on/off flag, spelled the same way in every script: `--name 1` / `--name 0` as the original
    MiniMind's flags, and `--name` alone for 1, as a `store_true` flag. The value is the int 0 or 1
    (`default` when the flag is absent; None = the script decides). Several `names` are aliases of
    the first, which names the value."""
    group.add_argument(*names, nargs="?", const=1, type=int, choices=[0, 1], default=default, help=help)


def add_sampling_args(group: argparse._ActionsContainer, *, max_new_tokens: int = 512, temperature: float = 0.85,
                      top_p: float = 0.85) -> None:
    """How an answer is sampled, spelled the same way by every program that answers (eval_llm, the web
    demo, the server's request defaults, the API client): `--max_new_tokens` (MiniMind's name; the
    OpenAI API's `--max_tokens` is accepted for it), `--temperature`, `--top_p`."""
    group.add_argument("--max_new_tokens", "--max_tokens", type=int, default=max_new_tokens,
                       help=f"longest answer, in tokens (--max_tokens: the OpenAI API's name) (default: {max_new_tokens})")
    group.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    group.add_argument("--top_p", type=float, default=top_p, help=f"nucleus sampling threshold (default: {top_p})")


def add_thinking_switch(group: argparse._ActionsContainer, *, default: int | None = None, help_default: str = "") -> None:
    """`--open_thinking` (MiniMind's name; `--enable_thinking`, the chat template's, is accepted for it):
    the template's `enable_thinking`. None leaves the template's own choice."""
    add_switch(group, "--open_thinking", "--enable_thinking", default=default,
               help="1 = ask for a <think> block, 0 = the prompt ends with an empty one "
                    f"(default: {help_default or 'the chat template decides'})")


QUERY_UTTERANCE_HELP = ("query_utterance = only the --history_utterances earlier user utterances most relevant to the "
                        "question (BM25 over words and Chinese characters and character pairs; ties go to the more "
                        "recent), in their order, one per line before the question in its user message; "
                        "assistant replies dropped")


def add_history_args(group: argparse._ActionsContainer, *, full: str, none: str, default: str = "full") -> None:
    """`--history_mode` and `--history_utterances`, the switches of `chat_format.fit_history`, spelled
    and explained the same way in every program; `full` and `none` say what those modes mean there."""
    group.add_argument("--history_mode", default=default, choices=HISTORY_MODES,
                       help=f"full = {full}; {QUERY_UTTERANCE_HELP}; none = {none} (default: {default})")
    group.add_argument("--history_utterances", type=non_negative_int, default=DEFAULT_HISTORY_UTTERANCES, metavar="K",
                       help=f"with --history_mode query_utterance: how many earlier user utterances go with the "
                            f"question (default: {DEFAULT_HISTORY_UTTERANCES})")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value
