"""MiniMind's training data: jsonl files read lazily, one item per line, and batches built on top.

Four dataset classes, one per jsonl format (CONVENTIONS §3), each with the original signature
`(data_path, tokenizer, max_length=...)`. Item `i` is line `i` of the file, a dict of LongTensors whose
`labels` are aligned with `input_ids` (the model shifts them; -100 = no loss) and never padded:

    PretrainDataset   {"text": str}                          -> [bos] + text + [eos], every token learned
    SFTDataset        {"conversations": [msgs]}              -> chat template; only assistant replies learned
                                                                (or, with a `history_mode`, one item per reply)
    DPODataset        {"chosen": [msgs], "rejected": [msgs]} -> both sides, labelled as in SFT
    RLAIFDataset      {"conversations": [msgs], "answer"?}   -> a prompt ending in the generation prompt

`PackedBatches` turns a dataset into batches. For pretraining and SFT it packs several documents into
each `max_length` row, with attention confined to each document and positions restarting per document,
so a packed row trains exactly as its documents would one by one, without the compute spent on padding.
It also shards the data over ranks, and its `state_dict()` lets a resumed run continue with exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from model.chat_format import DEFAULT_HISTORY_UTTERANCES, HISTORY_MODES, PromptTooLong, fit_history, render_prompt

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------
# 1. Lazy jsonl: an index of line offsets, lines parsed on demand
# ---------------------------------------------------------------------------------------------

class JsonlFile:
    """Random access to the lines of a jsonl file without holding them in memory.

    The constructor scans the file once for newlines (numpy, ~1 GB/s) and keeps only the byte offset
    where each line starts. `file[i]` reads and parses line i; `validate(record)` (optional) raises
    `ValueError(reason)` for a record of the wrong shape. Every error names the file and the 1-based
    line: `ValueError("data.jsonl:17: missing field 'text'")`. Blank lines at the end are ignored.
    """

    def __init__(self, path: str | os.PathLike, validate: Callable[[Any], None] | None = None):
        self.path = os.fspath(path)
        self.validate = validate
        self.line_starts = self._index_lines(self.path)  # n + 1 offsets; the last is the end of the data
        self._file, self._file_pid = None, None

    @staticmethod
    def _index_lines(path: str, chunk_bytes: int = 1 << 24) -> np.ndarray:
        newline_ends = [np.zeros(1, dtype=np.int64)]
        with open(path, "rb") as f:
            offset = 0
            while chunk := f.read(chunk_bytes):
                newline_ends.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + offset + 1)
                offset += len(chunk)
            starts = np.concatenate(newline_ends)
            if starts[-1] != offset:
                starts = np.append(starts, offset)  # last line has no newline
            # Drop blank lines at the end (they are short, so reading them back is cheap).
            while len(starts) > 1:
                f.seek(int(starts[-2]))
                if f.read(int(starts[-1] - starts[-2])).strip():
                    break
                starts = starts[:-1]
        return starts

    def __len__(self) -> int:
        return len(self.line_starts) - 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_file_pid": None}  # file handles don't cross processes

    def _read_line(self, i: int) -> bytes:
        if self._file is None or self._file_pid != os.getpid():  # reopen in each DataLoader worker
            self._file, self._file_pid = open(self.path, "rb"), os.getpid()
        start, end = int(self.line_starts[i]), int(self.line_starts[i + 1])
        self._file.seek(start)
        return self._file.read(end - start)

    def error(self, i: int, reason: Any) -> ValueError:
        return ValueError(f"{self.path}:{i + 1}: {reason}")

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"line index {i} out of range for {len(self)} lines")
        i %= len(self)
        try:
            text = self._read_line(i).decode("utf-8")
            if i == 0:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not text.strip():
                raise ValueError("empty line")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON ({e})") from None
            if self.validate is not None:
                self.validate(record)
        except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise self.error(i, e) from None
        return record

    def check_all(self) -> None:
        """Parse and validate every line (no tokenization): fail before training, not in the middle."""
        for i in range(len(self)):
            self[i]


# ---------------------------------------------------------------------------------------------
# 2. Record formats (CONVENTIONS §3). Each check raises ValueError(reason); JsonlFile adds path:line.
# ---------------------------------------------------------------------------------------------

def _require(record: Any, field: str, kind: type) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"missing field {field!r}")
    if not isinstance(record[field], kind):
        raise ValueError(f"field {field!r} must be {kind.__name__}, got {type(record[field]).__name__}")
    return record[field]


def _load_json_field(value: Any, what: str) -> Any:
    """MiniMind's files sometimes store `functions` / `tool_calls` as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON ({e})") from None
    return value


