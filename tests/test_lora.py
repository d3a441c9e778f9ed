"""LoRA (model/model_lora.py, trainer/train_lora.py, `--lora_weight` in the shared loader): adapters
start as a no-op, merging changes nothing, PEFT reads our adapters and we read PEFT's, only adapters
learn, and the trainer runs, resumes exactly and stays in sync under torchrun like every stage."""

import argparse
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from conftest import assert_ranks_in_sync, kill_then_resume, losses, run_trainer, tiny_flags, torchrun
from model.loader import add_model_args, load_from_args, load_model_and_tokenizer, load_pth
from model.model_lora import (LoRAConfig, apply_lora, load_lora, lora_layers, lora_state_dict, merged_copy, save_lora,
                              write_peft)
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from scripts import convert_model
from model.weights import save_weights

IDS = torch.randint(3, 6400, (2, 24), generator=torch.Generator().manual_seed(1))


def base_model(preset: str = "tiny") -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS[preset])).eval()


def adapted_model(config: LoRAConfig = LoRAConfig(rank=4, alpha=8.0), preset: str = "tiny") -> MiniMindForCausalLM:
    """The base model with adapters whose B is random, so that they change the logits."""
    model = base_model(preset)
    apply_lora(model, config)
    torch.manual_seed(2)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora.B.weight, std=0.3)
    return model


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the adapters themselves -------------------------------------------------------------------

def test_zero_initialised_B_leaves_the_logits_unchanged():
    model = base_model()
    expected = logits(model)
    adapted = apply_lora(model, LoRAConfig())
    # Every attention and MLP projection, including the non-square ones (k/v: 64 -> 32, MLP: 64 <-> 192).
    assert len(adapted) == 2 * 7
    assert {tuple(layer.weight.shape) for layer in lora_layers(model).values()} >= {(32, 64), (192, 64), (64, 192)}
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])  # MoE: every expert's projections are adapted
def test_merged_model_gives_the_adapters_logits(preset):
    model = adapted_model(preset=preset)
    with_adapters = logits(model)
    assert relative_diff(with_adapters, logits(base_model(preset))) > 1e-2  # the adapters do change the model
    merged = merged_copy(model)
    assert relative_diff(logits(merged), with_adapters) <= 1e-5
    assert merged.state_dict().keys() == base_model(preset).state_dict().keys()  # plain layers again
    assert lora_layers(model)  # the original keeps its adapters


def test_only_adapter_parameters_receive_gradients():
    model = adapted_model()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        if ".lora." in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_a_tied_output_head_is_refused():
    with pytest.raises(ValueError, match="tied"):
        apply_lora(base_model(), LoRAConfig(targets=("lm_head",)))


def test_an_adapter_file_of_the_original_minimind_loads(tmp_path):
    """The original saved `<layer>.lora.A.weight` / `.B.weight` of the square layers, under DDP names,
    without a config, and added B A x unscaled (alpha = rank)."""
    model = adapted_model(LoRAConfig(rank=8, alpha=8.0, targets=("q_proj", "o_proj")))
    torch.save({f"module.{key}": tensor for key, tensor in lora_state_dict(model).items()}, tmp_path / "lora_identity_64.pth")
    fresh = base_model()
    config = load_lora(fresh, tmp_path / "lora_identity_64.pth")
    assert (config.rank, config.alpha, config.targets) == (8, 8.0, ("o_proj", "q_proj"))
    assert relative_diff(logits(fresh), logits(model)) <= 1e-6


def test_save_lora_then_load_lora_gives_the_same_adapters(tmp_path):
    model = adapted_model(LoRAConfig(rank=4, alpha=16.0, dropout=0.1, targets=("q_proj", "down_proj")))
    save_lora(model, tmp_path / "lora" / "lora_identity_64.pth")
    fresh = base_model()
    assert load_lora(fresh, tmp_path / "lora" / "lora_identity_64.pth") == model.lora_config
    saved, loaded = lora_state_dict(model), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(logits(fresh.eval()), logits(model.eval()))


# --- PEFT, the independent reference ----------------------------------------------------------

