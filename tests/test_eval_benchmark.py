"""scripts/eval_benchmark.py: C-Eval and CMMLU scored exactly as their official protocol says, checked
against an implementation of that protocol written out here, against lm-evaluation-harness on the same
files, and on bad input."""
import csv
import dataclasses
import json
import random
import re
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

def official_parts(benchmark: str, subject: str) -> tuple[str, str, str]:
    """(header, question prefix, answer prefix). C-Eval: 以下是中国关于{科目}考试的单项选择题…, blocks
    `{q}\\nA. …\\n答案：{X}\\n\\n`; CMMLU: 以下是关于{科目}的单项选择题…, blocks `题目：{q}\\nA. …\\n答案是：{X}\\n\\n`."""
    if benchmark == "ceval":
        return f"以下是中国关于{CHINESE_NAMES[subject]}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案："
    return f"以下是关于{CHINESE_NAMES[subject]}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是："


def official_block(benchmark: str, subject: str, r: list[str]) -> str:
    _, start, end = official_parts(benchmark, subject)
    return f"{start}{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n{end}"


def official_prompt(benchmark: str, subject: str, dev: list[list[str]], row: list[str]) -> str:
    header = official_parts(benchmark, subject)[0]
    return header + "".join(official_block(benchmark, subject, example) + example[5] + "\n\n" for example in dev) \
        + official_block(benchmark, subject, row)


def official_chat(benchmark: str, subject: str, dev: list[list[str]], row: list[str]) -> str:
    """lm-eval's `--apply_chat_template` (few-shot as multi-turn) in MiniMind's ChatML: the header as the
    system turn, each dev example a user turn answered by its letter, the question, the generation prompt."""
    turn = "<|im_start|>{}\n{}<|im_end|>\n".format
    return (turn("system", official_parts(benchmark, subject)[0])
            + "".join(turn("user", official_block(benchmark, subject, example)) + turn("assistant", example[5])
                      for example in dev)
            + turn("user", official_block(benchmark, subject, row)) + "<|im_start|>assistant\n")


def csv_path(folder: Path, benchmark: str, split: str, subject: str) -> Path:
    return folder / split / (f"{subject}_{split}.csv" if benchmark == "ceval" else f"{subject}.csv")


def read_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row[1:] for row in list(csv.reader(f))[1:]]  # drop the id / index column


def predictions_by_subject(details: list[dict]) -> dict[str, list[str]]:
    by_subject: dict[str, list[str]] = {}
    for detail in details:
        by_subject.setdefault(detail["subject"], []).append(detail["prediction"])
    return by_subject


def chosen_letters(answers: dict) -> dict[str, list[str]]:
    return {subject: [letter for letter, _ in pairs] for subject, pairs in answers.items()}


