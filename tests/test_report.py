"""scripts/report.py: the statistics against closed forms worked out here, and a whole report card
written for a run's out/ folder."""
import json
import math

import pytest
import torch

from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts import report
from scripts.common import binomial_interval, mcnemar_exact, paired_change, training_flops_per_token


def binomial_tail_at_least(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def bisect(f, low: float = 0.0, high: float = 1.0) -> float:
    """The root of an increasing f on [low, high]."""
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if f(middle) < 0 else (low, middle)
    return (low + high) / 2


@pytest.mark.parametrize("correct, n", [(0, 10), (10, 10), (7, 20), (61, 180)])
def test_binomial_interval_is_clopper_pearson(correct, n):
    """The exact interval's ends: the p at which seeing >= correct (resp. <= correct) has probability 2.5%."""
    low, high = binomial_interval(correct, n)
    expected_low = 0.0 if correct == 0 else bisect(lambda p: binomial_tail_at_least(correct, n, p) - 0.025)
    expected_high = 1.0 if correct == n else bisect(lambda p: 0.025 - (1 - binomial_tail_at_least(correct + 1, n, p)))
    assert low == pytest.approx(expected_low, abs=1e-7) and high == pytest.approx(expected_high, abs=1e-7)


def clopper_pearson(correct: int, n: int) -> tuple[float, float]:
    low = 0.0 if correct == 0 else bisect(lambda p: binomial_tail_at_least(correct, n, p) - 0.025)
    high = 1.0 if correct == n else bisect(lambda p: 0.025 - (1 - binomial_tail_at_least(correct + 1, n, p)))
    return low, high


@pytest.mark.parametrize("correct, n, verdict", [
    (58, 180, "above chance"),  # 32.2%: the interval starts at 25.5%
    (55, 180, "within noise of chance"),  # 30.6%: starts at 23.9%
    (45, 180, "within noise of chance"),
    (30, 180, "below chance"),
    (3, 4, "within noise of chance"),  # 75% of four questions says nothing
])
def test_the_chance_verdict_is_the_binomial_interval_against_25_percent(correct, n, verdict):
    low, high = clopper_pearson(correct, n)
    assert (low > 0.25, high < 0.25) == (verdict == "above chance", verdict == "below chance")  # the cases are right
    assert report.chance_verdict(correct, n) == verdict
    beats = "beats chance beyond noise" if verdict == "above chance" else "does not beat chance beyond noise"
    assert report.chance_statement("SFT", "ceval", correct, n) == (
        f"- SFT {beats} on the demo C-Eval: {correct} of {n} questions right ({correct / n:.1%}, 95% interval "
        f"{low:.1%}–{high:.1%}, chance 25%): {verdict}.")


def test_mcnemar_exact_p_value():
    # 9 questions gained, 1 lost, 10 unchanged: p = 2 * P(X <= 1 | Bin(10, 1/2)) = 2 * 11 / 1024
    before = [False] * 9 + [True] + [True] * 5 + [False] * 5
    after = [True] * 9 + [False] + [True] * 5 + [False] * 5
    result = mcnemar_exact(before, after)
    assert (result["gained"], result["lost"], result["n"]) == (9, 1, 20)
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


def test_paired_change_compares_the_questions_both_evaluations_answered():
    """Predictions are matched by question, not by position; a question only one side has is left out."""
    def evaluation(*answers):
        return {"predictions": [{"question": q, "correct": c} for q, c in answers]}

    before = evaluation(("1+1", False), ("2+2", True), ("3+3", False), ("only before", True))
    after = evaluation(("3+3", True), ("2+2", False), ("1+1", True), ("only after", False))
    assert paired_change(before, after) == {"n": 3, "gained": 2, "lost": 1, "p_value": 1.0}
    assert paired_change(before, evaluation(("another", True))) is None


def write_stage(out, name: str, seed: int) -> None:
    """What a trainer leaves: weights with a sidecar (config, train_args) and its metrics jsonl."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    save_weights(model, out / f"{name}_64.pth", extra={"train_args": {"command": "test", "flags": {"max_seq_len": 64}}})
    records = [{"step": step, "epoch": 0, "loss": 9.0 - step, "lr": 1e-3, "tokens": 1000 * step,
                "tokens_per_s": 500.0, "elapsed_s": 2.0 * step} for step in (1, 2, 3)]
    (out / f"{name}_64.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_card_for_a_run(tmp_path):
    write_stage(tmp_path, "pretrain", 0)
    write_stage(tmp_path, "full_sft", 1)
    path = report.write_report(tmp_path, device="cpu", limit=10)  # 10 questions a file, 30 a benchmark
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.md"
    for section in ("## Environment", "## Code", "## Tokenizer", "## Training", "## Evaluation", "## Before and after"):
        assert section in text
    assert f"| torch | {torch.__version__} |" in text
    parameters = sum(p.numel() for p in MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])).parameters())
    assert f"| PRETRAIN | `pretrain_64.pth` | {parameters:,} | 3,000 | 6 s | 6.000 | 500 |" in text
    assert "| | PRETRAIN | SFT |" in text
    assert text.count("n=30,") == 4  # demo C-Eval and CMMLU, each stage
    assert "| ceval | PRETRAIN | SFT | 30 |" in text and "| exact_match | PRETRAIN | SFT | 10 |" in text
    for stage, weights in (("PRETRAIN", "pretrain"), ("SFT", "full_sft")):  # the pretrained and SFT model, in words
        for name, title in (("ceval", "C-Eval"), ("cmmlu", "CMMLU")):
            result = json.loads((tmp_path / f"{weights}_64.{name}.first10.json").read_text(encoding="utf-8"))
            assert result["n"] == 30 and len(result["predictions"]) == 30
            beats = clopper_pearson(result["correct"], 30)[0] > 0.25
            assert f"- {stage} {'beats' if beats else 'does not beat'} chance beyond noise on the demo {title}: " \
                   f"{result['correct']} of 30 questions right" in text
    saved = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*_64.*.json")}
    assert len(saved) == 8  # four evaluations per stage, with every prediction
    report.write_report(tmp_path, tmp_path / "again.md", device="cpu", limit=10)  # reuses them: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*_64.*.json")} == saved
    assert training_flops_per_token(parameters, 2, 64, 64) == 6 * parameters + 12 * 2 * 64 * 64
