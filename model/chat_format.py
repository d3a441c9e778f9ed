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
import math
import re
import uuid
from collections import Counter
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


# What the history is made of, for each `history_mode`:
#   full            every past turn, as it was (MiniMind's behaviour, and the default);
#   query_utterance the few earlier *user* utterances most relevant to the latest query (below);
#   none            nothing: the system message and the latest turn alone.
HISTORY_MODES = ("full", "query_utterance", "none")
DEFAULT_HISTORY_UTTERANCES = 2

_CHINESE = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK unified ideographs (with extension A) and compatibility ones
_CHINESE_RUN = re.compile(f"[{_CHINESE}]+")
_TERM_RUNS = re.compile(rf"[{_CHINESE}]+|[^\W{_CHINESE}]+")  # a run of Chinese characters, or a word (letters, digits)


def lexical_terms(text: str) -> list[str]:
    """The terms BM25 matches on. Chinese has no spaces, so a run of Chinese characters gives its
    characters and their bigrams (苹果 -> 苹, 果, 苹果): a word of one or two characters matches
    without a segmenter. Other text gives its lower-cased words; punctuation is dropped."""
    terms = []
    for run in _TERM_RUNS.findall(text.lower()):
        if _CHINESE_RUN.fullmatch(run):
            terms += list(run) + [run[k:k + 2] for k in range(len(run) - 1)]
        else:
            terms.append(run)
    return terms


def bm25_scores(query: str, documents: list[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 relevance of each document to the query (Robertson and Zaragoza, 2009):

        score(d) = sum over distinct query terms t of  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
        idf(t)   = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

    with tf the term's count in d, |d| its length in terms, avgdl the mean length, N the documents
    and n(t) how many contain t. A term rare among the documents weighs more (idf, Lucene's form,
    never negative); repeating a term helps less and less (k1); a long document's counts are
    discounted toward the average length (b)."""
    bags = [Counter(lexical_terms(document)) for document in documents]
    lengths = [sum(bag.values()) for bag in bags]
    average_length = max(sum(lengths) / max(len(lengths), 1), 1.0)
    containing = Counter(term for bag in bags for term in bag)
    idf = {term: math.log(1 + (len(bags) - containing[term] + 0.5) / (containing[term] + 0.5))
           for term in set(lexical_terms(query))}
    return [sum((idf[term] * bag[term] * (k1 + 1) / (bag[term] + k1 * (1 - b + b * length / average_length))
                 for term in idf if bag[term]), 0.0)
            for bag, length in zip(bags, lengths)]


def select_utterances(query: str, utterances: list[str], k: int) -> list[int]:
    """The positions of the `k` utterances most relevant to `query` by BM25, in their original
    order. Ties go to the more recent one, so when fewer than `k` share a term with the query the
    rest of the places go to the latest utterances, as a plain history would keep them."""
    scores = bm25_scores(query, utterances)
    ranked = sorted(range(len(utterances)), key=lambda i: (scores[i], i), reverse=True)
    return sorted(ranked[:k])


def with_utterances(question: Message, utterances: list[str]) -> Message:
    """The latest user message with the chosen earlier utterances before it, one per line: the model
    sees one ordinary user turn, in the chat template's format, whatever it was trained on."""
    if not utterances:
        return question
    return {**question, "content": "\n".join([*utterances, question["content"]])}


def fit_history(tokenizer: PreTrainedTokenizerBase | None, messages: list[Message], max_prompt_tokens: int | None = None,
                keep_turns: int | None = None, *, enable_thinking: bool | None = None,
                tools: list[dict] | None = None, history_mode: str = "full",
                history_utterances: int = DEFAULT_HISTORY_UTTERANCES) -> list[Message]:
    """The history policy, the one every chat program applies: the messages to send for the latest
    turn, given the whole conversation. The system message and the latest turn (a user message and
    the tool calls and results that answer it so far) are always sent; what else goes depends on
    `history_mode`:

    * `full`: at most `keep_turns` past turns (None = all), whole (a tool call stays with its result);
    * `query_utterance`: the `history_utterances` earlier user utterances most relevant to the latest
      user message (BM25 over words and Chinese characters, `select_utterances`), in their order,
      put before it in the same user message, one per line (`with_utterances`). Assistant replies and
      tool turns of the past are dropped: a small model's context holds the question and what the
      user said that bears on it, not everything said. `keep_turns` plays no part;
    * `none`: nothing else.

    The oldest of what was chosen goes first until the rendered prompt fits `max_prompt_tokens`;
    raises PromptTooLong when the system message and the latest turn alone are too long.
    `max_prompt_tokens=None` sets no token budget, and needs no tokenizer: for a client whose server
    fits the prompt to its own context, and for building training data."""
    system, turns = split_turns(messages)
    if not turns:
        return list(messages)
    past, latest = turns[:-1], turns[-1]
    if history_mode == "full":
        history = past if keep_turns is None else past[max(0, len(past) - keep_turns):]
        assemble = lambda kept: system + [message for turn in kept for message in turn] + latest
    elif history_mode == "query_utterance":
        utterances = [turn[0]["content"] or "" for turn in past if turn[0]["role"] == "user"]
        query = (latest[0]["content"] or "") if latest[0]["role"] == "user" else ""
        history = [utterances[i] for i in select_utterances(query, utterances, history_utterances)]
        assemble = lambda kept: system + [with_utterances(latest[0], kept)] + latest[1:]
    elif history_mode == "none":
        history, assemble = [], lambda kept: system + latest
    else:
        raise ValueError(f"history_mode {history_mode!r}: expected one of {', '.join(HISTORY_MODES)}")
    while True:
        kept = assemble(history)
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
