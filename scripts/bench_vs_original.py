"""Pretraining speed against the original MiniMind, whole process, same documents and tokenizer.

    git clone https://github.com/jingyaogong/minimind /tmp/minimind
    python scripts/bench_vs_original.py --original /tmp/minimind            # MiniMind2-Small size, 400 documents

Both trainers run as users run them, each in its own process from start to exit (imports, data
loading, every step, saving): the original's `trainer/train_pretrain.py` and ours, with default flags
except the model size (hidden 512 x 8 layers), batch 8 x 340, one epoch, the first `--docs` documents
of `--data_path`, and the original's tokenizer for both, so both see the same tokens. The figure is
documents per second of wall time; the loss per token over the last fifth of each run's steps shows
that the faster run did not learn less. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.common import DEMO, REPO, cpu_name, read_metrics

SIZE = ["--hidden_size", "512", "--num_hidden_layers", "8", "--batch_size", "8", "--max_seq_len", "340", "--epochs", "1"]


def first_documents(source: Path, count: int, target: Path) -> None:
    with open(source, encoding="utf-8") as lines, open(target, "w", encoding="utf-8") as out:
        for _, line in zip(range(count), lines):
            out.write(line)


def timed(command: list[str], cwd: Path, threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def tail_mean(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 5):]
    return sum(tail) / len(tail)


def run_original(original: Path, data: Path, out: Path, threads: int) -> dict:
    """The original logs `loss` per micro-batch at `--log_interval`; with 1 every micro-batch is seen."""
    command = [sys.executable, "train_pretrain.py", *SIZE, "--data_path", str(data), "--save_dir", str(out),
               "--device", "cpu", "--num_workers", "0", "--log_interval", "1", "--save_interval", "1000000"]
    seconds, log = timed(command, original / "trainer", threads)
    loss = [float(value) for value in re.findall(r"\), loss: ([0-9.]+)", log)]
    if not loss:
        sys.exit(f"no loss lines in the original's output:\n{log[-2000:]}")
    return {"seconds": round(seconds, 1), "micro_batches": len(loss), "final_loss": round(tail_mean(loss), 4)}


def run_ours(original: Path, data: Path, out: Path, threads: int, extra: list[str]) -> dict:
    command = [sys.executable, str(REPO / "trainer" / "train_pretrain.py"), *SIZE, "--data_path", str(data),
               "--tokenizer_path", str(original / "model"), "--save_dir", str(out), "--checkpoint_dir", str(out / "ckpt"),
               "--from_weight", "none", "--device", "cpu", *extra]
    seconds, log = timed(command, REPO, threads)
    metrics = read_metrics(out / "pretrain_512.metrics.jsonl")
    dtype = re.search(r"dtype (\w+)", log)
    return {"seconds": round(seconds, 1), "steps": metrics[-1]["step"], "tokens": metrics[-1]["tokens"],
            "final_loss": round(tail_mean([record["loss"] for record in metrics]), 4),
            "dtype": dtype.group(1) if dtype else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="a checkout of github.com/jingyaogong/minimind")
    parser.add_argument("--docs", type=int, default=400, help="documents from the start of --data_path")
    parser.add_argument("--data_path", default=str(DEMO / "pretrain.jsonl"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for both")
    parser.add_argument("--ours_flags", default="", help="extra flags for our trainer, e.g. '--dtype float32'")
    args = parser.parse_args()
    original = Path(args.original).resolve()
    if not (original / "trainer" / "train_pretrain.py").exists():
        sys.exit(f"error: {original} is not a MiniMind checkout (no trainer/train_pretrain.py)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "docs.jsonl"
        first_documents(Path(args.data_path), args.docs, data)
        theirs = run_original(original, data, tmp / "original", args.threads)
        print(f"original: {theirs['seconds']:.0f} s, loss {theirs['final_loss']:.3f} over the last fifth", flush=True)
        ours = run_ours(original, data, tmp / "ours", args.threads, args.ours_flags.split())
        print(f"ours ({ours['dtype']}): {ours['seconds']:.0f} s, loss {ours['final_loss']:.3f} over the last fifth", flush=True)
    summary = {"cpu": cpu_name(), "threads": args.threads, "docs": args.docs, "original": theirs, "ours": ours,
               "original_docs_per_s": round(args.docs / theirs["seconds"], 3),
               "ours_docs_per_s": round(args.docs / ours["seconds"], 3),
               "speedup": round(theirs["seconds"] / ours["seconds"], 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
