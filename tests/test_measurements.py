"""The measurement scripts behind the README's post-training, RL and history figures, shortened (--quick):
each runs the real trainers and evaluations end to end and reports what it measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dataset.lm_dataset import DPODataset
from model.loader import load_pth, load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts.measure_post_training import preference_accuracy, write_held_out_pairs

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
    # every before/after pair is compared question by question (McNemar), on all 40 questions
    for change in (results["dpo"]["vs_sft"], results["reason"]["thinking_on_vs_dpo"], results["reason"]["thinking_on_vs_sft"]):
        assert change["n"] == 40 and 0.0 < change["p_value"] <= 1.0 and change["gained"] + change["lost"] <= 40


def test_measure_history_trains_both_ways_and_answers_with_every_history_mode(tmp_path):
    results = run_script("measure_history.py", tmp_path / "history")
    assert set(results["sft"]) == {"full", "query_utterance"}
    assert all(run["steps"] == 6 and run["tokens"] > 0 for run in results["sft"].values())
    for training in ("full", "query_utterance"):
        cells = results["cells"][training]
        assert set(cells) == {"full", "query_utterance", "none"}
        for inference, evaluations in cells.items():
            for name in ("multi-turn recall", "single-turn"):
                figures = evaluations[name]
                assert figures["n"] == 20 and figures["interval_95"][0] <= figures["accuracy"] <= figures["interval_95"][1]
                assert ("vs_baseline" in figures) == ((training, inference) != ("full", "full"))
        recall = {inference: cells[inference]["multi-turn recall"]["mean_prompt_tokens"] for inference in cells}
        assert recall["none"] < recall["query_utterance"] < recall["full"]  # the history each mode sends
        single = {cells[inference]["single-turn"]["mean_prompt_tokens"] for inference in cells}
        assert len(single) == 1  # a single question has no history to choose from
    for baseline in results["constant_answer_baseline"].values():
        assert baseline["answer"].isdigit() and 1 / 20 <= baseline["accuracy"] <= 1
    table = (tmp_path / "history" / "history.md").read_text(encoding="utf-8")
    assert "| query_utterance | query_utterance |" in table and "Always replying the most common answer" in table
    assert json.loads((tmp_path / "history" / "history.json").read_text(encoding="utf-8")) == results


@torch.inference_mode()
def test_held_out_preference_accuracy_counts_pairs_whose_chosen_reply_is_likelier(tmp_path):
    """Against each reply scored alone, unpadded, by a full log-softmax: the batched measurement
    (both sides of 50 pairs in one padded batch) must find the same winners."""
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"], initializer_range=0.3)), tmp_path / "m.pth")
    write_held_out_pairs(tmp_path / "pairs.jsonl")
    model = load_pth(tmp_path / "m.pth", MiniMindConfig()).eval()
    pairs = DPODataset(tmp_path / "pairs.jsonl", load_tokenizer(), max_length=128)

    def reply_log_prob(ids: torch.Tensor, labels: torch.Tensor) -> float:
        log_probs = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), dim=-1)
        scored = labels[1:] != -100
        return log_probs[scored].gather(1, labels[1:][scored, None]).sum().item()

    items = [pairs[i] for i in range(len(pairs))]
    wins = sum(reply_log_prob(item["chosen_input_ids"], item["chosen_labels"])
               > reply_log_prob(item["rejected_input_ids"], item["rejected_labels"]) for item in items)
    assert 0 < wins < len(pairs)
    assert preference_accuracy(tmp_path / "m.pth", tmp_path / "pairs.jsonl") == wins / len(pairs)


def test_on_policy_pairs_reject_exactly_what_the_model_said(tmp_path):
    """scripts/make_dpo_pairs.py: one pair per prompt the model got wrong, the reference answer as `chosen`,
    the model's own greedy reply (as eval_llm.py gave it) as `rejected`; right answers give no pair."""
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])), tmp_path / "m.pth")
    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "dataset" / "demo" / "rlaif.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_dpo_pairs.py"), "--load_from",
                             str(tmp_path / "m.pth"), "--prompts", str(prompts), "--out", str(tmp_path / "pairs.jsonl"),
                             "--device", "cpu", "--max_new_tokens", "4"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    answers = json.loads((tmp_path / "pairs.answers.json").read_text())["predictions"]
    wrong = [(record, detail) for record, detail in zip(map(json.loads, lines), answers) if not detail["correct"]]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary == {"prompts": 30, "pairs": len(wrong), "accuracy": (30 - len(wrong)) / 30, "out": str(tmp_path / "pairs.jsonl")}
    assert len(pairs) == len(wrong) > 0
    for pair, (record, detail) in zip(pairs, wrong):
        assert pair["chosen"][:-1] == pair["rejected"][:-1] == record["conversations"]
        assert pair["chosen"][-1] == {"role": "assistant", "content": record["answer"]}
        assert pair["rejected"][-1] == {"role": "assistant", "content": detail["prediction"].strip()}
    DPODataset(tmp_path / "pairs.jsonl", load_tokenizer(), max_length=64)[0]  # train_dpo.py reads them
