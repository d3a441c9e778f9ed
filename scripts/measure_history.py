"""Does query–utterance pairing help a small model answer multi-turn questions? Measured on the demo data.

    python scripts/measure_history.py                                   # pretrains a small model first (256 hidden, 4 layers)
    python scripts/measure_history.py --pretrained out/demo/pretrain_128.pth
    python scripts/measure_history.py --quick                           # tiny models, a few steps: checks the plumbing

The claim: pairing the current query with the one or few earlier *user* utterances most relevant to
it, instead of concatenating the whole history, gives a small model +17% accuracy on multi-turn
questions. Here:

1. Pretraining (unless `--pretrained`): `trainer/train_pretrain.py` on `dataset/demo/pretrain.jsonl`
   from random weights.
2. SFT twice from those weights, with the same data (`dataset/demo/sft.jsonl`, whose last 1,000
   conversations are the multi-turn recall task), flags and seed: `--history_mode full` (each
   conversation whole, as MiniMind trains) and `--history_mode query_utterance` (each reply its own
   example, after the history that mode sends).
3. Each SFT model answers with each inference history mode (`eval_llm.py --history_mode full |
   query_utterance | none`, greedy) the held-out recall conversations (`dataset/demo/multiturn_eval.jsonl`:
   "我有 7 个苹果。" ... unrelated turns ... "又买了 5 个苹果，现在一共有几个苹果？"; none of their questions is
   in a training file) and the single-turn questions (`dataset/demo/eval.jsonl`, to see that nothing
   else got worse). Exact-match accuracy with a 95% Clopper-Pearson interval, the mean prompt length
   in tokens, and McNemar's exact test of each cell against full-trained, full-history answering on
   the same questions; and the accuracy of always replying the most common answer, the level below
   which a score says nothing about reading the conversation.

`none` is the floor: without the earlier turn the recall question cannot be answered, so its accuracy
is what guessing the number gives. Each step runs the real script a user would run (printed before
it starts). Writes `<out_dir>/history.json` and `<out_dir>/history.md` (the table) and prints the
JSON as one object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from model.cli import add_switch
from model.loader import add_device_args
from scripts.common import (DEMO, REPO, accelerator_name, binomial_interval, constant_answer_baseline,
                            cpu_name, last_json, mcnemar_exact, output_dir, read_metrics, run)

TRAINING_MODES = ("full", "query_utterance")
INFERENCE_MODES = ("full", "query_utterance", "none")
EVALUATIONS = {"multi-turn recall": DEMO / "multiturn_eval.jsonl", "single-turn": DEMO / "eval.jsonl"}


def cell(summary: dict, correct: list[bool]) -> dict:
    """One evaluation's figures: accuracy with its interval, prompt length, and every answer's correctness."""
    low, high = binomial_interval(summary["correct"], summary["samples"])
    return {"accuracy": summary["accuracy"], "correct": summary["correct"], "n": summary["samples"],
            "interval_95": [low, high], "mean_prompt_tokens": summary["mean_prompt_tokens"], "answers": correct}


def markdown_table(results: dict) -> str:
    """Rows: (SFT data, inference history); columns: each evaluation, and McNemar's p against the baseline."""
    lines = ["| SFT data | inference history | " + " | ".join(f"{name} exact match [95% CI] | mean prompt tokens"
                                                          for name in EVALUATIONS) + " | recall vs baseline (gained/lost, p) |",
             "|---|---|" + "---|---|" * len(EVALUATIONS) + "---|"]
    for training in TRAINING_MODES:
        for inference in INFERENCE_MODES:
            cells = results["cells"][training][inference]
            figures = [f"{c['accuracy']:.1%} ({c['correct']}/{c['n']}) [{c['interval_95'][0]:.1%}, {c['interval_95'][1]:.1%}] | "
                       f"{c['mean_prompt_tokens']:.1f}" for c in (cells[name] for name in EVALUATIONS)]
            test = cells["multi-turn recall"].get("vs_baseline")
            versus = "baseline" if test is None else f"+{test['gained']}/−{test['lost']}, p = {test['p_value']:.3g}"
            lines.append(f"| {training} | {inference} | " + " | ".join(figures) + f" | {versus} |")
    constant = results["constant_answer_baseline"]
    lines += ["", "Always replying the most common answer: " + ", ".join(
        f"{name} {constant[name]['accuracy']:.1%} (\"{constant[name]['answer']}\")" for name in EVALUATIONS) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None,
                        help="pretrained weights (.pth with its .json sidecar) both SFT runs start from; "
                             "default: pretrain one on dataset/demo/pretrain.jsonl")
    parser.add_argument("--out_dir", default=str(REPO / "out" / "history"))
    add_switch(parser, "--quick", default=0, help="tiny models, a few steps, 20 questions per evaluation")
    parser.add_argument("--hidden_size", type=int, default=256, help="of the pretrained model, when this script trains it")
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--pretrain_epochs", type=int, default=1)
    parser.add_argument("--pretrain_max_steps", type=int, default=0, help="stop pretraining after N steps (default: 0 = no cap)")
    parser.add_argument("--sft_epochs", type=int, default=2)
    parser.add_argument("--sft_max_steps", type=int, default=0,
                        help="stop each SFT run after N steps, the same compute for both (default: 0 = no cap)")
    parser.add_argument("--history_utterances", type=int, default=2,
                        help="K: earlier user utterances paired with the query, in training and answering (default: 2)")
    add_device_args(parser)
    args = parser.parse_args()
    out = output_dir(args.out_dir)
    python, start, timings = sys.executable, time.time(), {}

    def step_cap(max_steps: int) -> list[str]:
        """`--max_steps`: 6 in a quick run, else `max_steps` when it is set."""
        return ["--max_steps", "6" if args.quick else str(max_steps)] if args.quick or max_steps else []

    def trainer(script: str, *flags: str) -> None:
        run([python, f"trainer/{script}", "--save_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"),
             "--device", args.device, "--dtype", args.dtype, "--log_interval", "10", "--save_interval", "100000",
             "--accumulation_steps", "1", "--max_seq_len", "256", "--batch_size", "16", "--warmup_steps", "20", *flags])

    # 1. The pretrained weights both SFT runs start from.
    since = time.time()
    pretrained = Path(args.pretrained).resolve() if args.pretrained else None
    if pretrained is None:
        size = ["--preset", "tiny"] if args.quick else ["--hidden_size", str(args.hidden_size),
                                                        "--num_hidden_layers", str(args.num_hidden_layers)]
        trainer("train_pretrain.py", *size, *step_cap(args.pretrain_max_steps), "--from_weight", "none",
                "--learning_rate", "2e-3", "--epochs", str(args.pretrain_epochs), "--data_path", str(DEMO / "pretrain.jsonl"))
        pretrained = next(out.glob("pretrain_*.pth"))
    timings["pretrain"] = round((time.time() - since) / 60, 1)

    # 2. SFT with each history mode, all else equal.
    sft = {}
    for training in TRAINING_MODES:
        since = time.time()
        trainer("train_full_sft.py", *step_cap(args.sft_max_steps), "--from_weight", str(pretrained),
                "--save_weight", f"sft_{training}", "--learning_rate", "1e-3", "--epochs", str(args.sft_epochs),
                "--data_path", str(DEMO / "sft.jsonl"), "--history_mode", training, "--history_utterances", str(args.history_utterances))
        sft[training] = next(out.glob(f"sft_{training}_*.pth"))
        timings[f"sft_{training}"] = round((time.time() - since) / 60, 1)

    # 3. Every model, every inference mode, both evaluations.
    since = time.time()
    cells: dict = {training: {inference: {} for inference in INFERENCE_MODES} for training in TRAINING_MODES}
    constant: dict = {}
    for training, weights in sft.items():
        for inference in INFERENCE_MODES:
            for name, path in EVALUATIONS.items():
                details = out / f"eval_{training}_{inference}_{path.stem}.json"
                summary = last_json(run([python, "eval_llm.py", "--load_from", str(weights), "--device", args.device,
                                         "--eval_file", str(path), "--history_mode", inference,
                                         "--history_utterances", str(args.history_utterances), "--max_new_tokens", "8",
                                         "--batch_size", "50", "--eval_out", str(details),
                                         *(["--max_samples", "20"] if args.quick else [])]))
                predictions = json.loads(details.read_text(encoding="utf-8"))["predictions"]
                cells[training][inference][name] = cell(summary, [p["correct"] for p in predictions])
                constant[name] = constant_answer_baseline(predictions)
    timings["evaluation"] = round((time.time() - since) / 60, 1)
    baseline = {name: cells["full"]["full"][name]["answers"] for name in EVALUATIONS}
    for training in TRAINING_MODES:
        for inference in INFERENCE_MODES:
            for name in EVALUATIONS:  # paired by position: both answered the same file in the same order
                answers = cells[training][inference][name].pop("answers")
                if (training, inference) != ("full", "full"):
                    cells[training][inference][name]["vs_baseline"] = mcnemar_exact(baseline[name], answers)

    final_records = {training: read_metrics(weights.with_suffix(".metrics.jsonl"))[-1] for training, weights in sft.items()}
    results = {
        "cpu": cpu_name(), "accelerator": accelerator_name(args.device), "minutes": round((time.time() - start) / 60, 1),
        "stage_minutes": timings, "pretrained": str(pretrained), "history_utterances": args.history_utterances,
        "sft": {training: {"weights": str(sft[training]), "steps": record["step"], "tokens": record["tokens"],
                           "final_loss": record["loss"]} for training, record in final_records.items()},
        "constant_answer_baseline": constant, "cells": cells,
    }
    (out / "history.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "history.md").write_text(markdown_table(results), encoding="utf-8")
    print(markdown_table(results))
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
