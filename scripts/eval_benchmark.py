"""C-Eval and CMMLU, the multiple-choice benchmarks MiniMind's README reports, scored as their authors score them.

    python scripts/eval_benchmark.py --benchmark ceval --data_dir dataset/demo/ceval --load_from out/full_sft_512.pth
    python scripts/eval_benchmark.py --benchmark cmmlu --data_dir dataset/cmmlu --shots 5 --load_from model
    python scripts/eval_benchmark.py --benchmark ceval --data_dir dataset/ceval --harness 1   # through lm-evaluation-harness
    python scripts/eval_benchmark.py --harness 1 --tasks arc_easy,piqa                         # any lm-eval task it can reach
    python scripts/eval_benchmark.py --benchmark ceval --data_dir dataset/ceval --write_tasks out/lm_eval_tasks

Data in the official layouts, as unpacked from the benchmarks' releases (`dataset/ceval/`, `dataset/cmmlu/`):
C-Eval `{dev,val,test}/{subject}_{split}.csv` with columns `id,question,A,B,C,D,answer[,explanation]`
(the public test split has no answers: score `val`); CMMLU `{dev,test}/{subject}.csv` with header
`,Question,A,B,C,D,Answer`. The offline demo in both layouts is `dataset/demo/ceval` and `dataset/demo/cmmlu`.

The protocol is the official one. The prompt is the benchmark's header naming the subject in Chinese,
the first `--shots` dev questions with their answers, then the question, ending where the answer letter
goes. The model's prediction is the likeliest of the four letter tokens at that last position: no text is
generated, so a model that has never seen the format is still scored, and a letter that is not a single
token is an error, never a silently wrong score. Prints a table, then one JSON object as the last line.

`--chat 1` renders the prompt through the tokenizer's chat template as lm-eval's `--apply_chat_template`
does (tested against it): the header as the system turn (after `--system_prompt`), each dev example as a
user turn answered by its letter, then the question as a user turn and the assistant's generation prompt.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from tqdm import tqdm

from dataset.benchmark_subjects import CEVAL_SUBJECTS, CMMLU_CHINA_SPECIFIC, CMMLU_SUBJECTS
from model.chat_format import render_prompt
from model.loader import add_model_args, add_switch, context_length, describe, load_from_args

REPO = Path(__file__).resolve().parents[1]
LETTERS = ("A", "B", "C", "D")
CHANCE = 1 / len(LETTERS)
MAX_SHOTS = 5  # both benchmarks ship five dev questions per subject


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's layout and prompt: everything that differs between C-Eval and CMMLU."""

    name: str
    splits: tuple[str, ...]
    default_split: str
    question_column: str
    answer_column: str
    header: str  # with {subject}: the Chinese subject name
    question_prefix: str
    answer_prefix: str  # the text the answer letter follows
    subjects: dict[str, tuple[str, str]]
    extra_groups: dict[str, frozenset[str]]

    def csv_path(self, data_dir: Path, split: str, subject: str) -> Path:
        name = f"{subject}_{split}.csv" if self.name == "ceval" else f"{subject}.csv"
        return data_dir / split / name

    def subject_of(self, path: Path, split: str) -> str:
        return path.stem.removesuffix(f"_{split}") if self.name == "ceval" else path.stem

    def chinese_name(self, subject: str) -> str:
        if subject not in self.subjects:
            raise ValueError(f"{subject!r} is not a {self.name} subject (the {len(self.subjects)} subjects: "
                             f"{', '.join(sorted(self.subjects))})")
        return self.subjects[subject][0]


BENCHMARKS = {
    "ceval": Benchmark("ceval", ("val", "test", "dev"), "val", "question", "answer",
                       "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案：",
                       CEVAL_SUBJECTS, {}),
    "cmmlu": Benchmark("cmmlu", ("test", "dev"), "test", "Question", "Answer",
                       "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是：",
                       CMMLU_SUBJECTS, {"China specific": CMMLU_CHINA_SPECIFIC}),
}


# ---------------------------------------------------------------------------------------------
# Reading the official layouts
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    subject: str
    text: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    source: str  # `path:line`, for messages and predictions


