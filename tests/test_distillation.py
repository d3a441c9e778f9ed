"""Distillation: the KL term vanishes for student = teacher, alpha mixes CE and KL, an MoE teacher teaches a
dense student, torchrun, exact resume. (KD beating CE on held-out loss needs a trained teacher: measured by
scripts/measure_post_training.py, not here.)"""

import copy
import subprocess

import pytest
import torch

from conftest import (assert_ranks_in_sync, assert_same_losses, kill_then_resume, read_metrics, run_in_process,
                      tiny_flags, torchrun, trainer_command)
from dataset.lm_dataset import SFTDataset, pad_rows
from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from trainer import engine
from trainer.train_distillation import distillation_step


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_model(seed: int, preset: str = "tiny") -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset]))


@pytest.fixture(scope="module")
def sft_batch(small_data) -> dict:
    dataset = SFTDataset(small_data["sft"], load_tokenizer("model"), max_length=64)
    return pad_rows([dataset[i] for i in range(6)], 64, dataset.pad_token_id)


def test_kl_is_zero_when_the_student_is_the_teacher_and_alpha_mixes_ce_with_kl(sft_batch):
    student = tiny_model(0)
    same = distillation_step(student, sft_batch, copy.deepcopy(student).eval(), temperature=2.0, alpha=0.3)
    assert same.metrics["kl"] == 0.0
    assert same.loss_sum.item() == pytest.approx(0.3 * same.metrics["ce"] * same.count, rel=1e-6)

    teacher = tiny_model(1, "tiny-moe").eval()
    mixed = distillation_step(student, sft_batch, teacher, temperature=2.0, alpha=0.3)
    assert mixed.metrics["kl"] > 0.01
    # The KL term by its definition: T^2 * sum_tokens sum_v p_teacher (log p_teacher - log p_student), at T = 2.
    targets = sft_batch["labels"][:, 1:]
    learned = targets != -100
    with torch.no_grad():
        log_p_student, log_p_teacher = (
            (model(sft_batch["input_ids"], sft_batch["attention_mask"]).logits[:, :-1][learned] / 2).log_softmax(-1)
            for model in (student, teacher))
    kl = 4 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum() / learned.sum()
    assert mixed.metrics["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert mixed.loss_sum.item() / mixed.count == pytest.approx(0.3 * mixed.metrics["ce"] + 0.7 * kl.item(), rel=1e-4)
    # alpha = 1 is SFT: the same loss as engine.causal_lm_loss.
    sft = engine.causal_lm_loss(student, sft_batch)
    ce_only = distillation_step(student, sft_batch, teacher, temperature=2.0, alpha=1.0)
    assert ce_only.count == sft.count and ce_only.loss_sum.item() == pytest.approx(sft.loss_sum.item(), rel=1e-6)


def save_teacher(model: MiniMindForCausalLM, path) -> str:
    save_weights(model, path)
    return str(path)


def test_moe_teacher_dense_student_resumes_exactly_after_kill(small_data, tmp_path):
    teacher = save_teacher(tiny_model(1, "tiny-moe"), tmp_path / "teacher.pth")
    flags = ["--from_weight", "none", "--teacher_weight", teacher, "--alpha", "0.5", "--temperature", "2",
             "--learning_rate", "1e-3", "--max_steps", "8"]
    run_in_process("train_distillation.py", tiny_flags(tmp_path / "reference", small_data["sft"], *flags))
    records = read_metrics(tmp_path / "reference" / "out" / "full_dist_64.metrics.jsonl")
    expected = {r["step"]: r["loss"] for r in records}
    assert len(expected) == 8 and all(r["kl"] > 0 for r in records)
    killed = tmp_path / "killed"
    resumed = kill_then_resume("train_distillation.py",
                               tiny_flags(killed, small_data["sft"], *flags, "--save_interval", "1", "--from_resume", "1"),
                               killed / "out" / "full_dist_64.metrics.jsonl", [4])
    assert_same_losses(resumed, expected)


def test_torchrun_two_processes_student_equal_to_teacher(small_data, tmp_path):
    """Student and teacher start from the same file, so the first step's KL is 0 on both processes."""
    teacher = save_teacher(tiny_model(0), tmp_path / "teacher.pth")
    torchrun("train_distillation.py", tiny_flags(tmp_path, small_data["sft"], "--from_weight", teacher,
                                                 "--teacher_weight", teacher, "--max_steps", "3"))
    assert_ranks_in_sync(tmp_path / "ckpt", "full_dist_64")
    records = read_metrics(tmp_path / "out" / "full_dist_64.metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0


def test_a_missing_teacher_is_reported_by_its_own_flag(small_data, tmp_path):
    missing = tmp_path / "no_teacher.pth"
    result = subprocess.run(trainer_command("train_distillation.py", tiny_flags(
        tmp_path, small_data["sft"], "--from_weight", "none", "--teacher_weight", str(missing), "--max_steps", "1")),
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"--teacher_weight {missing}" in result.stderr and "Traceback" not in result.stderr
