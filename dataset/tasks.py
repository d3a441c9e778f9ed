"""Exact-match answer checking for the verifiable tasks in the demo data.

The answer convention
---------------------
Every generated task (arithmetic, comparison, counting, unit conversion, ...) has one
*canonical answer*: a short string, in practice a bare integer such as ``"19"`` or ``"300"``.
It is stored in the ``"answer"`` field of ``rlaif.jsonl``, ``reason.jsonl`` and ``eval.jsonl``.

A model's reply counts as correct when the answer extracted from it equals the canonical
answer. Extraction is deliberately small and predictable, so that evaluation and the RL reward
agree and a reader can predict a score by eye:

1. A reasoning block is dropped: everything up to the last ``</think>`` goes. A reply that opens
   ``<think>`` and never closes it has no answer (the model ran out of tokens while thinking).
   This is ``model.chat_format.final_answer``, the one reader of the think block.
2. ``<answer>...</answer>`` tags (the older MiniMind R1 style) are unwrapped.
3. If the text names its answer with a marker ("答案是 19", "The answer is 19", "Answer: 19"),
   only what follows the last marker is kept.
4. Surrounding whitespace and sentence punctuation are stripped (a leading minus sign stays).

So ``"19"``, ``" 19。"``, ``"<think>\\n7 + 12 = 19\\n</think>\\n\\n答案是 19"`` and
``"The answer is 19."`` all extract to ``"19"``; ``"19 个"`` or ``"12 + 7 = 19"`` do not: the
model is trained to reply with the bare answer, and the check holds it to that.

Comparison ignores case, and two numbers are equal when their values are (``"19.0"`` and
``"19"``), so a reply is never marked wrong for a formatting detail that carries no meaning.
"""
from __future__ import annotations

import re

from model.chat_format import final_answer

# Phrases that introduce the final answer in a longer reply (matched case-insensitively).
_ANSWER_MARKER = re.compile(r"答案是|答案[:：]|最终答案[:：]?|the answer is|answer\s*[:：]", re.IGNORECASE)
_ANSWER_TAGS = re.compile(r"</?answer>", re.IGNORECASE)
# Whitespace and sentence punctuation (ASCII and full-width) that never belong to an answer.
_EDGE_CHARS = " \t\r\n\u3000.,;:!?。，、；：！？\"'“”‘’「」『』()（）[]【】*`"
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The final answer a reply commits to, following the convention in the module docstring."""
    text = _ANSWER_TAGS.sub(" ", final_answer(text))
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        text = text[markers[-1].end():]
    text = text.strip(_EDGE_CHARS)
    return " ".join(text.split())


def _normalize(answer: str) -> str:
    answer = " ".join(answer.strip(_EDGE_CHARS).split()).casefold()
    if _NUMBER.fullmatch(answer):
        value = float(answer)
        return str(int(value)) if value.is_integer() else repr(value)
    return answer


def is_correct(prediction: str, answer: str) -> bool:
    """Whether a model reply (raw generated text) states the canonical `answer`."""
    extracted = extract_answer(prediction)
    return bool(extracted) and _normalize(extracted) == _normalize(answer)
