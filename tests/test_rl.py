"""RL stages (PPO, GRPO, SPO) and their shared rollout / reward module, against independent references:
GAE against a plain reverse loop, the GRPO and CISPO losses against TRL's GRPOTrainer, masked log-probs
of a padded batch against each row alone, a batched reward model against one text at a time; and the
trainers as users run them (kill -9 and exact resume, torchrun with two processes)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import left_padded_rollout, torchrun
from dataset.lm_dataset import RLAIFDataset
from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from trainer import rl
from trainer.train_grpo import cispo_surrogate
from trainer.train_ppo import gae
from trainer.train_spo import ValueTracker

REPO = Path(__file__).resolve().parents[1]
PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(REPO / "model")


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny randomly initialised HF reward model (Qwen2 sequence classifier, one label) with our tokenizer."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("reward_model")
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The algorithms against independent references
# ---------------------------------------------------------------------------------------------

def test_gae_matches_a_plain_reverse_loop():
    torch.manual_seed(0)
    lengths = [5, 1, 8, 3]
    rewards, values = torch.randn(4, 8), torch.randn(4, 8)
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).float()
    gamma, lam = 0.97, 0.9
    advantages, returns = gae(rewards * mask, values * mask, mask, gamma, lam)
    for row, length in enumerate(lengths):
        expected, running = [0.0] * length, 0.0
        for t in reversed(range(length)):
            next_value = values[row, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert advantages[row, :length].tolist() == pytest.approx(expected, abs=1e-5)
        expected_returns = [a + v for a, v in zip(expected, values[row, :length].tolist())]
        assert returns[row, :length].tolist() == pytest.approx(expected_returns, abs=1e-5)
        assert not advantages[row, length:].any() and not returns[row, length:].any()
    # lambda = 1, gamma = 1: the advantage is the Monte Carlo return minus the value.
    advantages, _ = gae(rewards * mask, values * mask, mask, 1.0, 1.0)
    mc_return = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(advantages, (mc_return - values) * mask, atol=1e-5)


@pytest.fixture(scope="module")
def trl_grpo_trainer(tokenizer, tmp_path_factory):
    """TRL's GRPOTrainer on a tiny model: only its public loss computation (`compute_loss`) is used."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    config = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), num_generations=2, beta=0.0,
                            per_device_train_batch_size=2, report_to=[], use_cpu=True, max_completion_length=6,
                            use_bias_correction_kl=False)  # the KL term of the GRPO paper, as ours
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                              args=config, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_grpo_loss_matches_trl(trl_grpo_trainer, loss_type):
    """Same logits, old/reference log-probs, advantages and mask: our token-normalised loss equals TRL's
    "dapo" (GRPO with clip-higher) or "cispo" loss, in value and in gradient."""
    torch.manual_seed(1)
    rows, prompt_length, response_length, vocab = 4, 3, 6, 11
    input_ids = torch.randint(3, vocab, (rows, prompt_length + response_length))
    response_mask = (torch.arange(response_length)[None] < torch.tensor([6, 2, 4, 5])[:, None]).float()
    labels = input_ids.clone()
    labels[:, :prompt_length] = -100
    labels[:, prompt_length:] = labels[:, prompt_length:].masked_fill(response_mask == 0, -100)
    logits = torch.randn(rows, response_length + 1, vocab, requires_grad=True)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "response_mask": response_mask,
             "labels": labels, "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1]), "rollout_metrics": {}}
    current = rl.response_log_probs(logits, batch, temperature=1.0).detach()
    batch["old_log_probs"] = current + 0.4 * torch.randn(rows, response_length)  # ratios well past the clip
    batch["ref_log_probs"] = current + 0.3 * torch.randn(rows, response_length)
    epsilon, epsilon_high, beta = 0.2, 0.28 if loss_type == "grpo" else 0.3, 0.04

    args = SimpleNamespace(temperature=1.0, beta=beta)
    model = lambda **kwargs: SimpleNamespace(logits=logits, aux_loss=0.0)  # noqa: E731
    surrogate = (lambda lp, old, adv: cispo_surrogate(lp, old, adv, epsilon_high)) if loss_type == "cispo" else \
        (lambda lp, old, adv: rl.clipped_surrogate(lp, old, adv, epsilon, epsilon_high))
    out = rl.critic_free_loss(model, batch, args, surrogate)
    ours = out.loss_sum / out.count
    ours_grad, = torch.autograd.grad(ours, logits)

    trainer = trl_grpo_trainer
    trainer.loss_type, trainer.beta, trainer.epsilon_low = "dapo" if loss_type == "grpo" else "cispo", beta, epsilon
    trainer.epsilon_high = epsilon_high if loss_type == "grpo" else 1 + epsilon_high  # TRL's CISPO cap is the weight itself

    def policy(input_ids, attention_mask, labels, **kwargs):
        """The model call TRL makes, answered as its fused LM head does: per-token log-probs of the labels
        TRL builds (and entropies), of which TRL keeps the completion's."""
        completion = rl.response_log_probs(logits, {"response_mask": response_mask, "labels": labels}, 1.0)
        log_probs = torch.cat([torch.zeros(rows, prompt_length), completion], 1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs))

    inputs = {"prompt_ids": input_ids[:, :prompt_length], "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
              "completion_ids": input_ids[:, prompt_length:], "completion_mask": response_mask.long(),
              "advantages": batch["advantages"], "old_per_token_logps": batch["old_log_probs"],
              "ref_per_token_logps": batch["ref_log_probs"], "num_items_in_batch": response_mask.sum()}
    theirs = trainer.compute_loss(policy, inputs)
    theirs_grad, = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)
    assert out.metrics["clip_frac"] > 0


