"""Chat with a trained model, or measure it.

    python eval_llm.py                                        # canned questions to out/full_sft_512.pth
    python eval_llm.py --mode chat --historys 2               # type questions; the last 2 exchanges are kept
    python eval_llm.py --mode chat --history_mode query_utterance   # ... with the 2 earlier questions most like the new one
    python eval_llm.py --weight pretrain                      # out/pretrain_512.pth
    python eval_llm.py --load_from path/to/model.pth          # a .pth, an HF directory, any transformers chat model
    python eval_llm.py --eval_file dataset/demo/eval.jsonl    # exact-match accuracy, overall and per task
    python eval_llm.py --ppl_file held_out.jsonl              # perplexity of pretrain (text) or SFT (conversations) data
    python eval_llm.py --ppl_lengths 256,1024,4096 --eval_file dataset/demo/long_text.jsonl   # by context length, YaRN off/on

Evaluation prints a table, and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from dataset.lm_dataset import JsonlFile, check_prompt, check_text, dataset_for_file, pad_rows
from dataset.tasks import is_correct
from model.chat_format import PromptTooLong, count_tokens, fit_history, render_prompt, start_messages, typed_questions
from model.cli import add_history_args, add_sampling_args, add_thinking_switch
from model.loader import (add_model_args, add_switch, chat_stream, context_length, describe, describe_training,
                          generate_batch, load_from_args)
from model.model_minimind import next_token_nll

CANNED_PROMPTS = [
    "你有什么特长？",
    "请用一句话介绍一下你自己。",
    "为什么天空是蓝色的？",
    "推荐几本值得一读的中国古典小说。",
    "3 加 2 等于多少？",
    "97 和 89 中较大的数是哪个？",
    "Tell me a short story about a cat.",
    "What is the capital of France?",
    "What is the product of 6 and 7?",
    "How many centimeters are in 10 meters?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    chat = parser.add_argument_group("chat")
    chat.add_argument("--mode", default="auto", choices=["auto", "chat"],
                      help="auto = answer the canned questions; chat = read your questions from stdin (default: auto)")
    chat.add_argument("--prompts", nargs="+", default=None, metavar="TEXT",
                      help="with --mode auto: these questions instead of the canned ones")
    chat.add_argument("--historys", type=int, default=0,
                      help="with --history_mode full: past exchanges (question + answer) kept in the prompt; 0 = every "
                           "question alone. Older ones are dropped first, also when the prompt would not fit the context")
    add_history_args(chat, full="past exchanges as --historys says (an --eval_file record: all of its history)",
                     none="the system prompt and the question alone")
    add_sampling_args(chat)
    chat.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens; 0 = no cut (default: 0)")
    chat.add_argument("--repetition_penalty", type=float, default=1.0, help="(default: 1.0 = none)")
    add_thinking_switch(chat)
    chat.add_argument("--seed", type=int, default=None, help="makes sampled answers repeatable")
    add_switch(chat, "--show_speed", help="1 = print tokens/s after each answer")

    evaluation = parser.add_argument_group("evaluation (instead of chatting)")
    evaluation.add_argument("--eval_file", default=None,
                            help="jsonl of {conversations, answer, task}: greedy answers scored by exact match "
                                 "(e.g. dataset/demo/eval.jsonl); a multi-turn record's history is sent as "
                                 "--history_mode says")
    evaluation.add_argument("--ppl_file", default=None,
                            help="jsonl of {text} (all tokens count) or {conversations} (only assistant tokens count)")
    evaluation.add_argument("--eval_out", default=None, help="also write the results, with every prediction, to this JSON file")
    evaluation.add_argument("--max_samples", type=int, default=0, help="use only the first N lines of each file (0 = all)")
    evaluation.add_argument("--batch_size", type=int, default=16, help="questions or documents per batch (default: 16)")
    evaluation.add_argument("--max_seq_len", type=int, default=512, help="perplexity: documents are cut to this many tokens")
    evaluation.add_argument("--ppl_lengths", default=None, metavar="L1,L2,...",
                            help="long-context perplexity of --eval_file (a .txt, or a jsonl of {text} read as one text) "
                                 "in windows of each length, with --inference_rope_scaling 0 and 1; e.g. 256,512,1024,2048,4096,8192")
    evaluation.add_argument("--ppl_plot", default=str(Path(__file__).resolve().parent / "images" / "ppl_by_length.png"),
                            help="with --ppl_lengths: where the plot goes (default: <repo>/images/ppl_by_length.png)")
    return parser.parse_args(argv)


def enable_thinking(args: argparse.Namespace) -> bool | None:
    return None if args.open_thinking is None else bool(args.open_thinking)


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------

def chat(args: argparse.Namespace, model, tokenizer, questions: Iterable[str], echo: bool) -> None:
    """Answer each question, streaming; the earlier exchanges sent with it are chosen by --history_mode (and --historys)."""
    max_prompt_tokens = context_length(model) - args.max_new_tokens
    if max_prompt_tokens <= 0:
        sys.exit(f"error: --max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the "
                 f"model's {context_length(model)}-token context")
    conversation = start_messages(args.system_prompt)
    for question in questions:
        if echo:
            print(f"👶: {question}")
        conversation.append({"role": "user", "content": question})
        try:
            messages = fit_history(tokenizer, conversation, max_prompt_tokens, keep_turns=args.historys,
                                   enable_thinking=enable_thinking(args), history_mode=args.history_mode,
                                   history_utterances=args.history_utterances)
        except PromptTooLong as error:
            print(f"(skipped: {error})", file=sys.stderr)
            conversation.pop()
            continue
        print("🤖: ", end="", flush=True)
        start = time.perf_counter()
        pieces = []
        with chat_stream(model, tokenizer, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                         enable_thinking=enable_thinking(args), seed=args.seed) as stream:
            for piece in stream:
                pieces.append(piece)
                print(piece, end="", flush=True)
        print()
        if args.show_speed:
            seconds = time.perf_counter() - start
            print(f"[{stream.completion_tokens} tokens, {stream.completion_tokens / max(seconds, 1e-9):.1f} tokens/s]")
        print()
        conversation.append({"role": "assistant", "content": "".join(pieces)})


# ---------------------------------------------------------------------------------------------
# Evaluation data
# ---------------------------------------------------------------------------------------------

def read_questions(path: Path, max_samples: int) -> list[dict]:
    """`{"conversations", "answer", "task"?}` records (the first `max_samples` if > 0); a bad line
    stops the run with `path:line: why`."""
    file = JsonlFile(path, validate=check_prompt)
    records = []
    for i in range(min(len(file), max_samples) if max_samples else len(file)):
        records.append(file[i])
        if "answer" not in records[-1]:
            raise file.error(i, "missing field 'answer' (the reference to score against)")
    return records


def question_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """The conversation to answer: a trailing reference answer, if the record carries one, is left out."""
    conversation = list(record["conversations"])
    if conversation[-1]["role"] == "assistant":
        conversation.pop()
    return start_messages(system_prompt) + conversation


def question_prompt(args: argparse.Namespace, tokenizer, record: dict) -> str:
    """The prompt for a record, its history sent as `--history_mode` says (all of it in `full`)."""
    messages = fit_history(None, question_messages(record, args.system_prompt), history_mode=args.history_mode,
                           history_utterances=args.history_utterances)
    return render_prompt(tokenizer, messages, enable_thinking=enable_thinking(args))


# ---------------------------------------------------------------------------------------------
# Exact-match accuracy
# ---------------------------------------------------------------------------------------------

def greedy_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy replies to rendered prompts, `batch_size` at a time through the decode loop: each row
    decodes at its own position and leaves the batch when it ends its turn."""
    answers = []
    with tqdm(total=len(prompts), desc="answering", unit="q", file=sys.stderr) as progress:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              padding_side="left", add_special_tokens=False).to(model.device)
            output = generate_batch(model, tokenizer, batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens)
            answers += tokenizer.batch_decode(output[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            progress.update(batch.input_ids.shape[0])
    return answers


def score(records: list[dict], predictions: list[str]) -> dict:
    """Exact-match accuracy overall and per task (and per language when the records say)."""
    correct = [is_correct(prediction, str(record["answer"])) for record, prediction in zip(records, predictions)]
    summary = {"samples": len(records), "correct": sum(correct), "accuracy": sum(correct) / max(len(records), 1)}
    for field in ("task", "lang"):
        if not any(field in record for record in records):
            continue
        groups: dict[str, list[bool]] = defaultdict(list)
        for record, ok in zip(records, correct):
            groups[str(record.get(field, "?"))].append(ok)
        summary[f"per_{field}"] = {name: {"samples": len(oks), "correct": sum(oks), "accuracy": sum(oks) / len(oks)}
                                   for name, oks in sorted(groups.items())}
    return summary


def evaluate_accuracy(args: argparse.Namespace, model, tokenizer, path: Path) -> tuple[dict, list[dict]]:
    records = read_questions(path, args.max_samples)
    prompts = [question_prompt(args, tokenizer, record) for record in records]
    predictions = greedy_answers(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
    prompt_tokens = [count_tokens(tokenizer, prompt) for prompt in prompts]
    details = [{"question": question_messages(record, None)[-1]["content"], "answer": record["answer"], "prediction": prediction,
                "correct": is_correct(prediction, str(record["answer"])), "task": record.get("task")}
               for record, prediction in zip(records, predictions)]
    return {"eval_file": str(path), "history_mode": args.history_mode,
            "mean_prompt_tokens": sum(prompt_tokens) / max(len(prompt_tokens), 1), **score(records, predictions)}, details


def print_table(summary: dict) -> None:
    rows = [(name, group) for name, group in summary.get("per_task", {}).items()]
    rows.append(("all", summary))
    width = max(len(name) for name, _ in rows)
    print(f"{'task':<{width}}  {'samples':>7}  {'correct':>7}  {'accuracy':>8}")
    for name, group in rows:
        print(f"{name:<{width}}  {group['samples']:>7}  {group['correct']:>7}  {group['accuracy']:>8.1%}")


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(model, dataset, batch_size: int, max_samples: int = 0) -> dict:
    """exp of the mean next-token negative log-likelihood over every scored token of the file."""
    count = min(len(dataset), max_samples) if max_samples else len(dataset)
    nll_sum, tokens = 0.0, 0
    for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", file=sys.stderr):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        batch = pad_rows(items, max(len(item["input_ids"]) for item in items), dataset.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits
        labels = batch["labels"].to(model.device)
        nll_sum += float(next_token_nll(logits, labels, reduction="sum"))
        tokens += int((labels[:, 1:] != -100).sum())  # the token at position t is predicted at t - 1
    mean_nll = nll_sum / max(tokens, 1)
    return {"documents": count, "tokens": tokens, "nll": mean_nll, "ppl": math.exp(mean_nll)}


# ---------------------------------------------------------------------------------------------
# Long-context perplexity by window length, YaRN off and on
# ---------------------------------------------------------------------------------------------

def long_text_ids(path: Path, tokenizer) -> torch.Tensor:
    """One long text as token ids: a .txt file whole, or the `text` of every jsonl line joined by newlines."""
    if path.suffix == ".jsonl":
        file = JsonlFile(path, validate=check_text)
        text = "\n".join(file[i]["text"] for i in range(len(file)))
    else:
        text = path.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


@torch.inference_mode()
def windowed_perplexity(model, ids: torch.Tensor, length: int) -> dict:
    """Perplexity of `ids` cut into consecutive windows of `length` tokens, each scored on its own from
    its start: every token but a window's first is predicted from up to `length - 1` tokens before it."""
    windows = ids[:len(ids) // length * length].view(-1, length)
    nll_sum = 0.0
    for window in tqdm(windows, desc=f"perplexity @ {length}", unit="window", file=sys.stderr):
        row = window[None].to(model.device)
        nll_sum += float(next_token_nll(model(input_ids=row).logits, row, reduction="sum"))
    tokens = windows.shape[0] * (length - 1)
    return {"length": length, "windows": windows.shape[0], "tokens": tokens, "ppl": math.exp(nll_sum / tokens)}


def plot_ppl_by_length(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("yarn_off", "YaRN off"), ("yarn_on", "YaRN on")):
        ax.plot([row["length"] for row in rows], [row[key] for row in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def perplexity_by_length(args: argparse.Namespace) -> dict:
    """`--ppl_lengths`: the same text, the same model loaded with YaRN off and on, every window length.
    Only the windows of the longest length that fit are used, so every length reads the same tokens."""
    lengths = sorted(int(length) for length in args.ppl_lengths.split(","))
    path = Path(args.eval_file)
    rows = [{"length": length} for length in lengths]
    for key, scaling in (("yarn_off", 0), ("yarn_on", 1)):
        model, tokenizer = load_from_args(argparse.Namespace(**{**vars(args), "inference_rope_scaling": scaling}))
        print(f"loaded {describe(model)}, --inference_rope_scaling {scaling}", file=sys.stderr)
        ids = long_text_ids(path, tokenizer)
        if len(ids) < lengths[-1]:
            raise ValueError(f"{path} has {len(ids):,} tokens, fewer than the longest window ({lengths[-1]:,})")
        ids = ids[:len(ids) // lengths[-1] * lengths[-1]]
        for row in rows:
            result = windowed_perplexity(model, ids, row["length"])
            row.update({"windows": result["windows"], key: result["ppl"]})
    print(f"{'window':>7}  {'windows':>7}  {'YaRN off':>10}  {'YaRN on':>10}")
    for row in rows:
        print(f"{row['length']:>7}  {row['windows']:>7}  {row['yarn_off']:>10.3f}  {row['yarn_on']:>10.3f}")
    plot_ppl_by_length(rows, Path(args.ppl_plot), f"Perplexity by context length: {path.name}, {len(ids):,} tokens")
    print(f"plot: {args.ppl_plot}", file=sys.stderr)
    return {"eval_file": str(path), "tokens": len(ids), "plot": str(args.ppl_plot), "by_length": rows}


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ppl_lengths:
        if not args.eval_file:
            sys.exit("error: --ppl_lengths needs --eval_file: the long text to score")
        try:
            print(json.dumps(perplexity_by_length(args), ensure_ascii=False))
        except (OSError, ValueError) as error:
            sys.exit(f"error: {error}")
        return
    try:
        model, tokenizer = load_from_args(args)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"loaded {describe(model)}", file=sys.stderr)
    if training := describe_training(model):
        print(training, file=sys.stderr)

    if args.eval_file or args.ppl_file:
        results, details = {"load_from": args.load_from, "weight": args.weight}, []
        try:
            if args.eval_file:
                summary, details = evaluate_accuracy(args, model, tokenizer, Path(args.eval_file))
                print_table(summary)
                results.update(summary)
            if args.ppl_file:
                path = Path(args.ppl_file)
                dataset = dataset_for_file(path, tokenizer, args.max_seq_len)
                ppl = perplexity(model, dataset, args.batch_size, args.max_samples)
                print(f"perplexity {ppl['ppl']:.3f} (mean NLL {ppl['nll']:.4f} over {ppl['tokens']:,} tokens "
                      f"of {ppl['documents']} documents)")
                results.update({"ppl_file": str(path), **ppl})
        except (OSError, ValueError) as error:
            sys.exit(f"error: {error}")
        if args.eval_out:
            Path(args.eval_out).write_text(json.dumps({**results, "predictions": details}, ensure_ascii=False, indent=1),
                                           encoding="utf-8")
        print(json.dumps(results, ensure_ascii=False))
        return

    questions = (args.prompts or CANNED_PROMPTS) if args.mode == "auto" else typed_questions()
    try:
        chat(args, model, tokenizer, questions, echo=args.mode == "auto")
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
