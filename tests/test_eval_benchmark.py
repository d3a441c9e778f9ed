"""scripts/eval_benchmark.py: C-Eval and CMMLU scored exactly as their official protocol says, checked
against an implementation of that protocol written out here, against lm-evaluation-harness on the same
files, and on bad input."""
import csv
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from model.loader import load_model_and_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts import eval_benchmark

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = {"ceval": ["middle_school_mathematics", "logic"], "cmmlu": ["elementary_mathematics", "chinese_history"]}
SCORED_SPLIT = {"ceval": "val", "cmmlu": "test"}
CHINESE_NAMES = {"middle_school_mathematics": "初中数学", "logic": "逻辑学", "elementary_mathematics": "初等数学",
                 "chinese_history": "中国历史"}


# --- fixtures: a sharp random model, tiny folders in both layouts ----------------------------

@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """A random tiny model whose weight matrices are scaled far from the near-uniform init, so its
    letter logits differ by whole units and a one-word change to the prompt changes answers."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(30)
    path = tmp_path_factory.mktemp("model") / "sharp_64.pth"
    save_weights(model, path)
    loaded, tokenizer = load_model_and_tokenizer(str(path), device="cpu", dtype="float32")
    return path, loaded, tokenizer


def random_rows(rng: random.Random, count: int) -> list[list[str]]:
    """Questions of varied length (so batches need padding), numeric-only and word options, answers A-D."""
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = rng.choice([f"{a} 加 {b} 等于多少？", f"下列说法中，关于第 {a} 题与第 {b} 题，哪一项是正确的？请仔细判断"])
        options = [f"{a + b + d:02d}" for d in rng.sample(range(-5, 6), 4)] if rng.random() < 0.5 else \
            [rng.choice(["对", "错", "不确定", "NA", "以上都不对", "无法判断"]) + str(i) for i in range(4)]
        rows.append([question, *options, rng.choice("ABCD")])
    return rows


def write_layout(root: Path, benchmark: str, n: int = 14) -> Path:
    """`root/<benchmark>` in the official layout: 2 subjects, 5 dev questions each, `n` scored."""
    rng = random.Random(benchmark)
    folder = root / benchmark
    for subject in SUBJECTS[benchmark]:
        for split, count in (("dev", 5), (SCORED_SPLIT[benchmark], n)):
            rows = random_rows(rng, count)
            if benchmark == "ceval":
                path = folder / split / f"{subject}_{split}.csv"
                table = [["id", "question", "A", "B", "C", "D", "answer"]] + [[str(i), *row] for i, row in enumerate(rows)]
            else:
                path = folder / split / f"{subject}.csv"
                table = [["", "Question", "A", "B", "C", "D", "Answer"]] + [[str(i), *row] for i, row in enumerate(rows)]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(table)
    return folder


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {benchmark: write_layout(root, benchmark) for benchmark in SUBJECTS}


# --- the official protocol, written out independently ----------------------------------------

def official_prompt(benchmark: str, subject: str, dev: list[list[str]], row: list[str]) -> str:
    """C-Eval: 以下是中国关于{科目}考试的单项选择题…, blocks `{q}\\nA. …\\n答案：{X}\\n\\n`;
    CMMLU: 以下是关于{科目}的单项选择题…, blocks `题目：{q}\\nA. …\\n答案是：{X}\\n\\n`."""
    if benchmark == "ceval":
        header, start, end = f"以下是中国关于{CHINESE_NAMES[subject]}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案："
    else:
        header, start, end = f"以下是关于{CHINESE_NAMES[subject]}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是："

    def block(r: list[str]) -> str:
        return f"{start}{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n{end}"

    return header + "".join(block(example) + example[5] + "\n\n" for example in dev) + block(row)


def read_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row[1:] for row in list(csv.reader(f))[1:]]  # drop the id / index column


def reference_answers(model, tokenizer, folder: Path, benchmark: str, shots: int, rename: str | None = None) -> dict:
    """Per subject, the chosen letter and the reference letter of each question: one prompt at a time, no
    padding, argmax of the four letters' logits at the last position. `rename` swaps the subject's Chinese
    name for another word."""
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    answers = {}
    for subject in SUBJECTS[benchmark]:
        split = SCORED_SPLIT[benchmark]
        name = f"{subject}_{{}}.csv" if benchmark == "ceval" else f"{subject}.csv"
        dev = read_rows(folder / "dev" / name.format("dev"))[:shots]
        answers[subject] = []
        for row in read_rows(folder / split / name.format(split)):
            prompt = official_prompt(benchmark, subject, dev, row)
            if rename:
                prompt = prompt.replace(CHINESE_NAMES[subject], rename, 1)
            ids = torch.tensor([tokenizer(prompt).input_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            answers[subject].append(("ABCD"[int(logits[letters].argmax())], row[5]))
    return answers


@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
@pytest.mark.parametrize("shots", [0, 5])
def test_correct_counts_equal_an_independent_implementation(sharp_model, layouts, bench, shots):
    _, model, tokenizer = sharp_model
    results, details = eval_benchmark.evaluate(model, tokenizer, bench, layouts[bench], shots=shots, batch_size=4)
    answers = reference_answers(model, tokenizer, layouts[bench], bench, shots)
    expected = {subject: sum(chosen == reference for chosen, reference in pairs) for subject, pairs in answers.items()}
    assert {name: entry["correct"] for name, entry in results["subjects"].items()} == expected
    chosen = {subject: [letter for letter, _ in pairs] for subject, pairs in answers.items()}
    assert {subject: [d["prediction"] for d in details if d["subject"] == subject] for subject in chosen} == chosen
    assert results["n"] == 28 and len(details) == 28
    assert results["accuracy"] == sum(expected.values()) / 28


def test_the_protocol_check_can_fail(sharp_model, layouts):
    """The model is sharp enough that one changed word in the header changes its answers: a runner
    that got the prompt slightly wrong would not pass the test above (whose counts come from these answers)."""
    _, model, tokenizer = sharp_model
    for benchmark in SUBJECTS:
        right = reference_answers(model, tokenizer, layouts[benchmark], benchmark, 0)
        renamed = reference_answers(model, tokenizer, layouts[benchmark], benchmark, 0, rename="物理")
        assert right != renamed  # some chosen letter differs


# --- the prompt text, byte for byte ------------------------------------------------------------

def test_rendered_prompts_are_the_official_strings():
    question = eval_benchmark.Question("logic", "1 加 1 等于多少？", ("1", "2", "3", "4"), "B", "x.csv:2")
    examples = [eval_benchmark.Question("logic", f"第{i}题", ("甲", "乙", "丙", "丁"), "ABCDA"[i], f"x.csv:{i}")
                for i in range(5)]
    ceval, cmmlu = eval_benchmark.BENCHMARKS["ceval"], eval_benchmark.BENCHMARKS["cmmlu"]
    assert eval_benchmark.render_question(ceval, question, []) == (
        "以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n"
        "1 加 1 等于多少？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert eval_benchmark.render_question(ceval, question, examples) == (
        "以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n"
        "第0题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n"
        "第1题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：B\n\n"
        "第2题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：C\n\n"
        "第3题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：D\n\n"
        "第4题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n"
        "1 加 1 等于多少？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    cmmlu_question = dataclasses.replace(question, subject="logical")
    cmmlu_examples = [dataclasses.replace(example, subject="logical") for example in examples]
    assert eval_benchmark.render_question(cmmlu, cmmlu_question, []) == (
        "以下是关于逻辑学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：1 加 1 等于多少？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")
    assert eval_benchmark.render_question(cmmlu, cmmlu_question, cmmlu_examples) == (
        "以下是关于逻辑学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：第0题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：A\n\n"
        "题目：第1题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：B\n\n"
        "题目：第2题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：C\n\n"
        "题目：第3题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：D\n\n"
        "题目：第4题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：A\n\n"
        "题目：1 加 1 等于多少？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")


def test_subject_tables_are_complete():
    ceval, cmmlu = eval_benchmark.CEVAL_SUBJECTS, eval_benchmark.CMMLU_SUBJECTS
    assert len(ceval) == 52 and len(cmmlu) == 67
    assert {category for _, category in ceval.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    assert [c for _, c in ceval.values()].count("STEM") == 20
    assert eval_benchmark.CMMLU_CHINA_SPECIFIC <= set(cmmlu)
    assert ceval["accountant"][0] == "注册会计师" and cmmlu["agronomy"][0] == "农学"


def test_chat_mode_wraps_the_prompt_in_a_user_turn(sharp_model):
    _, _, tokenizer = sharp_model
    assert eval_benchmark.chat_wrapped(tokenizer, "题目：x\n答案是：", None) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n题目：x\n答案是：<|im_end|>\n<|im_start|>assistant\n")


# --- lm-evaluation-harness on the same files --------------------------------------------------

@pytest.mark.parametrize("bench, shots", [("ceval", 0), ("cmmlu", 5)])
def test_lm_eval_on_the_generated_tasks_agrees(sharp_model, layouts, tmp_path, bench, shots):
    """Same prompts (lm-eval's logged contexts), same per-subject correct counts."""
    _, model, tokenizer = sharp_model
    benchmark = bench
    split = SCORED_SPLIT[benchmark]
    ours, _ = eval_benchmark.evaluate(model, tokenizer, benchmark, layouts[benchmark], shots=shots, batch_size=4)
    tasks = eval_benchmark.write_lm_eval_tasks(benchmark, layouts[benchmark], split, None, tmp_path)
    counts, results = eval_benchmark.run_harness(model, tokenizer, tasks, shots=shots, batch_size=4, chat=False,
                                                 include_path=tmp_path)
    prefix = len(eval_benchmark.lm_eval_task_name(eval_benchmark.BENCHMARKS[benchmark], split, ""))
    assert {task[prefix:]: count[0] for task, count in counts.items()} == \
        {name: entry["correct"] for name, entry in ours["subjects"].items()}
    _, prompts = eval_benchmark.build_prompts(eval_benchmark.BENCHMARKS[benchmark], layouts[benchmark], split,
                                              SUBJECTS[benchmark], shots)
    harness_prompts = [sample["arguments"][0][0] for task in tasks for sample in results["samples"][task]]
    assert sorted(harness_prompts) == sorted(prompts)


# --- bad input: a clear error and no number ---------------------------------------------------

def run_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "eval_benchmark.py"), *flags, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd="/")