def test_value_tracker_forgets_faster_when_the_policy_moves():
    slow, fast = ValueTracker(0.875, 0.96, 0.06), ValueTracker(0.875, 0.96, 0.06)
    for tracker in (slow, fast):
        tracker.update(["q"] * 10, [0.0] * 10)
    fast.drift += 1.0  # the policy changed a lot since "q" was last seen
    slow.update(["q"], [1.0])
    fast.update(["q"], [1.0])
    assert fast.baseline("q") > slow.baseline("q") > 0
    assert ValueTracker(0.875, 0.96, 0.06).baseline("new") == pytest.approx(0.5)
    restored = ValueTracker(0.875, 0.96, 0.06)
    restored.load_state_dict(fast.state_dict())
    assert restored.baseline("q") == fast.baseline("q") and restored.drift == fast.drift


# ---------------------------------------------------------------------------------------------
# Rollouts and log-probabilities
# ---------------------------------------------------------------------------------------------

def tiny_policy() -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])).eval()


def test_log_probs_of_a_left_padded_batch_equal_each_row_alone():
    model = tiny_policy()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    responses = [[20, 21, 22, EOS], [23, 24, 25, 26, 27, 28], [29, EOS]]  # the second was cut off
    batch = rl.rollout_batch(left_padded_rollout(prompts, responses))
    with torch.no_grad():
        log_probs = rl.response_log_probs(rl.forward(model, batch).logits, batch, temperature=0.7)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = torch.tensor([prompt + response])
            logits = model(alone).logits[0, len(prompt) - 1:-1].float() / 0.7
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            assert torch.allclose(log_probs[row, :len(response)], expected, atol=1e-5), row
            assert not log_probs[row, len(response):].any()


