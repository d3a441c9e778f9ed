"""The Streamlit web demo (scripts/web_demo.py), driven by Streamlit's own AppTest: the page as a
browser session would run it, with real tiny models and no mocks. Flags reach the page the way
`streamlit run scripts/web_demo.py -- FLAGS` passes them, through sys.argv."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from model.model_lora import LoRAConfig, apply_lora, save_lora
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_DEMO = REPO_ROOT / "scripts" / "web_demo.py"
QUICK = ["--max_new_tokens", "32"]  # short answers keep each test to about a second


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """An out/ directory holding a random tiny MiniMind as the trainers save it (fp16 .pth + .json)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("out")
    save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"])), directory / "full_sft_64.pth")
    return directory


def start_page(monkeypatch, *flags: str, messages: list[dict] | None = None) -> AppTest:
    monkeypatch.setattr(sys, "argv", [str(WEB_DEMO), *flags])
    page = AppTest.from_file(WEB_DEMO, default_timeout=60)
    if messages is not None:
        page.session_state["messages"] = messages
    return page.run()


def conversation(page: AppTest) -> list[tuple[str, str]]:
    """(role, what is displayed) for every chat bubble, in order."""
    return [(bubble.name, " | ".join(str(element.value) for element in bubble.text)) for bubble in page.chat_message]


def seeded(page: AppTest) -> AppTest:
    """Sampling draws from torch's global generator, so seeding it just before a rerun makes the
    answer the same every run (a random tiny model's greedy answer is only newlines)."""
    torch.manual_seed(0)
    return page


def ask(page: AppTest, question: str) -> AppTest:
    return seeded(page).chat_input(key="prompt").set_value(question).run()


def test_without_a_model_the_page_says_how_to_train_one(monkeypatch, tmp_path):
    page = start_page(monkeypatch, "--save_dir", str(tmp_path))
    assert not page.exception
    guidance = " ".join(warning.value for warning in page.warning)
    assert "python trainer/train_pretrain.py" in guidance and "python trainer/train_full_sft.py" in guidance
    assert "HF directory" in guidance
    assert page.chat_input(key="prompt").proto.disabled


def test_a_chat_turn_with_a_trained_minimind(monkeypatch, tmp_path, weights_dir):
    monkeypatch.chdir(tmp_path)  # started from anywhere, not the repo
    page = start_page(monkeypatch, "--save_dir", str(weights_dir), *QUICK)
    assert not page.exception and not page.warning
    assert "full_sft_64.pth" in page.caption[0].value  # the model found in out/ is picked and loaded
    ask(page, "你好，请介绍一下你自己。")
    assert not page.exception
    shown = conversation(page)
    assert [role for role, _ in shown] == ["user", "assistant"]
    assert shown[0][1] == "你好，请介绍一下你自己。"
    answer = page.session_state["messages"][-1]
    assert answer["role"] == "assistant" and answer["content"].strip()
    assert shown[1][1] == answer["content"]  # the streamed answer is what the bubble shows, as text


