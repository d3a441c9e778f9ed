"""Inference speed: our decode loop (model/generate.py) against transformers' `generate`, and against
llama.cpp when `llama_cpp` is importable and `scripts/convert_model.py` can write GGUF; at batch 1,
4, 16 and 32; through the HTTP server at 1, 4, 16 and 32 concurrent streams; fp32 and int8 weights;
and the perplexity that int8 costs on held-out text.

    python scripts/bench_generate.py                                  # MiniMind2-Small, random weights
    python scripts/bench_generate.py --load_from out/pretrain_512.pth --ppl_file held_out.jsonl
    python scripts/bench_generate.py --new_tokens 64 --repeats 2 --skip_server

Every figure is the best of `--repeats` runs, the variants measured in turn within each repeat, so
that other work on the machine slows them alike. Prefill tokens/s = prompt tokens / time to the first
new token; decode tokens/s = the further new tokens / the time they took (both summed over the batch).
The server's figures are aggregate completion tokens/s and time to first token (p50/p95) of greedy
streams. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from model.cli import add_switch
from model.loader import load_model_and_tokenizer, quantize_int8
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts.common import DEMO, REPO, cpu_name, last_json, run, time_our_decode

Generate = Callable[[torch.Tensor, int], tuple[float, float]]
# (prompt ids (B, T), new tokens per row) -> seconds to the first new token and to the last, of one run


# ---------------------------------------------------------------------------------------------
# In-process decoding: ours, transformers', llama.cpp's
# ---------------------------------------------------------------------------------------------

def ours(model) -> Generate:
    return partial(time_our_decode, model)


class FirstTokenClock(BaseStreamer):
    """Notes when transformers' generate hands over its first new token (its first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.puts, self.first = start, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def transformers(model) -> Generate:
    """transformers' generate made to write exactly `new_tokens` tokens per row, as ours does."""
    def run_transformers(ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        start = time.perf_counter()
        clock = FirstTokenClock(start)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, streamer=clock if ids.shape[0] == 1 else None)
        whole = time.perf_counter() - start
        return (clock.first if ids.shape[0] == 1 else None), whole

    return run_transformers


