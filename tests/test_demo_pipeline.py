"""The README's main command, shortened: tokenizer -> pretrain -> SFT -> evaluation -> chat -> report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_pipeline_runs_end_to_end_and_reports(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_pipeline.py"), "--quick", "--device", "cpu",
                             "--out_dir", str(tmp_path / "out"), "--images_dir", str(tmp_path / "images")],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["eval_samples"] == 40
    assert 0.0 <= summary["accuracy_before_sft"] <= 1.0 and 0.0 <= summary["accuracy_after_sft"] <= 1.0
    assert 6.0 < summary["unigram_entropy"] < 9.0  # of a 6400-token vocabulary: at most ln 6400 = 8.76
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "unigram entropy" in report and "after SFT" in report and "3 加 5 等于多少" in report
    for stage in ("pretrain", "sft"):  # both curves: validation every 2 steps of the quick run
        assert 0 < summary[f"{stage}_val_loss"] < 10 and 0 < summary[f"{stage}_val_bpb"] < 10
        metrics = [json.loads(line) for line in (tmp_path / "out" / f"{'full_sft' if stage == 'sft' else stage}_64"
                                                 ".metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics if "val_loss" in r] == [2, 4, 6, 8]
    assert "held-out" in report and "bits per byte" in report
    card = (tmp_path / "out" / "report_card.md").read_text(encoding="utf-8")
    assert "C-Eval" in card and "CMMLU" in card
    # the report card reuses the pipeline's two held-out exact-match evaluations instead of running them again;
    # the third scores the validation questions carved from the SFT data
    steps = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert sum("eval_llm.py" in step and "--eval_file" in step for step in steps) == 3
    assert summary["validation_accuracy"] is not None and 0.0 <= summary["validation_accuracy"] <= 1.0
    for name in ("demo_pretrain_loss.png", "demo_sft_loss.png"):
        assert (tmp_path / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "pretrain_64.pth").exists() and (tmp_path / "out" / "full_sft_64.pth").exists()


def test_sweep_chooses_on_validation_questions_and_never_scores_the_held_out_ones(tmp_path):
    out = tmp_path / "sweep"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_demo.py"), "--quick", "--device", "cpu",
                             "--recipes", "base", "one_sft_epoch", "--budget_minutes", "60", "--out_dir", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    steps = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert not any("demo/eval.jsonl" in step for step in steps)  # eval.jsonl is for the chosen recipe's demo run
    assert sum("sft_val_questions.jsonl" in step for step in steps) == 2
    accuracy = {r["recipe"]: r["validation_accuracy"] for r in report["recipes"]}
    assert set(accuracy) == {"base", "one_sft_epoch"} and report["chosen"] == max(accuracy, key=accuracy.get)
    questions = (out / "base" / "data" / "sft_val_questions.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = {json.loads(line)["conversations"][-1]["content"]
                for line in (REPO / "dataset" / "demo" / "eval.jsonl").read_text(encoding="utf-8").splitlines()}
    asked = [json.loads(line) for line in questions]
    assert len(asked) > 300 and all(q["answer"].isdigit() and len(q["conversations"]) == 1 for q in asked)
    assert not held_out & {q["conversations"][0]["content"] for q in asked}
    table = (out / "sweep.md").read_text(encoding="utf-8")
    assert table.count("| base |") + table.count("| **base** |") == 1 and "validation exact match" in table


def test_bench_train_prints_json_last(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train.py"), "--preset", "tiny", "--steps", "1",
                             "--warmup", "1", "--max_seq_len", "512", "--batch_size", "2", "--device", "cpu",
                             "--variants", "padded-fp32,packed-fp32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    padded, packed = summary["results"]
    assert padded["variant"] == "padded-fp32" and packed["variant"] == "packed-fp32"
    # Packing fills rows with real tokens: a larger share of each row carries loss (demo documents
    # are about 270 tokens, so a padded 512-token row is about half padding).
    assert packed["loss_bearing_fraction"] > padded["loss_bearing_fraction"]
    for result in summary["results"]:
        assert result["tokens_per_s"] > 0 and result["ms_per_step"] > 0 and 0 < result["mfu"] < 1
        # a step is its matmuls and more: it cannot run faster than its GEMMs alone (timing noise aside)
        assert 0 < result["fraction_of_limit"] < 1.3
        assert result["limit_tokens_per_s"] == pytest.approx(result["tokens_per_s"] / result["fraction_of_limit"], rel=0.01)
