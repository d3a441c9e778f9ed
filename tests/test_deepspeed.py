"""DeepSpeed ZeRO as users run it (`--deepspeed trainer/ds_config_zero{2,3}.json`, two CPU processes on
gloo): the same losses as DDP with the same flags, exact continuation after `kill -9`, and the
`deepspeed` launcher itself."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, assert_same_losses, free_port, losses, run_trainer, tiny_flags, torchrun,
                      wait_for_logged_steps)

pytest.importorskip("deepspeed")

STEPS = ["--max_steps", "10", "--grad_clip", "0.5"]  # a clip the early steps exceed: clipping is compared too


def zero(stage: int) -> list[str]:
    return ["--deepspeed", str(REPO / "trainer" / f"ds_config_zero{stage}.json")]


@pytest.fixture(scope="module")
def ddp_pretrain(small_data, tmp_path_factory) -> Path:
    """The DDP run every pretraining comparison is against."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun("train_pretrain.py", tiny_flags(out, small_data["pretrain"], *STEPS))
    return out


@pytest.fixture(scope="module")
def zero2_pretrain(small_data, tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-2 run: compared with DDP, and the reference of the ZeRO-2 resume."""
    out = tmp_path_factory.mktemp("zero2")
    torchrun("train_pretrain.py", tiny_flags(out, small_data["pretrain"], *STEPS, *zero(2)))
    return out


@pytest.fixture(scope="module")
def zero3_pretrain(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    torchrun("train_pretrain.py", tiny_flags(out, small_data["pretrain"], *STEPS, *zero(3)))
    return out


def metrics_of(out: Path, stem: str = "pretrain_64") -> Path:
    return out / "out" / f"{stem}.metrics.jsonl"


def test_zero2_pretraining_logs_the_ddp_losses(ddp_pretrain, zero2_pretrain):
    expected = losses(metrics_of(ddp_pretrain))
    assert sorted(expected) == list(range(1, 11))
    assert_same_losses(losses(metrics_of(zero2_pretrain)), expected, tolerance=1e-4)


def test_zero3_pretraining_logs_the_ddp_losses_and_writes_whole_weights(ddp_pretrain, zero3_pretrain):
    """ZeRO-3 holds a shard of every weight on each process; the `.pth` users get is gathered, so it
    matches DDP's weights (both saved in half precision)."""
    assert_same_losses(losses(metrics_of(zero3_pretrain)), losses(metrics_of(ddp_pretrain)), tolerance=1e-4)
    sharded = torch.load(zero3_pretrain / "out" / "pretrain_64.pth")
    replicated = torch.load(ddp_pretrain / "out" / "pretrain_64.pth")
    assert sharded.keys() == replicated.keys()
    for key, tensor in replicated.items():
        assert sharded[key].shape == tensor.shape
        torch.testing.assert_close(sharded[key].float(), tensor.float(), atol=1e-3, rtol=1e-3)
    assert (zero3_pretrain / "out" / "pretrain_64.json").exists()


@pytest.mark.parametrize("script, data, stem", [("train_full_sft.py", "sft", "full_sft_64"),
                                                ("train_dpo.py", "dpo", "dpo_64")])
def test_zero2_sft_and_dpo_log_the_ddp_losses(small_data, tmp_path, script, data, stem):
    flags = ["--from_weight", "none", *STEPS]
    torchrun(script, tiny_flags(tmp_path / "ddp", small_data[data], *flags))
    torchrun(script, tiny_flags(tmp_path / "zero2", small_data[data], *flags, *zero(2)))
    expected = losses(metrics_of(tmp_path / "ddp", stem))
    assert len(expected) == 10
    assert_same_losses(losses(metrics_of(tmp_path / "zero2", stem)), expected, tolerance=1e-4)


@pytest.mark.parametrize("script, stem, extra", [("train_grpo.py", "grpo_64", ["--num_generations", "3"]),
                                                 ("train_ppo.py", "ppo_actor_64", ["--ppo_epochs", "2"])])
def test_zero2_rl_stages_log_the_ddp_losses(small_data, tmp_path, script, stem, extra):
    """RL under ZeRO-2: each process samples its rollouts from the same weights as under DDP (PPO's
    critic and GRPO's frozen reference ride along), so the losses are DDP's."""
    flags = ["--from_weight", "none", "--max_steps", "4", "--max_gen_len", "6", "--learning_rate", "1e-3", *extra]
    torchrun(script, tiny_flags(tmp_path / "ddp", small_data["rlaif"], *flags))
    torchrun(script, tiny_flags(tmp_path / "zero2", small_data["rlaif"], *flags, *zero(2)))
    expected = losses(metrics_of(tmp_path / "ddp", stem))
    assert len(expected) == 4 and any(abs(loss) > 1e-6 for loss in expected.values())
    assert_same_losses(losses(metrics_of(tmp_path / "zero2", stem)), expected, tolerance=1e-4)


def test_rl_refuses_zero3_with_the_reason(small_data, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train_grpo.py"),
                             *tiny_flags(tmp_path, small_data["rlaif"], "--from_weight", "none", "--max_steps", "1",
                                         *zero(3))], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ZeRO-3" in result.stderr and "ds_config_zero2.json" in result.stderr


def kill_torchrun_then_resume(flags: list[str], metrics: Path, kill_after_step: int) -> dict[int, float]:
    """Start two processes with `flags` (holding `--from_resume 1`), `kill -9` the launcher and both
    workers at once once `kill_after_step` steps are logged, then run again to the end."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "trainer" / "train_pretrain.py"), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    wait_for_logged_steps(process, metrics, kill_after_step)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(losses(metrics)) < 10, "the run ended before it was killed"
    torchrun("train_pretrain.py", flags)
    return losses(metrics)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_after_kill_continues_exactly(small_data, tmp_path, request, stage):
    """Every rank's state (its ZeRO shards, its data position and RNG) comes back: each step after
    the kill logs the uninterrupted run's loss."""
    reference = request.getfixturevalue(f"zero{stage}_pretrain")
    flags = tiny_flags(tmp_path, small_data["pretrain"], *STEPS, *zero(stage), "--save_interval", "1",
                       "--from_resume", "1")
    resumed = kill_torchrun_then_resume(flags, metrics_of(tmp_path), kill_after_step=5)
    assert_same_losses(resumed, losses(metrics_of(reference)), tolerance=1e-5)
    kept = sorted(path.name for path in (tmp_path / "ckpt" / "pretrain_64_zero").glob("step*"))
    assert kept == ["step10", "step9"], "only the checkpoints a resume state points to are kept"


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_run_resumes_on_another_number_of_processes(small_data, tmp_path, stage):
    """Saved on 1 process, resumed on 2, then on 1 again: the saved step is mapped to the new count's
    steps; each run starts from exactly the fp32 weights, AdamW moments and step counts the one before
    it saved (both read whole through DeepSpeed, `zero_state_probe.py`); and, checked from the saved
    data positions, no document of the epoch is trained by two of the runs."""
    from dataset.lm_dataset import PackedBatches

    probe = str(REPO / "tests" / "zero_state_probe.py")  # an absolute path: run_trainer and torchrun take it as is
    flags = tiny_flags(tmp_path, small_data["pretrain"], *zero(stage), "--save_interval", "1", "--from_resume", "1")
    checkpoints = tmp_path / "ckpt"

    def data_states(world_size: int) -> list[dict]:
        names = ["pretrain_64_resume.pth", *(f"pretrain_64_resume_rank{rank}.pth" for rank in range(1, world_size))]
        return [torch.load(checkpoints / name, weights_only=False)["objects"]["data"] for name in names]

    run_trainer(probe, [str(tmp_path / "one"), "train_pretrain.py", *flags, "--max_steps", "4"])
    on_one = data_states(1)
    on_two = torchrun(probe, [str(tmp_path / "two"), "train_pretrain.py", *flags, "--max_steps", "4"])
    assert "its step 4 is step 2 here" in on_two.stdout
    on_two_data = data_states(2)
    again_on_one = run_trainer(probe, [str(tmp_path / "again"), "train_pretrain.py", *flags, "--max_steps", "10"])
    assert "its step 4 is step 8 here" in again_on_one.stdout
    assert not (checkpoints / "pretrain_64_zero" / "universal").exists(), "the conversion is removed once loaded"

    # AdamW counts the updates its moments have seen, 4 on one process and 2 more on two, not the mapped step
    for saved, loaded, adam_steps in [("one", "two", [4.0]), ("two", "again", [6.0])]:
        before = torch.load(tmp_path / saved / "finished.pth")
        after = torch.load(tmp_path / loaded / "loaded.pth")
        assert after["adam_steps"] == before["adam_steps"] == adam_steps
        assert after["weight_decay"] == before["weight_decay"] == [0.01, 0.0]
        assert after["params"].keys() == before["params"].keys()
        for name, states in before["params"].items():
            assert states["exp_avg"].abs().sum() > 0
            for key, tensor in states.items():
                assert torch.equal(after["params"][name][key], tensor), f"{saved} -> {loaded}: {name} {key}"

    reader = PackedBatches(list(range(300)), 4, 64, seed=42)
    segments = [set().union(*(reader.trained_items(state) for state in states))
                for states in (on_one, on_two_data, data_states(1))]
    assert all(segments)
    assert not (segments[0] & segments[1] or segments[0] & segments[2] or segments[1] & segments[2])


def test_the_deepspeed_launcher_starts_two_cpu_processes(small_data, tmp_path):
    """`deepspeed --num_gpus 2 trainer/train_pretrain.py --deepspeed ...` as the README says: the
    launcher appends `--local_rank`, which the trainers accept."""
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "trainer" / "train_pretrain.py"),
               *tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "2", *zero(2))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd="/",
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--local_rank=1" in result.stdout + result.stderr
    assert sorted(losses(metrics_of(tmp_path))) == [1, 2]
    for rank_file in ("pretrain_64_resume.pth", "pretrain_64_resume_rank1.pth"):
        state = torch.load(tmp_path / "ckpt" / rank_file, weights_only=False)
        assert state["world_size"] == 2 and state["zero_checkpoint"] == 2