def check_messages(record: Any, field: str) -> None:
    """`record[field]` is a non-empty list of chat messages with known roles and string contents."""
    messages = _require(record, field, list)
    if not messages:
        raise ValueError(f"{field!r} is empty")
    for n, message in enumerate(messages):
        where = f"{field}[{n}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"{where} has role {message.get('role')!r}, expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(f"{where} needs a string 'content'")
        if not isinstance(message.get("reasoning_content", ""), (str, type(None))):
            raise ValueError(f"{where}.reasoning_content must be a string")
        if not isinstance(_load_json_field(message.get("tool_calls", []), f"{where}.tool_calls"), (list, type(None))):
            raise ValueError(f"{where}.tool_calls must be a list")


def check_text(record: Any) -> None:
    _require(record, "text", str)


def check_conversation(record: Any) -> None:
    check_messages(record, "conversations")


def check_preference(record: Any) -> None:
    check_messages(record, "chosen")
    check_messages(record, "rejected")


def check_prompt(record: Any) -> None:
    check_messages(record, "conversations")
    if not any(m["role"] == "user" for m in record["conversations"]):
        raise ValueError("'conversations' has no user message")
    if not isinstance(record.get("answer", ""), (str, int, float)):
        raise ValueError("field 'answer' must be a string")


# ---------------------------------------------------------------------------------------------
# 3. Chat rendering shared by SFT, DPO and RL: template text -> token ids + assistant-only labels
# ---------------------------------------------------------------------------------------------

