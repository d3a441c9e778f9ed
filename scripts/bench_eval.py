"""Speed of `scripts/eval_benchmark.py`: how long a model takes to score C-Eval's validation split
(1,346 questions over its 52 subjects) at 0 shots, here on the CPU.

    python scripts/bench_eval.py                                  # --load_from random: MiniMind2-Small, 2 threads
    python scripts/bench_eval.py --data_dir dataset/ceval         # the real val split, once unpacked there
    python scripts/bench_eval.py --load_from out/full_sft_512.pth --threads 4 --batch_size 32

Without `--data_dir` the questions are synthetic, written in the C-Eval layout to a temporary folder:
`--questions` of them spread evenly over the 52 subjects, each a question of about `--question_chars`
Chinese characters and four options of about `--option_chars` (each length drawn uniformly from half to
one and a half times that), cut from the shipped 三国演义 chapters. The score is meaningless; the time is
the runner's, reading the CSVs included, from the loaded model to the last prediction. Random weights
cost what trained ones do. The last line is one JSON object, with the machine's load average, since
other work on the cores slows the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.loader import add_model_args, describe, load_from_args, size_config
from model.model_minimind import MiniMindForCausalLM
from model.weights import save_weights
from scripts.common import DEMO, cpu_name
from scripts.eval_benchmark import BENCHMARKS, CEVAL_SUBJECTS, build_prompts, evaluate, find_subjects

CEVAL_VAL_QUESTIONS = 1346


def text_source() -> str:
    """The shipped long Chinese text, the questions' characters (no line breaks: one CSV row each)."""
    lines = (DEMO / "long_text.jsonl").read_text(encoding="utf-8").splitlines()
    return "".join(json.loads(line)["text"] for line in lines if line).replace("\n", "")


def write_synthetic_ceval(folder: Path, questions: int, question_chars: int, option_chars: int, seed: int = 0) -> Path:
    """`questions` four-choice questions in C-Eval's layout (`val/` and 5 `dev/` per subject) under `folder`."""
    rng, text = random.Random(seed), text_source()

    def cut(mean: int) -> str:
        length = rng.randint(max(1, mean // 2), max(1, mean * 3 // 2))
        start = rng.randrange(len(text) - length)
        return text[start:start + length]

    subjects = list(CEVAL_SUBJECTS)
    for split, count in (("dev", 5 * len(subjects)), ("val", questions)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for index, subject in enumerate(subjects):
            rows = [["id", "question", "A", "B", "C", "D", "answer"]]
            share = count // len(subjects) + (index < count % len(subjects))
            rows += [[str(i), cut(question_chars), *(cut(option_chars) for _ in "ABCD"), rng.choice("ABCD")]
                     for i in range(share)]
            with open(folder / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    return folder


def load_model(args: argparse.Namespace, folder: Path):
    """The model the loader's flags name; `--load_from random`: random weights of `--preset`, saved and
    loaded as a `.pth` so that the device and dtype are chosen as for any other model."""
    if args.load_from != "random":
        return load_from_args(args)
    torch.manual_seed(0)
    path = folder / "random.pth"
    save_weights(MiniMindForCausalLM(size_config(args.hidden_size, args.num_hidden_layers, bool(args.use_moe),
                                                 args.preset)), path)
    return load_from_args(argparse.Namespace(**{**vars(args), "load_from": str(path)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(load_from="random", preset="minimind2-small", device="cpu")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--data_dir", default=None, help="a C-Eval folder to score its val split (default: synthetic questions)")
    bench.add_argument("--questions", type=int, default=CEVAL_VAL_QUESTIONS,
                       help="synthetic questions (default: C-Eval val's 1,346)")
    bench.add_argument("--question_chars", type=int, default=60, help="mean characters of a synthetic question (default: 60)")
    bench.add_argument("--option_chars", type=int, default=10, help="mean characters of a synthetic option (default: 10)")
    bench.add_argument("--shots", type=int, default=0, help="(default: 0)")
    bench.add_argument("--batch_size", type=int, default=16, help="questions per forward pass (default: 16, the runner's)")
    bench.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.data_dir) if args.data_dir else write_synthetic_ceval(
            Path(scratch) / "ceval", args.questions, args.question_chars, args.option_chars)
        model, tokenizer = load_model(args, Path(scratch))
        print(f"loaded {describe(model)}; {args.threads} threads on {cpu_name()}", file=sys.stderr)
        benchmark = BENCHMARKS["ceval"]
        _, prompts = build_prompts(benchmark, folder, "val", find_subjects(benchmark, folder, "val", None), args.shots)
        prompt_tokens = sum(len(tokenizer(prompt).input_ids) for prompt in prompts) / len(prompts)
        start = time.perf_counter()
        results, _ = evaluate(model, tokenizer, "ceval", folder, split="val", shots=args.shots, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
    name = describe(model) if args.load_from != "random" else f"random {args.preset}: {describe(model).split(': ', 1)[1]}"
    summary = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "data": args.data_dir or "synthetic",
               "questions": results["n"], "subjects": len(results["subjects"]), "shots": args.shots,
               "prompt_tokens_mean": round(prompt_tokens, 1), "batch_size": args.batch_size, "threads": args.threads,
               "cpu": cpu_name(), "load_average_1min": round(os.getloadavg()[0], 2), "seconds": round(seconds, 1),
               "minutes": round(seconds / 60, 2), "questions_per_s": round(results["n"] / seconds, 2)}
    print(f"{summary['questions']:,} questions ({summary['prompt_tokens_mean']:.0f} prompt tokens on average), "
          f"{args.shots} shots, batch {args.batch_size}, {args.threads} threads: {summary['minutes']:.2f} minutes, "
          f"{summary['questions_per_s']:.2f} questions/s")
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
