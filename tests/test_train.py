"""Trainers as users run them: subprocesses, `kill -9` and resume, `torchrun` with two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataset" / "demo"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """The first lines of the demo files: enough for a few dozen tiny steps."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for name, lines in (("pretrain", 300), ("sft", 300)):
        path = root / f"{name}.jsonl"
        with open(DEMO / f"{name}.jsonl", encoding="utf-8") as src:
            path.write_text("".join(next(src) for _ in range(lines)), encoding="utf-8")
        files[name] = path
    return files


def tiny_flags(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--data_path", str(data), "--max_seq_len", "64", "--batch_size", "4",
            "--accumulation_steps", "2", "--device", "cpu", "--dtype", "float32", "--log_interval", "1",
            "--save_dir", str(out / "out"), "--checkpoint_dir", str(out / "ckpt"), *extra]


def run_trainer(script: str, flags: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "trainer" / script), *flags], capture_output=True, text=True,
                            timeout=600, cwd=kwargs.get("cwd", "/"))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(metrics: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "metrics must hold each step once, in order"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_then_resume_continues_exactly(small_data, tmp_path):
    """Kill -9 at several moments (saves happen every step, so some kills land mid-save); each
    `--from_resume 1` continues, and every step's loss equals the uninterrupted run's."""
    reference = tmp_path / "reference"
    run_trainer("train_pretrain.py", tiny_flags(reference, small_data["pretrain"], "--epochs", "2"))
    expected = losses(reference / "out" / "pretrain_64.metrics.jsonl")
    assert len(expected) >= 12

    killed = tmp_path / "killed"
    flags = tiny_flags(killed, small_data["pretrain"], "--epochs", "2", "--save_interval", "1", "--from_resume", "1")
    metrics = killed / "out" / "pretrain_64.metrics.jsonl"
    for kill_after_step in (3, 7, len(expected) // 2 + 3):
        process = subprocess.Popen([sys.executable, str(REPO / "trainer" / "train_pretrain.py"), *flags],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= kill_after_step:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    run_trainer("train_pretrain.py", flags)
    resumed = losses(metrics)
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= 1e-5, f"step {step}: {resumed[step]} vs {loss}"


def test_half_written_checkpoint_is_never_loaded(small_data, tmp_path):
    flags = tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "3", "--from_resume", "1")
    run_trainer("train_pretrain.py", flags)
    checkpoint = tmp_path / "ckpt" / "pretrain_64_resume.pth"
    good = checkpoint.read_bytes()
    # What a kill during a save leaves behind: a partial temporary file next to the last good checkpoint.
    (tmp_path / "ckpt" / f".{checkpoint.name}.tmp12345").write_bytes(good[: len(good) // 2])
    result = run_trainer("train_pretrain.py", flags[:-4] + ["--max_steps", "5", "--from_resume", "1"])
    assert "resumed from" in result.stdout + result.stderr
    assert max(losses(tmp_path / "out" / "pretrain_64.metrics.jsonl")) == 5


def test_resume_without_checkpoint_starts_fresh_and_says_so(small_data, tmp_path):
    result = run_trainer("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "2",
                                                         "--from_resume", "1"))
    assert "starting fresh" in result.stdout + result.stderr


def test_demo_data_fallback_is_announced_on_the_first_line(tmp_path):
    flags = tiny_flags(tmp_path, Path("unused"), "--max_steps", "1")
    flags = flags[:2] + flags[4:]  # no --data_path
    result = run_trainer("train_pretrain.py", flags)
    assert result.stdout.splitlines()[0].startswith("[demo data]")


def test_pretrain_then_sft_outputs_and_metrics(small_data, tmp_path):
    run_trainer("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "4"))
    out = tmp_path / "out"
    assert (out / "pretrain_64.pth").exists() and (out / "pretrain_64.json").exists()
    run_trainer("train_full_sft.py", tiny_flags(tmp_path, small_data["sft"], "--max_steps", "3"))
    records = [json.loads(line) for line in (out / "full_sft_64.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in records[-1]
    assert records[-1]["tokens"] > records[0]["tokens"] > 0
    # --max_steps caps the run, not the schedule: LR has not decayed to its 10% floor.
    assert records[-1]["lr"] > 0.5 * 1e-6


def torchrun(script: str, flags: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", str(REPO / "trainer" / script), *flags],
                            capture_output=True, text=True, timeout=600, env=env, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_torchrun_two_processes_pretrain_and_sft_stay_in_sync(small_data, tmp_path):
    torchrun("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "4"))
    torchrun("train_full_sft.py", tiny_flags(tmp_path, small_data["sft"], "--max_steps", "3"))
    for stem in ("pretrain_64", "full_sft_64"):
        rank0 = torch.load(tmp_path / "ckpt" / f"{stem}_resume.pth", weights_only=False)
        rank1 = torch.load(tmp_path / "ckpt" / f"{stem}_resume_rank1.pth", weights_only=False)
        assert rank0["world_size"] == 2
        for key, tensor in rank0["model"].items():
            assert torch.equal(tensor, rank1["model"][key]), f"{stem}: {key} differs between ranks"
        assert rank0["objects"]["data"] != rank1["objects"]["data"]  # each rank read its own share
