"""The whole pipeline on the shipped demo data, from nothing to a chat, in about 15 minutes on 2 CPU cores.

    python scripts/demo_pipeline.py            # tokenizer (if absent) -> pretrain -> SFT -> evaluation -> chat
    python scripts/demo_pipeline.py --quick    # a 1-minute smoke run with a tiny model

Each step runs the real script a user would run (printed before it starts), so this file is also the
recipe. At the end it writes `<out_dir>/report.md` and loss curves in `images/`, showing whether the
model learned: the training and validation loss of each stage (every 20th document is held out),
the pretraining loss against the unigram entropy of the data (what a model that ignores context
achieves at best), and exact-match accuracy on held-out questions before and after SFT.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

from model.cli import add_switch
from scripts.common import (DEMO, REPO, constant_answer_baseline, evaluation_path, last_json, new_figure, read_metrics,
                            run, save_figure)

CHAT_PROMPTS = ["3 加 5 等于多少？", "What is 7 plus 2?", "9 和 4 哪个大？", "How many letters are in the word dog?", "你好"]


def unigram_entropy(data_path: Path, tokenizer_path: Path, max_length: int) -> float:
    """Entropy (nats/token) of the token frequencies of the pretraining data, tokenized exactly as
    training sees it: the loss of the best model that ignores context."""
    from dataset.lm_dataset import PretrainDataset
    from model.loader import load_tokenizer

    dataset = PretrainDataset(str(data_path), load_tokenizer(tokenizer_path), max_length=max_length)
    counts: Counter = Counter()
    for i in range(len(dataset)):
        # the first token is never predicted (labels shift by one)
        counts.update(dataset[i]["input_ids"][1:].tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def split_validation(source: Path, directory: Path, every: int = 20) -> tuple[Path, Path]:
    """Every `every`-th line of `source` held out as validation data, the rest to train on: a split
    spread over the whole file (the demo files are grouped by source and task), the same every run."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    directory.mkdir(parents=True, exist_ok=True)
    train, validation = directory / f"{source.stem}_train.jsonl", directory / f"{source.stem}_val.jsonl"
    train.write_text("".join(line for i, line in enumerate(lines) if i % every != every - 1), encoding="utf-8")
    validation.write_text("".join(line for i, line in enumerate(lines) if i % every == every - 1), encoding="utf-8")
    return train, validation