def test_sample_masks_each_response_after_its_end_of_turn(tokenizer, monkeypatch):
    model = tiny_policy()
    prompt = {"input_ids": torch.tensor([[PAD, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
              "prompt": ["p0", "p1"], "answer": ["3", ""]}
    generated = torch.tensor([[PAD, 5, 6, 18, EOS, PAD, PAD], [7, 8, 9, 18, 19, 20, 21]])
    monkeypatch.setattr(rl.loader, "generate_batch", lambda *args, **kwargs: generated)
    args = SimpleNamespace(max_gen_len=4, temperature=1.0, top_p=1.0)
    rollout = rl.sample(model, tokenizer, prompt, args, SimpleNamespace(device=torch.device("cpu"),
                                                                       autocast=contextlib.nullcontext))
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollout.finished.tolist() == [True, False]
    assert rollout.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert rollout.responses[0] == tokenizer.decode([18]) and rollout.answers == ["3", ""]
    assert rollout.labels()[0].tolist() == [-100, -100, -100, 18, EOS, -100, -100]


def test_long_prompts_lose_old_turns_never_the_generation_prompt(tokenizer, tmp_path):
    turns = [{"role": "user", "content": "很长的历史 " * 30}, {"role": "assistant", "content": "好的 " * 30},
             {"role": "user", "content": "3 加 2 等于多少？"}]
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"conversations": turns, "answer": "5"}, ensure_ascii=False) + "\n", encoding="utf-8")
    item = RLAIFDataset(path, tokenizer, max_length=40)[0]
    assert len(item["input_ids"]) <= 40
    assert item["prompt"].endswith("3 加 2 等于多少？<|im_end|>\n<|im_start|>assistant\n")
    assert "很长的历史" not in item["prompt"]


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

def text_rollout(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool],
                 lengths: list[int]) -> rl.Rollout:
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    return rl.Rollout(torch.zeros(len(prompts), width, dtype=torch.long), mask.long(), mask, torch.tensor(finished),
                      prompts, responses, answers)


def test_rule_rewards():
    prompt = "<|im_start|>user\n3 加 2 等于多少？<|im_end|>\n<|im_start|>assistant\n"
    no_think_prompt = prompt + "<think>\n\n</think>\n\n"
    rollout = text_rollout(
        [prompt, prompt, prompt, no_think_prompt, prompt],
        ["<think>\n3 + 2 = 5\n</think>\n\n答案是 5", "5", "<think>\n3 + 2 = 5", "5", "<think>x</think>6"],
        ["5", "5", "5", "5", ""], [True, True, False, True, True], [10, 2, 16, 2, 13])
    assert rl.AnswerReward()(rollout).tolist() == [1, 1, 0, 1, 0]
    assert rl.FormatReward()(rollout).tolist() == [1, 0.5, 0, 1, 1]
    assert rl.LengthPenalty(max_len=16, buffer=4)(rollout).tolist() == [0, 0, -1, 0, -0.25]
    rewards = rl.Rewards([(1.0, rl.AnswerReward()), (0.5, rl.FormatReward()), (2.0, rl.LengthPenalty(16, 4))])
    total, components = rewards(rollout)
    assert total.tolist() == pytest.approx([1.5, 1.25, -2.0, 1.5, 0.0])
    assert set(components) == {"answer", "format", "length"}
    assert rewards.bounds == (-2.0, 1.5)


def test_reward_model_scores_a_batch_as_each_text_alone(reward_model_dir, tokenizer):
    reward = rl.ModelReward(reward_model_dir, torch.device("cpu"), clip=1e9)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                           add_generation_prompt=True)
    responses = ["你好！", "<think>\n想一想\n</think>\n\n我是一个很长很长的回答，" * 3, "Hi"]
    rollout = text_rollout([prompt] * 3, responses, [""] * 3, [True] * 3, [3, 40, 2])
    batched = reward(rollout)
    assert "想一想" not in reward.conversation_text(prompt, responses[1])  # scored on the final answer
    assert reward.conversation_text(prompt, "Hi").endswith("<|im_start|>assistant\nHi<|im_end|>\n")
    for row in range(3):
        alone = tokenizer(reward.conversation_text(prompt, responses[row]), return_tensors="pt", add_special_tokens=False)
        expected = reward.model(**alone).logits[0, 0].item()
        assert batched[row].item() == pytest.approx(expected, abs=1e-5)
    assert len(set(batched.tolist())) == 3
    clipped = rl.ModelReward(reward_model_dir, torch.device("cpu"), clip=1e-3)(rollout)
    assert clipped.abs().max().item() == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------
# The trainers, as users run them
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rl_data") / "rlaif.jsonl"
    with open(REPO / "dataset" / "demo" / "rlaif.jsonl", encoding="utf-8") as source:
        path.write_text("".join(next(source) for _ in range(64)), encoding="utf-8")
    return path


