"""The shipped demo data: rebuilt byte for byte by its generator, every line in its format, every
answer right (checked by an independent solver), and the eval questions held out of training."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.tasks import extract_answer, is_correct
from scripts.make_demo_data import main as make_demo_data

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "dataset" / "demo"
FILES = ["pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "rlaif.jsonl", "reason.jsonl", "eval.jsonl", "multiturn_eval.jsonl"]
TRAINING_FILES = [name for name in FILES if name not in ("eval.jsonl", "multiturn_eval.jsonl")]
BENCHMARK_FILES = sorted(str(path.relative_to(DEMO_DIR)) for path in DEMO_DIR.glob("c*/*/*.csv"))
LONG_TEXT = "long_text.jsonl"
TASKS = {"add_1digit", "sub_1digit", "successor", "compare", "count_items", "count_letters", "unit_convert",
         "add_2digit", "sub_2digit", "mul_1digit"}


def read_rows(name: str) -> list[dict]:
    with open(DEMO_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- reproducibility ------------------------------------------------------------------------

def test_generator_rebuilds_the_committed_files_byte_for_byte(tmp_path):
    """Once in a fresh interpreter (new hash seed) and once in this one: both equal the committed
    files, so the data is reproducible and the committed copy cannot drift from its generator."""
    script = REPO_ROOT / "scripts" / "make_demo_data.py"
    subprocess.run([sys.executable, str(script), "--out_dir", str(tmp_path / "a")], check=True, capture_output=True)
    make_demo_data(["--out_dir", str(tmp_path / "b")])
    assert len(BENCHMARK_FILES) == 12
    for name in FILES + BENCHMARK_FILES + [LONG_TEXT]:
        committed = (DEMO_DIR / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == committed, name
        assert (tmp_path / "b" / name).read_bytes() == committed, name


def test_committed_demo_data_is_small():
    assert sum((DEMO_DIR / name).stat().st_size for name in FILES + BENCHMARK_FILES + [LONG_TEXT]) <= 20_000_000


# --- formats --------------------------------------------------------------------------------

def check_message(message: dict) -> None:
    role = message.get("role")
    assert role in {"system", "user", "assistant", "tool"}, message
    assert isinstance(message.get("content"), str), message
    extra_keys = {"system": {"functions"}, "assistant": {"tool_calls", "reasoning_content"}}
    allowed = {"role", "content"} | extra_keys.get(role, set())
    assert set(message) <= allowed, message
    if role == "assistant":
        assert message["content"].strip() or message.get("tool_calls"), message
    else:
        assert message["content"].strip(), message
    if "reasoning_content" in message:
        assert isinstance(message["reasoning_content"], str) and message["reasoning_content"].strip()
    for call in message.get("tool_calls", []):
        assert call["type"] == "function" and isinstance(call["function"]["name"], str), call
        arguments = call["function"]["arguments"]
        assert isinstance(arguments if isinstance(arguments, dict) else json.loads(arguments), dict), call
    for tool in message.get("functions", []):
        assert tool["type"] == "function" and tool["function"]["name"] and "parameters" in tool["function"]


def check_conversation(messages: list, ends_with_assistant: bool = True) -> None:
    """ChatML order: optional system first, then user turns each answered by the assistant,
    tool results only right after an assistant turn that called as many tools."""
    assert isinstance(messages, list) and messages
    for message in messages:
        check_message(message)
    roles = [message["role"] for message in messages]
    assert "system" not in roles[1:]
    turns = messages[1:] if roles[0] == "system" else messages
    assert turns[0]["role"] == "user"
    pending_calls = 0
    for previous, message in zip(turns, turns[1:]):
        if message["role"] == "tool":
            assert pending_calls > 0, messages
            pending_calls -= 1
            continue
        assert pending_calls == 0, messages
        expected = "assistant" if previous["role"] in {"user", "tool"} else "user"
        assert message["role"] == expected, messages
        pending_calls = len(message.get("tool_calls", []))
    if ends_with_assistant:
        assert turns[-1]["role"] == "assistant" and not turns[-1].get("tool_calls"), messages
    if any("functions" in message for message in messages):
        assert roles[0] == "system" and "tool_calls" in json.dumps(messages)


def check_pretrain(row):
    assert set(row) == {"text"} and isinstance(row["text"], str) and row["text"].strip()


def check_sft(row):
    assert set(row) == {"conversations"}
    check_conversation(row["conversations"])


def check_dpo(row):
    assert set(row) == {"chosen", "rejected", "answer"}
    check_conversation(row["chosen"])
    check_conversation(row["rejected"])
    assert row["chosen"][:-1] == row["rejected"][:-1]
    chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    assert chosen != rejected
    assert is_correct(chosen, row["answer"]) and not is_correct(rejected, row["answer"])


def check_single_question(row, keys):
    assert set(row) == keys
    assert isinstance(row["answer"], str) and row["answer"]
    check_conversation(row["conversations"], ends_with_assistant=False)
    assert [message["role"] for message in row["conversations"]] == ["user"]


def check_rlaif(row):
    check_single_question(row, {"conversations", "answer"})


def check_eval(row):
    check_single_question(row, {"conversations", "answer", "task", "lang"})
    assert row["task"] in TASKS and row["lang"] in {"zh", "en"}


def check_multiturn_eval(row):
    assert set(row) == {"conversations", "answer", "task", "lang"} and row["task"] == "recall"
    check_conversation(row["conversations"], ends_with_assistant=False)
    assert row["conversations"][-1]["role"] == "user"
    assert sum(message["role"] == "user" for message in row["conversations"]) >= 3  # the fact, a distractor, the question


def check_reason(row):
    assert set(row) == {"conversations", "answer"}
    check_conversation(row["conversations"])
    reply = row["conversations"][-1]
    if "reasoning_content" in reply:
        assert "<think>" not in reply["content"]
    else:
        assert re.fullmatch(r"<think>\n.+\n</think>\n\n.+", reply["content"], re.DOTALL), reply
    assert reply["content"].endswith(row["answer"])
    assert is_correct(reply["content"], row["answer"])


VALIDATORS = {"pretrain.jsonl": check_pretrain, "sft.jsonl": check_sft, "dpo.jsonl": check_dpo,
              "rlaif.jsonl": check_rlaif, "reason.jsonl": check_reason, "eval.jsonl": check_eval,
              "multiturn_eval.jsonl": check_multiturn_eval}


@pytest.mark.parametrize("name", FILES)
def test_every_line_has_its_format(name):
    raw = (DEMO_DIR / name).read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\r" not in raw
    rows = read_rows(name)
    for line_number, row in enumerate(rows, 1):
        try:
            VALIDATORS[name](row)
        except (AssertionError, KeyError, TypeError) as error:
            raise AssertionError(f"{name}:{line_number}: {error!r}") from None


def test_sft_covers_every_kind_of_conversation():
    rows = [row["conversations"] for row in read_rows("sft.jsonl")]
    assert 10_000 <= len(rows) <= 20_000
    assert sum(turns[0]["role"] == "system" for turns in rows) >= 100
    assert sum(any(m.get("tool_calls") for m in turns) for turns in rows) >= 50
    assert sum(any(m.get("reasoning_content") for m in turns) for turns in rows) >= 50
    assert sum(len(turns) > 3 for turns in rows) >= 500
    assert any(re.search(r"[\u4e00-\u9fff]", turns[-1]["content"]) for turns in rows)


def test_eval_mixes_tasks_and_languages():
    rows = read_rows("eval.jsonl")
    assert 350 <= len(rows) <= 450
    assert {(row["task"], row["lang"]) for row in rows} == {(task, lang) for task in TASKS for lang in ("zh", "en")}
    assert len({row["conversations"][0]["content"] for row in rows}) == len(rows)


# --- answers are right: an independent solver reads each question ---------------------------

UNIT_FACTORS = {("米", "厘米"): 100, ("千米", "米"): 1000, ("千克", "克"): 1000, ("小时", "分钟"): 60,
                ("分钟", "秒"): 60, ("天", "小时"): 24, ("m", "cm"): 100, ("km", "m"): 1000, ("kg", "g"): 1000,
                ("h", "min"): 60, ("min", "s"): 60, ("day", "hours"): 24, ("days", "hours"): 24,
                ("meter", "centimeter"): 100, ("kilometer", "meter"): 1000, ("kilogram", "gram"): 1000,
                ("hour", "minute"): 60, ("minute", "second"): 60, ("day", "hour"): 24}
OPERATIONS = {"加": int.__add__, "+": int.__add__, "plus": int.__add__, "sum": int.__add__,
              "减": int.__sub__, "-": int.__sub__, "minus": int.__sub__, "difference": int.__sub__,
              "乘以": int.__mul__, "×": int.__mul__, "times": int.__mul__, "product": int.__mul__}


def solve(question: str) -> int:
    """Work out a generated question's answer from its text alone, one rule per question shape."""
    def match(pattern: str) -> re.Match | None:
        return re.fullmatch(pattern, question)

    if m := match(r"(\d+) (\S+?) ?(?:= \? |等于多少)(\S+?)？?"):
        return int(m[1]) * UNIT_FACTORS[m[2], m[3]]
    if m := match(r"How many (\w+?)s are in (\d+) (\w+?)s?\?"):
        return int(m[2]) * UNIT_FACTORS[m[3], m[1]]
    if m := re.search(r"(\d+) ?(加|减|乘以|\+|-|×|plus|minus|times) ?(\d+)", question):
        return OPERATIONS[m[2]](int(m[1]), int(m[3]))
    if m := re.search(r"(sum|difference|product) of (\d+) and (\d+)", question):
        return OPERATIONS[m[1]](int(m[2]), int(m[3]))
    if m := match(r"(\d+) 后面的一个数是几？|比 (\d+) 大 1 的数是多少？|What number comes after (\d+)\?|What is one more than (\d+)\?"):
        return int(next(g for g in m.groups() if g)) + 1
    if re.search(r"哪个|Which", question):
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        return max(numbers) if re.search(r"大|larger|bigger", question) else min(numbers)
    if m := match(r"(.+) 中有几个(.+)？"):
        return m[1].split("、").count(m[2])
    if m := match(r"数一数，下面有几个(.+)：(.+)"):
        return m[2].split("、").count(m[1])
    if m := match(r"下面一共有几个.+：(.+)？") or match(r"数一数：(.+)，一共几个？"):
        return len(m[1].split("、"))
    if m := (match(r"How many times does (\w+) appear in: (.+)\?")
              or match(r"Count how many times (\w+) appears: (.+)\.")):
        return m[2].split(", ").count(m[1])
    if m := match(r"How many \w+ are in this list: (.+)\?") or match(r"Count the items: (.+)\."):
        return len(m[1].split(", "))
    if m := match(r"单词 ([a-z]+) 里有几个字母 ([a-z])？") or match(r"“([a-z]+)” 中字母 ([a-z]) 出现了几次？"):
        return m[1].count(m[2])
    if m := (match(r"How many times does the letter ([a-z]) appear in ([a-z]+)\?")
              or match(r'How many ([a-z])\'s are in "([a-z]+)"\?')):
        return m[2].count(m[1])
    if m := match(r"单词 ([a-z]+) 有几个字母？|“([a-z]+)” 一共有多少个字母？"
                  r'|How many letters are in the word ([a-z]+)\?|How many letters does "([a-z]+)" have\?'):
        return len(next(g for g in m.groups() if g))
    raise ValueError(f"no rule for {question!r}")


