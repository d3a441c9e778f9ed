"""Shared by the trainer tests: small data, tiny-preset flags, running a trainer as users do
(subprocess, `torchrun`, `kill -9` then `--from_resume 1`), and reading its metrics."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from scripts.common import ForkedStep

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataset" / "demo"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most 4. The tests are small models and
    process start-ups, which a core runs as fast alone as with a second thread."""
    return max(1, min(CORES, 4))


# The files that take minutes (trainers under torchrun, the quick pipeline and measurements) start
# first, so that the workers finish together instead of one running them alone at the end.
LONGEST_FIRST = ("test_demo_pipeline.py", "test_measurements.py", "test_train.py", "test_deepspeed.py", "test_rl.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each worker gets its share of the cores, and so do the trainers and servers it starts: more
    # threads than cores makes OpenMP's threads wait on each other and runs everything slower.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """The first 300 lines of each demo file, by name ("pretrain", "sft", "dpo", ...): enough for a
    few dozen tiny steps."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for source in sorted(DEMO.glob("*.jsonl")):
        path = root / source.name
        with open(source, encoding="utf-8") as src:
            path.write_text("".join(line for _, line in zip(range(300), src)), encoding="utf-8")
        files[source.stem] = path
    return files


def tiny_flags(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data_path", str(data), "--max_seq_len", "64", "--batch_size", "4",
            "--accumulation_steps", "2", "--device", "cpu", "--dtype", "float32", "--log_interval", "1",
            "--save_dir", str(out / "out"), "--checkpoint_dir", str(out / "ckpt"), *extra]


def trainer_command(script: str, flags: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "trainer" / script), *flags]


def run_trainer(script: str, flags: list[str], cwd: str | Path = "/") -> subprocess.CompletedProcess:
    """`python trainer/<script> flags` from `cwd` (any directory, as users run it), in a fork of the
    preloaded interpreter (scripts/common.py: the same program, without 5-10 s of imports)."""
    step = ForkedStep(str(REPO / "trainer" / script), flags, cwd=cwd, separate_stderr=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(step.stderr))
    reader.start()
    output = step.stdout.read()
    reader.join()
    result = subprocess.CompletedProcess(trainer_command(script, flags), step.wait(), output, "".join(errors))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(metrics: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "metrics must hold each step once, in order"
    return {r["step"]: r["loss"] for r in records}


def wait_for_logged_steps(process: subprocess.Popen | ForkedStep, metrics: Path, steps: int, timeout_s: float = 300) -> None:
    """Until the metrics file holds `steps` lines, the process has ended, or `timeout_s` passed."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.02)


def kill_then_resume(script: str, flags: list[str], metrics: Path, kill_after_steps: list[int]) -> dict[int, float]:
    """Start the trainer with `flags` (which should hold `--from_resume 1`), `kill -9` it once the
    metrics file has each of `kill_after_steps` lines (a restart in between), then let it finish.
    Returns the per-step losses of the whole, interrupted run."""
    for kill_after_step in kill_after_steps:
        process = ForkedStep(str(REPO / "trainer" / script), flags, cwd="/", output=False)
        wait_for_logged_steps(process, metrics, kill_after_step)
        process.kill()  # SIGKILL
        process.wait()
    run_trainer(script, flags)
    return losses(metrics)


def free_port() -> int:
    """A TCP port nothing listens on, so that test runs side by side don't meet on one rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(script: str, flags: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(REPO / "trainer" / script), *flags],
                            capture_output=True, text=True, timeout=600, env=env, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_ranks_in_sync(checkpoint_dir: Path, stem: str) -> None:
    """After a two-process run: both ranks' resume states hold the same weights, and each rank read
    its own share of the data."""
    rank0 = torch.load(checkpoint_dir / f"{stem}_resume.pth", weights_only=False)
    rank1 = torch.load(checkpoint_dir / f"{stem}_resume_rank1.pth", weights_only=False)
    assert rank0["world_size"] == 2
    for key, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][key]), f"{stem}: {key} differs between ranks"
    assert rank0["objects"]["data"] != rank1["objects"]["data"]


def read_metrics(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line]


def assert_same_losses(resumed: dict[int, float], expected: dict[int, float], tolerance: float = 1e-5) -> None:
    """Every step of the interrupted run logged the uninterrupted run's loss (CONVENTIONS §4)."""
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= tolerance, f"step {step}: {resumed[step]} vs {loss}"


def run_in_process(script: str, flags: list[str]) -> None:
    """The trainer's `main()` in this process, on one thread like the subprocesses of tests that set
    OMP_NUM_THREADS=1, so its losses match theirs exactly: an uninterrupted reference run without the
    seconds of a fresh interpreter."""
    import runpy
    from unittest import mock

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.object(sys, "argv", [script, *flags]):
            runpy.run_path(str(REPO / "trainer" / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def save_tiny_qwen2(directory: Path) -> Path:
    """A non-MiniMind transformers chat model for the loader's "any causal LM" path: a random tiny
    Qwen2 saved together with the bundled tokenizer (and its chat template) in `directory`."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(REPO / "model").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("qwen2"))


def left_padded_rollout(prompts: list[list[int]], responses: list[list[int]]):
    """A `trainer.rl.Rollout` as `rl.sample` returns it: left-padded prompts (pad id 0), then each
    response, padding after its end; finished where the response ends in <|im_end|> (id 2)."""
    from trainer.rl import Rollout

    prompt_length, response_length = max(map(len, prompts)), max(map(len, responses))
    input_ids = torch.full((len(prompts), prompt_length + response_length), 0)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, prompt_length - len(prompt):prompt_length] = torch.tensor(prompt)
        input_ids[row, prompt_length:prompt_length + len(response)] = torch.tensor(response)
        attention_mask[row, prompt_length - len(prompt):prompt_length + len(response)] = 1
    return Rollout(input_ids, attention_mask, attention_mask[:, prompt_length:].float(),
                      torch.tensor([r[-1] == 2 for r in responses]), [""] * len(prompts), [""] * len(prompts),
                      [""] * len(prompts))
