"""The engine's promises, in-process: token-normalised accumulation, LR schedule, NaN guard."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

from model import loader
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM, next_token_nll
from trainer import engine


def make_args(tmp_path, *extra: str):
    parser = engine.stage_parser("test", save_weight="unit", from_weight="none", learning_rate=1e-3, epochs=1,
                                 batch_size=2, max_seq_len=16, data_file="none.jsonl")
    return parser.parse_args(["--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
                              "--device", "cpu", "--dtype", "float32", *extra])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))


def batch_with_labels(ids: torch.Tensor, labelled: int) -> dict:
    labels = ids.clone()
    labels[:, : ids.shape[1] - labelled] = -100
    return {"input_ids": ids, "labels": labels}


def gradients_of_one_step(trainer: engine.Trainer, model, window: list[dict]) -> dict[str, torch.Tensor]:
    """The gradients `train_step` hands to the optimizer (normalised, before clipping), by name."""
    trainer.total_steps = 1
    trainer.start_logging()
    captured = {}
    trainer.optimizer_step = lambda finite: captured.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}) or (False, 0.0)
    trainer.train_step(window, engine.causal_lm_loss)
    return captured


def test_accumulation_weighs_every_token_equally(tmp_path):
    """Two micro-batches with 4 and 13 loss tokens must give the gradient of the mean over all 17 tokens,
    not the mean of the two micro-batch means."""
    ids = torch.randint(3, 6400, (1, 16), generator=torch.Generator().manual_seed(0))
    small, large = batch_with_labels(ids, 4), batch_with_labels(ids.flip(1), 13)

    model = tiny_model()
    trainer = engine.Trainer(make_args(tmp_path, "--accumulation_steps", "2", "--grad_clip", "0"), engine.Runtime(
        torch.device("cpu"), torch.float32), model)
    captured = gradients_of_one_step(trainer, model, [small, large])

    reference = tiny_model()
    total = 0.0
    for batch in (small, large):
        logits = reference(batch["input_ids"]).logits[:, :-1]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                          ignore_index=-100, reduction="sum")
    (total / 17).backward()
    for name, param in reference.named_parameters():
        assert torch.allclose(captured[name], param.grad, atol=1e-6, rtol=1e-4), name


def test_loss_from_the_labelled_positions_only_equals_the_full_cross_entropy():
    """causal_lm_loss sends only the positions that predict a labelled token through the vocabulary head:
    its loss and every gradient must be those of the cross-entropy over the whole logits, with labels
    scattered over rows (as in a packed SFT row: several replies, prompts between them)."""
    model = tiny_model()
    torch.manual_seed(1)
    ids = torch.randint(3, 6400, (3, 24))
    labels = ids.masked_fill(torch.rand(3, 24) < 0.7, -100)
    labels[2] = -100  # a row with nothing to learn
    batch = {"input_ids": ids, "labels": labels}
    out = engine.causal_lm_loss(model, batch)
    out.loss_sum.backward()
    selected = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    reference = next_token_nll(model(input_ids=ids).logits, labels, reduction="sum")
    reference.backward()
    assert out.count == int((labels[:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(out.loss_sum, reference, rtol=1e-6, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(selected[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_model_holds_the_one_cross_entropy():
    """Next-token cross-entropy is written once, `model_minimind.next_token_nll`, which the trainers,
    validation and evaluation call: no other module of the repo calls torch's cross-entropy itself."""
    repo = Path(__file__).resolve().parents[1]
    sources = [repo / "eval_llm.py", *(path for folder in ("model", "dataset", "trainer", "scripts")
                                       for path in sorted((repo / folder).glob("*.py")))]
    callers = [str(path.relative_to(repo)) for path in sources
               if re.search(r"\b(cross_entropy|nll_loss)\(", path.read_text(encoding="utf-8"))]
    assert callers == ["model/model_minimind.py"]


@pytest.mark.parametrize("steps, compiles", [(100, False), (100_000, True)])
def test_auto_compiles_only_when_the_rest_of_the_run_pays_for_it(tmp_path, monkeypatch, steps, compiles):
    """`--use_compile auto` times the first eager steps, then compiles in place when steps left x step time
    x (1 - 1/speedup) exceeds the compile time: at 0.1 s a step, 30 s to compile and 1.5x, it takes 900 steps."""
    monkeypatch.setitem(engine.COMPILE_COST, "cpu", (30.0, 1.5))
    model = tiny_model()
    trainer = engine.Trainer(make_args(tmp_path), engine.Runtime(torch.device("cpu"), torch.float32), model)
    trainer.total_steps = steps
    for _ in range(engine.COMPILE_PROBE_STEPS):
        trainer.compile_if_it_pays(2.0 if not trainer.probe_step_seconds else 0.1)  # the first step is slow
        assert model._compiled_call_impl is None and not trainer.compile_decided
    trainer.compile_if_it_pays(0.1)
    assert trainer.compile_decided and (model._compiled_call_impl is not None) == compiles
    trainer.compile_if_it_pays(0.1)  # decided once


