"""Training throughput: loss-bearing tokens/s, ms/step, peak memory and MFU, per configuration.

    python scripts/bench_train.py                                   # MiniMind2-Small, batch 8 x 340, all variants
    python scripts/bench_train.py --preset tiny --steps 3 --variants packed-fp32

Each variant runs the real training step (engine.Trainer.train_step: forward, token-normalised
backward, clipping, AdamW) on the same documents, in its own process so peak memory is its own:

  padded-fp32   one document per row padded to --max_seq_len, fp32: what the original MiniMind's
                trainer does on a CPU (its baseline figure)
  packed-fp32   documents packed into full rows, attention kept within each document
  packed-bf16   the same under bf16 autocast
  *-compiled    the same with torch.compile

Only tokens that carry loss count: padding is work, not progress. MFU = achieved FLOP/s over the
peak matmul FLOP/s measured on this machine in the same dtype; model FLOPs per token are
6 x parameters + 12 x layers x hidden x context (attention scores), the usual estimate. The fraction
of the limit divides the same FLOP/s by what the model's own GEMM shapes reach at a step's tokens in
that dtype (`common.model_gemm_peak_flops`): the tokens/s a step made only of its matmuls would run at.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from scripts.common import (DEMO, accelerator_name, cpu_name, model_gemm_peak_flops, peak_matmul_flops,
                            training_flops_per_token)

VARIANTS = ["padded-fp32", "packed-fp32", "packed-bf16", "packed-fp32-compiled", "packed-bf16-compiled"]


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """One configuration, in this process: returns its measurements."""
    from dataset.lm_dataset import PackedBatches, dataset_for_file
    from trainer import engine

    layout, dtype_name = variant.split("-")[:2]
    compiled = variant.endswith("compiled")
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        parser = engine.stage_parser("bench", save_weight="bench", from_weight="none", learning_rate=1e-4, epochs=1,
                                     batch_size=args.batch_size, max_seq_len=args.max_seq_len, data_file="-")
        size = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers)] \
            if args.hidden_size else ["--preset", args.preset]
        train_args = parser.parse_args([*size, "--device", args.device, "--save_dir", tmp,
                                        "--checkpoint_dir", tmp, "--save_interval", "1000000", "--log_interval", "1000000",
                                        "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype_name],
                                        "--use_compile", str(int(compiled))])
        runtime = engine.setup_runtime(train_args)
        tokenizer = engine.load_tokenizer("model")
        model = engine.load_model(train_args, runtime)
        dataset = dataset_for_file(args.data_path, tokenizer, args.max_seq_len)
        batches = PackedBatches(dataset, args.batch_size, args.max_seq_len, pack=layout == "packed", seed=0)
        trainer = engine.Trainer(train_args, runtime, model)
        trainer.total_steps = args.warmup + args.steps
        trainer.start_logging()
        trainer.progress.disable = True
        iterator = iter(batches)
        times, tokens, rows_tokens, warmup_s = [], 0, 0, 0.0
        for step in range(args.warmup + args.steps):
            batch = next(iterator)
            start = time.perf_counter()
            before = trainer.tokens
            trainer.train_step([batch], engine.causal_lm_loss)
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if step < args.warmup:
                warmup_s += elapsed
            else:
                times.append(elapsed)
                tokens += trainer.tokens - before
                rows_tokens += batch["input_ids"].numel()
        n_params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        flops_per_token = training_flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, args.max_seq_len)
        seconds = sum(times)
        tokens_per_s = tokens / seconds
        peak = peak_matmul_flops(runtime.dtype, runtime.device)
        # the roof for this model: its own GEMM shapes at a step's tokens (the head runs on loss-bearing rows only)
        limit = model_gemm_peak_flops(engine.unwrap(model), args.batch_size * args.max_seq_len, runtime.dtype, runtime.device)
        memory = (torch.cuda.max_memory_allocated() if runtime.device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"variant": variant, "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(1000 * seconds / len(times), 1),
                # what the untimed first steps cost beyond timed ones: torch.compile's compilation, mostly
                "warmup_overhead_s": round(warmup_s - args.warmup * seconds / len(times), 1),
                "loss_bearing_fraction": round(tokens / rows_tokens, 3), "peak_memory_mb": round(memory / 2 ** 20, 1),
                "mfu": round(tokens_per_s * flops_per_token / peak, 4), "peak_matmul_gflops": round(peak / 1e9, 1),
                "limit_tokens_per_s": round(limit / flops_per_token, 1), "fraction_of_limit": round(tokens_per_s * flops_per_token / limit, 4),
                "model_gemm_gflops": round(limit / 1e9, 1),
                "parameters": n_params, "dtype": str(runtime.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--hidden_size", type=int, default=0, help="with --num_hidden_layers, a size instead of --preset")
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=340)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data_path", default=str(DEMO / "pretrain.jsonl"),
                        help="pretraining ({text}) or SFT ({conversations}) jsonl; SFT trains on replies only")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args, args.one)))
        return
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        command = [sys.executable, __file__, "--one", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("one", "variants")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{variant:24s} {result['tokens_per_s']:>9.0f} tok/s {result['ms_per_step']:>9.0f} ms/step "
              f"{result['peak_memory_mb']:>8.0f} MB  MFU {100 * result['mfu']:5.1f}%  "
              f"{100 * result['fraction_of_limit']:5.1f}% of the limit ({result['limit_tokens_per_s']:.0f} tok/s)  "
              f"(loss-bearing {100 * result['loss_bearing_fraction']:.0f}% of row tokens)", flush=True)
    baseline = next((r for r in results if r["variant"] == "padded-fp32"), None)
    best = max(results, key=lambda r: r["tokens_per_s"])
    summary = {"cpu": cpu_name(), "accelerator": accelerator_name(args.device), "threads": torch.get_num_threads(),
               "preset": args.preset, "batch": f"{args.batch_size}x{args.max_seq_len}", "results": results, "best": best["variant"]}
    if baseline:
        summary["speedup_vs_padded_fp32"] = round(best["tokens_per_s"] / baseline["tokens_per_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
