"""The shared loader (model/loader.py) and eval_llm.py: every kind of `--load_from` loads the same
weights strictly, on/off flags read the same everywhere, streaming equals `generate`, and the
evaluation numbers are the ones computed by hand. (How conversations are trimmed: test_chat_format.py.)"""
import argparse
import ast
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from dataset.lm_dataset import dataset_for_file
from model.chat_format import render_prompt
from model.loader import add_switch, chat_stream, load_from_args, load_model_and_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_LLM = REPO_ROOT / "eval_llm.py"


def import_eval_llm():
    spec = importlib.util.spec_from_file_location("eval_llm", EVAL_LLM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_llm = import_eval_llm()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])).eval()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny_model):
    """out/full_sft_64.pth + full_sft_64.json, written by the trainers' own saver."""
    directory = tmp_path_factory.mktemp("out")
    save_weights(tiny_model, directory / "full_sft_64.pth")
    return directory


def half_rounded(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """What a .pth holds: the weights rounded to fp16."""
    copy = MiniMindForCausalLM(model.config).eval()
    copy.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return copy


def logits(model, ids=torch.tensor([[1, 300, 301, 302, 2]])) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def run_eval_llm(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVAL_LLM), "--device", "cpu", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd)


# --- loading ----------------------------------------------------------------------------------

def test_pth_with_sidecar_round_trip(weights_dir, tiny_model):
    model, tokenizer = load_model_and_tokenizer(str(weights_dir / "full_sft_64.pth"), device="cpu", dtype="float32")
    assert isinstance(model, MiniMindForCausalLM) and model.config.hidden_size == 64 and not model.training
    assert model.dtype == torch.float32 and len(tokenizer) == 6400
    torch.testing.assert_close(logits(model), logits(half_rounded(tiny_model)))


def test_native_name_under_save_dir(weights_dir, tiny_model):
    """`--load_from model --weight full_sft --save_dir D` reads D/full_sft_<hidden>.pth, as the original."""
    model, _ = load_model_and_tokenizer("model", weight="full_sft", save_dir=str(weights_dir), preset="tiny", device="cpu", dtype="float32")
    torch.testing.assert_close(logits(model), logits(half_rounded(tiny_model)))
    with pytest.raises(FileNotFoundError, match="pretrain_64.pth"):
        load_model_and_tokenizer("model", weight="pretrain", save_dir=str(weights_dir), preset="tiny", device="cpu")


def test_pth_without_sidecar_takes_the_size_flags(tmp_path):
    torch.manual_seed(1)
    original = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
    save_weights(original, tmp_path / "pretrain_64.pth")
    (tmp_path / "pretrain_64.json").unlink()
    model, _ = load_model_and_tokenizer(str(tmp_path / "pretrain_64.pth"), hidden_size=64, num_hidden_layers=2, device="cpu", dtype="float32")
    torch.testing.assert_close(logits(model), logits(half_rounded(original)))
    with pytest.raises(ValueError, match="size flags"):  # strict: a wrong size is an error, not a partial load
        load_model_and_tokenizer(str(tmp_path / "pretrain_64.pth"), hidden_size=64, num_hidden_layers=3, device="cpu")


def test_our_hf_directory(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), device="cpu", dtype="float32")
    assert isinstance(model, MiniMindForCausalLM)
    assert tokenizer.chat_template  # the directory has none: the bundled tokenizer is used
    torch.testing.assert_close(logits(model), logits(tiny_model))


