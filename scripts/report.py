"""The report card of a training run: what ran where, what each stage cost, and what each stage's model can do.

    python scripts/report.py                                  # out/ -> out/report.md
    python scripts/report.py --out_dir out/demo --report out/demo/report_card.md --device cpu

Reads what the trainers leave in `--out_dir`: the weights `<stage>_<hidden>[_moe].pth` with their sidecar
config and the `<stage>_<hidden>[_moe].metrics.jsonl` they log. For every stage found (PRETRAIN, SFT, DPO,
RL) it runs the evaluations as a user would type them — `eval_llm.py` for exact match on the demo's held-out
questions and perplexity on held-out text, `scripts/eval_benchmark.py` for the demo C-Eval and CMMLU — keeps
their results with every prediction beside the weights (`<stem>.<evaluation>.json`, reused while newer
than the weights), and writes one markdown file:

* the environment (commit, CPU/GPU, torch and transformers) and the size of the code;
* the tokenizer's compression, characters per token on held-out text;
* per stage: parameters, tokens, wall time, final loss, tokens/s and MFU;
* one table with a column per stage: exact match, C-Eval/CMMLU accuracy against chance with a 95%
  Clopper-Pearson interval, held-out perplexity; and for each stage, in words, whether it beats chance
  on each demo benchmark beyond noise, with the number of questions;
* for each pair of consecutive stages scored on the same questions, McNemar's exact test: is the
  change in accuracy more than the noise of which questions happened to flip?
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from model.loader import load_tokenizer
from model.model_minimind import MiniMindForCausalLM
from model.weights import read_sidecar
from scripts.common import (DEMO, REPO, accelerator_name, binomial_interval, cpu_name, evaluation_path,
                            paired_change,
                            peak_matmul_flops, read_metrics, run, training_flops_per_token)

# column -> the weight names that fill it, first found wins (RL: whichever RL trainer ran)
STAGES = {"PRETRAIN": ("pretrain",), "SFT": ("full_sft",), "DPO": ("dpo",), "RL": ("grpo", "ppo_actor", "spo")}
CODE_FOLDERS = ("model", "dataset", "trainer", "scripts")
HELD_OUT_TEXT = DEMO / "long_text.jsonl"  # 三国演义, in no training file
CHANCE = 0.25


# ---------------------------------------------------------------------------------------------
# What the run left in out/
# ---------------------------------------------------------------------------------------------

def find_stage_weights(out_dir: Path, hidden_size: int | None) -> dict[str, Path]:
    """Column -> its weight file: the newest `<name>_<hidden>[_moe].pth` of the stage's names."""
    found = {}
    for column, names in STAGES.items():
        for name in names:
            pattern = f"{name}_{hidden_size}*.pth" if hidden_size else f"{name}_*.pth"
            candidates = [p for p in out_dir.glob(pattern) if p.stem.removeprefix(f"{name}_").split("_")[0].isdigit()]
            if candidates:
                found[column] = max(candidates, key=lambda p: p.stat().st_mtime)
                break
    return found


def parameter_count(weights: Path) -> int | None:
    """Parameters of the model a sidecar describes (a tied embedding counted once), built on the meta
    device so nothing is allocated."""
    config, _ = read_sidecar(weights)
    if config is None:
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in MiniMindForCausalLM(config).parameters())


def stage_costs(weights: Path, peak_flops: float) -> dict:
    """Parameters, tokens, wall time, final loss, tokens/s and MFU of the stage that wrote `weights`."""
    config, extra = read_sidecar(weights)
    metrics_file = weights.with_suffix(".metrics.jsonl")
    costs: dict = {"weights": weights.name, "parameters": parameter_count(weights)}
    if not metrics_file.exists():
        return costs
    last = read_metrics(metrics_file)[-1]
    tokens_per_s = last["tokens"] / max(last["elapsed_s"], 1e-9)
    costs.update(tokens=last["tokens"], wall_s=last["elapsed_s"], final_loss=last["loss"], tokens_per_s=tokens_per_s)
    flags = (extra.get("train_args") or {}).get("flags") or {}
    if config is not None and costs["parameters"] and flags.get("max_seq_len"):
        flops = training_flops_per_token(costs["parameters"], config.num_hidden_layers, config.hidden_size,
                                         int(flags["max_seq_len"]))
        costs["mfu"] = tokens_per_s * flops / peak_flops
    return costs


