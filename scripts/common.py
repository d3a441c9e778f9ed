"""What the pipeline, measurement and benchmark scripts share: running each step as the command a
user would type, reading back what it printed and logged, and naming the machine the figures come
from. A library, not an entry script: scripts import it, never each other.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import runpy
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from model.generate import Decoder, Sequence

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataset" / "demo"


# A step of ours (`python <script>.py ...`) starts in a fork of one server process that has already
# imported torch, transformers and the project, instead of a fresh interpreter: importing them takes
# 5-10 s of a 2-core machine, longer than most demo steps themselves. The server itself never
# computes (a fork of a process whose OpenMP threads have run hangs), nor touches CUDA.
_PRELOAD = ["torch", "transformers", "model.loader", "model.generate", "dataset.lm_dataset", "trainer.engine"]


def _run_script(script: str, argv: list[str], cwd: str, stdout: socket.socket | None,
                stderr: socket.socket | None) -> None:
    """In the forked child: be `python script argv` run from `cwd`, its stdout and stderr going to
    the given sockets (None: to /dev/null)."""
    for fd, target in ((1, stdout), (2, stderr)):
        if target is None:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), fd)
        else:
            os.dup2(target.fileno(), fd)
    sys.stdout.reconfigure(line_buffering=True)
    os.chdir(cwd)
    sys.argv, sys.path[0] = [script, *argv], str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")


class ForkedStep:
    """What `run` needs of a `subprocess.Popen`: the output lines (`stdout`; stderr joins them unless
    `separate_stderr`, then `stderr`), `wait`, `kill`, `returncode`. `output=False` discards both."""

    def __init__(self, script: str, argv: list[str], cwd: str | Path = REPO, output: bool = True,
                 separate_stderr: bool = False):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        pairs = [socket.socketpair() for _ in range(2 if separate_stderr else 1 if output else 0)]
        child_ends = [theirs for _, theirs in pairs] or [None]
        self.process = context.Process(target=_run_script, args=(script, argv, str(cwd), child_ends[0], child_ends[-1]))
        # multiprocessing would re-run this program's own script in the child first, to recreate its
        # `__main__`; the step needs none of it
        main = sys.modules["__main__"]
        main_file = main.__dict__.pop("__file__", None)
        try:
            self.process.start()
        finally:
            if main_file is not None:
                main.__file__ = main_file
        streams = []
        for ours, theirs in pairs:
            theirs.close()
            streams.append(ours.makefile("r", encoding="utf-8", errors="replace"))
            ours.close()
        self.stdout, self.stderr = (streams + [None, None])[:2]

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()


def start(command: list[str]) -> ForkedStep | subprocess.Popen:
    """`command` running with its output (stdout and stderr) readable line by line: forked from the
    preloaded server when it is one of our Python scripts and forking is safe here (Linux, this
    process has not initialised CUDA), else as a plain subprocess."""
    script = command[1] if len(command) > 1 and command[0] == sys.executable else ""
    if script.endswith(".py") and sys.platform == "linux" and not torch.cuda.is_initialized():
        return ForkedStep(script, command[2:])
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output_dir(path: str | Path) -> Path:
    """A measurement's folder, made if needed, as an absolute path (its steps run from the repo root)."""
    out = Path(path).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(command: list[str], timeout_s: float | None = None, stop_at_timeout: bool = False) -> str:
    """Run a step from the repo root, echoing its command; its output streams to the terminal and is
    returned. Past `timeout_s` the step fails, or with `stop_at_timeout` is stopped and its output
    so far returned."""
    print(f"\n$ {' '.join(shlex.quote(c) for c in command)}", flush=True)
    process = start(command)
    lines = []
    deadline = time.time() + timeout_s if timeout_s is not None else None
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
        if deadline is not None and time.time() > deadline:
            process.kill()
            process.wait()
            if not stop_at_timeout:
                sys.exit(f"step ran past {timeout_s:.0f}s: {' '.join(command)}")
            print(f"\n(stopped after {timeout_s:.0f}s; using what it saved)", flush=True)
            return "".join(lines)
    if process.wait() != 0:
        sys.exit(f"step failed (exit {process.returncode}): {' '.join(command)}")
    return "".join(lines)


def evaluation_path(weights: Path, name: str, limit: int = 0) -> Path:
    """Where an evaluation of `weights` (`exact_match`, `ceval`, ...) saves its results, on the first
    `limit` questions (0 = all): beside the weights, so that the report card reuses it."""
    return weights.with_name(f"{weights.stem}.{name}{f'.first{limit}' if limit else ''}.json")


def last_json(output: str) -> dict:
    """The JSON object a script prints as its last line (eval_llm.py, the bench_* scripts)."""
    return json.loads(output.strip().splitlines()[-1])