def test_peft_loads_our_export_with_the_same_logits(tmp_path):
    model = adapted_model()
    write_peft(lora_state_dict(model), model.lora_config, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter")).eval()
    assert relative_diff(logits(peft_model), logits(model)) <= 1e-5


def test_we_load_an_adapter_trained_with_peft(tmp_path):
    peft_model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ours = base_model()
    config = load_lora(ours, tmp_path / "adapter")
    assert (config.rank, config.alpha, len(lora_layers(ours))) == (4, 16, 6)
    assert relative_diff(logits(ours), logits(peft_model.eval())) <= 1e-5


# --- the trainer, as users run it, and the loader's --lora_weight ---------------------------------

@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """A tiny base model saved as the trainers save one (fp16 .pth + .json config), to adapt."""
    path = tmp_path_factory.mktemp("base") / "full_sft_64.pth"
    save_weights(base_model(), path)
    return path


def lora_flags(out, data, base, max_steps: int, *extra: str) -> list[str]:
    # A high learning rate so that a few steps move the adapters measurably.
    return tiny_flags(out, data, "--from_weight", str(base), "--accumulation_steps", "1", "--learning_rate", "1e-2",
                      "--lora_name", "lora_identity", "--max_steps", str(max_steps), *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data, base_weights):
    """An uninterrupted 8-step run: out/lora/lora_identity_64.pth and its metrics."""
    out = tmp_path_factory.mktemp("lora")
    run_trainer("train_lora.py", lora_flags(out, small_data["sft"], base_weights, 8))
    return out


def test_train_lora_saves_only_the_adapter_and_leaves_the_base_alone(trained, base_weights):
    adapter = torch.load(trained / "out" / "lora" / "lora_identity_64.pth", weights_only=True)
    assert len(adapter) == 2 * 2 * 7 and all(".lora." in key for key in adapter)
    config = LoRAConfig.from_dict(json.loads((trained / "out" / "lora" / "lora_identity_64.json").read_text()))
    assert config == LoRAConfig()
    resume = torch.load(trained / "ckpt" / "lora_identity_64_resume.pth", weights_only=False)
    assert len(resume["optimizer"]["state"]) == len(adapter)  # the optimizer only ever saw the adapters
    for key, tensor in torch.load(base_weights, weights_only=True).items():
        assert torch.equal(resume["model"][key], tensor.float()), f"{key} changed during LoRA training"
    assert len(losses(trained / "out" / "lora_identity_64.metrics.jsonl")) == 8


def test_save_lora_writes_the_trainers_adapter_files_byte_for_byte(trained, base_weights, tmp_path):
    """An adapter the trainer wrote, loaded and saved again with `save_lora` (and the trainer's record of
    how it was trained, which its sidecar carries), gives the same two files."""
    adapter = trained / "out" / "lora" / "lora_identity_64.pth"
    model = load_pth(base_weights, MiniMindConfig(**PRESETS["tiny"]))
    load_lora(model, adapter)
    record = json.loads(adapter.with_suffix(".json").read_text())["train_args"]
    assert record["script"] == "train_lora.py" and record["flags"]["lora_rank"] == 8
    save_lora(model, tmp_path / "again.pth", {"train_args": record})
    assert (tmp_path / "again.pth").read_bytes() == adapter.read_bytes()
    assert (tmp_path / "again.json").read_bytes() == adapter.with_suffix(".json").read_bytes()


def test_lora_weight_flag_merges_the_adapter_into_the_loaded_model(trained, base_weights):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    model, _ = load_from_args(parser.parse_args(["--load_from", str(base_weights), "--lora_weight", "lora_identity",
                                                 "--save_dir", str(trained / "out"), "--device", "cpu", "--dtype", "float32"]))
    assert not lora_layers(model)  # merged: it runs as fast as the base model
    base = load_pth(base_weights, MiniMindConfig(**PRESETS["tiny"])).eval()
    base_logits = logits(base)
    load_lora(base, trained / "out" / "lora" / "lora_identity_64.pth")  # the adapters kept apart
    assert relative_diff(logits(model), logits(base)) <= 1e-5
    assert relative_diff(logits(model), base_logits) > 1e-3  # and the adapter was applied
    by_path, _ = load_model_and_tokenizer(str(base_weights), lora_weight=str(trained / "out" / "lora" / "lora_identity_64.pth"),
                                          device="cpu", dtype="float32")
    assert torch.equal(logits(by_path), logits(model))


def test_convert_model_merges_an_adapter_and_exports_it_for_peft(trained, base_weights, tmp_path):
    adapter = trained / "out" / "lora" / "lora_identity_64.pth"
    reference = load_pth(base_weights, MiniMindConfig(**PRESETS["tiny"])).eval()
    load_lora(reference, adapter)
    # --merge_lora: the written .pth holds W + alpha/r * B A, rounded once to the stored fp16.
    convert_model.main([str(base_weights), str(tmp_path / "merged_64.pth"), "--to", "pth", "--merge_lora", str(adapter)])
    written = torch.load(tmp_path / "merged_64.pth", weights_only=True)
    expected = {key: tensor.half() for key, tensor in merged_copy(reference).state_dict().items()}
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    # --to peft, on transformers' own Llama converted from the base: PEFT gives our adapter's logits.
    convert_model.main([str(base_weights), str(tmp_path / "llama"), "--to", "llama"])
    convert_model.main([str(adapter), str(tmp_path / "adapter"), "--to", "peft"])
    llama = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(llama, str(tmp_path / "adapter")).eval()
    assert relative_diff(logits(peft_model), logits(reference)) <= 1e-5


def test_sigkill_then_resume_continues_exactly(trained, small_data, base_weights, tmp_path):
    expected = losses(trained / "out" / "lora_identity_64.metrics.jsonl")
    flags = lora_flags(tmp_path, small_data["sft"], base_weights, 8, "--save_interval", "1", "--from_resume", "1")
    resumed = kill_then_resume("train_lora.py", flags, tmp_path / "out" / "lora_identity_64.metrics.jsonl", [4])
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= 1e-5, f"step {step}: {resumed[step]} vs {loss}"


def test_torchrun_two_processes_stay_in_sync(small_data, base_weights, tmp_path):
    torchrun("train_lora.py", lora_flags(tmp_path, small_data["sft"], base_weights, 3))
    assert_ranks_in_sync(tmp_path / "ckpt", "lora_identity_64")  # incl. A's random init: rank 0's everywhere
    assert (tmp_path / "out" / "lora" / "lora_identity_64.pth").exists()