def code_size() -> dict[str, int]:
    """Lines of Python in each part of the library and scripts (tests not counted)."""
    sizes = {folder: sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (REPO / folder).rglob("*.py"))
             for folder in CODE_FOLDERS}
    sizes["eval_llm.py"] = len((REPO / "eval_llm.py").read_text(encoding="utf-8").splitlines())
    return sizes


def chars_per_token(tokenizer, path: Path = HELD_OUT_TEXT) -> float:
    text = "\n".join(json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line)
    return len(text) / len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def environment() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": commit or "unknown", "cpu": cpu_name(), "gpu": accelerator_name("auto") or "none",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------
# Evaluations, run as a user types them
# ---------------------------------------------------------------------------------------------

def evaluation_commands(weights: Path, device: str, limit: int = 0) -> dict[str, list[str]]:
    """Each evaluation of one weight file; every command writes its results with predictions to
    `--eval_out`. `limit` > 0 keeps the first `limit` questions of each file (a quick look, wider intervals)."""
    model = ["--load_from", str(weights), "--device", device]
    bench = [sys.executable, "scripts/eval_benchmark.py", *model, "--limit", str(limit)]
    return {
        "exact_match": [sys.executable, "eval_llm.py", *model, "--eval_file", str(DEMO / "eval.jsonl"),
                        "--max_new_tokens", "16", "--batch_size", "50", "--max_samples", str(limit)],
        "ceval": [*bench, "--benchmark", "ceval", "--data_dir", str(DEMO / "ceval")],
        "cmmlu": [*bench, "--benchmark", "cmmlu", "--data_dir", str(DEMO / "cmmlu")],
        "perplexity": [sys.executable, "eval_llm.py", *model, "--ppl_file", str(HELD_OUT_TEXT), "--max_seq_len", "512"],
    }


def evaluate_stage(weights: Path, device: str, limit: int = 0) -> dict[str, dict]:
    """Every evaluation of `weights`, from `<stem>.<name>[.first<limit>].json` when it is newer than the weights."""
    results = {}
    for name, command in evaluation_commands(weights, device, limit).items():
        saved = evaluation_path(weights, name, limit)
        if not saved.exists() or saved.stat().st_mtime < weights.stat().st_mtime:
            run([*command, "--eval_out", str(saved)])
        results[name] = json.loads(saved.read_text(encoding="utf-8"))
    return results


# ---------------------------------------------------------------------------------------------
# The markdown
# ---------------------------------------------------------------------------------------------

def chance_verdict(correct: int, n: int) -> str:
    """Beyond noise only when the whole 95% interval is on one side of chance."""
    low, high = binomial_interval(correct, n)
    return "above chance" if low > CHANCE else "below chance" if high < CHANCE else "within noise of chance"


def accuracy_cell(correct: int, n: int) -> str:
    low, high = binomial_interval(correct, n)
    return f"{correct / n:.3f} [{low:.3f}, {high:.3f}] n={n}, {chance_verdict(correct, n)}"


BENCHMARK_NAMES = {"ceval": "C-Eval", "cmmlu": "CMMLU"}


def chance_statement(stage: str, benchmark: str, correct: int, n: int) -> str:
    """One sentence: does this stage beat chance on this demo benchmark beyond noise?"""
    low, high = binomial_interval(correct, n)
    verdict = chance_verdict(correct, n)
    beats = "beats chance beyond noise" if verdict == "above chance" else "does not beat chance beyond noise"
    return (f"- {stage} {beats} on the demo {BENCHMARK_NAMES[benchmark]}: {correct} of {n} questions right "
            f"({correct / n:.1%}, 95% interval {low:.1%}–{high:.1%}, chance {CHANCE:.0%}): {verdict}.")


