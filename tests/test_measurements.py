"""The measurement scripts behind the README's post-training and RL figures, shortened (--quick):
each runs the real trainers and evaluations end to end and reports what it measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), "--quick", "--device", "cpu",
                             "--out_dir", str(out)], capture_output=True, text=True, timeout=900, cwd=out.parent,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_measure_rl_runs_every_stage_and_reports_rewards(tmp_path):
    results = run_script("measure_rl.py", tmp_path / "rl")
    for stage in ("grpo", "ppo", "spo"):
        assert results[stage]["steps"] == 3 and results[stage]["weights_at_step"] == 3
        assert -1.0 <= results[stage]["reward_first_quarter"] <= 1.5
        assert (tmp_path / "rl" / f"rl_reward_{stage}.png").read_bytes()[:8] == PNG
    report = (tmp_path / "rl" / "report.md").read_text(encoding="utf-8")
    assert "| GRPO | 1 | 3 |" in report and "(rl_reward_spo.png)" in report
    assert json.loads((tmp_path / "rl" / "rl_results.json").read_text()) == results


def test_measure_post_training_reports_dpo_distillation_and_reasoning(tmp_path):
    results = run_script("measure_post_training.py", tmp_path / "post")
    assert results["eval_questions"] == 40
    assert results["dpo"]["rpo_alpha"] == 1.0 and results["dpo"]["steps"] == 6
    assert 0.0 <= results["dpo"]["accuracy_dpo"] <= 1.0
    assert results["distillation"]["held_out_nll_kd"] > 0 and results["distillation"]["held_out_nll_ce_only"] > 0
    assert 0.0 <= results["reason"]["well_formed_thinking_on"] <= 1.0
