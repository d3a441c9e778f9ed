"""scripts/convert_model.py: a .pth and the HF directories made from it are the same model.

Each directory is read by an independent reader — transformers' own LlamaForCausalLM /
Qwen3ForCausalLM, AutoModelForCausalLM with trust_remote_code (in a process that cannot import this
repo), `pipeline` — and converted back to a .pth that must equal the original tensor for tensor.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen3ForCausalLM, pipeline

from model.loader import BUNDLED_TOKENIZER, load_pth
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.convert_model import main as convert
from test_model import make_model, max_relative_diff, random_ids

# Overrides of the tiny preset (hidden 64, 2 layers).
LAYOUTS = {
    "minimind2": {},
    "minimind3": dict(head_dim=24, intermediate_size=160, rms_norm_eps=1e-6, qk_norm=True),  # head_dim != 64 / 4
    "moe": dict(use_moe=True),
    "yarn": dict(inference_rope_scaling=True, max_position_embeddings=32768),
}
READERS = {"hf": AutoModelForCausalLM, "llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}
CLASS_NAMES = {"hf": "MiniMindForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MESSAGES = [{"role": "user", "content": "你好，请介绍一下你自己。"}]


def save_pth(model: MiniMindForCausalLM, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The trainers' format: a state dict, and the config as `<stem>.json` beside it."""
    torch.save({name: tensor.to(dtype) for name, tensor in model.state_dict().items()}, path)
    path.with_suffix(".json").write_text(model.config.to_json_string(), encoding="utf-8")
    return path


def read_back(directory: Path, target: str):
    return READERS[target].from_pretrained(str(directory), trust_remote_code=True).eval()


def comparable(config: MiniMindConfig) -> dict:
    ignored = {"transformers_version", "dtype", "architectures", "auto_map"}
    return {key: value for key, value in config.to_dict().items() if key not in ignored}


@pytest.mark.parametrize("layout, target", [("minimind2", "hf"), ("minimind2", "llama"), ("minimind3", "hf"),
                                            ("minimind3", "qwen3"), ("moe", "hf"), ("yarn", "hf"), ("yarn", "llama")])
def test_round_trip(tmp_path, capsys, layout, target):
    model = make_model(**LAYOUTS[layout])
    original = save_pth(model, tmp_path / "full_sft_64.pth")
    directory = tmp_path / f"{layout}-{target}"
    convert([str(original), str(directory), "--to", target])
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("model.safetensors", "config.json", "tokenizer.json"))

    converted = read_back(directory, target)
    assert type(converted).__name__ == CLASS_NAMES[target]
    ids = random_ids(length=40)
    # far positions for YaRN, where its stretched frequencies change the angles
    positions = torch.arange(3000, 3040).expand(2, -1) if layout == "yarn" else None
    with torch.no_grad():
        assert max_relative_diff(converted(ids, position_ids=positions).logits,
                                 model(ids, position_ids=positions).logits) <= 1e-4

    back = tmp_path / "back.pth"
    convert([str(directory), str(back)])
    expected, actual = torch.load(original, weights_only=True), torch.load(back, weights_only=True)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name
    assert comparable(MiniMindConfig.from_json_file(str(back.with_suffix(".json")))) == comparable(model.config)


def test_pth_written_loads_strictly_with_its_sidecar(tmp_path):
    """--to pth writes through model/weights.py: the loader rebuilds the model from the sidecar alone
    (the fallback fits nothing here), strictly, and the atomic writes leave no temporary file."""
    model = make_model(**LAYOUTS["minimind3"])
    convert([str(save_pth(model, tmp_path / "m.pth")), str(tmp_path / "hf")])
    convert([str(tmp_path / "hf"), str(tmp_path / "out" / "back_64.pth")])
    back = load_pth(tmp_path / "out" / "back_64.pth", MiniMindConfig())
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, model(ids).logits)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["back_64.json", "back_64.pth"]


