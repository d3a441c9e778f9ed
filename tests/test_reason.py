"""Reasoning: tag weighting touches only whole tags, weight 1 is SFT, the thinking switch's contract, torchrun,
exact resume. (Well-formed <think> blocks from a trained model: scripts/measure_post_training.py.)"""


import pytest
import torch

from conftest import (assert_ranks_in_sync, assert_same_losses, kill_then_resume, read_metrics, run_in_process,
                      tiny_flags, torchrun)
from dataset.lm_dataset import ChatEncoder, SFTDataset
from model.loader import load_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from trainer import engine
from trainer.train_reason import TAGS, reasoning_step, tag_mask, tag_token_ids

REPLY = ("<think>\n3<5 and 5>3, so (think) the larger one is 5; rethink: 想一想：think again. A <thinking> "
         "or answer>s tag is no tag.\n</think>\n\n<answer>5</answer>")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("model")


def encode(tokenizer, reply: str) -> dict:
    ids, labels = ChatEncoder(tokenizer).encode_conversation(
        [{"role": "user", "content": "Which is larger, 3 or 5?"}, {"role": "assistant", "content": reply}], 512)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}


def test_tag_weight_touches_only_the_tokens_of_whole_tags(tokenizer):
    batch = encode(tokenizer, REPLY)
    mask = tag_mask(batch["labels"], tag_token_ids(tokenizer))[0]
    # The weighted tokens, read back in order, are exactly the four tags and nothing else.
    runs, current = [], []
    for token, weighted in zip(batch["labels"][0].tolist(), mask.tolist()):
        if weighted:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    assert runs == ["<think>", "</think>", "<answer>", "</answer>"]
    # The original weighted every token that occurs in any tag: here 11 more, pieces of "<", ">", "think"
    # and "answer" in the text.
    pieces = torch.tensor(sorted({t for ids in tag_token_ids(tokenizer) for t in ids}))
    assert int(torch.isin(batch["labels"][0], pieces).sum()) - int(mask.sum()) == 11


def test_every_tag_of_the_demo_data_is_found(tokenizer):
    dataset = SFTDataset(engine.REPO_ROOT / "dataset" / "demo" / "reason.jsonl", tokenizer, max_length=720)
    sequences = tag_token_ids(tokenizer)
    for i in range(0, len(dataset), 50):
        labels = dataset[i]["labels"]
        text = tokenizer.decode([t for t in labels.tolist() if t != -100])
        expected = sum(text.count(tag) * len(ids) for tag, ids in zip(TAGS, sequences))
        assert expected > 0 and int(tag_mask(labels[None], sequences).sum()) == expected, f"line {i + 1}"


def test_loss_weights_tags_and_weight_one_is_sft(tokenizer):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    batch = encode(tokenizer, REPLY)
    sft = engine.causal_lm_loss(model, batch)
    plain = reasoning_step(model, batch, tag_token_ids(tokenizer), tag_weight=1.0)
    assert plain.count == sft.count and plain.loss_sum.item() == pytest.approx(sft.loss_sum.item(), rel=1e-6)
    weighted = reasoning_step(model, batch, tag_token_ids(tokenizer), tag_weight=10.0)
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits[0, :-1]
    targets, mask = batch["labels"][0, 1:], tag_mask(batch["labels"], tag_token_ids(tokenizer))[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none") * (targets != -100)
    assert weighted.loss_sum.item() == pytest.approx((nll.sum() + 9 * nll[mask].sum()).item(), rel=1e-5)
    assert weighted.count == sft.count  # divided by the labelled tokens, as SFT


def test_thinking_switch_contract(tokenizer):
    """Trained replies begin with `<think>` right after the generation prompt, so with thinking on (the
    prompt ends at `assistant\\n`) the model opens the block itself; with it off the template has
    already closed an empty block and the model answers."""
    chat = ChatEncoder(tokenizer)
    question = [{"role": "user", "content": "What is 2 plus 3?"}]
    on, _ = chat.encode_prompt(question, 512, enable_thinking=True)
    off, _ = chat.encode_prompt(question, 512, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"
    dataset = SFTDataset(engine.REPO_ROOT / "dataset" / "demo" / "reason.jsonl", tokenizer, max_length=720)
    for i in (0, 1, 2, 3):  # the demo writes some steps in `content`, some in `reasoning_content`
        labels = dataset[i]["labels"].tolist()
        first = next(n for n, t in enumerate(labels) if t != -100)
        assert labels[first:first + 4] == tag_token_ids(tokenizer)[0]


def reason_flags(out, data, *extra: str) -> list[str]:
    return tiny_flags(out, data, "--from_weight", "none", "--learning_rate", "1e-3", "--max_seq_len", "128", *extra)


def test_resumes_exactly_after_kill(small_data, tmp_path):
    run_in_process("train_reason.py", reason_flags(tmp_path / "reference", small_data["reason"], "--max_steps", "8"))
    records = read_metrics(tmp_path / "reference" / "out" / "reason_64.metrics.jsonl")
    expected = {r["step"]: r["loss"] for r in records}
    assert len(expected) == 8 and all(r["loss"] > r["ce"] for r in records)  # tags weigh 10x by default
    killed = tmp_path / "killed"
    resumed = kill_then_resume("train_reason.py", reason_flags(killed, small_data["reason"], "--max_steps", "8",
                                                               "--save_interval", "1", "--from_resume", "1"),
                               killed / "out" / "reason_64.metrics.jsonl", [4])
    assert_same_losses(resumed, expected)


def test_torchrun_two_processes(small_data, tmp_path):
    torchrun("train_reason.py", reason_flags(tmp_path, small_data["reason"], "--max_steps", "3"))
    assert_ranks_in_sync(tmp_path / "ckpt", "reason_64")