def csv_line_numbers(path: Path) -> list[int]:
    """The file line each data row starts on (quoted fields may span several lines)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        starts, line = [], reader.line_num + 1
        for _ in reader:
            starts.append(line)
            line = reader.line_num + 1
    return starts


def read_questions(benchmark: Benchmark, path: Path, subject: str) -> list[Question]:
    """Every row of one subject's CSV; a malformed file, a missing column or an answer outside A-D
    is a ValueError `path:line: reason`."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.ParserError as error:
        line = re.search(r"line (\d+)", str(error))
        raise ValueError(f"{path}:{line[1] if line else 1}: malformed CSV: {error}") from None
    except (UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}:1: unreadable CSV: {error}") from None
    columns = [benchmark.question_column, *LETTERS, benchmark.answer_column]
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}:1: missing column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                         f"(header: {','.join(map(str, frame.columns))}; {benchmark.name} needs {','.join(columns)})")
    lines = csv_line_numbers(path)
    questions = []
    for index, row in enumerate(frame[columns].itertuples(index=False)):
        text, *options, answer = row
        if answer not in LETTERS:
            raise ValueError(f"{path}:{lines[index]}: answer {answer!r} is not one of {', '.join(LETTERS)}")
        questions.append(Question(subject, text, tuple(options), answer, f"{path}:{lines[index]}"))
    return questions


def find_subjects(benchmark: Benchmark, data_dir: Path, split: str, wanted: list[str] | None) -> list[str]:
    """The subjects to score: those asked for, else every subject file of the split, in table order."""
    if wanted:
        for subject in wanted:
            benchmark.chinese_name(subject)
        return wanted
    folder = data_dir / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: --data_dir must hold the {benchmark.name} layout "
                                f"({', '.join(f'{s}/' for s in benchmark.splits)})")
    found = {benchmark.subject_of(path, split) for path in folder.glob("*.csv")}
    if not found:
        raise FileNotFoundError(f"no {benchmark.name} subject files in {folder}")
    for subject in found:
        benchmark.chinese_name(subject)
    return [subject for subject in benchmark.subjects if subject in found]


def load_split(benchmark: Benchmark, data_dir: Path, split: str, subject: str) -> list[Question]:
    path = benchmark.csv_path(data_dir, split, subject)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return read_questions(benchmark, path, subject)
    except ValueError as error:
        if benchmark.name == "ceval" and split == "test":  # the public release withholds the test answers
            raise ValueError(f"{error} (C-Eval's public test split has no answers: score --split val)") from None
        raise


def check_split_and_shots(benchmark: Benchmark, split: str, shots: int) -> None:
    if split not in benchmark.splits:
        raise ValueError(f"{benchmark.name} has splits {', '.join(benchmark.splits)}, not {split!r}")
    if not 0 <= shots <= MAX_SHOTS:
        raise ValueError(f"--shots must be 0..{MAX_SHOTS} ({benchmark.name} has {MAX_SHOTS} dev questions "
                         f"per subject), not {shots}")


# ---------------------------------------------------------------------------------------------
# Prompts and scoring
# ---------------------------------------------------------------------------------------------

def question_block(benchmark: Benchmark, question: Question, with_answer: bool) -> str:
    """A question as the benchmark's prompt shows it; a dev example carries its answer and a blank line."""
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, question.options))
    block = f"{benchmark.question_prefix}{question.text}{options}\n{benchmark.answer_prefix}"
    return f"{block}{question.answer}\n\n" if with_answer else block


def render_question(benchmark: Benchmark, question: Question, examples: list[Question]) -> str:
    """Header naming the subject in Chinese, the dev examples in file order, then the question."""
    header = benchmark.header.format(subject=benchmark.chinese_name(question.subject))
    return header + "".join(question_block(benchmark, example, True) for example in examples) \
        + question_block(benchmark, question, False)