def test_yarn_written_as_rope_parameters(tmp_path):
    convert([str(save_pth(make_model(**LAYOUTS["yarn"]), tmp_path / "m.pth")), str(tmp_path / "llama"), "--to", "llama"])
    rope = json.loads((tmp_path / "llama" / "config.json").read_text())["rope_parameters"]
    assert rope == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 2048,
                    "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}


def test_dtype_auto_keeps_half_precision(tmp_path):
    """The trainers' fp16 .pth stays fp16 unless asked otherwise, and comes back unchanged."""
    original = save_pth(make_model(), tmp_path / "full_sft_64.pth", torch.float16)
    convert([str(original), str(tmp_path / "llama"), "--to", "llama"])
    convert([str(original), str(tmp_path / "fp32"), "--dtype", "float32"])
    for directory, dtype in (("llama", torch.float16), ("fp32", torch.float32)):
        with safe_open(str(tmp_path / directory / "model.safetensors"), "pt") as weights:
            assert {weights.get_tensor(name).dtype for name in weights.keys()} == {dtype}
    convert([str(tmp_path / "llama"), str(tmp_path / "back.pth")])
    expected, actual = torch.load(original, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert all(actual[name].dtype == torch.float16 and torch.equal(actual[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("layout, target, advice", [("moe", "llama", "MoE"), ("moe", "qwen3", "MoE"),
                                                    ("minimind3", "llama", "--to qwen3"),
                                                    ("minimind2", "qwen3", "--to llama")])
def test_refuses_layouts_the_plain_class_cannot_hold(tmp_path, layout, target, advice):
    original = save_pth(make_model(**LAYOUTS[layout]), tmp_path / "m.pth")
    with pytest.raises(SystemExit) as stopped:
        convert([str(original), str(tmp_path / "out"), "--to", target])
    assert advice in str(stopped.value.code) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, target", [("minimind2", "hf"), ("minimind2", "llama"), ("minimind3", "qwen3")])
def test_chat_as_in_transformers_docs(tmp_path, layout, target):
    """pipeline("text-generation") with messages, and apply_chat_template + generate, on the directory."""
    reference = make_model(**LAYOUTS[layout])
    directory = tmp_path / "chat"
    convert([str(save_pth(reference, tmp_path / "m.pth")), str(directory), "--to", target])

    chat = pipeline("text-generation", model=str(directory), trust_remote_code=True)
    reply = chat(MESSAGES, max_new_tokens=8, min_new_tokens=4, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"]

    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True)
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)).apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                                   tokenize=False)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    # vLLM stops a chat at generation_config.json's eos: it must be <|im_end|>, the end of an assistant turn
    written = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    assert written["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outputs = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert outputs.shape[1] > inputs["input_ids"].shape[1]
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert torch.equal(outputs, expected)


SELF_CONTAINED_CHECK = """
import sys
sys.modules["model"] = None  # this repo's package: importing it now fails, so only the copied code can serve
import torch
from transformers import AutoModelForCausalLM
directory, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.load(ids_file)).logits
torch.save({"module": type(model).__module__, "logits": logits}, out_file)
"""


def test_our_directory_loads_without_the_repo(tmp_path):
    """Isolated mode (-I: no PYTHONPATH, no cwd on sys.path), another working directory, and the
    `model` package blocked: the class must come from model_minimind.py in the directory itself."""
    model = make_model(use_moe=True)
    directory = tmp_path / "ours"
    convert([str(save_pth(model, tmp_path / "m.pth")), str(directory)])
    assert (directory / "model_minimind.py").exists()
    ids = random_ids()
    torch.save(ids, tmp_path / "ids.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run([sys.executable, "-I", "-c", SELF_CONTAINED_CHECK, str(directory), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], cwd=workdir, env=env, check=True, timeout=120)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["module"].startswith("transformers_modules.")
    with torch.no_grad():
        assert max_relative_diff(result["logits"], model(ids).logits) <= 1e-4