@pytest.mark.parametrize("name", ["eval.jsonl", "rlaif.jsonl", "reason.jsonl", "dpo.jsonl"])
def test_answers_match_an_independent_solver(name):
    for row in read_rows(name):
        question = (row.get("conversations") or row.get("chosen"))[0]["content"]
        assert str(solve(question)) == row["answer"], (question, row["answer"])


def test_single_turn_sft_task_answers_are_right():
    checked = 0
    for row in read_rows("sft.jsonl"):
        turns = row["conversations"]
        if len(turns) == 2 and re.fullmatch(r"\d+", turns[1]["content"]):
            try:
                solved = solve(turns[0]["content"])
            except ValueError:  # a chatterbot trivia question with a numeric reply
                continue
            assert str(solved) == turns[1]["content"], turns
            checked += 1
    assert checked >= 5000


RECALL_FACT = re.compile(r"我有 (\d+) (.)(.+)。|I have (\d+) (\w+)\.")
RECALL_QUESTION = re.compile(r"(又买了|送给朋友) (\d+) (.)(.+)，现在(?:一共有|还剩)几\3\4？"
                             r"|I (bought|gave) (\d+) (?:more )?\w+(?: to a friend)?\. How many (\w+) do I have (?:now|left)\?")


def solve_recall(conversation: list[dict]) -> tuple[str, str, int]:
    """The fact and the question of a recall conversation, and the answer worked out from their text
    alone: the one earlier user turn that states a count of the thing the last question asks about."""
    question = RECALL_QUESTION.fullmatch(conversation[-1]["content"])
    zh = question[1] is not None
    thing = question[3] + question[4] if zh else question[7]
    change = int(question[2] if zh else question[6]) * (1 if (question[1] or question[5]) in ("又买了", "bought") else -1)
    facts = [(message["content"], fact) for message in conversation[:-1] if message["role"] == "user"
             and (fact := RECALL_FACT.fullmatch(message["content"]))
             and (fact[2] + fact[3] if fact[1] else fact[5]) == thing]
    [(fact_text, fact)] = facts
    return fact_text, conversation[-1]["content"], int(fact[1] or fact[4]) + change