def chat_messages(benchmark: Benchmark, question: Question, examples: list[Question],
                  system_prompt: str | None = None) -> list[dict]:
    """`--chat 1`: the prompt as lm-eval's `--apply_chat_template` turns it into a chat (with its default
    `fewshot_as_multiturn`): the header as the system turn (after `--system_prompt`, lm-eval's
    `system_instruction`, with a blank line between), each dev example as a user turn answered by an
    assistant turn holding its letter, then the question as the last user turn."""
    header = benchmark.header.format(subject=benchmark.chinese_name(question.subject))
    system = header if not system_prompt else \
        system_prompt + ("" if system_prompt[-1].isspace() else "\n\n") + header
    messages = [{"role": "system", "content": system}]
    for example in examples:
        messages += [{"role": "user", "content": question_block(benchmark, example, False)},
                     {"role": "assistant", "content": example.answer}]
    return messages + [{"role": "user", "content": question_block(benchmark, question, False)}]


def letter_token_ids(tokenizer) -> list[int]:
    """The id of each answer letter; a letter the tokenizer splits cannot be scored from one position."""
    ids = []
    for letter in LETTERS:
        tokens = tokenizer.encode(letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer makes the answer letter {letter!r} {len(tokens)} tokens {tokens}, "
                             f"not one: letter-logit scoring needs each of {', '.join(LETTERS)} to be a single token")
        ids.append(tokens[0])
    return ids


@torch.inference_mode()
def predict_letters(model, tokenizer, prompts: list[str], batch_size: int) -> list[str]:
    """The likeliest answer letter after each prompt, from the next-token logits at its last position.

    Prompts are batched longest-first (less padding) and left-padded, so every row's last prompt token
    sits at the same column; positions count from each row's first real token, so padding changes nothing."""
    letter_ids = torch.tensor(letter_token_ids(tokenizer), device=model.device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    predictions: list[str] = [""] * len(prompts)
    limit = context_length(model)
    with tqdm(total=len(prompts), desc="scoring", unit="q", file=sys.stderr) as progress:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                              padding_side="left").to(model.device)
            if batch.input_ids.shape[1] > limit:
                raise ValueError(f"a prompt of {batch.input_ids.shape[1]} tokens exceeds the model's {limit}-token "
                                 f"context: use fewer --shots")
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1]
            for i, choice in zip(rows, logits[:, letter_ids].argmax(-1).tolist()):
                predictions[i] = LETTERS[choice]
            progress.update(len(rows))
    return predictions


def build_prompts(benchmark: Benchmark, data_dir: Path, split: str, subjects: list[str], shots: int,
                  limit: int = 0, render: Callable[[Benchmark, Question, list[Question]], str] = render_question
                  ) -> tuple[list[Question], list[str]]:
    """Every question to score, with its prompt (`render`: the plain one, unless told otherwise)."""
    questions, prompts = [], []
    for subject in subjects:
        examples = load_split(benchmark, data_dir, "dev", subject)[:shots] if shots else []
        if len(examples) < shots:
            raise ValueError(f"{benchmark.csv_path(data_dir, 'dev', subject)} has {len(examples)} dev questions, "
                             f"fewer than --shots {shots}")
        subject_questions = load_split(benchmark, data_dir, split, subject)
        for question in subject_questions[:limit] if limit else subject_questions:
            questions.append(question)
            prompts.append(render(benchmark, question, examples))
    return questions, prompts


def summarize(benchmark_name: str, split: str, shots: int, counts: dict[str, tuple[int, int]],
              groups: dict[str, list[str]]) -> dict:
    """The results JSON: `counts` is subject -> (correct, n), `groups` category -> its subjects."""
    def entry(correct: int, n: int) -> dict:
        return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n}

    subjects = {name: entry(*counts[name]) for name in counts}
    categories = {}
    for category, members in groups.items():
        scored = [counts[name] for name in members if name in counts]
        if scored:
            categories[category] = entry(sum(c for c, _ in scored), sum(n for _, n in scored))
    correct, total = sum(c for c, _ in counts.values()), sum(n for _, n in counts.values())
    return {"benchmark": benchmark_name, "split": split, "shots": shots, "accuracy": correct / total if total else 0.0,
            "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1),
            "correct": correct, "n": total, "chance": CHANCE, "subjects": subjects, "categories": categories}


