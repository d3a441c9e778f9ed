"""Do DPO, distillation and reasoning training do what they claim? Measured on the demo data from an SFT model.

    python scripts/measure_post_training.py --sft_weight out/demo/full_sft_128.pth
    python scripts/measure_post_training.py            # first trains an SFT model from scratch (128 hidden, 4 layers)
    python scripts/measure_post_training.py --quick    # tiny models, a few steps: checks the plumbing

1. DPO (`trainer/train_dpo.py`; by default `--rpo_alpha 1`, lr 1e-4, 2 epochs) from the SFT model, on
   `dataset/demo/dpo.jsonl` (fixed near misses as `rejected`) or with `--dpo_pairs on_policy` on the SFT
   model's own wrong answers to the RL prompts (`scripts/make_dpo_pairs.py`): the preference accuracy (chosen reward > rejected reward) of the first and last
   tenth of its steps; on the held-out questions
   (`dataset/demo/eval.jsonl`), exact-match accuracy (`eval_llm.py --eval_file`, greedy) and how often the
   model finds the reference answer likelier than a near miss (the answer plus one), before and after.
2. Distillation (`trainer/train_distillation.py`): a smaller student from random weights, once with the SFT
   model as teacher (the original's alpha 0.5, T 1.5) and once with cross-entropy only (alpha 1), same
   data, steps and seed; held-out loss (`eval_llm.py --ppl_file`) on the evaluation questions with their
   reference answers, which no training file contains.
3. Reasoning (`trainer/train_reason.py`, `dataset/demo/reason.jsonl`) from the DPO model: the share of
   held-out questions answered with one well-formed `<think>...</think>` block followed by an answer when
   thinking is on, and accuracy with thinking on and off.

Each step runs the real script a user would run (printed before it starts). Writes
`<out_dir>/post_training.json` and prints it as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dataset.lm_dataset import DPODataset, pad_preference_pairs
from model.chat_format import split_reasoning, thinking_well_formed
from model.cli import add_switch
from model.loader import add_device_args, load_model_and_tokenizer
from model.model_minimind import next_token_nll
from scripts.common import (DEMO, REPO, accelerator_name, cpu_name, last_json, output_dir,
                            paired_change, read_metrics, run)

def well_formed(reply: str) -> bool:
    """One `<think>` block opening the reply (`thinking_well_formed`, the RL format reward's rule), with
    something in it, then a non-empty answer."""
    reasoning, answer = split_reasoning(reply)
    return thinking_well_formed(reply) and bool(reasoning) and bool(answer)


def write_held_out_pairs(path: Path) -> None:
    """The evaluation questions as preference pairs: the reference answer against a near miss (one more)."""
    with open(DEMO / "eval.jsonl", encoding="utf-8") as questions, open(path, "w", encoding="utf-8") as pairs:
        for line in questions:
            record = json.loads(line)
            if not str(record["answer"]).isdigit():
                continue
            replies = (str(record["answer"]), str(int(record["answer"]) + 1))
            pair = {side: record["conversations"] + [{"role": "assistant", "content": reply}]
                    for side, reply in zip(("chosen", "rejected"), replies)}
            pairs.write(json.dumps(pair, ensure_ascii=False) + "\n")


@torch.inference_mode()
def preference_accuracy(weights: Path, pairs_path: Path) -> float:
    """Share of pairs whose chosen reply the model finds likelier than the rejected one: a lower
    negative log-likelihood summed over the reply's tokens, the model alone (no reference). As in
    DPO training, both sides of 50 pairs go through the model as one batch."""
    model, tokenizer = load_model_and_tokenizer(str(weights), device="cpu", dtype="float32")
    pairs = DPODataset(pairs_path, tokenizer, max_length=128)
    wins = 0
    for start in range(0, len(pairs), 50):
        batch = pad_preference_pairs([pairs[i] for i in range(start, min(start + 50, len(pairs)))], pairs.pad_token_id)
        sides = {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
                 for key in ("input_ids", "labels", "attention_mask")}
        logits = model(input_ids=sides["input_ids"], attention_mask=sides["attention_mask"]).logits
        chosen_nll, rejected_nll = next_token_nll(logits, sides["labels"]).sum(dim=1).chunk(2)
        wins += int((chosen_nll < rejected_nll).sum())
    return wins / len(pairs)


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / max(len(records), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_weight", default=None, help="the SFT model (.pth with its .json sidecar); default: "
                                                           "SFT from random weights on dataset/demo/sft.jsonl, 1 epoch")
    parser.add_argument("--out_dir", default=str(REPO / "out" / "post_training"))
    add_switch(parser, "--quick", default=0, help="tiny models, a few steps")
    parser.add_argument("--dpo_pairs", choices=["on_policy", "shipped"], default="shipped",
                        help="on_policy: the SFT model's own wrong answers as rejected (scripts/make_dpo_pairs.py); "
                             "shipped: dataset/demo/dpo.jsonl's near misses")
    parser.add_argument("--dpo_learning_rate", type=float, default=1e-4)
    parser.add_argument("--dpo_beta", type=float, default=0.1)
    parser.add_argument("--dpo_rpo_alpha", type=float, default=1.0, help="train_dpo.py --rpo_alpha (0 = plain DPO)")
    parser.add_argument("--dpo_epochs", type=int, default=2)
    parser.add_argument("--student_hidden_size", type=int, default=64)
    parser.add_argument("--student_num_layers", type=int, default=2)
    parser.add_argument("--kd_steps", type=int, default=300)
    parser.add_argument("--reason_epochs", type=int, default=2)
    add_device_args(parser)
    args = parser.parse_args()
    out = output_dir(args.out_dir)
    python, start, timings = sys.executable, time.time(), {}

    def stage_done(name: str, since: float) -> float:
        timings[name] = round((time.time() - since) / 60, 1)
        return time.time()

    def trainer(script: str, *flags: str) -> None:
        run([python, f"trainer/{script}", "--save_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"),
             "--device", args.device, "--dtype", args.dtype, "--log_interval", "5", "--save_interval", "100000",
             "--accumulation_steps", "1", *(["--max_steps", "6"] if args.quick else []), *flags])

    def evaluate(weights: Path, name: str, *flags: str) -> tuple[dict, dict]:
        """`eval_llm.py`'s summary, and its saved details (with the replies when it answered questions)."""
        details = out / f"eval_{name}.json"
        summary = last_json(run([python, "eval_llm.py", "--load_from", str(weights), "--device", args.device,
                                 "--batch_size", "50", "--eval_out", str(details),
                                 *(["--max_samples", "40"] if args.quick else []), *flags]))
        return summary, json.loads(details.read_text())

    def accuracy(weights: Path, name: str, max_new_tokens: int, *flags: str) -> tuple[dict, dict]:
        return evaluate(weights, name, "--eval_file", str(DEMO / "eval.jsonl"), "--max_new_tokens", str(max_new_tokens),
                        *flags)

    since = time.time()
    sft = Path(args.sft_weight).resolve() if args.sft_weight else None
    if sft is None:
        size = ["--preset", "tiny"] if args.quick else ["--hidden_size", "128", "--num_hidden_layers", "4"]
        trainer("train_full_sft.py", *size, "--from_weight", "none", "--max_seq_len", "96", "--batch_size", "32",
                "--learning_rate", "2e-3", "--warmup_steps", "20", "--epochs", "1")
        sft = next(out.glob("full_sft_*.pth"))
    sft_eval, sft_details = accuracy(sft, "sft", 16)
    since = stage_done("sft", since)

    # 1. DPO
    if args.dpo_pairs == "on_policy":
        pairs = out / "dpo_on_policy.jsonl"
        run([python, "scripts/make_dpo_pairs.py", "--load_from", str(sft), "--out", str(pairs), "--device", args.device,
             *(["--max_prompts", "200"] if args.quick else [])])
    else:
        pairs = DEMO / "dpo.jsonl"
    trainer("train_dpo.py", "--from_weight", str(sft), "--data_path", str(pairs), "--batch_size", "16", "--max_seq_len", "128",
            "--learning_rate", str(args.dpo_learning_rate), "--beta", str(args.dpo_beta),
            "--rpo_alpha", str(args.dpo_rpo_alpha), "--epochs", str(args.dpo_epochs))
    dpo = next(out.glob("dpo_*.pth"))
    dpo_metrics = read_metrics(dpo.with_suffix(".metrics.jsonl"))
    tenth = max(1, len(dpo_metrics) // 10)
    dpo_eval, dpo_details = accuracy(dpo, "dpo", 16)
    held_out_pairs = out / "held_out_pairs.jsonl"
    write_held_out_pairs(held_out_pairs)
    held_out_preference = {"sft": preference_accuracy(sft, held_out_pairs), "dpo": preference_accuracy(dpo, held_out_pairs)}
    since = stage_done("dpo", since)

    # 2. Distillation: the same student with and without the teacher. The held-out conversations are the
    # evaluation questions answered with their reference answers, as the SFT data answers such questions.
    held_out = out / "held_out_answers.jsonl"
    with open(DEMO / "eval.jsonl", encoding="utf-8") as questions, open(held_out, "w", encoding="utf-8") as answers:
        for line in questions:
            record = json.loads(line)
            reply = {"role": "assistant", "content": str(record["answer"])}
            answers.write(json.dumps({"conversations": record["conversations"] + [reply]}, ensure_ascii=False) + "\n")
    student_size = ["--preset", "tiny"] if args.quick else ["--hidden_size", str(args.student_hidden_size),
                                                             "--num_hidden_layers", str(args.student_num_layers)]
    held_out_nll = {}
    for name, alpha in (("kd", "0.5"), ("ce", "1.0")):
        trainer("train_distillation.py", *student_size, "--from_weight", "none", "--teacher_weight", str(sft),
                "--alpha", alpha, "--temperature", "1.5", "--save_weight", f"student_{name}", "--batch_size", "16",
                "--max_seq_len", "128", "--learning_rate", "2e-3", "--warmup_steps", "20",
                *([] if args.quick else ["--max_steps", str(args.kd_steps)]), "--epochs", "1")
        student = next(out.glob(f"student_{name}_*.pth"))
        held_out_nll[name] = evaluate(student, f"student_{name}", "--ppl_file", str(held_out),
                                      "--max_seq_len", "128")[0]["nll"]
    held_out_nll["teacher"] = evaluate(sft, "teacher", "--ppl_file", str(held_out), "--max_seq_len", "128")[0]["nll"]
    since = stage_done("distillation", since)

    # 3. Reasoning
    trainer("train_reason.py", "--from_weight", str(dpo), "--batch_size", "16", "--max_seq_len", "256",
            "--learning_rate", "5e-4", "--warmup_steps", "10", "--epochs", str(args.reason_epochs))
    reason = next(out.glob("reason_*.pth"))
    thinking, thinking_details = accuracy(reason, "reason_thinking_on", 192, "--open_thinking", "1")
    no_thinking, no_thinking_details = accuracy(reason, "reason_thinking_off", 32, "--open_thinking", "0")
    replies_on = [p["prediction"] for p in thinking_details["predictions"]]
    replies_off = [p["prediction"] for p in no_thinking_details["predictions"]]
    stage_done("reason", since)

    results = {
        "cpu": cpu_name(), "accelerator": accelerator_name(args.device), "minutes": round((time.time() - start) / 60, 1), "stage_minutes": timings,
        "sft_weight": str(sft), "eval_questions": sft_eval["samples"],
        "dpo": {"accuracy_sft": sft_eval["accuracy"], "accuracy_dpo": dpo_eval["accuracy"],
                "held_out_preference_accuracy_sft": held_out_preference["sft"],
                "held_out_preference_accuracy_dpo": held_out_preference["dpo"],
                "steps": dpo_metrics[-1]["step"],
                "preference_accuracy_first_tenth": mean(dpo_metrics[:tenth], "reward_accuracy"),
                "preference_accuracy_last_tenth": mean(dpo_metrics[-tenth:], "reward_accuracy"),
                "reward_margin_first_tenth": mean(dpo_metrics[:tenth], "reward_margin"),
                "reward_margin_last_tenth": mean(dpo_metrics[-tenth:], "reward_margin"),
                "pairs": args.dpo_pairs, "learning_rate": args.dpo_learning_rate, "beta": args.dpo_beta, "rpo_alpha": args.dpo_rpo_alpha,
                "epochs": args.dpo_epochs, "vs_sft": paired_change(sft_details, dpo_details)},
        "distillation": {"held_out_nll_kd": held_out_nll["kd"], "held_out_nll_ce_only": held_out_nll["ce"],
                         "held_out_nll_teacher": held_out_nll["teacher"],
                         "student": " ".join(student_size), "steps": 6 if args.quick else args.kd_steps},
        "reason": {"well_formed_thinking_on": sum(map(well_formed, replies_on)) / len(replies_on),
                   "accuracy_thinking_on": thinking["accuracy"], "accuracy_thinking_off": no_thinking["accuracy"],
                   "think_block_in_reply_thinking_off": sum("<think>" in r for r in replies_off) / len(replies_off),
                   # McNemar's exact test against the model it started from (DPO), and against SFT
                   "thinking_on_vs_dpo": paired_change(dpo_details, thinking_details),
                   "thinking_off_vs_dpo": paired_change(dpo_details, no_thinking_details),
                   "thinking_on_vs_sft": paired_change(sft_details, thinking_details)},
    }
    (out / "post_training.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
