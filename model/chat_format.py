"""The chat format, written once for every program that talks to a model: how a reply's
`<think>...</think>` reasoning and `<tool_call>{...}</tool_call>` blocks are read, and which part of
a conversation is sent as the prompt.

The chat template (`model/tokenizer_config.json`, MiniMind2's) defines the format; this module reads
what it writes. Every reader of a reply uses these functions: `dataset/tasks.py` (exact-match
answers), the RL rewards, the OpenAI-compatible server, the web demo and the measurements. Every
chat program trims its history with `fit_history`, the one history policy.

It imports no torch (nor transformers), so the terminal API client that uses it starts instantly;
a tokenizer is only ever passed in.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

Message = dict  # {"role": ..., "content": ..., optional "reasoning_content", "tool_calls"}


# ---------------------------------------------------------------------------------------------
# A whole reply (or the part written so far): its reasoning and its answer
# ---------------------------------------------------------------------------------------------

def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply written as `<think>\\n…\\n</think>\\n\\nanswer`, also while it is
    still being written, both stripped. Models whose prompt already opens the block (Qwen3) write
    only `</think>`."""
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.replace(THINK_OPEN, "", 1).strip(), answer.strip()
    started = text.lstrip()
    if started.startswith(THINK_OPEN):
        return started.removeprefix(THINK_OPEN).strip(), ""
    if THINK_OPEN.startswith(started):  # the opening tag is still arriving: nothing to show yet
        return "", ""
    return "", text.strip()


def final_answer(text: str) -> str:
    """What a finished reply commits to: the text after its last `</think>`; the whole text when it
    has no think block; "" when it opens `<think>` and never closes it (the model ran out of tokens
    while thinking)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return ""
    return text


def thinking_well_formed(reply: str) -> bool:
    """Whether a reply thinks as the reasoning stage teaches: it opens with `<think>` (after
    whitespace) and holds exactly one `<think>` and one `</think>`. The RL format reward's rule."""
    return reply.lstrip().startswith(THINK_OPEN) and reply.count(THINK_OPEN) == 1 and reply.count(THINK_CLOSE) == 1


# ---------------------------------------------------------------------------------------------
# A reply as it streams: reasoning, content and tool calls
# ---------------------------------------------------------------------------------------------

Event = tuple[str, Any]  # ("content", text) | ("reasoning", text) | ("tool_call", {"id", "type", "function"})