def test_a_lora_adapter_is_found_under_save_dir(monkeypatch, tmp_path):
    """`--lora_weight NAME` is <save_dir>/lora/NAME_<hidden>.pth, as the trainer writes it, not <repo>/out/lora."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    save_weights(model, tmp_path / "full_sft_64.pth")
    apply_lora(model, LoRAConfig(rank=4))
    save_lora(model, tmp_path / "lora" / "lora_identity_64.pth")
    page = start_page(monkeypatch, "--save_dir", str(tmp_path), "--lora_weight", "lora_identity", *QUICK)
    assert not page.exception and not page.warning
    assert "full_sft_64.pth" in page.caption[0].value
    page = start_page(monkeypatch, "--save_dir", str(tmp_path), "--lora_weight", "lora_missing", *QUICK)
    assert str(tmp_path / "lora" / "lora_missing_64.pth") in page.warning[0].value  # where it looked


@pytest.mark.parametrize("flags, thinking", [([], False), (["--open_thinking", "1"], True), (["--enable_thinking"], True),
                                             (["--enable_thinking", "0"], False)])
def test_the_thinking_flag_and_its_alias_set_the_toggle(monkeypatch, flags, thinking, tmp_path):
    page = start_page(monkeypatch, "--save_dir", str(tmp_path), *flags)
    assert not page.exception
    assert page.toggle(key="thinking").value is thinking


@pytest.mark.parametrize("flags, mode, utterances", [([], "full", 2),
                                                     (["--history_mode", "query_utterance", "--history_utterances", "3"],
                                                      "query_utterance", 3)])
def test_the_history_flags_set_the_sidebar(monkeypatch, tmp_path, flags, mode, utterances):
    page = start_page(monkeypatch, "--save_dir", str(tmp_path), *flags)
    assert not page.exception
    assert page.selectbox(key="history_mode").value == mode
    assert page.slider(key="history_utterances").value == utterances


def test_regenerate_replaces_the_last_answer(monkeypatch, weights_dir):
    messages = [{"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": "第一个回答"},
                {"role": "user", "content": "第二个问题"}, {"role": "assistant", "content": "OLD ANSWER"}]
    page = start_page(monkeypatch, "--save_dir", str(weights_dir), *QUICK, messages=messages)
    seeded(page).button(key="regenerate").click().run()
    assert not page.exception
    after = page.session_state["messages"]
    assert after[:3] == messages[:3]
    assert len(after) == 4 and after[3]["role"] == "assistant" and after[3]["content"] not in ("", "OLD ANSWER")
    assert "OLD ANSWER" not in str(conversation(page))


def test_delete_removes_one_turn(monkeypatch, weights_dir):
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    page = start_page(monkeypatch, "--save_dir", str(weights_dir), *QUICK, messages=messages)
    page.button(key="delete_0").click().run()
    assert not page.exception
    assert page.session_state["messages"] == messages[2:]
    assert conversation(page) == [("user", "second question"), ("assistant", "second answer")]


def test_model_output_is_shown_as_text_never_as_html_or_markdown(monkeypatch, weights_dir):
    attack = "<script>alert(1)</script> **not bold** <img src=x onerror=alert(2)>"
    messages = [{"role": "user", "content": "<b>hi</b>"},
                {"role": "assistant", "content": attack, "reasoning_content": "<script>alert(3)</script>"}]
    page = start_page(monkeypatch, "--save_dir", str(weights_dir), messages=messages)
    assert not page.exception
    user, assistant = page.chat_message
    assert [element.value for element in user.text] == ["<b>hi</b>"]
    assert attack in [element.value for element in assistant.text]  # st.text: shown character for character
    thinking = assistant.expander[0]
    assert [element.value for element in thinking.text] == ["<script>alert(3)</script>"]
    rendered_as_markup = [element.value for element in page.main.markdown] + [element.body for element in page.main.get("html")]
    assert not any("<script>" in value or "not bold" in value for value in rendered_as_markup)


def test_a_transformers_qwen2_chat_model_answers(monkeypatch, qwen_dir):
    page = start_page(monkeypatch, "--load_from", str(qwen_dir), *QUICK)
    assert not page.exception and not page.warning
    assert "Qwen2ForCausalLM" in page.caption[0].value
    ask(page, "What is the capital of France?")
    assert not page.exception
    assert [role for role, _ in conversation(page)] == ["user", "assistant"]
    assert page.session_state["messages"][-1]["content"].strip()


def test_a_reply_that_cannot_fit_says_why_and_keeps_the_question(monkeypatch, qwen_dir):
    page = start_page(monkeypatch, "--load_from", str(qwen_dir), "--max_new_tokens", "512")  # its context: 512
    ask(page, "hello")
    assert not page.exception
    assert "no room for a prompt" in page.error[0].value
    assert page.session_state["messages"] == [{"role": "user", "content": "hello"}]
    assert page.button(key="regenerate") and page.button(key="delete_0")  # lower the limit and retry, or delete


def test_help_runs_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, str(WEB_DEMO), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--load_from" in result.stdout and "--api_base" in result.stdout