STAGES = {  # script, weight stem, stage flags
    "ppo": ("train_ppo.py", "ppo_actor_64", ["--ppo_epochs", "2"]),
    "grpo": ("train_grpo.py", "grpo_64", ["--num_generations", "3", "--ppo_epochs", "2", "--epsilon_high", "0.28"]),
    "spo": ("train_spo.py", "spo_64", ["--batch_size", "3"]),
}


def rl_flags(out: Path, data: Path, reward_model: Path, stage: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--from_weight", "none", "--data_path", str(data), "--reward_model_path", str(reward_model),
            "--max_seq_len", "48", "--max_gen_len", "6", "--batch_size", "2", "--learning_rate", "1e-3",
            "--device", "cpu", "--dtype", "float32", "--log_interval", "1", "--save_dir", str(out / "out"),
            "--checkpoint_dir", str(out / "ckpt"), *STAGES[stage][2], *extra]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads cost more than they save


def run_stage(stage: str, flags: list[str]) -> str:
    result = subprocess.run([sys.executable, str(REPO / "trainer" / STAGES[stage][0]), *flags], capture_output=True,
                            text=True, timeout=600, env=ONE_THREAD, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def logged(metrics: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records}), "each step once, in order"
    return {r["step"]: r for r in records}


@pytest.mark.parametrize("stage", ["ppo", "grpo", "spo"])
def test_trainer_resumes_exactly_after_kill(stage, prompts_file, reward_model_dir, tmp_path):
    """kill -9 once a resume checkpoint exists, then `--from_resume 1`: every step logs the loss, reward and
    KL of an uninterrupted run (the sampled responses, tracker, critic and optimizer all continue exactly)."""
    steps = 4
    reference = tmp_path / "reference"
    run_stage(stage, rl_flags(reference, prompts_file, reward_model_dir, stage, "--max_steps", str(steps)))
    expected = logged(reference / "out" / f"{STAGES[stage][1]}.metrics.jsonl")
    assert len(expected) == steps
    for key in ("loss", "reward", "reward_model", "reward_answer", "reward_format", "reward_length", "kl",
                "clip_frac", "response_length", "entropy"):
        assert key in expected[steps], key
    assert any(record["grad_norm"] > 0 for record in expected.values())

    killed = tmp_path / "killed"
    flags = rl_flags(killed, prompts_file, reward_model_dir, stage, "--max_steps", str(steps), "--save_interval", "1",
                     "--from_resume", "1")
    metrics = killed / "out" / f"{STAGES[stage][1]}.metrics.jsonl"
    checkpoint = killed / "ckpt" / f"{STAGES[stage][1]}_resume.pth"
    process = subprocess.Popen([sys.executable, str(REPO / "trainer" / STAGES[stage][0]), *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD, cwd="/")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert "resumed from" in run_stage(stage, flags)
    resumed = logged(metrics)
    assert resumed.keys() == expected.keys()
    for step, record in expected.items():
        for key in ("loss", "reward", "kl"):
            assert abs(resumed[step][key] - record[key]) <= 1e-5, f"step {step} {key}: {resumed[step][key]} vs {record[key]}"


@pytest.mark.parametrize("stage", ["ppo", "grpo", "spo"])
def test_trainer_under_torchrun_keeps_processes_in_sync(stage, prompts_file, reward_model_dir, tmp_path):
    torchrun(STAGES[stage][0], rl_flags(tmp_path, prompts_file, reward_model_dir, stage, "--max_steps", "2"))
    stem = STAGES[stage][1]
    rank0 = torch.load(tmp_path / "ckpt" / f"{stem}_resume.pth", weights_only=False)
    rank1 = torch.load(tmp_path / "ckpt" / f"{stem}_resume_rank1.pth", weights_only=False)
    for key, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][key]), f"{key} differs between ranks"
    assert rank0["objects"]["data"] != rank1["objects"]["data"]  # each process sampled its own prompts
    if stage == "spo":  # both processes applied both processes' rewards
        assert rank0["objects"]["tracker"] == rank1["objects"]["tracker"]
        assert len(rank0["objects"]["tracker"]["prompts"]) == 2 * 2 * 3