def llama_cpp_runner(gguf: Path, context: int) -> Generate:
    """Greedy decoding of a GGUF file with llama-cpp-python (batch 1 only)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=torch.get_num_threads(), verbose=False)

    def run_llama(ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        llm.reset()  # else generate() reuses the cached prompt of the previous call, skipping its prefill
        start, first, produced = time.perf_counter(), None, 0
        for _ in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
            produced += 1
            first = first or time.perf_counter() - start
            if produced == new_tokens:
                break
        return first, time.perf_counter() - start

    return run_llama


def write_gguf(source: Path, outtype: str, directory: Path, converter: Path) -> Path | None:
    """The model as GGUF through the export script, or None when it cannot write GGUF."""
    target = directory / f"model-{outtype}.gguf"
    result = subprocess.run([sys.executable, str(converter), str(source), str(target), "--to", "gguf",
                             "--outtype", outtype], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(converter.resolve().parents[1])})  # its own checkout
    if result.returncode != 0:
        print(f"(no llama.cpp {outtype}: {converter.name} --to gguf failed: {result.stderr.strip().splitlines()[-1:]})",
              file=sys.stderr)
        return None
    return target


def measure(variants: dict[str, Generate], batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """{variant: {"prefill_tok_s", "decode_tok_s"}} for `batch` random prompts, best of `repeats`.
    Both rates come from the same run: prompt tokens / time to the first new token, and the other
    new tokens / the time after it. transformers' batched generate streams nothing, so its
    prefill is timed by a one-token run of its own."""
    ids = torch.randint(3, 6400, (batch, prompt_tokens), generator=torch.Generator().manual_seed(batch))
    best: dict[str, dict] = {name: {"prefill_tok_s": 0.0, "decode_tok_s": 0.0} for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up: allocator, kernels, llama.cpp's first eval
            fn(ids, 2)
        for _ in range(repeats):
            for name, fn in variants.items():
                first, whole = fn(ids, new_tokens)
                if first is None:
                    first = fn(ids, 1)[1]
                best[name]["prefill_tok_s"] = max(best[name]["prefill_tok_s"], batch * prompt_tokens / first)
                if whole > first:  # (a separately timed prefill can outlast a noisy whole run)
                    best[name]["decode_tok_s"] = max(best[name]["decode_tok_s"], batch * (new_tokens - 1) / (whole - first))
    return {name: {key: round(value, 1) for key, value in rates.items()} for name, rates in best.items()}


# ---------------------------------------------------------------------------------------------
# The HTTP server
# ---------------------------------------------------------------------------------------------

class Server:
    """scripts/serve_openai_api.py serving `weights` in a process of its own."""

    def __init__(self, weights: Path, port: int, context: int, *flags: str):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--load_from", str(weights), "--device", "cpu",
             "--dtype", "float32", "--port", str(port), "--max_batch_size", "32", "--max_queue", "64",
             "--max_model_len", str(context), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})

    def wait_ready(self, timeout: float = 300) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"the server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5).read()
                return
            except OSError:
                time.sleep(0.5)
        sys.exit(f"the server did not start in {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def streams_at_once(url: str, streams: int, prompt: str, new_tokens: int) -> dict:
    """`streams` greedy streaming requests at once: aggregate tokens/s and time to first token."""
    from openai import AsyncOpenAI

    async def one(client) -> tuple[float, int]:
        start, first = time.perf_counter(), None
        tokens = 0
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if first is None and delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first if first is not None else time.perf_counter() - start, tokens

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client) for _ in range(streams)))
        wall = time.perf_counter() - start
    ttft = sorted(first for first, _ in results)
    return {"aggregate_tok_s": round(sum(tokens for _, tokens in results) / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], 3)}


def bench_server(weights: Path, levels: list[int], prompt: str, new_tokens: int, repeats: int) -> dict:
    """fp32 and int8 servers side by side, each level measured on both in turn; best of `repeats`
    by aggregate throughput."""
    context = 4 * len(prompt) + new_tokens + 256
    servers = {"fp32": Server(weights, 18990, context), "int8": Server(weights, 18991, context, "--quantize", "int8")}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up
            asyncio.run(streams_at_once(server.url, 2, prompt, 4))
        results: dict[str, dict] = {name: {} for name in servers}
        for streams in levels:
            for _ in range(repeats):
                for name, server in servers.items():
                    measured = asyncio.run(streams_at_once(server.url, streams, prompt, new_tokens))
                    kept = results[name].get(str(streams))
                    if kept is None or measured["aggregate_tok_s"] > kept["aggregate_tok_s"]:
                        results[name][str(streams)] = measured
            print(f"server, {streams} streams: " + ", ".join(f"{name} {results[name][str(streams)]}" for name in servers),
                  file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    return results


# ---------------------------------------------------------------------------------------------

def perplexity(weights: Path, ppl_file: Path, samples: int, quantize: str) -> float:
    """eval_llm.py's perplexity of `ppl_file`, as a user would run it."""
    output = run([sys.executable, "eval_llm.py", "--load_from", str(weights), "--device", "cpu", "--dtype", "float32",
                  "--ppl_file", str(ppl_file), "--max_samples", str(samples), "--quantize", quantize])
    return last_json(output)["ppl"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", default=None,
                        help="a .pth or HF directory the loader opens (default: random weights of --preset)")
    parser.add_argument("--preset", default="minimind2-small", choices=sorted(PRESETS),
                        help="the random model's size without --load_from (default: minimind2-small)")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--batch_sizes", default="1,4,16,32")
    parser.add_argument("--stream_counts", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    add_switch(parser, "--skip_server", default=0, help="no HTTP server figures")
    parser.add_argument("--ppl_file", default=str(DEMO / "pretrain.jsonl"), help="held-out text for the int8 perplexity")
    parser.add_argument("--ppl_samples", type=int, default=100)
    parser.add_argument("--ppl_load_from", default=None,
                        help="trained weights for the perplexity (default: the benchmarked ones; random weights "
                             "say little about what int8 costs)")
    parser.add_argument("--converter", default=str(REPO / "scripts" / "convert_model.py"),
                        help="the GGUF export script (convert_model.py --to gguf); llama.cpp is skipped if it cannot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    if args.load_from is None:
        torch.manual_seed(0)
        weights, source = workdir / f"random-{args.preset}.pth", f"{args.preset}, random weights"
        save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS[args.preset])), weights)
    else:
        weights, source = Path(args.load_from), args.load_from
    model, _ = load_model_and_tokenizer(str(weights), device="cpu", dtype="float32")  # what the server loads too
    int8 = quantize_int8(copy.deepcopy(model))
    print(f"{source}; {cpu_name()}, {torch.get_num_threads()} threads", file=sys.stderr)

    variants = {"ours_fp32": ours(model), "transformers_fp32": transformers(model),
                "ours_int8": ours(int8), "transformers_int8": transformers(int8)}
    if importlib.util.find_spec("llama_cpp") is None:
        print("(no llama.cpp: llama_cpp is not importable)", file=sys.stderr)
    else:
        for outtype in ("f32", "q8_0"):
            if gguf := write_gguf(weights, outtype, workdir, Path(args.converter)):
                variants[f"llama_cpp_{outtype}"] = llama_cpp_runner(gguf, args.prompt_tokens + args.new_tokens + 8)
    batches = {}
    for batch in map(int, args.batch_sizes.split(",")):
        in_batch = {name: fn for name, fn in variants.items() if batch == 1 or not name.startswith("llama_cpp")}
        batches[str(batch)] = measure(in_batch, batch, args.prompt_tokens, args.new_tokens, args.repeats)
        print(f"batch {batch}: {batches[str(batch)]}", file=sys.stderr)

    server = None
    if not args.skip_server:
        prompt = "请介绍一下你自己。" * max(1, args.prompt_tokens // 12)
        server = bench_server(weights, list(map(int, args.stream_counts.split(","))), prompt, args.new_tokens,
                              args.repeats)
    ppl_weights = Path(args.ppl_load_from) if args.ppl_load_from else weights
    ppl = {quantize: perplexity(ppl_weights, Path(args.ppl_file), args.ppl_samples, quantize) for quantize in ("none", "int8")}

    one = batches.get("1", {})
    decode = {name: rates["decode_tok_s"] for name, rates in one.items()}
    summary = {
        "ours_vs_transformers_fp32_batch1": round(decode["ours_fp32"] / decode["transformers_fp32"], 2) if one else None,
        "ours_int8_vs_llama_cpp_q8_0_batch1": round(decode["ours_int8"] / decode["llama_cpp_q8_0"], 2)
        if "llama_cpp_q8_0" in decode else None,
        "ours_fp32_vs_llama_cpp_f32_batch1": round(decode["ours_fp32"] / decode["llama_cpp_f32"], 2)
        if "llama_cpp_f32" in decode else None,
        "server_fp32_16_vs_1_streams": round(server["fp32"]["16"]["aggregate_tok_s"] / server["fp32"]["1"]["aggregate_tok_s"], 2)
        if server and "16" in server["fp32"] and "1" in server["fp32"] else None,
        "int8_ppl_change": round(ppl["int8"] / ppl["none"] - 1, 4),
    }
    print(json.dumps({"model": source, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "batch": batches, "server": server,
                      "perplexity": {"weights": str(ppl_weights), "file": args.ppl_file, "fp32": round(ppl["none"], 3),
                                     "int8": round(ppl["int8"], 3)},
                      "summary": summary}, ensure_ascii=False))


if __name__ == "__main__":
    main()