def recall_conversations(name: str) -> list[list[dict]]:
    return [row["conversations"] for row in read_rows(name)
            if any(RECALL_QUESTION.fullmatch(m["content"]) for m in row["conversations"] if m["role"] == "user")]


def test_recall_answers_match_an_independent_solver():
    held_out = read_rows("multiturn_eval.jsonl")
    assert len(held_out) == 200 and {row["lang"] for row in held_out} == {"zh", "en"}
    for row in held_out:
        assert str(solve_recall(row["conversations"])[2]) == row["answer"], row
    training = recall_conversations("sft.jsonl")
    assert len(training) >= 900
    for conversation in training:
        assert conversation[-1]["role"] == "assistant" and str(solve_recall(conversation[:-1])[2]) == conversation[-1]["content"]


def test_recall_conversations_need_an_earlier_turn_and_have_distractors():
    """The last question names no count: only the fact, a user turn with unrelated ones after it, answers it."""
    for row in read_rows("multiturn_eval.jsonl"):
        conversation = row["conversations"]
        fact, question, _ = solve_recall(conversation)
        fact_at = [m["content"] for m in conversation].index(fact)
        assert len(re.findall(r"\d+", question)) == 1  # the change alone, not the count it changes
        assert len(conversation) - 1 - fact_at >= 4  # the fact's acknowledgement, at least one exchange, the question


