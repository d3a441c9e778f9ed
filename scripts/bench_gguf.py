"""Decode speed of one model in llama.cpp, per GGUF --outtype, next to ours (model/generate.py, the decode
loop of eval_llm.py and the server, which scripts/bench_generate.py calls "ours"), and the size of each file.

    python scripts/bench_gguf.py                       # MiniMind2-Small, 32-token prompt, 200 new tokens, 1 thread
    python scripts/bench_gguf.py --preset tiny --new_tokens 20 --repeats 1

Batch 1, greedy, random weights (speed does not depend on their values). Decode tokens/s counts the
new tokens after the first, so the prompt's prefill is left out on both sides. Every figure is the best
of --repeats runs, all variants timed in turn within each repeat, so that other work on the machine
slows them alike. Needs llama-cpp-python (requirements-test.txt). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from llama_cpp import Llama
from tqdm import tqdm

from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from scripts.common import cpu_name, time_our_decode
from scripts.gguf_export import OUTTYPES, write_gguf

DecodeSeconds = Callable[[list[int], int], float]  # (prompt, new tokens) -> seconds of the new tokens after the first


def ours(model: MiniMindForCausalLM) -> DecodeSeconds:
    def decode_seconds(prompt: list[int], new_tokens: int) -> float:
        first, last = time_our_decode(model, torch.tensor([prompt]), new_tokens)
        return last - first

    return decode_seconds


def llama_cpp(llm: Llama) -> DecodeSeconds:
    def decode_seconds(prompt: list[int], new_tokens: int) -> float:
        llm.reset()  # else generate() reuses the previous run's cached prompt
        tokens = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)  # never stops at eos itself
        next(tokens)  # prefill and the first new token
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        return time.perf_counter() - start

    return decode_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small", choices=sorted(PRESETS))
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="threads for both sides (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs (default 3)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS[args.preset])).eval()
    tokenizer = load_tokenizer()
    prompt = torch.randint(3, len(tokenizer), (args.prompt_tokens,)).tolist()
    results = {"cpu": cpu_name(), "threads": args.threads, "preset": args.preset, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "file_mib": {}, "decode_tokens_per_s": {}}
    with tempfile.TemporaryDirectory() as directory:
        variants, sessions = {"ours fp32": ours(model)}, []
        for outtype in OUTTYPES:
            gguf_file = Path(directory) / f"{args.preset}-{outtype}.gguf"
            write_gguf(model, tokenizer, gguf_file, outtype)
            results["file_mib"][outtype] = round(gguf_file.stat().st_size / 2**20, 1)
            sessions.append(Llama(str(gguf_file), n_ctx=args.prompt_tokens + args.new_tokens + 8,
                                  n_threads=args.threads, n_threads_batch=args.threads, verbose=False))
            variants[f"llama.cpp {outtype}"] = llama_cpp(sessions[-1])
        try:
            best = {name: float("inf") for name in variants}
            for decode_seconds in variants.values():  # warm-up: allocator, kernels, llama.cpp's first eval
                decode_seconds(prompt, 2)
            with tqdm(total=args.repeats * len(variants), desc="decode runs", unit="run") as progress:
                for _ in range(args.repeats):
                    for name, decode_seconds in variants.items():
                        best[name] = min(best[name], decode_seconds(prompt, args.new_tokens))
                        progress.update()
        finally:
            for llm in sessions:
                llm.close()
    for name, seconds in best.items():
        results["decode_tokens_per_s"][name] = round((args.new_tokens - 1) / seconds, 1)
        outtype = name.removeprefix("llama.cpp ")
        size = f"{results['file_mib'][outtype]:>6} MiB" if outtype in results["file_mib"] else " " * 10
        print(f"{name:<16} {size}  {results['decode_tokens_per_s'][name]:>7} tok/s")
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