def test_hf_directory_with_a_missing_tensor_is_refused(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_model_and_tokenizer(str(tmp_path), device="cpu")


def test_any_transformers_chat_model_loads(qwen_dir):
    model, tokenizer = load_model_and_tokenizer(str(qwen_dir), device="cpu")
    assert isinstance(model, Qwen2ForCausalLM)
    assert tokenizer.name_or_path == str(qwen_dir)
    stream = chat_stream(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0)
    assert len("".join(stream)) > 0 and stream.finish_reason in ("stop", "length")


def test_int8_layers_compute_the_dequantized_matmul_and_keep_the_logits(weights_dir):
    """Each int8 layer equals x @ (scale * int8)^T (up to its bf16 activations), and the model's
    next-token choice survives quantization on almost every position."""
    path = str(weights_dir / "full_sft_64.pth")
    exact, _ = load_model_and_tokenizer(path, device="cpu", dtype="float32")
    quantized, _ = load_from_args(eval_llm.parse_args(["--load_from", path, "--device", "cpu", "--dtype", "float32",
                                                       "--quantize", "int8"]))
    layer = quantized.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Int8Linear" and layer.weight_int8.dtype == torch.int8
    x = torch.randn(3, 64)
    dequantized = layer.weight_int8.float() * layer.scale.float()[:, None]
    torch.testing.assert_close(layer(x), x.bfloat16().float() @ dequantized.T, rtol=2e-2, atol=2e-2)
    weight = exact.model.layers[0].mlp.up_proj.weight.detach()
    # half a step of rounding, plus the scale's own bf16 rounding (2^-9 relative)
    assert ((dequantized - weight).abs() <= layer.scale.float()[:, None] / 2 + weight.abs() * 2 ** -8).all()
    ids = torch.randint(3, 6400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (exact(ids).logits.argmax(-1) == quantized(ids).logits.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_and_tokenizer(str(tmp_path / "nowhere"), device="cpu")


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a file imports from."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    return {module.split(".")[0] for module in modules}


def test_loader_and_eval_llm_never_import_trainer_code():
    for path in (REPO_ROOT / "model" / "loader.py", EVAL_LLM):
        assert "trainer" not in imported_packages(path), path


def test_eval_llm_imports_no_script():
    """scripts/ are programs, not a library: what eval_llm.py shares with them lives in model/."""
    assert "scripts" not in imported_packages(EVAL_LLM)


# --- flags --------------------------------------------------------------------------------------

def test_a_switch_takes_0_1_or_stands_alone():
    parser = argparse.ArgumentParser()
    add_switch(parser, "--speed", help="")
    add_switch(parser, "--thinking", "--think", default=None, help="")
    assert vars(parser.parse_args([])) == {"speed": 0, "thinking": None}
    assert vars(parser.parse_args(["--speed", "--think"])) == {"speed": 1, "thinking": 1}
    assert vars(parser.parse_args(["--speed", "0", "--thinking", "0"])) == {"speed": 0, "thinking": 0}
    assert vars(parser.parse_args(["--speed", "1", "--think", "1"])) == {"speed": 1, "thinking": 1}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speed", "2"])


@pytest.mark.parametrize("argv, thinking, rope_scaling", [
    ([], None, 0),
    (["--open_thinking", "1", "--inference_rope_scaling"], 1, 1),
    (["--enable_thinking", "0", "--inference_rope_scaling", "0"], 0, 0),
    (["--enable_thinking", "--inference_rope_scaling", "1"], 1, 1),
])
def test_eval_llm_thinking_flag_and_its_alias(argv, thinking, rope_scaling):
    args = eval_llm.parse_args(argv)
    assert (args.open_thinking, args.inference_rope_scaling) == (thinking, rope_scaling)


@pytest.mark.parametrize("switch, yarn", [([], False), (["--inference_rope_scaling"], True),
                                          (["--inference_rope_scaling", "0"], False)])
def test_the_rope_scaling_switch_reaches_the_model(weights_dir, switch, yarn):
    args = eval_llm.parse_args(["--load_from", str(weights_dir / "full_sft_64.pth"), "--device", "cpu", *switch])
    model, _ = load_from_args(args)
    assert model.config.inference_rope_scaling is yarn


# --- streaming --------------------------------------------------------------------------------

def test_chat_stream_equals_greedy_generate(tiny_model, tokenizer):
    messages = [{"role": "user", "content": "3 加 2 等于多少？"}]
    stream = chat_stream(tiny_model, tokenizer, messages, max_new_tokens=12, temperature=0)
    text = "".join(stream)
    ids = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids
    output = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert text == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    assert stream.prompt_tokens == ids.shape[1]
    assert stream.completion_tokens + (stream.finish_reason == "stop") == output.shape[1] - ids.shape[1]
    assert stream.finish_reason == ("stop" if output[0, -1] == 2 else "length")


def test_chat_stream_is_seeded_and_closing_stops_it(tiny_model, tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    sample = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert "".join(chat_stream(tiny_model, tokenizer, messages, **sample)) == \
           "".join(chat_stream(tiny_model, tokenizer, messages, **sample))
    with chat_stream(tiny_model, tokenizer, messages, max_new_tokens=10_000, temperature=1.0, seed=3) as stream:
        next(iter(stream))
    assert stream.finish_reason == "cancelled" and stream.completion_tokens < 10_000


# --- the script ---------------------------------------------------------------------------------

def test_canned_mode_prints_answers(weights_dir, tmp_path):
    result = run_eval_llm("--load_from", str(weights_dir / "full_sft_64.pth"), "--max_new_tokens", "6",
                          "--seed", "0", "--show_speed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("🤖: ") == len(eval_llm.CANNED_PROMPTS)
    assert "3 加 2 等于多少？" in result.stdout and "tokens/s]" in result.stdout


def test_interactive_chat_with_a_qwen2_model(qwen_dir):
    result = run_eval_llm("--load_from", str(qwen_dir), "--mode", "chat", "--historys", "1", "--max_new_tokens", "4",
                          "--temperature", "0", stdin="你好\nWhat is 3 plus 4?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("🤖: ") == 2
    assert "Qwen2ForCausalLM" in result.stderr


def test_missing_weights_exit_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="full_sft_512.pth not found"):
        eval_llm.main(["--save_dir", str(tmp_path), "--weight", "full_sft", "--device", "cpu"])


def test_eval_mode_prints_json_with_accuracy_and_perplexity(weights_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    eval_llm.main(["--load_from", str(weights_dir / "full_sft_64.pth"), "--device", "cpu",
                   "--eval_file", str(REPO_ROOT / "dataset/demo/eval.jsonl"), "--ppl_file", str(REPO_ROOT / "dataset/demo/sft.jsonl"),
                   "--max_samples", "24", "--batch_size", "8", "--max_new_tokens", "3", "--eval_out", str(out)])
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["samples"] == 24 and 0.0 <= summary["accuracy"] <= 1.0
    assert sum(group["samples"] for group in summary["per_task"].values()) == 24
    assert summary["documents"] == 24 and summary["tokens"] > 0 and math.isfinite(summary["ppl"])
    assert "accuracy" in stdout.splitlines()[0]  # the table comes first
    assert len(json.loads(out.read_text(encoding="utf-8"))["predictions"]) == 24


BOOKING = [{"role": "user", "content": "我想订一张去上海的机票。"}, {"role": "assistant", "content": "好的，请告诉我出发地和日期。"},
           {"role": "user", "content": "从北京出发，明天。"}, {"role": "user", "content": "多少钱？"}]


@pytest.mark.parametrize("flags, sent", [
    ([], BOOKING),
    (["--history_mode", "query_utterance"], [{"role": "user", "content": "我想订一张去上海的机票。\n从北京出发，明天。\n多少钱？"}]),
    (["--history_mode", "query_utterance", "--history_utterances", "1"], [{"role": "user", "content": "从北京出发，明天。\n多少钱？"}]),
    (["--history_mode", "none"], BOOKING[-1:]),
])
def test_history_mode_flags_shape_the_prompts_of_multi_turn_records(weights_dir, tokenizer, tmp_path, capsys, flags, sent):
    records = jsonl(tmp_path / "booking.jsonl", [{"conversations": BOOKING, "answer": "800"}])
    eval_llm.main(["--load_from", str(weights_dir / "full_sft_64.pth"), "--device", "cpu", "--eval_file", str(records),
                   "--max_new_tokens", "2", *flags])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["history_mode"] == (flags[1] if flags else "full")
    assert summary["mean_prompt_tokens"] == len(tokenizer(render_prompt(tokenizer, sent), add_special_tokens=False).input_ids)


def test_an_unknown_history_mode_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        eval_llm.parse_args(["--history_mode", "recent"])
    assert "invalid choice: 'recent'" in capsys.readouterr().err


def test_a_malformed_line_names_file_and_line(tmp_path, weights_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=re.escape(f"{bad}:2:")):
        eval_llm.main(["--load_from", str(weights_dir / "full_sft_64.pth"), "--device", "cpu", "--ppl_file", str(bad)])


# --- the numbers ----------------------------------------------------------------------------------

def test_exact_match_scoring_by_hand():
    records = [{"answer": "19", "task": "add"}, {"answer": "7", "task": "add"},
               {"answer": "300", "task": "convert"}, {"answer": "5", "task": "convert"}, {"answer": "2", "task": "count"}]
    predictions = ["19", "The answer is 8", "<think>\n3 m = 300 cm\n</think>\n\n答案是 300。", "5 个", ""]
    summary = eval_llm.score(records, predictions)
    assert (summary["samples"], summary["correct"], summary["accuracy"]) == (5, 2, 0.4)
    assert summary["per_task"] == {"add": {"samples": 2, "correct": 1, "accuracy": 0.5},
                                   "convert": {"samples": 2, "correct": 1, "accuracy": 0.5},
                                   "count": {"samples": 1, "correct": 0, "accuracy": 0.0}}


def summed_nll(model, ids: list[int], scored: list[int]) -> float:
    """Next-token NLL of the tokens at positions `scored`, one document alone, no padding."""
    log_probs = F.log_softmax(logits(model, torch.tensor([ids]))[0].float(), dim=-1)
    return -sum(float(log_probs[t - 1, ids[t]]) for t in scored)


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def test_perplexity_of_text_by_hand(tiny_model, tokenizer, tmp_path):
    texts = ["Did I ever live?", "当时是同事极力推荐这本书。", "short", "A somewhat longer sentence, with punctuation; and more."]
    nll, count = 0.0, 0
    for text in texts:
        ids = [1] + tokenizer(text, add_special_tokens=False).input_ids + [2]
        nll += summed_nll(tiny_model, ids, range(1, len(ids)))
        count += len(ids) - 1
    dataset = dataset_for_file(jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts]), tokenizer, 512)
    result = eval_llm.perplexity(tiny_model, dataset, batch_size=3)
    assert result["tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_perplexity_of_conversations_counts_assistant_tokens_only(tiny_model, tokenizer, tmp_path):
    conversation = [{"role": "user", "content": "3 加 2 等于多少？"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "What is 7 times 5?"}, {"role": "assistant", "content": "35"}]
    ids = tokenizer(render_prompt(tokenizer, conversation, add_generation_prompt=False), add_special_tokens=False).input_ids
    scored = []
    for i in (1, 3):  # each reply: from after its generation prompt through its <|im_end|>
        start = len(tokenizer(render_prompt(tokenizer, conversation[:i]), add_special_tokens=False).input_ids)
        end = ids.index(2, start)
        scored += range(start, end + 1)
    assert [tokenizer.decode([ids[t]]) for t in scored].count("<|im_end|>") == 2
    nll = summed_nll(tiny_model, ids, scored)
    dataset = dataset_for_file(jsonl(tmp_path / "chat.jsonl", [{"conversations": conversation}]), tokenizer, 512)
    result = eval_llm.perplexity(tiny_model, dataset, batch_size=1)
    assert result["tokens"] == len(scored)
    assert result["ppl"] == pytest.approx(math.exp(nll / len(scored)), rel=1e-4)


def test_perplexity_by_length_with_yarn_off_and_on(tokenizer, tmp_path, capsys):
    """Each window scored alone, by hand: exp of the mean cross-entropy of every token but a window's
    first, over the windows of the longest length that fit, for the model built with YaRN off and on.
    The weights are scaled up so that positions matter: the two differ by more than the tolerance."""
    torch.manual_seed(0)
    sharp = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])).eval()
    with torch.no_grad():
        for parameter in sharp.parameters():
            if parameter.dim() > 1:
                parameter.mul_(10)
    save_weights(sharp, tmp_path / "sharp_64.pth")
    text = tmp_path / "long.txt"
    text.write_text("滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。" * 40, encoding="utf-8")
    plot = tmp_path / "ppl.png"
    eval_llm.main(["--load_from", str(tmp_path / "sharp_64.pth"), "--device", "cpu", "--dtype", "float32",
                   "--eval_file", str(text), "--ppl_lengths", "32,128", "--ppl_plot", str(plot)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = torch.tensor(tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
    ids = ids[:len(ids) // 128 * 128]
    models = {key: MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"], inference_rope_scaling=scaling)).eval()
              for key, scaling in (("yarn_off", False), ("yarn_on", True))}
    for model in models.values():
        model.load_state_dict(half_rounded(sharp).state_dict())
    for row in summary["by_length"]:
        windows = ids.view(-1, row["length"])
        assert row["windows"] == windows.shape[0]
        for key, model in models.items():
            with torch.no_grad():
                nll = F.cross_entropy(model(input_ids=windows).logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
            assert row[key] == pytest.approx(math.exp(nll), rel=1e-4)
        assert row["yarn_on"] != pytest.approx(row["yarn_off"], rel=1e-4)  # so swapping them would fail
    assert summary["tokens"] == len(ids) and plot.stat().st_size > 0