def normalize_conversation(messages: list[dict]) -> tuple[list[dict], list | None]:
    """Messages ready for `apply_chat_template`, and the tools offered by the system message.

    As in MiniMind, a first system message may carry the tool schemas under `functions` (or `tools`),
    possibly as a JSON string; `tool_calls` may also be a JSON string.
    """
    tools = None
    if messages[0]["role"] == "system":
        tools = _load_json_field(messages[0].get("functions") or messages[0].get("tools"), "functions") or None
    normalized = []
    for message in messages:
        message = {k: v for k, v in message.items() if k not in ("functions", "tools")}
        if "tool_calls" in message:
            message["tool_calls"] = _load_json_field(message["tool_calls"], "tool_calls")
        normalized.append(message)
    return normalized, tools


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and marks what the model should learn.

    Labels cover each assistant reply (its `<think>` block and tool calls included) and the end
    marker that closes it (`<|im_end|>`): the tokens the model itself produces at inference. The
    `<|im_start|>assistant\\n` header, the newline after `<|im_end|>`, and every system, user and tool
    turn get -100.

    The spans are found in the rendered text, not in token ids: the header is whatever the template
    appends for `add_generation_prompt=True`, the end marker whatever follows an assistant reply. The
    text is then tokenized piece by piece, cut at the span boundaries, so a reply's first token is the
    one the model emits right after the generation prompt. This works with any ChatML-like template
    (ours, MiniMind2's, minimind-3's, Qwen's) and with slow tokenizers, which have no offsets.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        probe_user, probe_reply = [{"role": "user", "content": "¶"}], {"role": "assistant", "content": "¤"}
        base = self.render(probe_user)
        with_prompt = self.render(probe_user, add_generation_prompt=True)
        header = with_prompt[len(base):] if with_prompt.startswith(base) else ""
        self.header = header or "<|im_start|>assistant\n"
        after_reply = self.render(probe_user + [probe_reply]).rsplit("¤", 1)[-1]
        self.end_marker = after_reply.strip() or tokenizer.eos_token

    def render(self, messages: list[dict], tools: list | None = None, **template_kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **template_kwargs)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def assistant_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant reply plus its end marker."""
        spans, search_from = [], 0
        while (header_at := text.find(self.header, search_from)) != -1:
            start = header_at + len(self.header)
            end = text.find(self.end_marker, start)
            end = len(text) if end == -1 else end + len(self.end_marker)
            spans.append((start, end))
            search_from = end
        return spans

    def encode_conversation(self, messages: list[dict], max_length: int,
                            last_reply_only: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and labels that are -100 outside assistant replies
        (outside the last one, with `last_reply_only`: the earlier ones are context)."""
        messages, tools = normalize_conversation(messages)
        text = self.render(messages, tools)
        spans = self.assistant_spans(text)
        if not spans and any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"the chat template does not open assistant turns with {self.header!r}")
        if last_reply_only:
            spans = spans[-1:]
        pieces, cut = [], 0  # (text, learned?) alternating outside / inside assistant replies
        for start, end in spans:
            pieces += [(text[cut:start], False), (text[start:end], True)]
            cut = end
        pieces.append((text[cut:], False))
        pieces = [(piece, learned) for piece, learned in pieces if piece]
        input_ids, labels = [], []
        for ids, (_, learned) in zip(self.tokenizer([p for p, _ in pieces], add_special_tokens=False)["input_ids"],
                                     pieces):
            input_ids += ids
            labels += ids if learned else [IGNORE_INDEX] * len(ids)
        return input_ids[:max_length], labels[:max_length]

    def encode_prompt(self, messages: list[dict], max_length: int,
                      enable_thinking: bool | None = None) -> tuple[str, list[int]]:
        """The prompt text and ids for generating the next assistant turn, at most `max_length` ids.

        A long history loses its oldest turns first (`fit_history`, the one history policy); the system
        message and the last user turn (with anything after it) stay. If even that is too long, the
        head is cut: the end of the prompt, the generation prompt included, is what the model must see.
        """
        messages, tools = normalize_conversation(messages)
        try:
            kept = fit_history(self.tokenizer, messages, max_length, enable_thinking=enable_thinking, tools=tools)
        except PromptTooLong:
            kept = fit_history(None, messages, history_mode="none")
        text = render_prompt(self.tokenizer, kept, enable_thinking=enable_thinking, tools=tools)
        ids = self.tokenize(text)
        if len(ids) <= max_length:
            return text, ids
        ids = ids[-max_length:]
        return self.tokenizer.decode(ids), ids


# ---------------------------------------------------------------------------------------------
# 4. The datasets: item i = line i, a dict of unpadded LongTensors
# ---------------------------------------------------------------------------------------------

