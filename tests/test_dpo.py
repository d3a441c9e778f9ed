"""DPO: the loss against TRL's, preferences learned, precomputed reference = live reference, torchrun, resume."""

from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch

from conftest import (assert_ranks_in_sync, assert_same_losses, kill_then_resume, losses, read_metrics,
                      run_in_process, tiny_flags, torchrun)
from dataset.lm_dataset import DPODataset
from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from trainer.engine import Runtime
from trainer.train_dpo import PairsWithReference, compute_reference_logps, preference_step

trl = pytest.importorskip("trl")


def tiny_model(seed: int) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))


def per_token_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """log p of each labelled next token, 0 elsewhere: the `log_probs` TRL's fused LM head returns."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * (targets != -100)


@pytest.fixture(scope="module")
def trl_dpo_trainer(tmp_path_factory) -> "trl.DPOTrainer":
    """A real DPOTrainer (a tiny Qwen2 stands in as its model; reference log-probs precomputed, as our
    `--precompute_ref 1`). Only its public `compute_loss` and `log` are used: each call answers the model
    call with our policy and passes our reference's log-probs as the precomputed ones."""
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer("model")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    config = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_dpo")), per_device_train_batch_size=2,
                           report_to=[], use_cpu=True, precompute_ref_log_probs=True)
    pairs = Dataset.from_dict({"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [" z", " w"]})
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)
    trainer.model.train()  # TRL logs under "train"
    return trainer


def trl_dpo(trainer, policy, reference, batch, beta: float, loss_type: str, sft_weight: float = 0.0) -> tuple[float, dict]:
    """TRL's DPOTrainer loss (`compute_loss`) on the same pairs: its model call is answered with our
    policy's per-token log-probs of the labels TRL builds, the reference's log-probs are passed as
    precomputed, and the metrics are what `log` reports."""
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        ref_chosen, ref_rejected = per_token_logps(reference, input_ids, attention_mask, labels).sum(1).chunk(2)

    @torch.no_grad()
    def model(input_ids, attention_mask, labels, **kwargs):
        log_probs = per_token_logps(policy, input_ids, attention_mask, labels)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [loss_type, "sft"], [1.0, sft_weight]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": (labels != -100).long(),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer.compute_loss(model, inputs)
    trainer.log({})
    return float(loss), trainer.state.log_history[-1]


@pytest.fixture(scope="module")
def pair_batch(small_data) -> dict:
    pairs = DPODataset(small_data["dpo"], load_tokenizer("model"), max_length=64)
    # Pairs of different lengths, so padding and the per-token (IPO) normalisation both matter.
    return PairsWithReference.collate([pairs[i] for i in range(8)], 64, pairs.pad_token_id)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_rewards_and_margins_equal_trl(trl_dpo_trainer, pair_batch, loss_type):
    policy, reference = tiny_model(0), tiny_model(1).eval()
    args = Namespace(beta=0.5, loss_type=loss_type, length_normalize=0, rpo_alpha=0.0)
    ours = preference_step(policy, pair_batch, args, reference)
    trl_loss, trl_metrics = trl_dpo(trl_dpo_trainer, policy, reference, pair_batch, beta=0.5, loss_type=loss_type)
    assert ours.count == 8  # the engine averages per pair
    assert ours.loss_sum.item() / ours.count == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for ours_key, trl_key in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        assert ours.metrics[ours_key] == pytest.approx(trl_metrics[trl_key], rel=1e-5, abs=1e-6), ours_key
    assert trl_metrics["rewards/margins"] != 0  # two different models: the test compares something


@pytest.mark.parametrize("length_normalize", [0, 1])
def test_rpo_alpha_adds_trl_sft_loss(trl_dpo_trainer, pair_batch, length_normalize):
    policy, reference = tiny_model(0), tiny_model(1).eval()
    args = Namespace(beta=0.5, loss_type="sigmoid", length_normalize=length_normalize, rpo_alpha=0.7)
    ours = preference_step(policy, pair_batch, args, reference)
    trl_loss, _ = trl_dpo(trl_dpo_trainer, policy, reference, pair_batch, beta=0.5,
                          loss_type="sigmoid_norm" if length_normalize else "sigmoid", sft_weight=0.7)
    plain = preference_step(policy, pair_batch, Namespace(**{**vars(args), "rpo_alpha": 0.0}), reference)
    assert ours.loss_sum.item() / ours.count == pytest.approx(trl_loss, rel=1e-5)
    assert ours.loss_sum.item() - plain.loss_sum.item() == pytest.approx(0.7 * 8 * ours.metrics["chosen_nll"], rel=1e-5)


def test_minimind_length_normalisation_is_trl_sigmoid_norm(trl_dpo_trainer, pair_batch):
    policy, reference = tiny_model(0), tiny_model(1).eval()
    ours = preference_step(policy, pair_batch, Namespace(beta=0.5, loss_type="sigmoid", length_normalize=1, rpo_alpha=0.0),
                           reference)
    trl_loss, _ = trl_dpo(trl_dpo_trainer, policy, reference, pair_batch, beta=0.5, loss_type="sigmoid_norm")
    assert ours.loss_sum.item() / ours.count == pytest.approx(trl_loss, rel=1e-5)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run faster on one thread, and far faster when other processes share the CPUs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def dpo_flags(out, data, *extra: str) -> list[str]:
    # 32 pairs, 8 per step, 8 epochs: enough passes for a tiny random model to learn which side is preferred.
    return tiny_flags(out, data, "--from_weight", "none", "--batch_size", "8", "--accumulation_steps", "1",
                      "--learning_rate", "3e-3", "--beta", "0.5", *extra)


def first_pairs(small_data, path, count: int):
    path.write_text("".join(small_data["dpo"].read_text(encoding="utf-8").splitlines(keepends=True)[:count]),
                    encoding="utf-8")
    return path


def test_preferences_learned_precomputed_reference_and_exact_resume(small_data, tmp_path):
    """One uninterrupted run with the reference model in memory; one with precomputed reference
    log-probs, killed with -9 and resumed: every step's loss is the same (the precomputed table is
    the live reference's numbers, and it is reloaded, not recomputed, on resume). Along the way the
    preference accuracy on the training pairs rises."""
    data = first_pairs(small_data, tmp_path / "pairs.jsonl", 32)
    run_in_process("train_dpo.py", dpo_flags(tmp_path / "live", data, "--epochs", "8"))
    records = read_metrics(tmp_path / "live" / "out" / "dpo_64.metrics.jsonl")
    expected = {r["step"]: r["loss"] for r in records}
    assert len(expected) == 32
    first, last = records[:8], records[-8:]
    accuracy = [sum(r["reward_accuracy"] for r in part) / len(part) for part in (first, last)]
    margin = [sum(r["reward_margin"] for r in part) / len(part) for part in (first, last)]
    assert accuracy[1] >= accuracy[0] + 0.2 and accuracy[1] >= 0.8, accuracy
    assert margin[1] > margin[0], margin
    assert records[-1]["tokens"] > 0 and "reward_chosen" in records[-1] and "reward_rejected" in records[-1]

    flags = dpo_flags(tmp_path / "killed", data, "--epochs", "8", "--precompute_ref", "1", "--save_interval", "1",
                      "--from_resume", "1")
    resumed = kill_then_resume("train_dpo.py", flags, tmp_path / "killed" / "out" / "dpo_64.metrics.jsonl", [11])
    assert_same_losses(resumed, expected)


def test_torchrun_two_processes_with_precomputed_reference(small_data, tmp_path):
    """Under torchrun each process scores half of the pairs; the assembled table is what one process
    scores alone (`--from_weight none` starts every rank from the same seeded weights)."""
    data = first_pairs(small_data, tmp_path / "pairs.jsonl", 50)
    torchrun("train_dpo.py", dpo_flags(tmp_path, data, "--precompute_ref", "1", "--max_steps", "3"))
    assert_ranks_in_sync(tmp_path / "ckpt", "dpo_64")
    assert max(losses(tmp_path / "out" / "dpo_64.metrics.jsonl")) == 3
    table = torch.load(tmp_path / "ckpt" / "dpo_64_reference_logps.pth")["logps"]
    pairs = DPODataset(data, load_tokenizer("model"), max_length=64)
    args = Namespace(batch_size=8, length_normalize=0)
    expected = compute_reference_logps(tiny_model(seed=42), pairs, args, Runtime(torch.device("cpu"), torch.float32))
    assert table.shape == (len(pairs), 2)
    assert torch.allclose(table, expected, atol=1e-4)