# --- eval questions are held out ------------------------------------------------------------

def training_text_lines() -> set[str]:
    lines = set()
    for name in TRAINING_FILES:
        for row in read_rows(name):
            texts = [row["text"]] if "text" in row else [
                message.get(field) or "" for key in ("conversations", "chosen", "rejected")
                for message in row.get(key, []) for field in ("content", "reasoning_content")]
            for text in texts:
                lines.update(line.strip() for line in text.split("\n"))
    return lines


def test_held_out_recall_questions_are_asked_in_no_training_conversation():
    """A recall question is its (fact, question) pair: no training conversation says both of a held-out one."""
    held_out = {solve_recall(row["conversations"])[:2] for row in read_rows("multiturn_eval.jsonl")}
    for name in TRAINING_FILES:
        for row in read_rows(name):
            said = {m["content"] for key in ("conversations", "chosen", "rejected") for m in row.get(key, [])
                    if m["role"] == "user"}
            assert not any(fact in said and question in said for fact, question in held_out), (name, row)


def test_eval_questions_never_appear_in_training_files():
    seen_in_training = training_text_lines()
    leaked = [row["conversations"][0]["content"] for row in read_rows("eval.jsonl")
              if row["conversations"][0]["content"] in seen_in_training]
    assert not leaked


# --- the demo benchmark, in the C-Eval and CMMLU layouts -------------------------------------