def reference_answers(model, tokenizer, folder: Path, benchmark: str, shots: int, rename: str | None = None,
                      chat: bool = False, limit: int = 0) -> dict:
    """Per subject, the chosen letter and the reference letter of each question: one prompt at a time, no
    padding, argmax of the four letters' logits at the last position. `rename` swaps the subject's Chinese
    name for another word; `chat`: the prompt as lm-eval's chat rendering of it (`official_chat`)."""
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    answers = {}
    for subject in SUBJECTS[benchmark]:
        split = SCORED_SPLIT[benchmark]
        name = f"{subject}_{{}}.csv" if benchmark == "ceval" else f"{subject}.csv"
        dev = read_rows(folder / "dev" / name.format("dev"))[:shots]
        answers[subject] = []
        rows = read_rows(folder / split / name.format(split))
        for row in rows[:limit] if limit else rows:
            prompt = (official_chat if chat else official_prompt)(benchmark, subject, dev, row)
            if rename:
                prompt = prompt.replace(CHINESE_NAMES[subject], rename, 1)
            ids = torch.tensor([tokenizer(prompt).input_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            answers[subject].append(("ABCD"[int(logits[letters].argmax())], row[5]))
    return answers


@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
@pytest.mark.parametrize("shots", [0, 5])
@pytest.mark.parametrize("batch_size", [4, 28])
def test_correct_counts_equal_an_independent_implementation(sharp_model, layouts, bench, shots, batch_size):
    """Batched and left-padded (28: all questions in one batch, of many lengths) equals one prompt at a time."""
    _, model, tokenizer = sharp_model
    results, details = eval_benchmark.evaluate(model, tokenizer, bench, layouts[bench], shots=shots, batch_size=batch_size)
    _, prompts = eval_benchmark.build_prompts(eval_benchmark.BENCHMARKS[bench], layouts[bench], SCORED_SPLIT[bench],
                                              SUBJECTS[bench], shots)
    assert len({len(tokenizer(prompt).input_ids) for prompt in prompts}) > 5  # so the batches are padded
    answers = reference_answers(model, tokenizer, layouts[bench], bench, shots)
    expected = {subject: sum(chosen == reference for chosen, reference in pairs) for subject, pairs in answers.items()}
    assert {name: entry["correct"] for name, entry in results["subjects"].items()} == expected
    assert predictions_by_subject(details) == chosen_letters(answers)
    assert results["n"] == 28 and len(details) == 28
    assert results["accuracy"] == sum(expected.values()) / 28


def test_the_protocol_check_can_fail(sharp_model, layouts):
    """The model is sharp enough that one changed word in the header changes its answers: a runner
    that got the prompt slightly wrong would not pass the test above (whose counts come from these answers)."""
    _, model, tokenizer = sharp_model
    for benchmark in SUBJECTS:
        for shots in (0, 5):
            right = reference_answers(model, tokenizer, layouts[benchmark], benchmark, shots)
            renamed = reference_answers(model, tokenizer, layouts[benchmark], benchmark, shots, rename="物理")
            assert right != renamed  # some chosen letter differs


ONE_WORD_CHANGES = {
    "header 单项 -> 多项": lambda b: dataclasses.replace(b, header=b.header.replace("单项", "多项")),
    "answer prefix ： -> :": lambda b: dataclasses.replace(b, answer_prefix=b.answer_prefix.replace("：", ":")),
    "question prefix 题目： added / dropped":
        lambda b: dataclasses.replace(b, question_prefix="" if b.question_prefix else "题目："),
}


@pytest.mark.parametrize("change", ONE_WORD_CHANGES)
@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
@pytest.mark.parametrize("shots", [0, 5])
def test_a_runner_with_one_word_of_its_prompt_changed_fails_the_check(sharp_model, layouts, monkeypatch, change, bench,
                                                                       shots):
    """The runner itself, its prompt changed by one word: its predictions no longer equal the reference's,
    so the protocol test above would fail on it, at 0 and at 5 shots."""
    _, model, tokenizer = sharp_model
    reference = reference_answers(model, tokenizer, layouts[bench], bench, shots)
    monkeypatch.setitem(eval_benchmark.BENCHMARKS, bench, ONE_WORD_CHANGES[change](eval_benchmark.BENCHMARKS[bench]))
    _, details = eval_benchmark.evaluate(model, tokenizer, bench, layouts[bench], shots=shots, batch_size=28)
    assert predictions_by_subject(details) != chosen_letters(reference)
    assert set(predictions_by_subject(details)) == set(reference)


def test_chat_mode_scores_the_prompt_as_lm_evals_chat(sharp_model, layouts):
    """`--chat 1`: the header as the system turn, each dev example a user/assistant pair, the question, the
    generation prompt; scored at its last position."""
    _, model, tokenizer = sharp_model
    results, details = eval_benchmark.evaluate(model, tokenizer, "cmmlu", layouts["cmmlu"], shots=2, batch_size=28, chat=True)
    answers = reference_answers(model, tokenizer, layouts["cmmlu"], "cmmlu", 2, chat=True)
    assert predictions_by_subject(details) == chosen_letters(answers)
    assert {name: entry["correct"] for name, entry in results["subjects"].items()} == \
        {subject: sum(chosen == reference for chosen, reference in pairs) for subject, pairs in answers.items()}
    plain = reference_answers(model, tokenizer, layouts["cmmlu"], "cmmlu", 2)
    assert answers != plain and results["chat"] is True  # the chat turn changes answers: the check can fail


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


def lm_eval_subject_table(benchmark: str) -> dict[str, str]:
    """The subject -> Chinese name table lm-evaluation-harness generates its own ceval/cmmlu tasks from."""
    import importlib.util

    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / benchmark / "_generate_configs.py"
    spec = importlib.util.spec_from_file_location(f"lm_eval_{benchmark}_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUBJECTS


def test_subject_tables_are_complete():
    """Both tables whole: every subject with the Chinese name lm-eval's copy of the benchmark uses, and the
    category sizes the papers give (C-Eval 20/10/11/11, CMMLU 17/22/13/15 and 15 China-specific)."""
    from collections import Counter

    ceval, cmmlu = eval_benchmark.CEVAL_SUBJECTS, eval_benchmark.CMMLU_SUBJECTS
    assert len(ceval) == 52 and len(cmmlu) == 67
    assert {name: chinese for name, (chinese, _) in ceval.items()} == lm_eval_subject_table("ceval")
    assert {name: chinese for name, (chinese, _) in cmmlu.items()} == lm_eval_subject_table("cmmlu")
    assert Counter(c for _, c in ceval.values()) == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert Counter(c for _, c in cmmlu.values()) == {"STEM": 17, "Social Science": 22, "Humanities": 13, "Other": 15}
    assert eval_benchmark.CMMLU_CHINA_SPECIFIC <= set(cmmlu) and len(eval_benchmark.CMMLU_CHINA_SPECIFIC) == 15


def test_chat_mode_renders_lm_evals_turns(sharp_model):
    """The chat text for one fixed question, one dev example and a `--system_prompt`, written out."""
    _, _, tokenizer = sharp_model
    cmmlu = eval_benchmark.BENCHMARKS["cmmlu"]
    question = eval_benchmark.Question("logical", "x", ("1", "2", "3", "4"), "B", "x.csv:2")
    example = eval_benchmark.Question("logical", "y", ("甲", "乙", "丙", "丁"), "C", "d.csv:2")
    messages = eval_benchmark.chat_messages(cmmlu, question, [example], "你是助手。")
    assert eval_benchmark.render_prompt(tokenizer, messages) == (
        "<|im_start|>system\n你是助手。\n\n以下是关于逻辑学的单项选择题，请直接给出正确答案的选项。\n\n<|im_end|>\n"
        "<|im_start|>user\n题目：y\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：<|im_end|>\n<|im_start|>assistant\nC<|im_end|>\n"
        "<|im_start|>user\n题目：x\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：<|im_end|>\n<|im_start|>assistant\n")


# --- lm-evaluation-harness on the same files --------------------------------------------------

@pytest.mark.parametrize("bench, shots, chat", [("ceval", 0, False), ("cmmlu", 5, False), ("ceval", 5, True),
                                               ("cmmlu", 2, True)])
def test_lm_eval_on_the_generated_tasks_agrees(sharp_model, layouts, tmp_path, bench, shots, chat):
    """Same prompts (lm-eval's logged contexts), same per-subject correct counts; with `--chat 1`, against
    lm-eval's `apply_chat_template`."""
    _, model, tokenizer = sharp_model
    benchmark = bench
    split = SCORED_SPLIT[benchmark]
    ours, _ = eval_benchmark.evaluate(model, tokenizer, benchmark, layouts[benchmark], shots=shots, batch_size=4,
                                      chat=chat)
    tasks = eval_benchmark.write_lm_eval_tasks(benchmark, layouts[benchmark], split, None, tmp_path)
    counts, results = eval_benchmark.run_harness(model, tokenizer, tasks, shots=shots, batch_size=4, chat=chat,
                                                 include_path=tmp_path)
    prefix = len(eval_benchmark.lm_eval_task_name(eval_benchmark.BENCHMARKS[benchmark], split, ""))
    assert {task[prefix:]: count[0] for task, count in counts.items()} == \
        {name: entry["correct"] for name, entry in ours["subjects"].items()}
    render = official_chat if chat else official_prompt
    prompts = [render(benchmark, subject, read_rows(csv_path(layouts[benchmark], benchmark, "dev", subject))[:shots], row)
               for subject in SUBJECTS[benchmark] for row in read_rows(csv_path(layouts[benchmark], benchmark, split, subject))]
    harness_prompts = [sample["arguments"][0][0] for task in tasks for sample in results["samples"][task]]
    assert sorted(harness_prompts) == sorted(prompts)


def last_json_line(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_harness_flag_gives_the_runners_table_and_json(sharp_model, layouts, tmp_path, capsys):
    """`--harness 1` on a local folder and `--harness 1 --tasks` on the YAML `--write_tasks` wrote: lm-eval's
    counts, in the same table and JSON as the runner's own."""
    path = str(sharp_model[0])
    model_flags = ["--load_from", path, "--dtype", "float32", "--benchmark", "cmmlu", "--data_dir",
                   str(layouts["cmmlu"]), "--shots", "1", "--batch_size", "8"]
    ours = run_main(capsys, *model_flags)
    harness = run_main(capsys, *model_flags, "--harness", "1")
    assert "mean over subjects" in harness.stdout and "chance" in harness.stdout
    ours_json, harness_json = last_json_line(ours), last_json_line(harness)
    assert harness_json["harness"] is True
    for key in ("benchmark", "split", "shots", "accuracy", "macro_accuracy", "n", "subjects", "categories"):
        assert harness_json[key] == ours_json[key], key
    written = run_main(capsys, *model_flags, "--write_tasks", str(tmp_path / "tasks"))
    assert "wrote 2 tasks" in written.stdout
    by_task = last_json_line(run_main(capsys, "--load_from", path, "--dtype", "float32", "--harness", "1", "--shots", "1",
                                      "--tasks", "minimind_cmmlu_test", "--include_path", str(tmp_path / "tasks")))
    assert by_task["accuracy"] == ours_json["accuracy"] and by_task["n"] == ours_json["n"] == 28
    assert by_task["categories"]["minimind_cmmlu_test"]["correct"] == ours_json["correct"]
    assert {name.removeprefix("minimind_cmmlu_test_"): entry for name, entry in by_task["subjects"].items()} == \
        ours_json["subjects"]


def test_any_transformers_chat_model_directory_is_scored(layouts, tmp_path, capsys):
    """A transformers Llama saved with `save_pretrained` (and a tokenizer), opened by `--load_from DIR`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.loader import load_tokenizer

    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    with torch.no_grad():
        for parameter in llama.parameters():
            if parameter.dim() > 1:
                parameter.mul_(30)
    llama.save_pretrained(tmp_path / "llama")
    tokenizer = load_tokenizer(None)
    tokenizer.save_pretrained(tmp_path / "llama")
    summary = last_json_line(run_main(capsys, "--load_from", str(tmp_path / "llama"), "--dtype", "float32",
                                      "--benchmark", "ceval", "--data_dir", str(layouts["ceval"]), "--shots", "2"))
    answers = reference_answers(llama.eval(), tokenizer, layouts["ceval"], "ceval", 2)
    assert {name: entry["correct"] for name, entry in summary["subjects"].items()} == \
        {subject: sum(chosen == reference for chosen, reference in pairs) for subject, pairs in answers.items()}


# --- bad input: a clear error and no number ---------------------------------------------------

def run_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "eval_benchmark.py"), *flags, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd="/")


def broken_copy(layouts, tmp_path, benchmark: str, edit) -> Path:
    """A copy of the benchmark folder whose second subject's scored file has its line 4 edited."""
    folder = tmp_path / benchmark
    subprocess.run(["cp", "-r", str(layouts[benchmark]), str(folder)], check=True)
    subject, split = SUBJECTS[benchmark][1], SCORED_SPLIT[benchmark]
    path = folder / split / (f"{subject}_{split}.csv" if benchmark == "ceval" else f"{subject}.csv")
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[3] = edit(lines[3])
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_main(capsys, *flags: str) -> subprocess.CompletedProcess:
    """The command line in this process (quicker than a subprocess for the many error cases): `sys.exit`'s
    message is what the interpreter would print to stderr, with exit status 1."""
    capsys.readouterr()
    try:
        eval_benchmark.main([*flags, "--device", "cpu"])
        code, message = 0, ""
    except SystemExit as exit_:
        code, message = (1, exit_.code) if isinstance(exit_.code, str) else (exit_.code, "")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(flags, code, out, err + message)


def assert_error_and_no_number(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stdout == ""  # no table, no JSON


@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
@pytest.mark.parametrize("edit, reason", [
    (lambda line: line + ",extra,fields", "malformed CSV"),
    (lambda line: line[:-1] + "E", "answer 'E' is not one of A, B, C, D"),
    (lambda line: line[:-1], "answer '' is not one of A, B, C, D"),
])
def test_bad_csv_is_an_error_naming_the_line(sharp_model, layouts, tmp_path, bench, edit, reason, capsys):
    path = broken_copy(layouts, tmp_path, bench, edit)
    result = run_main(capsys, "--load_from", str(sharp_model[0]), "--benchmark", bench, "--data_dir", str(path.parents[1]))
    assert_error_and_no_number(result, f"{path}:4: {reason}")


@pytest.mark.parametrize("bench, column", [("ceval", "answer"), ("cmmlu", "Answer"), ("cmmlu", "Question"), ("ceval", "D")])
def test_missing_column_is_an_error(sharp_model, layouts, tmp_path, bench, column, capsys):
    path = broken_copy(layouts, tmp_path, bench, lambda line: line)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[0] = ",".join("label" if name == column else name for name in lines[0].split(","))
    path.write_text("\n".join(lines), encoding="utf-8")
    result = run_main(capsys, "--load_from", str(sharp_model[0]), "--benchmark", bench, "--data_dir", str(path.parents[1]))
    assert_error_and_no_number(result, f"{path}:1: missing column {column} ")


def test_the_public_ceval_test_split_without_answers_says_to_score_val(sharp_model, layouts, tmp_path, capsys):
    """C-Eval's released test files carry no answers: the error says so instead of scoring anything."""
    folder = tmp_path / "ceval"
    subprocess.run(["cp", "-r", str(layouts["ceval"]), str(folder)], check=True)
    for subject in SUBJECTS["ceval"]:
        rows = read_rows(folder / "val" / f"{subject}_val.csv")
        (folder / "test").mkdir(exist_ok=True)
        with open(folder / "test" / f"{subject}_test.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([["id", "question", "A", "B", "C", "D"]]
                                                          + [[str(i), *row[:5]] for i, row in enumerate(rows)])
    result = run_main(capsys, "--load_from", str(sharp_model[0]), "--benchmark", "ceval", "--data_dir", str(folder),
                      "--split", "test")
    assert_error_and_no_number(result, "missing column answer")
    assert "C-Eval's public test split has no answers: score --split val" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "cmmlu", "--split", "val"], "cmmlu has splits test, dev, not 'val'"),
    (["--benchmark", "ceval", "--split", "train"], "ceval has splits val, test, dev, not 'train'"),
    (["--benchmark", "ceval", "--shots", "6"], "--shots must be 0..5"),
    (["--benchmark", "cmmlu", "--shots", "-1"], "--shots must be 0..5"),
    (["--benchmark", "ceval", "--subjects", "logic,astrology"], "'astrology' is not a ceval subject"),
    (["--benchmark", "cmmlu", "--subjects", "logic"], "'logic' is not a cmmlu subject"),  # C-Eval's name, not CMMLU's
])
def test_wrong_flags_are_an_error(sharp_model, layouts, flags, message, capsys):
    bench = flags[1]
    result = run_main(capsys, "--load_from", str(sharp_model[0]), "--data_dir", str(layouts[bench]), *flags)
    assert_error_and_no_number(result, message)


def test_subjects_limit_and_splits_select_the_questions(sharp_model, layouts):
    """`--subjects` scores those subjects only, `--limit N` the first N of each, `--split dev` the dev files."""
    path, model, tokenizer = sharp_model
    result = run_cli("--load_from", str(path), "--dtype", "float32", "--benchmark", "ceval", "--data_dir",
                     str(layouts["ceval"]), "--subjects", "logic", "--limit", "4", "--shots", "3")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    reference = reference_answers(model, tokenizer, layouts["ceval"], "ceval", 3, limit=4)["logic"]
    assert set(summary["subjects"]) == {"logic"} and summary["n"] == 4
    assert summary["subjects"]["logic"]["correct"] == sum(chosen == answer for chosen, answer in reference)
    assert summary["categories"] == {"Humanities": summary["subjects"]["logic"]}
    dev, _ = eval_benchmark.evaluate(model, tokenizer, "cmmlu", layouts["cmmlu"], split="dev")
    assert dev["split"] == "dev" and dev["n"] == 10


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


# --- the shipped demo benchmark -----------------------------------------------------------------

@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
def test_the_demo_benchmark_loads_as_the_real_one_with_near_miss_distractors(bench):
    """`dataset/demo/<bench>` read by the runner as a real release: 3 subjects, 5 dev and 60 scored
    questions each; every wrong option is a near miss of the right one (a slip of 1, 2 or 10, a slipped
    zero, or the other number the question names), so the letters cannot be told apart by their size."""
    benchmark, folder = eval_benchmark.BENCHMARKS[bench], REPO / "dataset" / "demo" / bench
    subjects = eval_benchmark.find_subjects(benchmark, folder, benchmark.default_split, None)
    assert len(subjects) == 3
    questions, prompts = eval_benchmark.build_prompts(benchmark, folder, benchmark.default_split, subjects, 5)
    assert len(questions) == 180 and all(prompt.count(benchmark.answer_prefix) == 6 for prompt in prompts)
    dev = [question for subject in subjects for question in eval_benchmark.load_split(benchmark, folder, "dev", subject)]
    assert len(dev) == 15
    for question in questions + dev:
        right = int(question.options["ABCD".index(question.answer)])
        named = {int(number) for number in re.findall(r"\d+", question.text)}
        for option in question.options:
            wrong = int(option)
            assert wrong == right or abs(wrong - right) in (1, 2, 10) or wrong * 10 == right or right * 10 == wrong \
                or wrong in named, (question.source, question.options)


# --- the speed benchmark -------------------------------------------------------------------------

def test_speed_benchmark_scores_synthetic_ceval_sized_questions(capsys):
    """`scripts/bench_eval.py`: the questions it writes are a C-Eval layout the runner reads (all 52 subjects,
    the count asked for) and its last line is the JSON of the timing."""
    from scripts import bench_eval

    bench_eval.main(["--preset", "tiny", "--questions", "104", "--dtype", "float32"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["questions"] == 104 and summary["subjects"] == 52 and summary["shots"] == 0
    assert summary["model"].startswith("random tiny") and summary["dtype"] == "float32"
    assert summary["seconds"] > 0 and summary["questions_per_s"] > 0
    assert "104 questions" in lines[-2]