def test_cosine_schedule_warmup_and_floor():
    peak = 1.0
    assert engine.cosine_lr(0, 100, peak, warmup_steps=10) == pytest.approx(0.1)
    assert engine.cosine_lr(9, 100, peak, warmup_steps=10) == pytest.approx(1.0)
    assert engine.cosine_lr(10, 100, peak, warmup_steps=10) == pytest.approx(1.0)
    assert engine.cosine_lr(100, 100, peak, warmup_steps=10) == pytest.approx(0.1)
    middle = engine.cosine_lr(55, 100, peak, warmup_steps=10)
    assert middle == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    values = [engine.cosine_lr(s, 100, peak, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    model = tiny_model()
    trainer = engine.Trainer(make_args(tmp_path, "--max_bad_steps", "3"), engine.Runtime(torch.device("cpu"), torch.float32), model)
    trainer.total_steps = 10
    trainer.start_logging()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 6400, (2, 8))

    def poisoned_loss(model, batch):
        out = engine.causal_lm_loss(model, batch)
        out.loss_sum = out.loss_sum * float("nan")
        return out

    for _ in range(2):
        trainer.train_step([{"input_ids": ids, "labels": ids}], poisoned_loss)
    assert trainer.skipped_steps == 2 and trainer.step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    trainer.train_step([{"input_ids": ids, "labels": ids}], engine.causal_lm_loss)  # a good step resets the streak
    assert trainer.step == 1 and trainer.bad_steps == 0
    with pytest.raises(RuntimeError, match="non-finite"):
        for _ in range(3):
            trainer.train_step([{"input_ids": ids, "labels": ids}], poisoned_loss)


def test_weight_file_names_follow_minimind():
    assert engine.weight_stem(MiniMindConfig(), "pretrain") == "pretrain_512"
    assert engine.weight_stem(MiniMindConfig(**PRESETS["minimind2-moe"]), "full_sft") == "full_sft_640_moe"


def test_one_dtype_policy_for_training_and_inference(monkeypatch):
    """`--dtype auto` picks bf16 on a CPU only where it measured faster, fp16 on MPS, for the trainers
    (engine.setup_runtime) and the loader alike."""
    for faster, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loader, "cpu_bf16_is_faster", lambda: faster)
        assert loader.resolve_dtype("auto", torch.device("cpu")) == expected
        args = argparse.Namespace(device="cpu", dtype="auto", seed=0)
        assert engine.setup_runtime(args).dtype == expected
    assert loader.resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert loader.resolve_dtype("float16", torch.device("cpu")) == torch.float16


def fp16_trainer(tmp_path, model, *extra: str) -> engine.Trainer:
    """A trainer whose autocast runs in fp16 with GradScaler loss scaling, on the CPU: the path CUDA
    cards without bf16 take by default."""
    trainer = engine.Trainer(make_args(tmp_path, *extra), engine.Runtime(torch.device("cpu"), torch.float16), model)
    assert trainer.scaler.is_enabled()
    trainer.total_steps = 10
    trainer.start_logging()
    return trainer


def scaled_loss(factor: float):
    def loss_fn(model, batch):
        out = engine.causal_lm_loss(model, batch)
        out.loss_sum = out.loss_sum * factor
        return out
    return loss_fn


def test_fp16_counts_a_nan_loss_as_bad_and_an_overflow_as_loss_scaling(tmp_path):
    """A NaN loss is a bad step (skipped, in the streak that stops the run); a finite loss whose
    gradients overflow fp16 is loss scaling at work (skipped, scale halved, not in the streak). The
    old code had both the other way round."""
    model = tiny_model()
    trainer = fp16_trainer(tmp_path, model, "--max_bad_steps", "3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 6400, (2, 8), generator=torch.Generator().manual_seed(0))
    window = [{"input_ids": ids, "labels": ids}]

    assert not trainer.train_step(window, scaled_loss(float("nan")))
    assert (trainer.step, trainer.skipped_steps, trainer.bad_steps) == (0, 1, 1)

    scale = trainer.scaler.get_scale()
    for overflow in range(1, 5):  # more overflows in a row than --max_bad_steps: loss scaling, not a failure
        assert not trainer.train_step(window, scaled_loss(1e30))  # finite in fp32, inf once scaled in fp16
        assert trainer.scaler.get_scale() == scale / 2 ** overflow
    assert (trainer.step, trainer.skipped_steps, trainer.bad_steps) == (0, 5, 0)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    assert trainer.train_step(window, engine.causal_lm_loss)
    assert (trainer.step, trainer.skipped_steps, trainer.bad_steps) == (1, 5, 0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="non-finite"):
        for _ in range(3):
            trainer.train_step(window, scaled_loss(float("nan")))


def test_moe_balance_loss_reaches_the_gradient(tmp_path):
    """Through the engine, a MoE's gradient is that of mean CE + aux_loss (aux as a per-unit mean),
    and differs from the CE-only gradient in the router: the balance loss is trained, not just logged."""
    config = MiniMindConfig(**{**PRESETS["tiny"], "use_moe": True, "aux_loss_alpha": 0.5})
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).train()
    reference = MiniMindForCausalLM(config).train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = batch_with_labels(ids, 9)

    trainer = engine.Trainer(make_args(tmp_path, "--grad_clip", "0"), engine.Runtime(torch.device("cpu"), torch.float32), model)
    captured = gradients_of_one_step(trainer, model, [batch])

    out = reference(batch["input_ids"])
    assert float(out.aux_loss) > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                           ignore_index=-100)
    ce_only = torch.autograd.grad(ce, [p for _, p in reference.named_parameters()], retain_graph=True, allow_unused=True)
    (ce + out.aux_loss).backward()
    gates = [name for name, _ in reference.named_parameters() if name.endswith("mlp.gate.weight")]
    assert gates
    for (name, param), without_aux in zip(reference.named_parameters(), ce_only):
        if param.grad is None:
            continue
        assert torch.allclose(captured[name], param.grad, atol=1e-6, rtol=1e-4), name
        if name in gates:
            assert not torch.allclose(param.grad, without_aux, atol=1e-6), f"{name}: no gradient from the aux loss"