def validation_questions(conversations: Path, path: Path) -> Path:
    """The held-out SFT conversations that are one question with a numeric reply, as an `--eval_file`:
    the question, and the reply as its answer. Carved from the training data (not `eval.jsonl`), so a
    recipe can be chosen on it and the held-out questions scored once, for the final model."""
    with open(conversations, encoding="utf-8") as source, open(path, "w", encoding="utf-8") as questions:
        for line in source:
            messages = json.loads(line)["conversations"]
            if [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"].isdigit() \
                    and not messages[1].get("reasoning_content"):
                questions.write(json.dumps({"conversations": messages[:1], "answer": messages[1]["content"]},
                                           ensure_ascii=False) + "\n")
    return path


def plot_loss(records: list[dict], title: str, path: Path, reference: tuple[float, str] | None = None) -> None:
    """Training loss, and the validation loss where it was measured, against loss-bearing tokens."""
    fig, ax = new_figure()
    ax.plot([r["tokens"] / 1e6 for r in records], [r["loss"] for r in records], label="training loss")
    validated = [r for r in records if "val_loss" in r]
    if validated:
        ax.plot([r["tokens"] / 1e6 for r in validated], [r["val_loss"] for r in validated], "o-",
                label=f"validation loss (held-out; last {validated[-1]['val_loss']:.3f}, "
                      f"{validated[-1]['val_bpb']:.3f} bits/byte)")
    if reference:
        ax.axhline(reference[0], color="gray", linestyle="--", label=reference[1])
    ax.set_xlabel("loss-bearing tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    save_figure(fig, ax, path, title)


def stage_losses(pretrain_metrics: list[dict], sft_metrics: list[dict]) -> dict:
    """The last validation loss (nats/token) and bits per byte of pretraining and SFT."""
    return {f"{stage}_{key}": round(metrics[-1][key], 3)
            for stage, metrics in (("pretrain", pretrain_metrics), ("sft", sft_metrics)) for key in ("val_loss", "val_bpb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_switch(parser, "--quick", default=0, help="tiny model, a few steps: checks the plumbing in about a minute")
    parser.add_argument("--out_dir", default=str(REPO / "out" / "demo"), help="weights, metrics, evaluations, report")
    parser.add_argument("--images_dir", default=str(REPO / "images"), help="where the loss-curve PNGs go")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--pretrain_epochs", type=int, default=1)
    parser.add_argument("--sft_epochs", type=int, default=8,
                        help="passes over the SFT conversations; the one-digit tasks are learnt between the fifth and the eighth")
    parser.add_argument("--sft_batch_size", type=int, default=16)
    parser.add_argument("--sft_learning_rate", type=float, default=3e-3)
    parser.add_argument("--eval_interval", type=int, default=100, help="optimizer steps between validations")
    add_switch(parser, "--skip_test", default=0,
                        help="stop after scoring the validation questions (carved from the SFT data), for choosing a "
                             "recipe: dataset/demo/eval.jsonl is scored once, for the final model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    out, images = Path(args.out_dir).resolve(), Path(args.images_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    python = sys.executable

    tokenizer = REPO / "model"
    if not (tokenizer / "tokenizer.json").exists():
        run([python, "trainer/train_tokenizer.py"])

    size = ["--preset", "tiny"] if args.quick else ["--hidden_size", str(args.hidden_size),
                                                    "--num_hidden_layers", str(args.num_hidden_layers)]
    common = [*size, "--max_seq_len", str(args.max_seq_len), "--save_dir", str(out),
              "--checkpoint_dir", str(out / "checkpoints"), "--device", args.device, "--dtype", args.dtype,
              "--accumulation_steps", "1", "--log_interval", "5", "--save_interval", "200"]
    cap = ["--max_steps", "8"] if args.quick else []
    hidden = 64 if args.quick else args.hidden_size

    # Every 20th document and conversation is held out: its loss is the validation curve.
    pretrain_data, pretrain_val = split_validation(DEMO / "pretrain.jsonl", out / "data")
    sft_data, sft_val = split_validation(DEMO / "sft.jsonl", out / "data")
    common += ["--eval_interval", str(2 if args.quick else args.eval_interval)]

    # 1. Pretraining: next-token prediction on the demo corpus, from random weights.
    run([python, "trainer/train_pretrain.py", *common, *cap, "--from_weight", "none", "--batch_size", "16",
         "--epochs", str(args.pretrain_epochs), "--learning_rate", "2e-3", "--warmup_steps", "20",
         "--data_path", str(pretrain_data), "--eval_data", str(pretrain_val)])

    limit = 40 if args.quick else 0  # held-out questions per evaluation (0 = all)

    def evaluate(weight: str, questions: Path = DEMO / "eval.jsonl", name: str = "exact_match") -> dict:
        """Exact match on `questions`, saved where the report card finds it (and so not rerun)."""
        weights = out / f"{weight}_{hidden}.pth"
        output = run([python, "eval_llm.py", "--load_from", str(weights), "--eval_file", str(questions),
                      "--max_new_tokens", "16", "--batch_size", "50", "--device", args.device,
                      "--eval_out", str(evaluation_path(weights, name, limit)), "--max_samples", str(limit)])
        return last_json(output)

    # 2. How well does the pretrained model answer held-out questions in the chat format? (Barely.)
    before = None if args.skip_test else evaluate("pretrain")

    # 3. SFT: the same loss on assistant replies only, starting from the pretrained weights.
    run([python, "trainer/train_full_sft.py", *common, *cap, "--from_weight", "pretrain",
         "--batch_size", str(args.sft_batch_size), "--epochs", str(args.sft_epochs),
         "--learning_rate", str(args.sft_learning_rate), "--warmup_steps", "20",
         "--data_path", str(sft_data), "--eval_data", str(sft_val)])
    validation = evaluate("full_sft", validation_questions(sft_val, out / "data" / "sft_val_questions.jsonl"),
                          "validation_exact_match")
    pretrain_metrics = read_metrics(out / f"pretrain_{hidden}.metrics.jsonl")
    sft_metrics = read_metrics(out / f"full_sft_{hidden}.metrics.jsonl")
    model_name = f"hidden {hidden}, {2 if args.quick else args.num_hidden_layers} layers"
    if args.skip_test:
        summary = {"model": model_name, "validation_accuracy": validation["accuracy"],
                   "validation_correct": validation["correct"], "validation_samples": validation["samples"],
                   **stage_losses(pretrain_metrics, sft_metrics), "minutes": round((time.time() - start) / 60, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
        return
    after = evaluate("full_sft")

    # The report card: demo C-Eval/CMMLU, held-out perplexity and costs of each stage, against chance.
    run([python, "scripts/report.py", "--out_dir", str(out), "--hidden_size", str(hidden),
         "--report", str(out / "report_card.md"), "--device", args.device, "--limit", str(limit)])

    # 4. A few answers, greedy, as `python eval_llm.py` shows them.
    chat = run([python, "eval_llm.py", "--load_from", str(out / f"full_sft_{hidden}.pth"), "--temperature", "0",
                "--max_new_tokens", "32", "--device", args.device, "--prompts", *CHAT_PROMPTS])

    # 5. The report.
    entropy = unigram_entropy(pretrain_data, tokenizer, args.max_seq_len)
    tail = pretrain_metrics[-max(1, len(pretrain_metrics) // 10):]
    final_pretrain_loss = sum(r["loss"] for r in tail) / len(tail)
    plot_loss(pretrain_metrics, "Pretraining on the demo corpus", images / "demo_pretrain_loss.png",
              (entropy, f"unigram entropy of the data ({entropy:.2f})"))
    plot_loss(sft_metrics, "SFT on the demo conversations (assistant tokens)", images / "demo_sft_loss.png")
    summary = {
        "model": model_name,
        "unigram_entropy": round(entropy, 3), "pretrain_final_loss": round(final_pretrain_loss, 3),
        "pretrain_tokens": pretrain_metrics[-1]["tokens"], "sft_final_loss": round(sft_metrics[-1]["loss"], 3),
        **stage_losses(pretrain_metrics, sft_metrics), "validation_accuracy": validation["accuracy"],
        "accuracy_before_sft": before["accuracy"], "accuracy_after_sft": after["accuracy"],
        "eval_samples": after["samples"], "minutes": round((time.time() - start) / 60, 1),
    }
    answered = json.loads(evaluation_path(out / f"full_sft_{hidden}.pth", "exact_match", limit).read_text())["predictions"]
    constant = {task: constant_answer_baseline([p for p in answered if p["task"] == task]) for task in after["per_task"]}
    rows = "\n".join(f"| {task} | {before['per_task'].get(task, {}).get('accuracy', 0):.2f} | {stats['accuracy']:.2f} | "
                     f"{constant[task]['accuracy']:.2f} (\"{constant[task]['answer']}\") | {stats['samples']} |"
                     for task, stats in sorted(after["per_task"].items()))
    report = f"""# MiniMind demo run

{summary['model']}, trained on the shipped demo data in {summary['minutes']} minutes
(`python scripts/demo_pipeline.py{' --quick' if args.quick else ''}`).

## Pretraining

Final training loss **{final_pretrain_loss:.3f}** nats/token (mean of the last 10% of logged steps; the first
epoch's documents are unseen when scored), against **{entropy:.3f}** for the unigram entropy of the same
tokens: the best a model that ignores context can do. {pretrain_metrics[-1]['tokens']:,} loss-bearing tokens.
On the held-out documents (every 20th, not trained on): **{summary['pretrain_val_loss']:.3f}** nats/token,
**{summary['pretrain_val_bpb']:.3f}** bits per byte.

![pretraining loss](../../images/demo_pretrain_loss.png)

## SFT

Exact-match accuracy on {after['samples']} held-out questions (`dataset/demo/eval.jsonl`, greedy, chat format):
**{before['accuracy']:.3f}** after pretraining, **{after['accuracy']:.3f}** after SFT. Held-out conversations
(every 20th, not trained on): **{summary['sft_val_loss']:.3f}** nats per assistant token, **{summary['sft_val_bpb']:.3f}**
bits per byte.

| task | before SFT | after SFT | one reply to every question (the commonest answer) | questions |
|---|---|---|---|---|
{rows}

A task scored no better than its one-reply column is not read from the question: the model gives that task's
likeliest reply. On the validation questions (held-out SFT conversations, the split a recipe is chosen on):
**{validation['accuracy']:.3f}** of {validation['samples']}.

![SFT loss](../../images/demo_sft_loss.png)

See [report_card.md](report_card.md) for the demo C-Eval/CMMLU accuracy of each stage against chance (95%
interval, number of questions) and McNemar's test of the change.

## Chat (greedy)

```
{chat.strip()}
```
"""
    (out / "report.md").write_text(report, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nreport: {out / 'report.md'}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