def category_groups(benchmark: Benchmark, subjects: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for subject in subjects:
        groups.setdefault(benchmark.subjects[subject][1], []).append(subject)
    for name, members in benchmark.extra_groups.items():
        groups[name] = [subject for subject in subjects if subject in members]
    return groups


def evaluate(model, tokenizer, benchmark_name: str, data_dir: str | Path, *, split: str | None = None, shots: int = 0,
             subjects: list[str] | None = None, limit: int = 0, batch_size: int = 16, chat: bool = False,
             system_prompt: str | None = None) -> tuple[dict, list[dict]]:
    """Score a loaded model on a benchmark folder: the results JSON and one record per question
    (`source`, `answer`, `prediction`, `correct`) for paired comparisons between models."""
    benchmark = BENCHMARKS[benchmark_name]
    split = split or benchmark.default_split
    check_split_and_shots(benchmark, split, shots)
    data_dir = Path(data_dir)
    names = find_subjects(benchmark, data_dir, split, subjects)
    render = (lambda b, question, examples: render_prompt(tokenizer, chat_messages(b, question, examples, system_prompt))) \
        if chat else render_question
    questions, prompts = build_prompts(benchmark, data_dir, split, names, shots, limit, render)
    predictions = predict_letters(model, tokenizer, prompts, batch_size)
    counts = {name: [0, 0] for name in names}
    details = []
    for question, prediction in zip(questions, predictions):
        counts[question.subject][0] += prediction == question.answer
        counts[question.subject][1] += 1
        details.append({"source": question.source, "subject": question.subject, "answer": question.answer,
                        "prediction": prediction, "correct": prediction == question.answer})
    summary = summarize(benchmark.name, split, shots, {name: tuple(c) for name, c in counts.items()},
                        category_groups(benchmark, names))
    return {**summary, "chat": chat}, details


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ---------------------------------------------------------------------------------------------

# Beside the generated YAML: lm-eval resolves `!function minimind_csv.load` to this file's `load`.
LM_EVAL_READER = f'''"""Written by scripts/eval_benchmark.py: lm-eval reads the local CSVs as MiniMind's runner does."""
import sys

sys.path.insert(0, {str(REPO)!r})
from scripts.eval_benchmark import lm_eval_dataset as load  # noqa: E402
'''


def lm_eval_dataset(data_files: dict[str, str], **metadata) -> "datasets.DatasetDict":
    """The CSVs as lm-eval's dataset, every cell a string as `read_questions` reads them: the `csv`
    loader of `datasets` would turn an all-number option column into integers ("05" -> 5) and "NA"
    into a missing value, and it has no option to keep them as text."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_pandas(pd.read_csv(path, dtype=str, keep_default_na=False), preserve_index=False)
        for split, path in data_files.items()})


def lm_eval_task_name(benchmark: Benchmark, split: str, subject: str) -> str:
    return f"minimind_{benchmark.name}_{split}_{subject}"


def write_lm_eval_tasks(benchmark_name: str, data_dir: str | Path, split: str, subjects: list[str] | None,
                        out_dir: str | Path) -> list[str]:
    """lm-eval YAML tasks reading the local CSVs with the official prompt, one per subject plus a group
    `minimind_<benchmark>_<split>`: `lm_eval --include_path out_dir --tasks <group>` then runs offline.

    lm-eval's multiple-choice scoring compares the log-likelihood of each letter after the prompt,
    which ranks the letters as their logits at the last position do: with an empty target delimiter
    (lm-eval puts a space before the answer by default) it is this runner's protocol."""
    benchmark, data_dir, out_dir = BENCHMARKS[benchmark_name], Path(data_dir).resolve(), Path(out_dir)
    names = find_subjects(benchmark, data_dir, split, subjects)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = "".join(f"\n{letter}. {{{{{letter}}}}}" for letter in LETTERS)
    tasks = []
    for subject in names:
        task = lm_eval_task_name(benchmark, split, subject)
        config = {
            "task": task,
            "dataset_path": str(data_dir),
            "dataset_kwargs": {"data_files": {"eval": str(benchmark.csv_path(data_dir, split, subject)),
                                              "dev": str(benchmark.csv_path(data_dir, "dev", subject))}},
            "test_split": "eval",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": benchmark.header.format(subject=benchmark.chinese_name(subject)),
            "doc_to_text": f"{benchmark.question_prefix}{{{{{benchmark.question_column}}}}}{options}\n{benchmark.answer_prefix}",
            "doc_to_choice": list(LETTERS),
            "doc_to_target": f"{{{{{list(LETTERS)}.index({benchmark.answer_column})}}}}",
            "target_delimiter": "",
            "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False) + "custom_dataset: !function minimind_csv.load\n"
        (out_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
        tasks.append(task)
    group = {"group": f"minimind_{benchmark.name}_{split}", "task": tasks,
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}
    (out_dir / f"minimind_{benchmark.name}_{split}.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
    (out_dir / "minimind_csv.py").write_text(LM_EVAL_READER, encoding="utf-8")
    return tasks


def run_harness(model, tokenizer, tasks: list[str], *, shots: int, batch_size: int, chat: bool,
                include_path: str | Path | None = None, limit: int = 0,
                system_instruction: str | None = None) -> tuple[dict[str, tuple[int, int]], dict]:
    """`lm_eval.simple_evaluate` on the loaded model through HFLM: (correct, n) of every task it scored
    (the subtasks of a group such as `ceval-valid`) and lm-eval's own results (with every prompt it built,
    under "samples")."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context_length(model),
              device=str(model.device))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, task_manager=manager, apply_chat_template=chat,
                              system_instruction=system_instruction, limit=limit or None, log_samples=True)
    counts = {}
    for task, scores in results["results"].items():
        if task in results["n-samples"] and "acc,none" in scores:
            n = results["n-samples"][task]["effective"]
            counts[task] = (round(scores["acc,none"] * n), n)
    return counts, results


def harness_groups(results: dict, counts: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """lm-eval's groups (e.g. `cmmlu`, and within it its categories), each with the scored tasks under it."""
    subtasks = results.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [name] if name in counts else [leaf for sub in subtasks.get(name, []) for leaf in leaves(sub)]

    return {group: leaves(group) for group in subtasks if leaves(group)}


def harness_evaluate(model, tokenizer, args: argparse.Namespace) -> dict:
    """`--harness 1`: the generated tasks for a local benchmark folder, or any lm-eval task names."""
    if args.tasks:
        counts, results = run_harness(model, tokenizer, args.tasks.split(","), shots=args.shots, batch_size=args.batch_size,
                                      chat=bool(args.chat), include_path=args.include_path, limit=args.limit,
                                      system_instruction=args.system_prompt)
        summary = summarize("lm-eval", "-", args.shots, counts, harness_groups(results, counts))
        return {**summary, "chat": bool(args.chat), "harness": True}
    benchmark = BENCHMARKS[args.benchmark]
    split = args.split or benchmark.default_split
    with tempfile.TemporaryDirectory() as folder:
        tasks = write_lm_eval_tasks(benchmark.name, args.data_dir, split, subject_list(args), folder)
        counts, _ = run_harness(model, tokenizer, tasks, shots=args.shots, batch_size=args.batch_size,
                                chat=bool(args.chat), include_path=folder, limit=args.limit,
                                system_instruction=args.system_prompt)
    prefix = len(lm_eval_task_name(benchmark, split, ""))
    by_subject = {task[prefix:]: count for task, count in counts.items()}
    summary = summarize(benchmark.name, split, args.shots, by_subject, category_groups(benchmark, list(by_subject)))
    return {**summary, "chat": bool(args.chat), "harness": True}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def print_table(results: dict, benchmark: Benchmark | None) -> None:
    def name_of(subject: str) -> str:
        return f"{subject} ({benchmark.subjects[subject][0]})" if benchmark and subject in benchmark.subjects else subject

    rows = [(name_of(name), entry) for name, entry in results["subjects"].items()]
    rows += [(f"[{name}]", entry) for name, entry in results["categories"].items()]
    width = max([len(name) for name, _ in rows] + [len("overall (correct / all)")])
    print(f"{'subject':<{width}}  {'n':>5}  {'correct':>7}  {'accuracy':>8}")
    for name, entry in rows:
        print(f"{name:<{width}}  {entry['n']:>5}  {entry['correct']:>7}  {entry['accuracy']:>8.1%}")
    print(f"{'overall (correct / all)':<{width}}  {results['n']:>5}  {results['correct']:>7}  {results['accuracy']:>8.1%}")
    print(f"{'mean over subjects':<{width}}  {len(results['subjects']):>5}  {'':>7}  {results['macro_accuracy']:>8.1%}")
    print(f"{'chance':<{width}}  {'':>5}  {'':>7}  {CHANCE:>8.1%}")


def subject_list(args: argparse.Namespace) -> list[str] | None:
    return [name.strip() for name in args.subjects.split(",") if name.strip()] if args.subjects else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", default="ceval", choices=sorted(BENCHMARKS), help="(default: ceval)")
    bench.add_argument("--data_dir", default=None,
                       help="a folder in the benchmark's official layout (default: dataset/demo/<benchmark>)")
    bench.add_argument("--split", default=None, help="C-Eval val|test|dev, CMMLU test|dev (default: val / test)")
    bench.add_argument("--shots", type=int, default=0, help=f"dev examples before each question, 0..{MAX_SHOTS} (default: 0)")
    bench.add_argument("--subjects", default=None, help="comma-separated subject file names (default: all found)")
    bench.add_argument("--limit", type=int, default=0, help="only the first N questions of each subject (0 = all)")
    bench.add_argument("--batch_size", type=int, default=16, help="questions per forward pass (default: 16)")
    add_switch(bench, "--chat", help="1 = the prompt as a user turn of the chat template, then the generation prompt")
    bench.add_argument("--eval_out", default=None, help="also write the results with every prediction to this JSON file")
    harness = parser.add_argument_group("lm-evaluation-harness")
    add_switch(harness, "--harness", help="1 = score through lm_eval.simple_evaluate (HFLM on the loaded model)")
    harness.add_argument("--tasks", default=None,
                         help="with --harness 1: comma-separated lm-eval task names instead of the local benchmark "
                              "(e.g. ceval-valid,cmmlu,arc_easy,piqa,openbookqa,hellaswag,social_iqa; their data must be reachable)")
    harness.add_argument("--include_path", default=None, metavar="DIR",
                         help="with --tasks: also find lm-eval task YAML files in DIR (e.g. those --write_tasks wrote)")
    harness.add_argument("--write_tasks", default=None, metavar="DIR",
                         help="only write lm-eval YAML tasks for --data_dir into DIR, print how to run them, and exit")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = str(REPO / "dataset" / "demo" / args.benchmark)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    benchmark = BENCHMARKS[args.benchmark]
    split = args.split or benchmark.default_split
    try:
        if not args.tasks:  # before a model loads: a wrong flag fails at once
            check_split_and_shots(benchmark, split, args.shots)
        if args.write_tasks:
            tasks = write_lm_eval_tasks(benchmark.name, args.data_dir, split, subject_list(args), args.write_tasks)
            print(f"wrote {len(tasks)} tasks to {args.write_tasks}; run them with\n  lm_eval --model hf --model_args "
                  f"pretrained=DIR --include_path {args.write_tasks} --tasks minimind_{benchmark.name}_{split} "
                  f"--num_fewshot {args.shots}\nor\n  python scripts/eval_benchmark.py --harness 1 --include_path {args.write_tasks} "
                  f"--tasks minimind_{benchmark.name}_{split} --shots {args.shots} --load_from ...")
            return
        model, tokenizer = load_from_args(args)
        print(f"loaded {describe(model)}", file=sys.stderr)
        if args.harness:
            results, details = harness_evaluate(model, tokenizer, args), []
        else:
            results, details = evaluate(model, tokenizer, benchmark.name, args.data_dir, split=split, shots=args.shots,
                                        subjects=subject_list(args), limit=args.limit, batch_size=args.batch_size,
                                        chat=bool(args.chat), system_prompt=args.system_prompt)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print_table(results, None if args.tasks else benchmark)
    if args.eval_out:
        Path(args.eval_out).write_text(json.dumps({**results, "predictions": details}, ensure_ascii=False, indent=1),
                                       encoding="utf-8")
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