def broken_copy(layouts, tmp_path, edit) -> Path:
    folder = tmp_path / "ceval"
    subprocess.run(["cp", "-r", str(layouts["ceval"]), str(folder)], check=True)
    path = folder / "val" / "logic_val.csv"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[3] = edit(lines[3])
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, reason", [
    (lambda line: line + ",extra,fields", "malformed CSV"),
    (lambda line: line[:-1] + "E", "answer 'E' is not one of A, B, C, D"),
])
def test_bad_csv_is_an_error_naming_the_line(sharp_model, layouts, tmp_path, edit, reason):
    path = broken_copy(layouts, tmp_path, edit)
    result = run_cli("--load_from", str(sharp_model[0]), "--benchmark", "ceval", "--data_dir", str(path.parents[1]))
    assert result.returncode == 1
    assert f"{path}:4: " in result.stderr and reason in result.stderr, result.stderr
    assert result.stdout == ""


def test_missing_column_is_an_error(layouts, tmp_path):
    path = broken_copy(layouts, tmp_path, lambda line: line)
    path.write_text(path.read_text(encoding="utf-8").replace("answer", "label", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:1: missing column answer"):
        eval_benchmark.read_questions(eval_benchmark.BENCHMARKS["ceval"], path, "logic")


def test_a_letter_that_is_not_one_token_is_an_error(sharp_model, layouts, tmp_path):
    """A real (if odd) tokenizer that spells "A" as two tokens: scoring it by one logit would be wrong."""
    core = Tokenizer(WordLevel({"<unk>": 0, "<pad>": 1, "x": 2, "y": 3, "B": 4, "C": 5, "D": 6}, unk_token="<unk>"))
    core.normalizer = normalizers.Replace("A", "x y")
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    odd = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")
    odd.save_pretrained(tmp_path / "odd")
    result = run_cli("--load_from", str(sharp_model[0]), "--tokenizer_path", str(tmp_path / "odd"),
                     "--benchmark", "ceval", "--data_dir", str(layouts["ceval"]))
    assert result.returncode == 1
    assert "answer letter 'A' 2 tokens" in result.stderr, result.stderr
    assert result.stdout == ""


def test_cli_prints_a_table_and_the_json_last(sharp_model, layouts, tmp_path):
    result = run_cli("--load_from", str(sharp_model[0]), "--benchmark", "cmmlu", "--data_dir", str(layouts["cmmlu"]),
                     "--shots", "2", "--limit", "3", "--eval_out", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"benchmark", "split", "shots", "accuracy", "macro_accuracy", "subjects", "categories"}
    assert summary["n"] == 6 and summary["shots"] == 2 and set(summary["subjects"]) == set(SUBJECTS["cmmlu"])
    assert "chance" in result.stdout and "mean over subjects" in result.stdout
    assert len(json.loads((tmp_path / "out.json").read_text())["predictions"]) == 6
