"""Speed of `scripts/eval_benchmark.py`: how long a model takes to score C-Eval's validation split
(1,346 questions over its 52 subjects) at 0 shots, here on the CPU.

    python scripts/bench_eval.py                                  # --load_from random: MiniMind2-Small
    python scripts/bench_eval.py --data_dir dataset/ceval         # the real val split, once unpacked there
    python scripts/bench_eval.py --load_from out/full_sft_512.pth --batch_size 32

Without `--data_dir` the questions are synthetic, written in the C-Eval layout to a temporary folder:
`--questions` of them spread evenly over the 52 subjects, each a question of about `--question_chars`
Chinese characters and four options of about `--option_chars` (each length drawn uniformly from half to
one and a half times that), cut from the shipped 三国演义 chapters. The score is meaningless; the time is
the runner's whole run (`scripts/eval_benchmark.py`, as a user starts it: loading the model, reading the
CSVs, every prediction). The last line is one JSON object, with the machine's load average, since other
work on the cores slows the run.
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

from dataset.benchmark_subjects import CEVAL_SUBJECTS
from model.loader import add_device_args, resolve_device, resolve_dtype
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts.common import DEMO, cpu_name, last_json, run

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


def random_weights(preset: str, folder: Path) -> Path:
    """Random weights of `preset`, as a `.pth` the runner loads like any other (device and dtype chosen
    by the loader's one policy). Random weights cost what trained ones do."""
    torch.manual_seed(0)
    path = folder / f"random_{preset}.pth"
    save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset])), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", default="random",
                        help="anything scripts/eval_benchmark.py --load_from opens, or random (default: random --preset)")
    parser.add_argument("--preset", default="minimind2-small", choices=sorted(PRESETS),
                        help="size of the random model (default: minimind2-small)")
    add_device_args(parser)
    parser.set_defaults(device="cpu")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--data_dir", default=None, help="a C-Eval folder to score its val split (default: synthetic questions)")
    bench.add_argument("--questions", type=int, default=CEVAL_VAL_QUESTIONS,
                       help="synthetic questions (default: C-Eval val's 1,346)")
    bench.add_argument("--question_chars", type=int, default=60, help="mean characters of a synthetic question (default: 60)")
    bench.add_argument("--option_chars", type=int, default=10, help="mean characters of a synthetic option (default: 10)")
    bench.add_argument("--shots", type=int, default=0, help="(default: 0)")
    bench.add_argument("--batch_size", type=int, default=16, help="questions per forward pass (default: 16, the runner's)")
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.data_dir) if args.data_dir else write_synthetic_ceval(
            Path(scratch) / "ceval", args.questions, args.question_chars, args.option_chars)
        weights = random_weights(args.preset, Path(scratch)) if args.load_from == "random" else args.load_from
        start = time.perf_counter()
        results = last_json(run([sys.executable, "scripts/eval_benchmark.py", "--load_from", str(weights),
                                 "--benchmark", "ceval", "--data_dir", str(folder), "--split", "val",
                                 "--shots", str(args.shots), "--batch_size", str(args.batch_size),
                                 "--device", args.device, "--dtype", args.dtype]))
        seconds = time.perf_counter() - start
    summary = {"model": f"random {args.preset}" if args.load_from == "random" else args.load_from,
               "dtype": str(dtype).removeprefix("torch."), "data": args.data_dir or "synthetic",
               "questions": sum(s["n"] for s in results["subjects"].values()), "subjects": len(results["subjects"]),
               "shots": args.shots, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "cpu": cpu_name(), "load_average_1min": round(os.getloadavg()[0], 2), "seconds": round(seconds, 1),
               "minutes": round(seconds / 60, 2)}
    summary["questions_per_s"] = round(summary["questions"] / seconds, 2)
    print(f"{summary['questions']:,} questions, {args.shots} shots, batch {args.batch_size}, {summary['threads']} "
          f"threads, {summary['dtype']}: {summary['minutes']:.2f} minutes with the model's loading, "
          f"{summary['questions_per_s']:.2f} questions/s")
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
