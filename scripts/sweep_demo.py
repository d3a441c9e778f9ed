"""Choose the demo recipe by measurement: model size, sequence length and epochs against the time budget.

    python scripts/sweep_demo.py                       # every recipe below, one after another
    python scripts/sweep_demo.py --recipes small long  # some of them
    python scripts/sweep_demo.py --quick               # the plumbing, with tiny models

Each recipe is one `python scripts/demo_pipeline.py --skip_test ...` run in its own folder: pretraining and
SFT on the demo data, then exact match on the *validation* questions, the held-out SFT conversations that
ask one question with a numeric answer (every 20th conversation, never trained on). `dataset/demo/eval.jsonl`
is not touched: the recipe is chosen here, and the held-out questions are scored once, by the demo run of
the chosen recipe. The winner is the most accurate recipe whose run fits `--budget_minutes` (the demo's
last steps, held-out evaluation, report card and chat, take about a minute more).

Writes `<out_dir>/sweep.json` and `<out_dir>/sweep.md` (a table for the README) and prints the JSON object
on its last line.
"""
from __future__ import annotations

import argparse
import json
import sys

from model.cli import add_switch
from model.loader import add_device_args
from scripts.common import REPO, binomial_interval, cpu_name, last_json, output_dir, run

# name -> demo_pipeline.py flags (4 layers and sequences of 256 tokens, pretraining 1 epoch, unless a recipe
# says otherwise); what was tried, in the order it was tried. "long_sft" is demo_pipeline.py's default.
OLD_SFT = ["--sft_batch_size", "16", "--sft_learning_rate", "1e-3"]  # the SFT settings of the first recipes
RECIPES = {
    "base": ["--hidden_size", "256", "--sft_epochs", "2", *OLD_SFT],
    "one_sft_epoch": ["--hidden_size", "256", "--sft_epochs", "1", *OLD_SFT],
    "small": ["--hidden_size", "128", "--sft_epochs", "3", *OLD_SFT],
    "mid": ["--hidden_size", "192", "--sft_epochs", "2", *OLD_SFT],
    "long_sft": ["--hidden_size", "128", "--sft_epochs", "8", "--sft_batch_size", "16", "--sft_learning_rate", "3e-3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES),
                        help="which recipes to run (default: all)")
    parser.add_argument("--budget_minutes", type=float, default=13.5,
                        help="a recipe must train and validate within this to be chosen")
    parser.add_argument("--out_dir", default=str(REPO / "out" / "sweep"))
    add_switch(parser, "--quick", default=0, help="tiny models, a few steps: checks the plumbing")
    add_device_args(parser)
    args = parser.parse_args()
    out = output_dir(args.out_dir)

    results = []
    for name in args.recipes:
        folder = out / name
        summary = last_json(run([sys.executable, "scripts/demo_pipeline.py", "--skip_test", *RECIPES[name],
                                 "--out_dir", str(folder), "--images_dir", str(folder / "images"),
                                 "--device", args.device, "--dtype", args.dtype, *(["--quick"] if args.quick else [])]))
        low, high = binomial_interval(summary["validation_correct"], summary["validation_samples"])
        results.append({"recipe": name, "flags": " ".join(RECIPES[name]), **summary,
                        "validation_interval": [round(low, 4), round(high, 4)]})

    fitting = [r for r in results if r["minutes"] <= args.budget_minutes]
    chosen = max(fitting, key=lambda r: r["validation_accuracy"])["recipe"] if fitting else None
    rows = "\n".join(
        f"| {'**' + r['recipe'] + '**' if r['recipe'] == chosen else r['recipe']} | `{r['flags']}` | {r['model']} | "
        f"{r['minutes']} | {r['pretrain_val_loss']:.3f} | {r['sft_val_loss']:.3f} | "
        f"{100 * r['validation_accuracy']:.1f}% ({r['validation_correct']}/{r['validation_samples']}) "
        f"[{100 * r['validation_interval'][0]:.1f}%, {100 * r['validation_interval'][1]:.1f}%] |" for r in results)
    table = ("| recipe | demo_pipeline.py flags | model | minutes | pretrain val loss | SFT val loss | "
             "validation exact match [95% CI] |\n|---|---|---|---|---|---|---|\n" + rows)
    report = {"cpu": cpu_name(), "budget_minutes": args.budget_minutes, "chosen": chosen, "recipes": results}
    (out / "sweep.md").write_text(f"On {cpu_name()}; budget {args.budget_minutes} minutes.\n\n{table}\n", encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    print(f"\n{table}\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