def read_csv(name: str) -> list[dict]:
    with open(DEMO_DIR / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_benchmark_files_have_the_official_layout_and_right_answers(name):
    benchmark, split, file = name.split("/")
    rows = read_csv(name)
    header = list(rows[0])
    if benchmark == "ceval":
        assert split in {"dev", "val"} and file.endswith(f"_{split}.csv")
        assert header == ["id", "question", "A", "B", "C", "D", "answer"] + ["explanation"] * (split == "dev")
    else:
        assert split in {"dev", "test"} and header == ["", "Question", "A", "B", "C", "D", "Answer"]
    assert len(rows) == (5 if split == "dev" else 60)
    for row in rows:
        question, options, letter = row.get("question") or row["Question"], [row[c] for c in "ABCD"], row.get("answer") or row["Answer"]
        assert len(set(options)) == 4, row
        assert options["ABCD".index(letter)] == str(solve(question)), row


def test_benchmark_answers_are_spread_over_the_letters():
    letters = [row.get("answer") or row["Answer"] for name in BENCHMARK_FILES for row in read_csv(name)]
    assert all(letters.count(letter) > len(letters) / 8 for letter in "ABCD")


def test_benchmark_questions_are_in_no_training_file_nor_eval_and_never_repeat():
    questions = [row.get("question") or row["Question"] for name in BENCHMARK_FILES for row in read_csv(name)]
    assert len(set(questions)) == len(questions) == 390
    eval_questions = {row["conversations"][0]["content"] for row in read_rows("eval.jsonl")}
    assert not set(questions) & (training_text_lines() | eval_questions)


def test_long_text_is_long_held_out_and_from_the_novel():
    chapters = [row["text"] for row in read_rows(LONG_TEXT)]
    assert len(chapters) == 10 and chapters[0].startswith("第一回 宴桃园豪杰三结义")
    assert sum(len(chapter) for chapter in chapters) >= 45_000  # at ~0.87 characters per token: six 8192-token windows
    seen_in_training = training_text_lines()
    assert not any(line in seen_in_training for chapter in chapters for line in chapter.split("\n") if len(line) > 10)


# --- answer checking ------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("19", "19"), (" 19。", "19"), ("19.", "19"), ("-3", "-3"),
    ("<think>\n12 + 7 = 19\n</think>\n\n答案是 19", "19"),
    ("<think>\nstep\n</think>\nThe answer is 19.", "19"),
    ("Answer: 42", "42"), ("答案：42！", "42"), ("<answer>\n7\n</answer>", "7"),
    ("<think>\nstill thinking about 19", ""), ("12 + 7 = 19", "12 + 7 = 19"), ("Apple", "Apple"),
])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize("reply, answer, correct", [
    ("19", "19", True), ("19.0", "19", True), ("<think>\nx\n</think>\n\n19", "19", True),
    ("The answer is 19.", "19", True), ("apple", "Apple", True),
    ("18", "19", False), ("119", "19", False), ("19 个", "19", False), ("12 + 7 = 19", "19", False),
    ("", "19", False), ("<think>\n19", "19", False), ("-19", "19", False),
])
def test_is_correct(reply, answer, correct):
    assert is_correct(reply, answer) is correct