def test_validation_reports_nats_per_token_and_bits_per_byte(tmp_path):
    """val_loss and val_bpb of a {text} file against a computation from the raw text: every token
    after <bos> is scored; the bytes are the UTF-8 bytes of the text (the closing <eos> stands for
    none, so its loss counts per token but not per byte)."""
    texts = ["MiniMind 从零开始训练一个小模型。", "Bits per byte compare tokenizers: 3.14159 12345!"]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    tokenizer = loader.load_tokenizer("model")
    model = tiny_model(3).eval()
    validation = engine.Validation(path, tokenizer, 128, 1, engine.Runtime(torch.device("cpu"), torch.float32))
    figures = validation(model)

    nll_all, tokens, nll_text, text_bytes = 0.0, 0, 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        nll = -log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).double()
        nll_all, tokens = nll_all + float(nll.sum()), tokens + len(ids) - 1
        nll_text, text_bytes = nll_text + float(nll[:-1].sum()), text_bytes + len(text.encode("utf-8"))
    assert figures["val_loss"] == pytest.approx(nll_all / tokens, rel=1e-6)
    assert figures["val_bpb"] == pytest.approx(nll_text / (math.log(2) * text_bytes), rel=1e-6)


def test_validation_of_a_model_compiled_in_place_runs_eager(tmp_path):
    """`--use_compile` compiles the model in place mid-run; validation batches change shape every batch,
    so they must not go through the compiled forward (each would be a recompilation): no graph is
    compiled during validation, and the figures are the eager model's."""
    from torch._dynamo.utils import counters

    texts = ["短的。", "A longer held-out line, padded to another length.", "第三行，又是另一个长度的文本。"]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    validation = engine.Validation(path, loader.load_tokenizer("model"), 128, 1,
                                   engine.Runtime(torch.device("cpu"), torch.float32))
    model = tiny_model(3)
    expected = validation(model)
    model.compile()
    torch._dynamo.reset()
    counters.clear()
    assert validation(model) == pytest.approx(expected, rel=1e-9)
    assert not counters["stats"]["unique_graphs"], "validation went through the compiled forward"


def test_weight_decay_reaches_matrices_only(tmp_path):
    """`--weight_decay` decays the attention and MLP matrices; norms and the (tied) embedding are not."""
    model = tiny_model()
    trainer = engine.Trainer(make_args(tmp_path, "--weight_decay", "0.1"), engine.Runtime(torch.device("cpu"), torch.float32), model)
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter is in exactly one group
    for name, param in names.items():
        expected = 0.1 if name.endswith("_proj.weight") else 0.0
        assert decay_of[id(param)] == expected, name
    assert decay_of[id(model.lm_head.weight)] == 0.0 and model.lm_head.weight is model.model.embed_tokens.weight
    help_text = engine.stage_parser("x", save_weight="a", from_weight="none", learning_rate=1, epochs=1, batch_size=1,
                                    max_seq_len=8, data_file="x").format_help()
    assert "the original decayed every parameter" in " ".join(help_text.split())


def test_final_validation_joins_the_last_logged_step(tmp_path):
    """When the epochs end before the planned last step (packing's step estimate was high), the final
    weights are validated at `finish` and the figures join that step's line: each step once."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"text": "3 加 5 等于 8。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    model = tiny_model()
    args = make_args(tmp_path, "--eval_data", str(held_out), "--eval_interval", "0", "--log_interval", "1")
    trainer = engine.Trainer(args, engine.Runtime(torch.device("cpu"), torch.float32), model,
                             tokenizer=loader.load_tokenizer("model"))
    trainer.total_steps = 10
    trainer.train_args = {}
    trainer.start_logging()
    ids = torch.randint(3, 6400, (2, 8), generator=torch.Generator().manual_seed(0))
    trainer.train_step([{"input_ids": ids, "labels": ids}], engine.causal_lm_loss)
    trainer.finish()
    records = [json.loads(line) for line in (tmp_path / "out" / "unit_64.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["val_loss"] > 0 and records[0]["val_bpb"] > 0 and records[0]["loss"] > 0
