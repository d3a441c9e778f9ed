"""Decode speed of one model in llama.cpp, per GGUF --outtype, next to ours (transformers `generate`).

    python scripts/bench_gguf.py                       # MiniMind2-Small, 32-token prompt, 200 new tokens
    python scripts/bench_gguf.py --preset tiny --new_tokens 20

Batch 1, greedy, random weights (speed does not depend on their values). Decode tokens/s counts the
new tokens after the first, so the prompt's prefill is left out on both sides. Needs llama-cpp-python
(requirements-test.txt). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from llama_cpp import Llama

from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from scripts.bench_train import cpu_name
from scripts.gguf_export import OUTTYPES, write_gguf


def ours_tokens_per_s(model: MiniMindForCausalLM, prompt: list[int], new_tokens: int) -> float:
    """(new_tokens - 1) / (time of new_tokens - time of 1): the prefill cancels out."""
    ids = torch.tensor([prompt])

    def generate_seconds(count: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return time.perf_counter() - start

    generate_seconds(2)  # warm-up
    return (new_tokens - 1) / (generate_seconds(new_tokens) - generate_seconds(1))


def llama_cpp_tokens_per_s(gguf_file: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Time from the first sampled token to the last: `generate` never stops at eos by itself."""
    llm = Llama(str(gguf_file), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, verbose=False)
    try:
        tokens = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)
        next(tokens)  # prefill and the first token
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        return (new_tokens - 1) / (time.perf_counter() - start)
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind2-small", choices=sorted(PRESETS))
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS[args.preset])).eval()
    tokenizer = load_tokenizer()
    prompt = torch.randint(3, len(tokenizer), (args.prompt_tokens,)).tolist()
    results = {"cpu": cpu_name(), "threads": args.threads, "preset": args.preset,
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "ours_fp32_tokens_per_s": round(ours_tokens_per_s(model, prompt, args.new_tokens), 1), "llama.cpp": {}}
    print(f"ours (transformers generate, fp32): {results['ours_fp32_tokens_per_s']} tok/s")
    with tempfile.TemporaryDirectory() as directory:
        for outtype in OUTTYPES:
            gguf_file = Path(directory) / f"{args.preset}-{outtype}.gguf"
            write_gguf(model, tokenizer, gguf_file, outtype)
            speed = llama_cpp_tokens_per_s(gguf_file, prompt, args.new_tokens, args.threads)
            results["llama.cpp"][outtype] = {"file_mib": round(gguf_file.stat().st_size / 2**20, 1),
                                             "tokens_per_s": round(speed, 1)}
            print(f"llama.cpp {outtype:>5}: {results['llama.cpp'][outtype]['file_mib']:>6} MiB  {speed:.1f} tok/s")
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
