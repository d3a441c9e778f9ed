"""The README's main command, shortened: tokenizer -> pretrain -> SFT -> evaluation -> chat -> report."""

import json
import subprocess
import sys
from pathlib import Path

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
    # the report card reuses the pipeline's two exact-match evaluations instead of running them again
    steps = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert sum("eval_llm.py" in step and "--eval_file" in step for step in steps) == 2
    for name in ("demo_pretrain_loss.png", "demo_sft_loss.png"):
        assert (tmp_path / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "pretrain_64.pth").exists() and (tmp_path / "out" / "full_sft_64.pth").exists()


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
