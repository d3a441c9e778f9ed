"""The bundled tokenizer: MiniMind's special ids, lossless byte-level round trips, and a chat
template that renders exactly what MiniMind2's renders."""
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.train_tokenizer import CHAT_TEMPLATE, main as train_tokenizer_main

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((REPO_ROOT.parent / "shared" / "chat_template_examples.json").read_text(encoding="utf-8"))
SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_special_token_ids_and_roles(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.model_max_length == 32768


def test_vocabulary_has_6400_ids(tokenizer):
    assert len(tokenizer) == 6400
    assert max(tokenizer.get_vocab().values()) == 6399


def test_plain_encoding_adds_no_special_tokens(tokenizer):
    ids = tokenizer("hello").input_ids
    assert not set(ids) & {0, 1, 2}


def test_special_token_text_encodes_to_its_id(tokenizer):
    """Rendered chat text must tokenize its markers as single ids (the SFT loss mask looks for them)."""
    assert tokenizer("<|im_start|>assistant\nhi<|im_end|>").input_ids[0] == 1
    assert tokenizer("<|im_start|>assistant\nhi<|im_end|>").input_ids[-1] == 2


def test_every_digit_is_its_own_token(tokenizer):
    """Arithmetic is learnable digit by digit only if "30" and "31" share the token of 3: the bundled
    tokenizer never merges a digit with anything."""
    text = "What number comes after 30? 31. 47 + 28 = 75，1999 年"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all(len(piece) == 1 for piece in pieces if any(c.isdigit() for c in piece)), pieces
    assert {tokenizer.encode(str(d)) == [tokenizer.convert_tokens_to_ids(str(d))] for d in range(10)} == {True}


def test_gpt2_split_keeps_digit_runs_as_minimind_does(tmp_path):
    """`--split gpt2` is MiniMind's pre-tokenizer: a frequent number becomes one token."""
    corpus = tmp_path / "numbers.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{n} + 1 = {n + 1}. "}) + "\n" for n in range(10, 40)) * 20)
    for split, merged in (("gpt2", True), ("qwen2", False)):
        train_tokenizer_main(["--data_path", str(corpus), "--vocab_size", "300", "--split", split,
                              "--out_dir", str(tmp_path / split)])
        ids = AutoTokenizer.from_pretrained(tmp_path / split).encode("25 + 1 = 26")
        assert (len(ids) < 9) == merged, (split, ids)  # 9 pieces when every digit stands alone


@pytest.mark.parametrize("text", [
    "你好，世界！今天北京的天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(2, 3))\n",
    "emoji 😀🎉👨‍👩‍👧 and accents: café naïve Straße",
    "tabs\tand\t\tnewlines\n\n\nand    many     spaces   ",
    "  leading and trailing spaces  ",
    "混合 mixed 文本 with 数字 12345 and 符号 ©®™ ½ → ∞",
    "\x00\x01 control bytes \r\n",
])
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("case", SPEC["cases"], ids=[case["case"] for case in SPEC["cases"]])
def test_renders_minimind2_reference_text(tokenizer, case):
    tools = SPEC["tools"] if case["with_tools"] else None
    assert render(tokenizer, case["messages"], tools=tools, **case["kwargs"]) == case["rendered"]


def test_tool_call_arguments_as_dict_or_json_string_render_the_same(tokenizer):
    def conversation(arguments):
        call = {"type": "function", "function": {"name": "add", "arguments": arguments}}
        return [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    as_dict = render(tokenizer, conversation({"a": 1, "b": 2}), tools=SPEC["tools"])
    as_string = render(tokenizer, conversation('{"a": 1, "b": 2}'), tools=SPEC["tools"])
    assert as_dict == as_string
    assert as_dict.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
                            "\n</tool_call><|im_end|>\n")


def test_tool_call_after_text_starts_on_a_new_line(tokenizer):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me add.", "tool_calls": [call]}]
    assert render(tokenizer, messages).endswith(
        'assistant\nLet me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n')


def test_reasoning_content_renders_as_think_block(tokenizer):
    messages = [{"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": "5", "reasoning_content": "\n2 + 3 = 5\n"}]
    assert render(tokenizer, messages) == (
        SYSTEM_DEFAULT + "<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5\n</think>\n\n5<|im_end|>\n")


def test_empty_reasoning_content_renders_like_none(tokenizer):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    empty = [plain[0], {**plain[1], "reasoning_content": ""}]
    assert render(tokenizer, plain) == render(tokenizer, empty)


def test_consecutive_tool_responses_share_one_user_turn(tokenizer):
    call = {"type": "function", "function": {"name": "add", "arguments": {}}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call, call, call]},
        {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "done"},
        {"role": "tool", "content": "4"},
    ]
    text = render(tokenizer, messages, add_generation_prompt=True)
    assert text.count("<|im_start|>user") == 3
    assert ("<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>\n"
            "<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\ndone<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_tools_without_system_message_have_no_default_prompt(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "hi"}], tools=SPEC["tools"])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "You are a helpful assistant" not in text


def test_later_system_message_is_its_own_turn(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    assert render(tokenizer, messages) == SYSTEM_DEFAULT + (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n")


def test_enable_thinking_true_adds_nothing(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert render(tokenizer, messages, add_generation_prompt=True, enable_thinking=True) == render(
        tokenizer, messages, add_generation_prompt=True)


def test_train_tokenizer_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": "你好世界，hello world! 12 + 7 = 19\n\tindented"},
            {"conversations": [{"role": "user", "content": "今天天气怎么样？"},
                               {"role": "assistant", "content": "晴天。", "reasoning_content": "看看窗外"}]}]
    corpus.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows * 20) + "\n", encoding="utf-8")
    out_dir = tmp_path / "tok"
    train_tokenizer_main(["--data_path", str(corpus), "--vocab_size", "300", "--out_dir", str(out_dir)])

    small = AutoTokenizer.from_pretrained(out_dir)
    assert len(small) == 300
    assert small.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (small.pad_token_id, small.bos_token_id, small.eos_token_id) == (0, 1, 2)
    assert small.chat_template == CHAT_TEMPLATE
    text = "完全没见过的句子 with unseen words 🚀"
    assert small.decode(small.encode(text)) == text
    case = SPEC["cases"][3]
    assert render(small, case["messages"], tools=SPEC["tools"], **case["kwargs"]) == case["rendered"]


def test_bad_training_line_names_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: "):
        train_tokenizer_main(["--data_path", str(corpus), "--vocab_size", "300", "--out_dir", str(tmp_path / "t")])