def read_metrics(path: Path) -> list[dict]:
    """A trainer's `<stem>.metrics.jsonl`: one record per logged step."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def best_matmul_seconds(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    """The fastest of `calls` timed `a @ b` (the first warms the kernel and allocator up)."""
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def time_our_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Our decode loop (model/generate.py, what eval_llm and the server run) on a batch of equal-length
    prompts, `new_tokens` each: seconds to the first new token (prefill included) and to the last. The
    "ours" of bench_generate and bench_gguf."""
    start = time.perf_counter()
    decoder = Decoder(model, slots=ids.shape[0], capacity=ids.shape[1] + new_tokens)
    decoder.add([Sequence(row.tolist(), new_tokens) for row in ids])
    first = time.perf_counter() - start
    while decoder.running:
        decoder.step()
    return first, time.perf_counter() - start


def peak_matmul_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Best FLOP/s of a large square matmul: the roof MFU is measured against."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    return 2 * 2048 ** 3 / best_matmul_seconds(a, b, 6)


def model_gemm_peak_flops(model: torch.nn.Module, rows: int, dtype: torch.dtype, device: torch.device,
                          repeats: int = 3) -> float:
    """FLOP/s of this model's own matrix multiplications at `rows` tokens, in `dtype`: the roof a training
    step can reach on this machine. A square 2048 matmul flatters a small model, whose GEMMs are thin
    (hidden 128 against 6400 vocabulary rows) and run well below the machine's best shape.

    Each distinct `nn.Linear` shape is timed as training runs it: the forward (rows x in) @ (in x out),
    the input gradient (rows x out) @ (out x in) and the weight gradient (out x rows) @ (rows x in), best
    of `repeats`. The peak is the sum of the FLOPs of every layer's three GEMMs over the sum of their
    times, so a shape that occurs in every layer weighs as often as it occurs."""
    shapes = Counter((module.in_features, module.out_features) for module in model.modules()
                     if isinstance(module, torch.nn.Linear))

    def best_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        return best_matmul_seconds(a, b, repeats + 1)

    flops = seconds = 0.0
    for (fan_in, fan_out), count in shapes.items():
        x = torch.randn(rows, fan_in, device=device, dtype=dtype)
        weight = torch.randn(fan_in, fan_out, device=device, dtype=dtype)
        grad = torch.randn(rows, fan_out, device=device, dtype=dtype)
        step = best_seconds(x, weight) + best_seconds(grad, weight.T) + best_seconds(grad.T, x)
        flops += count * 3 * 2 * rows * fan_in * fan_out
        seconds += count * step
    return flops / seconds


def training_flops_per_token(parameters: int, num_hidden_layers: int, hidden_size: int, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 per weight, plus attention's scores and mixing
    (12 * layers * hidden * sequence length), as the PaLM paper counts them for MFU."""
    return 6 * parameters + 12 * num_hidden_layers * hidden_size * seq_len


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return platform.processor() or "unknown"


def accelerator_name(device: str) -> str | None:
    """The GPU that `--device` resolves to, if any: results name it beside the host CPU."""
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device("cuda" if device == "auto" else device))
    if device in ("auto", "mps") and torch.backends.mps.is_available():
        return "Apple MPS"
    return None


def new_figure():
    """A matplotlib figure and axes of the size every plot of ours has, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=120)


def save_figure(fig, ax, path: Path, title: str, legend_size: int | None = None) -> None:
    """Title, grid and legend, then the PNG at `path` (its folder made if needed)."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Statistics of exact-match results
# ---------------------------------------------------------------------------------------------

def binomial_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval for an accuracy of `correct` out of `n`."""
    from scipy.stats import binomtest  # 1.4 s of imports: only for the scripts that report statistics

    interval = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="exact")
    return interval.low, interval.high


def mcnemar_exact(before: list[bool], after: list[bool]) -> dict:
    """McNemar's exact test on paired answers to the same questions: only the questions whose
    correctness changed count, and under "no difference" each change is a fair coin's toss."""
    from scipy.stats import binomtest

    gained = sum(not b and a for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    p_value = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"n": len(before), "gained": gained, "lost": lost, "p_value": p_value}


def correctness(result: dict) -> dict[str, bool]:
    """Question -> answered correctly, from an evaluation's saved predictions (`--eval_out`)."""
    return {str(p.get("source") or p.get("question")): bool(p["correct"]) for p in result.get("predictions", [])}


def paired_change(before: dict, after: dict) -> dict | None:
    """McNemar's test between two evaluations' saved predictions, on the questions both answered;
    None when they share none."""
    first, second = correctness(before), correctness(after)
    shared = sorted(set(first) & set(second))
    return mcnemar_exact([first[q] for q in shared], [second[q] for q in shared]) if shared else None


def constant_answer_baseline(predictions: list[dict]) -> dict:
    """What a model scores that gives every question the same reply, the most common reference answer:
    the level below which an accuracy says nothing about reading the question."""
    answer, count = Counter(str(p["answer"]) for p in predictions).most_common(1)[0]
    return {"answer": answer, "accuracy": count / len(predictions)}