def render(env: dict, sizes: dict, compression: float, costs: dict[str, dict], evaluations: dict[str, dict],
           pairs: list[tuple[str, str, str, dict]], out_dir: Path) -> str:
    columns = list(costs)
    lines = [f"# MiniMind report card: `{out_dir}`", "",
             "## Environment", "", "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in env.items()), "",
             "## Code", "", f"{sum(sizes.values()):,} lines of Python (tests not counted): "
             + ", ".join(f"{name} {lines:,}" for name, lines in sizes.items()) + ".", "",
             "## Tokenizer", "", f"{compression:.3f} characters per token on held-out text (`{HELD_OUT_TEXT.relative_to(REPO)}`).", "",
             "## Training", "", "MFU: training FLOPs per token (6 × parameters + attention) × tokens/s over this machine's "
             "fp32 matmul peak, so it is only meaningful when the stage trained here.", "",
             "| stage | weights | parameters | tokens | wall time | final loss | tokens/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for column, cost in costs.items():
        def value(key: str, form: str) -> str:
            return format(cost[key], form) if cost.get(key) is not None else "—"
        lines.append(f"| {column} | `{cost['weights']}` | {value('parameters', ',')} | {value('tokens', ',')} | "
                     f"{value('wall_s', '.0f')} s | {value('final_loss', '.3f')} | {value('tokens_per_s', ',.0f')} | "
                     f"{value('mfu', '.2%')} |")
    lines += ["", "## Evaluation", "",
              "Accuracy with its 95% Clopper-Pearson interval; \"above chance\" when the whole interval is above "
              f"{CHANCE:.0%} (four choices), i.e. beyond noise. Perplexity on held-out text, documents cut to 512 tokens.", "",
              "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    rows = {"demo exact match (`eval.jsonl`)": lambda r: f"{r['exact_match']['accuracy']:.3f} n={r['exact_match']['samples']}",
            "demo C-Eval, 0-shot": lambda r: accuracy_cell(r["ceval"]["correct"], r["ceval"]["n"]),
            "demo CMMLU, 0-shot": lambda r: accuracy_cell(r["cmmlu"]["correct"], r["cmmlu"]["n"]),
            "held-out perplexity": lambda r: f"{r['perplexity']['ppl']:.1f}"}
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(evaluations[column]) for column in columns) + " |")
    lines += ["", "Against chance, 0-shot, as a binomial interval on the number of questions:", ""]
    lines += [chance_statement(column, name, evaluations[column][name]["correct"], evaluations[column][name]["n"])
              for column in columns for name in BENCHMARK_NAMES]
    if pairs:
        lines += ["", "## Before and after, on the same questions", "",
                  "McNemar's exact test: gained = wrong before and right after, lost = the reverse; p is two-sided.", "",
                  "| evaluation | from | to | questions | gained | lost | p |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {before} | {after} | {t['n']} | {t['gained']} | {t['lost']} | {t['p_value']:.3g} |"
                  for name, before, after, t in pairs]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: str | Path | None = None, *, device: str = "auto",
                 hidden_size: int | None = None, tokenizer_path: str | None = None, limit: int = 0) -> Path:
    """Evaluate every stage found in `out_dir` and write the report card (default `<out_dir>/report.md`)."""
    out_dir = Path(out_dir).resolve()
    weights = find_stage_weights(out_dir, hidden_size)
    if not weights:
        raise FileNotFoundError(f"no stage weights ({', '.join(n for names in STAGES.values() for n in names)}"
                                f"_<hidden>.pth) in {out_dir}")
    peak = peak_matmul_flops(torch.float32, torch.device("cpu"))
    costs = {column: stage_costs(path, peak) for column, path in weights.items()}
    evaluations = {column: evaluate_stage(path, device, limit) for column, path in weights.items()}
    pairs = []
    columns = list(weights)
    for before, after in zip(columns, columns[1:]):
        for name in ("exact_match", "ceval", "cmmlu"):
            change = paired_change(evaluations[before][name], evaluations[after][name])
            if change is not None:
                pairs.append((name, before, after, change))
    text = render(environment(), code_size(), chars_per_token(load_tokenizer(tokenizer_path)), costs, evaluations,
                  pairs, out_dir)
    path = Path(report) if report else out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(REPO / "out"), help="where the trainers wrote weights and metrics (default: <repo>/out)")
    parser.add_argument("--report", default=None, help="the markdown file to write (default: <out_dir>/report.md)")
    parser.add_argument("--hidden_size", type=int, default=None, help="only weights of this width (default: the newest of each stage)")
    parser.add_argument("--tokenizer_path", default=None, help="for the compression figure (default: the bundled tokenizer)")
    parser.add_argument("--device", default="auto", help="where the evaluations run (default: auto)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N questions of each evaluation file (0 = all): quicker, wider intervals")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.out_dir, args.report, device=args.device, hidden_size=args.hidden_size,
                            tokenizer_path=args.tokenizer_path, limit=args.limit)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