class JsonlDataset(Dataset):
    """What the four formats share: the lazy file, its line check, the tokenizer and the error prefix.

    `packable` says whether `PackedBatches` may pack several items into one row; `collate` turns a
    list of items into a padded batch when it does not pack.
    """

    packable = True
    validate_record: Callable[[Any], None] | None = None

    def __init__(self, data_path: str | os.PathLike, tokenizer, max_length: int = 512):
        self.file = JsonlFile(data_path, validate=self.validate_record)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, i: int) -> dict:
        record = self.file[i]
        try:
            return self.encode(record)
        except ValueError as e:
            raise self.file.error(i, e) from None

    def encode(self, record: dict) -> dict:
        raise NotImplementedError

    @staticmethod
    def collate(items: list[dict], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        return pad_rows(items, max_length, pad_token_id)


def _long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


class PretrainDataset(JsonlDataset):
    """`{"text": str}` -> `[bos] + tokens + [eos]`, the text cut so that the row fits `max_length`."""

    validate_record = staticmethod(check_text)

    def encode(self, record: dict) -> dict:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        text_ids = self.tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        input_ids = _long(bos + text_ids[:max(self.max_length - len(bos) - len(eos), 0)] + eos)
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class ChatDataset(JsonlDataset):
    """Base of the conversation formats: holds the `ChatEncoder` for the tokenizer's template."""

    def __init__(self, data_path: str | os.PathLike, tokenizer, max_length: int = 1024):
        super().__init__(data_path, tokenizer, max_length)
        self.chat = ChatEncoder(tokenizer)

    def encode_messages(self, messages: list[dict], prefix: str = "") -> dict:
        input_ids, labels = self.chat.encode_conversation(messages, self.max_length)
        return {f"{prefix}input_ids": _long(input_ids), f"{prefix}labels": _long(labels)}


class SFTDataset(ChatDataset):
    """`{"conversations": [...]}` -> the rendered chat; labels on assistant replies only.

    `history_mode="full"` (the default, MiniMind's data): item i is line i, the whole conversation with
    every reply learned. `query_utterance` or `none`: every assistant reply is an item of its own,
    its context the conversation before it as `chat_format.fit_history` sends it at inference in that
    mode, and only that reply learned, so that the model trains on prompts of the shape it will be
    asked with. Each reply needs its own item because each sees a different, compacted history (in
    `full` mode a reply's history is the whole conversation before it, so one item holds them all).
    Opening such a dataset reads every line once to find the replies.
    """

    validate_record = staticmethod(check_conversation)

    def __init__(self, data_path: str | os.PathLike, tokenizer, max_length: int = 1024, history_mode: str = "full",
                 history_utterances: int = DEFAULT_HISTORY_UTTERANCES):
        super().__init__(data_path, tokenizer, max_length)
        if history_mode not in HISTORY_MODES:
            raise ValueError(f"history_mode {history_mode!r}: expected one of {', '.join(HISTORY_MODES)}")
        self.history_mode, self.history_utterances = history_mode, history_utterances
        self.replies = None if history_mode == "full" else self.index_replies()

    def index_replies(self) -> np.ndarray:
        """(line, message position) of every assistant reply of the file, in order."""
        replies = [(line, position) for line in range(len(self.file))
                   for position, message in enumerate(self.file[line]["conversations"]) if message["role"] == "assistant"]
        return np.array(replies, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.file) if self.replies is None else len(self.replies)

    def __getitem__(self, i: int) -> dict:
        if self.replies is None:
            return super().__getitem__(i)
        line, position = (int(n) for n in self.replies[i])
        record = self.file[line]
        try:
            return self.encode_reply(record["conversations"], position)
        except ValueError as e:
            raise self.file.error(line, e) from None

    def encode(self, record: dict) -> dict:
        return self.encode_messages(record["conversations"])

    def encode_reply(self, messages: list[dict], position: int) -> dict:
        """The reply `messages[position]` after its history as `history_mode` compacts it; only it learned."""
        context = fit_history(None, messages[:position], history_mode=self.history_mode,
                              history_utterances=self.history_utterances)
        input_ids, labels = self.chat.encode_conversation(context + [messages[position]], self.max_length,
                                                          last_reply_only=True)
        return {"input_ids": _long(input_ids), "labels": _long(labels)}


class DPODataset(ChatDataset):
    """`{"chosen": [...], "rejected": [...]}` -> both conversations, each labelled as in SFT.

    `input_ids` / `labels` repeat the chosen side, so SFT-style code can read a DPO file too.
    """

    packable = False
    validate_record = staticmethod(check_preference)

    def encode(self, record: dict) -> dict:
        chosen = self.encode_messages(record["chosen"], "chosen_")
        rejected = self.encode_messages(record["rejected"], "rejected_")
        return {**chosen, **rejected, "input_ids": chosen["chosen_input_ids"], "labels": chosen["chosen_labels"]}

    @staticmethod
    def collate(items: list[dict], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        return pad_preference_pairs(items, pad_token_id)


class RLAIFDataset(ChatDataset):
    """`{"conversations": [...], "answer"?: str}` -> a prompt for the policy to answer.

    A final assistant message is not part of the prompt: it is kept as `reference`. `answer` is the
    verifiable answer for rule-based rewards ("" if none). `labels` are all -100 (nothing to imitate).
    `enable_thinking` is passed to the template (False appends an empty `<think>` block).
    """

    packable = False
    validate_record = staticmethod(check_prompt)

    def __init__(self, data_path: str | os.PathLike, tokenizer, max_length: int = 1024,
                 enable_thinking: bool | None = None):
        super().__init__(data_path, tokenizer, max_length)
        self.enable_thinking = enable_thinking

    def encode(self, record: dict) -> dict:
        messages, reference = record["conversations"], ""
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"] or ""
        prompt, ids = self.chat.encode_prompt(messages, self.max_length, self.enable_thinking)
        return {"input_ids": _long(ids), "labels": torch.full((len(ids),), IGNORE_INDEX),
                "prompt": prompt, "answer": str(record.get("answer", "")), "reference": reference}

    @staticmethod
    def collate(items: list[dict], max_length: int, pad_token_id: int) -> dict:
        return left_pad_prompts(items, pad_token_id)


def dataset_for_file(data_path: str | os.PathLike, tokenizer, max_length: int) -> PretrainDataset | SFTDataset:
    """A held-out file scored as training reads it: `{"text"}` lines on every token (PretrainDataset),
    `{"conversations"}` lines on the assistant's replies only (SFTDataset). Chosen by the first line."""
    first = JsonlFile(data_path)[0]
    dataset_class = PretrainDataset if isinstance(first, dict) and "text" in first else SFTDataset
    return dataset_class(data_path, tokenizer, max_length=max_length)


# ---------------------------------------------------------------------------------------------
# 5. Collation: packed rows, MiniMind's padded rows, DPO pairs, left-padded prompts
# ---------------------------------------------------------------------------------------------

def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (the model predicts labels[:, 1:] from positions :-1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def pack_rows(rows: list[list[dict]], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each row a list of items laid end to end, padded to `max_length`.

    `attention_mask` holds the document id (1, 2, ...; 0 = padding) so attention stays inside each
    document; `position_ids` restart at 0 per document. A document's first label is -100: otherwise
    the previous document's last token would be trained to predict it across the boundary.
    """
    shape = (len(rows), max_length)
    batch = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long)}
    for r, row in enumerate(rows):
        at = 0
        for doc_id, item in enumerate(row, start=1):
            n = min(len(item["input_ids"]), max_length - at)
            batch["input_ids"][r, at:at + n] = item["input_ids"][:n]
            batch["labels"][r, at + 1:at + n] = item["labels"][1:n]
            batch["attention_mask"][r, at:at + n] = doc_id
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
    return batch


def pad_rows(items: list[dict], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """MiniMind's rows: one item per row, right-padded to `max_length`, -100 labels on padding."""
    shape = (len(items), max_length)
    batch = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "position_ids": torch.arange(max_length).expand(shape).clone()}
    for r, item in enumerate(items):
        n = min(len(item["input_ids"]), max_length)
        batch["input_ids"][r, :n] = item["input_ids"][:n]
        batch["labels"][r, :n] = item["labels"][:n]
        batch["attention_mask"][r, :n] = 1
    return batch


def _right_pad(sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    for r, ids in enumerate(sequences):
        padded[r, :len(ids)] = ids
    return padded


def pad_preference_pairs(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """DPO batches: chosen and rejected right-padded to one common length (the longest of both), so a
    trainer can run them through the model as one batch of 2B rows."""
    length = max(len(item[f"{side}_input_ids"]) for item in items for side in ("chosen", "rejected"))
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [item[f"{side}_input_ids"] for item in items]
        batch[f"{side}_input_ids"] = _right_pad(ids, length, pad_token_id)
        batch[f"{side}_labels"] = _right_pad([item[f"{side}_labels"] for item in items], length, IGNORE_INDEX)
        batch[f"{side}_attention_mask"] = _right_pad([torch.ones_like(x) for x in ids], length, 0)
    return batch


def left_pad_prompts(items: list[dict], pad_token_id: int) -> dict:
    """RL batches: prompts left-padded (generation continues every row at the same column), with the
    prompt/answer/reference strings as lists."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for r, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[r, length - n:] = item["input_ids"]
        attention_mask[r, length - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            **{key: [item[key] for item in items] for key in ("prompt", "answer", "reference")}}


# ---------------------------------------------------------------------------------------------
# 6. Batches: order, sharding over ranks, packing with a look-ahead buffer, exact resume
# ---------------------------------------------------------------------------------------------

def take_row(buffer_lengths: list[int], max_length: int, pack: bool) -> list[int]:
    """Buffer positions that fill the next row: the oldest item first (so none waits forever), then,
    when packing, every later item that still fits (first fit over the look-ahead buffer)."""
    row, free = [0], max_length - min(buffer_lengths[0], max_length)
    if pack:
        for position in range(1, len(buffer_lengths)):
            if 0 < buffer_lengths[position] <= free:
                row.append(position)
                free -= buffer_lengths[position]
    return row


def _identity(item: Any) -> Any:
    return item


class _Items(Dataset):
    """`dataset[indices[k]]` as item k, for a DataLoader that fetches in order in worker processes."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, dict]:
        return self.indices[k], self.dataset[self.indices[k]]


class PackedBatches:
    """Batches of a dataset for one rank, packed or padded, resumable to the exact batch.

    Order: epoch e visits a permutation of the items seeded by (seed, e) (identity if not `shuffle`),
    cut to a multiple of `world_size` (at most world_size - 1 items skipped per epoch, as
    DistributedSampler(drop_last=True)); rank r takes `perm[r::world_size]`.

    `pack=True` (packable datasets: pretrain, SFT): rows of exactly `max_length` tokens holding whole
    items (an item longer than a row is truncated, never split), chosen first-fit from a look-ahead
    buffer of `buffer_size` items; see `pack_rows` for the keys. The shape is fixed, (batch_size,
    max_length), except a smaller last batch. `pack=False`: MiniMind's padded rows (`pad_rows`).
    DPO and RL datasets always use their own `collate` (padding to the longest in the batch).

    Iterating yields the rest of the current epoch and then moves to the next, so
    `for epoch in range(loader.epoch, epochs): for batch in loader: ...` resumes correctly.
    `state_dict()` after any batch, loaded into a fresh instance, continues with the identical batches.
    The states of every rank of a run on another number of processes load with `load_rank_states`:
    the rest of the epoch is the items none of them trained, shared out anew.

    With torch.distributed initialised and `world_size > 1`, packed ranks end each epoch together when
    the first runs out of rows (ranks hold different token counts; the rest of the epoch is skipped),
    so no rank waits for a gradient all-reduce that never comes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, max_length: int, pack: bool = True,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, buffer_size: int = 64):
        self.dataset, self.batch_size, self.max_length = dataset, batch_size, max_length
        self.pack = pack and getattr(dataset, "packable", True)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.num_workers, self.buffer_size = num_workers, max(buffer_size, 1) if self.pack else batch_size
        self.pad_token_id = getattr(dataset, "pad_token_id", 0)
        self.collate = pack_rows if self.pack else getattr(dataset, "collate", JsonlDataset.collate)
        self.epoch, self.position, self.buffer = 0, 0, []
        self.remaining: list[int] | None = None  # this epoch's order after a resume on another process count
        self._estimate = None

    # -- order --------------------------------------------------------------------------------

    def epoch_order(self, epoch: int, remaining: list[int] | None = None) -> np.ndarray:
        """Every item of `epoch` in the order the ranks share it out; `remaining` (what a run on another
        number of processes left untrained) replaces the epoch's permutation."""
        if remaining is not None:
            return np.asarray(remaining, dtype=np.int64)
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def rank_indices(self, epoch: int) -> np.ndarray:
        """The item indices this rank visits in `epoch`, in order."""
        return rank_share(self.epoch_order(epoch, self.remaining if epoch == self.epoch else None), self.rank,
                          self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a no-op if it is the current epoch (mid-epoch after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.position, self.buffer, self.remaining = epoch, 0, [], None

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the iteration stands after the last batch it yielded: small, ints only."""
        return {"epoch": self.epoch, "position": self.position, "buffer": list(self.buffer),
                "remaining": self.remaining, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        saved, this_run = (state["seed"], state["rank"], state["world_size"]), (self.seed, self.rank, self.world_size)
        if saved != this_run:
            raise ValueError(f"data state was saved with (seed, rank, world size) {saved}, this run has {this_run}")
        self.epoch, self.position, self.buffer = int(state["epoch"]), int(state["position"]), list(state["buffer"])
        self.remaining = state.get("remaining")

    def trained_items(self, state: dict) -> set[int]:
        """The items a rank's saved state has trained on in its epoch: those it fetched, less those
        still waiting in its packing buffer."""
        share = rank_share(self.epoch_order(state["epoch"], state.get("remaining")), state["rank"], state["world_size"])
        return set(share[:state["position"]].tolist()) - set(state["buffer"])

    def load_rank_states(self, states: list[dict]) -> None:
        """Continue the epoch of a run saved by `len(states)` processes (one state per rank) on this
        run's process count: the items none of its ranks trained, in the epoch's order, become the
        epoch's new order, which this run's ranks share out as usual. Within the epoch no item is
        trained twice, and none is skipped that the old ranks would have reached (the items waiting in
        their packing buffers included)."""
        if len({(state["epoch"], state["seed"]) for state in states}) != 1 or states[0]["seed"] != self.seed:
            raise ValueError(f"the ranks' data states disagree on (epoch, seed), or differ from this run's seed {self.seed}")
        epoch = int(states[0]["epoch"])
        trained = set().union(*(self.trained_items(state) for state in states))
        order = self.epoch_order(epoch, states[0].get("remaining"))
        self.epoch, self.position, self.buffer = epoch, 0, []
        self.remaining = [index for index in order.tolist() if index not in trained]

    # -- iteration ----------------------------------------------------------------------------

    def _fetch(self, indices: list[int]) -> Iterator[tuple[int, dict]]:
        items = _Items(self.dataset, indices)
        if self.num_workers == 0:
            return (items[k] for k in range(len(items)))
        return iter(DataLoader(items, batch_size=None, shuffle=False, num_workers=self.num_workers,
                               collate_fn=_identity))

    def _item_length(self, item: dict) -> int:
        return min(len(item["input_ids"]), self.max_length)

    def __iter__(self) -> Iterator[dict]:
        share = self.rank_indices(self.epoch)
        stream = self._fetch([*self.buffer, *share[self.position:].tolist()])
        restored = len(self.buffer)  # the first `restored` fetched items refill the saved buffer
        buffer: list[tuple[int, dict]] = []
        sync = self.pack and self.world_size > 1 and dist.is_available() and dist.is_initialized()
        while True:
            rows = []
            while len(rows) < self.batch_size:
                for index, item in stream:
                    buffer.append((index, item))
                    restored, self.position = (restored - 1, self.position) if restored else (0, self.position + 1)
                    if len(buffer) == self.buffer_size:
                        break
                if not buffer:
                    break
                taken = take_row([self._item_length(item) for _, item in buffer], self.max_length, self.pack)
                taken = dict.fromkeys(taken)  # ordered, with O(1) membership
                rows.append([buffer[p][1] for p in taken])
                buffer = [entry for p, entry in enumerate(buffer) if p not in taken]
            if not (_all_ranks_have(rows) if sync else rows):
                self.epoch, self.position, self.buffer, self.remaining = self.epoch + 1, 0, [], None
                return
            self.buffer = [index for index, _ in buffer]
            yield self.collate(rows if self.pack else [row[0] for row in rows], self.max_length, self.pad_token_id)

    # -- size ---------------------------------------------------------------------------------

    def estimated_batches_per_epoch(self, sample_size: int = 1000) -> int:
        """Batches in one epoch of this rank: exact without packing; with packing, estimated by packing
        the token lengths of an evenly spread sample of up to `sample_size` items."""
        items_per_rank = len(self.dataset) // self.world_size
        if not self.pack:
            return math.ceil(items_per_rank / self.batch_size)
        if self._estimate is None:
            n = len(self.dataset)
            sample = np.unique(np.linspace(0, n - 1, min(n, sample_size)).round().astype(int))
            lengths = [self._item_length(item) for _, item in self._fetch(sample.tolist())]
            rows = 0
            while lengths:
                taken = set(take_row(lengths[:self.buffer_size], self.max_length, pack=True))
                lengths = [length for p, length in enumerate(lengths) if p not in taken]
                rows += 1
            self._estimate = max(1, math.ceil(rows * items_per_rank / len(sample) / self.batch_size))
        return self._estimate


def rank_share(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s items of an epoch's `order`: cut to a multiple of `world_size` (at most
    world_size - 1 items skipped, as DistributedSampler(drop_last=True)), then every world_size-th."""
    return order[:len(order) // world_size * world_size][rank::world_size]


def _all_ranks_have(rows: list) -> bool:
    """True when every rank has a batch to give (a MIN all-reduce of `rows != []`)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1 if rows else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