def parse_tool_call(text: str) -> dict | None:
    """`{"name": ..., "arguments": {...}}` (the chat template's format) as an OpenAI tool call whose
    arguments are a JSON string; None when the model wrote something else."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}}


def unsettled_length(text: str, tags: list[str], space: str | None) -> int:
    """How much of the end of `text` the next piece could still change: the start of a tag, and the
    whitespace before it (dropped when a tag follows)."""
    tag_start = max((n for tag in tags for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])),
                    default=0)
    settled = text[:len(text) - tag_start].rstrip(space)
    return len(text) - len(settled)


class ReplyParser:
    """Splits a reply into reasoning (`<think>...</think>`), content and, when the request offered
    tools, tool calls (`<tool_call>{...}</tool_call>`), while it streams. Text that could be the start
    of a tag is held until the next piece shows whether it is one, so feeding the reply piece by
    piece gives the same events as feeding it whole. The newlines the chat template puts around a
    block are not part of the text (its `<think>\\n...\\n</think>\\n\\n` round-trips)."""

    def __init__(self, parse_tools: bool, starts_thinking: bool = False):
        self.tags = [THINK_OPEN, TOOL_CALL_OPEN] if parse_tools else [THINK_OPEN]
        self.mode = "reasoning" if starts_thinking else "content"  # or "tool_call", inside a <tool_call>
        self.pending = ""
        self.drop_leading_newlines = starts_thinking

    def feed(self, text: str) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while True:
            if self.drop_leading_newlines:
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return events
                self.drop_leading_newlines = False
            ends = {"content": self.tags, "reasoning": [THINK_CLOSE], "tool_call": [TOOL_CALL_CLOSE]}[self.mode]
            found = min(((self.pending.find(tag), tag) for tag in ends if tag in self.pending), default=None)
            if found is None:
                if self.mode != "tool_call":  # a tool call is given whole or not at all
                    keep = unsettled_length(self.pending, ends, None if self.mode == "content" else "\n")
                    self._emit(events, self.mode, self.pending[:len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                return events
            index, tag = found
            before, self.pending = self.pending[:index], self.pending[index + len(tag):]
            if self.mode == "tool_call":
                call = parse_tool_call(before.strip())
                if call:
                    events.append(("tool_call", call))
                else:
                    self._emit(events, "content", TOOL_CALL_OPEN + before + TOOL_CALL_CLOSE)
                self.mode = "content"
            elif self.mode == "reasoning":
                self._emit(events, "reasoning", before.rstrip("\n"))
                self.mode = "content"
            else:
                self._emit(events, "content", before.rstrip())
                self.mode = "reasoning" if tag == THINK_OPEN else "tool_call"
            self.drop_leading_newlines = self.mode != "tool_call"  # a call's text is kept whole, for when it is no call

    def finish(self) -> list[Event]:
        """What is left when the reply ends: an unclosed think block is reasoning, an unclosed tool
        call is text."""
        events: list[Event] = []
        if self.mode == "tool_call":
            self._emit(events, "content", TOOL_CALL_OPEN + self.pending)
        else:
            self._emit(events, self.mode, self.pending.rstrip("\n") if self.mode == "reasoning" else self.pending)
        self.pending = ""
        return events

    @staticmethod
    def _emit(events: list[Event], kind: str, text: str) -> None:
        if text:
            events.append((kind, text))


# ---------------------------------------------------------------------------------------------
# The prompt: rendering, and the history policy
# ---------------------------------------------------------------------------------------------

def start_messages(system_prompt: str | None) -> list[Message]:
    """A new conversation: the persona as a system message, or nothing (the template's default)."""
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, enable_thinking: bool | None = None,
                  tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """The chat template's text. `enable_thinking=None` leaves the template's default (MiniMind: the
    model decides whether to think); False asks for an empty think block, as MiniMind's does."""
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no chat template: "
                         f"pass one that has with --tokenizer_path")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


class PromptTooLong(ValueError):
    """Even the system message and the latest user turn alone exceed the prompt budget."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the prompt needs {tokens} tokens even without history, more than the {limit} allowed")
        self.tokens, self.limit = tokens, limit


def split_turns(messages: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """A leading system message, and turns: each user message with every assistant/tool message
    that answers it."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns: list[list[Message]] = []
    for message in messages[len(system):]:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return system, turns


def fit_history(tokenizer: PreTrainedTokenizerBase | None, messages: list[Message], max_prompt_tokens: int | None = None,
                keep_turns: int | None = None, *, enable_thinking: bool | None = None,
                tools: list[dict] | None = None) -> list[Message]:
    """The history policy, the one every chat program applies: the messages to send are the system
    message, at most `keep_turns` past turns (None = all) and the latest turn, dropping the oldest
    turns until the rendered prompt fits `max_prompt_tokens`. Whole turns go, never part of one
    (a tool call stays with its result); raises PromptTooLong when the latest turn alone is too long.
    `max_prompt_tokens=None` sets no token budget, and needs no tokenizer: for a client whose server
    fits the prompt to its own context."""
    system, turns = split_turns(messages)
    if not turns:
        return list(messages)
    history, latest = turns[:-1], turns[-1]
    if keep_turns is not None:
        history = history[max(0, len(history) - keep_turns):]
    while True:
        kept = system + [message for turn in history for message in turn] + latest
        if max_prompt_tokens is None:
            return kept
        tokens = count_tokens(tokenizer, render_prompt(tokenizer, kept, enable_thinking=enable_thinking, tools=tools))
        if tokens <= max_prompt_tokens:
            return kept
        if not history:
            raise PromptTooLong(tokens, max_prompt_tokens)
        history = history[1:]


# ---------------------------------------------------------------------------------------------
# The terminal
# ---------------------------------------------------------------------------------------------

def typed_questions(prompt: str = "👶: ") -> Iterator[str]:
    """Questions typed at the prompt, until end of input (Ctrl-D); blank lines are skipped. Shared by
    the terminal chats (`eval_llm.py --mode chat`, `scripts/chat_openai_api.py`)."""
    while True:
        try:
            question = input(prompt).strip()
        except EOFError:
            print()
            return
        if question:
            yield question
