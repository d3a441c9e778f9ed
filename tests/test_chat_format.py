"""The chat format (model/chat_format.py): replies read into reasoning, answer and tool calls,
whole or while they stream, checked against what the chat template itself writes; the history
policy (whole turns, oldest first); and the module stays free of torch."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.chat_format import (PromptTooLong, ReplyParser, bm25_scores, count_tokens, final_answer, fit_history,
                               lexical_terms, render_prompt, select_utterances, split_reasoning, thinking_well_formed,
                               typed_questions)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = {"role": "user", "content": "Weather in Paris?"}
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


def assistant_text(tokenizer, message: dict, tools: list[dict] | None = None) -> str:
    """What the chat template writes for an assistant message: the text a model is trained to reply."""
    rendered = tokenizer.apply_chat_template([QUESTION, message], tools=tools, tokenize=False)
    return rendered.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")


@pytest.mark.parametrize("module", ["model.chat_format", "scripts.chat_openai_api"])
def test_the_format_and_the_api_client_import_no_torch(module):
    """The terminal API client reads the format too, and must start instantly: torch takes seconds."""
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- a whole reply, or the part written so far ----------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>\nsome thought\n</think>\n\nThe answer.", ("some thought", "The answer.")),
    ("some thought\n</think>\n\nThe answer.", ("some thought", "The answer.")),  # the prompt opened the block
    ("Just an answer.", ("", "Just an answer.")),
    ("An answer that mentions <think>.", ("", "An answer that mentions <think>.")),
    ("<think>\nstill thinking", ("still thinking", "")),  # partial: the block is not closed yet
    ("<think>\nthought\n</think>\n\nThe ans", ("thought", "The ans")),
    ("\n<thi", ("", "")),  # partial: the opening tag is still arriving
    ("", ("", "")),
])
def test_split_reasoning_on_complete_and_partial_replies(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "Plain answer."},
    {"role": "assistant", "content": "Answer after thought.", "reasoning_content": "Thought."},
])
def test_split_reasoning_reads_back_what_the_chat_template_writes(tokenizer, message):
    reply = assistant_text(tokenizer, message)
    assert split_reasoning(reply) == (message.get("reasoning_content", ""), message["content"])


@pytest.mark.parametrize("text, expected", [
    ("<think>\n7 + 12 = 19\n</think>\n\n19", "\n\n19"),
    ("<think>a</think>b</think>c", "c"),  # after the last close
    ("19", "19"),
    ("<think>\nran out of tokens while thinking", ""),
])
def test_final_answer_is_what_follows_the_last_think_block(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("reply, expected", [
    ("<think>\nsteps\n</think>\n\n19", True),
    ("  \n<think>steps</think>19", True),  # whitespace before the block is allowed
    ("<think></think>", True),  # empty thought and answer: the format is still right
    ("19 <think>steps</think>", False),  # text before the block
    ("<think>\nsteps, never closed", False),
    ("steps</think>19", False),  # no opening tag
    ("<think>a</think><think>b</think>19", False),  # two blocks
    ("<think>a</think>19</think>", False),
    ("19", False),
])
def test_thinking_well_formed(reply, expected):
    assert thinking_well_formed(reply) is expected


# --- a reply as it streams -----------------------------------------------------------------------

def events_of(text: str, pieces: list[str], **settings) -> list[tuple[str, str]]:
    """The parser's events for `pieces`, consecutive texts of a kind joined, tool calls without their random id."""
    parser, events = ReplyParser(**settings), []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    merged = []
    for kind, value in events:
        value = json.dumps({k: v for k, v in value.items() if k != "id"}) if kind == "tool_call" else value
        if merged and merged[-1][0] == kind == "content" or merged and merged[-1][0] == kind == "reasoning":
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PARSED_CALL = json.dumps({"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}})


@pytest.mark.parametrize("text, settings, expected", [
    ("Hello <b>world</b>", {}, [("content", "Hello <b>world</b>")]),
    ("<think>\nsome thought\n</think>\n\nThe answer.", {}, [("reasoning", "some thought"), ("content", "The answer.")]),
    ("some thought\n</think>\n\nThe answer.", {"starts_thinking": True}, [("reasoning", "some thought"), ("content", "The answer.")]),
    (f"<think>\nr\n</think>\n\n<tool_call>\n{CALL_JSON}\n</tool_call>", {}, [("reasoning", "r"), ("content", f"<tool_call>\n{CALL_JSON}\n</tool_call>")]),
    (f"<think>\nr\n</think>\n\n<tool_call>\n{CALL_JSON}\n</tool_call>", {"parse_tools": True}, [("reasoning", "r"), ("tool_call", PARSED_CALL)]),
    (f"Let me look.\n<tool_call>\n{CALL_JSON}\n</tool_call>\n<tool_call>\n{CALL_JSON}\n</tool_call>", {"parse_tools": True},
     [("content", "Let me look."), ("tool_call", PARSED_CALL), ("tool_call", PARSED_CALL)]),
    ("<tool_call>\nnot json\n</tool_call> ok", {"parse_tools": True}, [("content", "<tool_call>\nnot json\n</tool_call> ok")]),
    ('<tool_call>\n{"name": "get_wea', {"parse_tools": True}, [("content", '<tool_call>\n{"name": "get_wea')]),
    ("<think>\ncut off while thinking\n", {}, [("reasoning", "cut off while thinking")]),
    ("ends with the start of a tag <thi", {"parse_tools": True}, [("content", "ends with the start of a tag <thi")]),
])
def test_reply_parser_piece_by_piece_equals_whole(text, settings, expected):
    settings = {"parse_tools": False, **settings}
    assert events_of(text, [text], **settings) == expected
    assert events_of(text, list(text), **settings) == expected
    assert events_of(text, [text[i:i + 3] for i in range(0, len(text), 3)], **settings) == expected


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "Plain answer."},
    {"role": "assistant", "content": "Answer after thought.", "reasoning_content": "Thought."},
    {"role": "assistant", "content": "Calling.", "reasoning_content": "Need data.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
])
def test_reply_parser_reads_back_what_the_chat_template_writes(tokenizer, message):
    """The template is the format's definition: an assistant message rendered by it parses back to itself."""
    reply = assistant_text(tokenizer, message, WEATHER_TOOLS)
    expected = ([("reasoning", message["reasoning_content"])] if "reasoning_content" in message else []) \
        + [("content", message["content"])] + [("tool_call", PARSED_CALL)] * len(message.get("tool_calls", []))
    assert events_of(reply, list(reply), parse_tools=True) == expected


# --- the history policy --------------------------------------------------------------------------

def conversation_of(turns: int, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "You are MiniMind."}] if system else []
    for i in range(turns - 1):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    return messages + [{"role": "user", "content": "the last question"}]


def prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids)


def test_fit_history_keeps_everything_that_fits(tokenizer):
    messages = conversation_of(4)
    assert fit_history(tokenizer, messages, 10_000) == messages
    assert fit_history(tokenizer, messages, 10_000, keep_turns=1) == messages[:1] + messages[5:]
    assert fit_history(tokenizer, messages, 10_000, keep_turns=0) == [messages[0], messages[-1]]


def test_fit_history_drops_oldest_whole_turns_to_fit(tokenizer):
    messages = conversation_of(4)
    budget = prompt_tokens(tokenizer, messages[:1] + messages[3:]) + 1  # room for the last past turn only
    fitted = fit_history(tokenizer, messages, budget)
    assert fitted == messages[:1] + messages[3:]
    assert prompt_tokens(tokenizer, fitted) <= budget
    no_system = conversation_of(3, system=False)
    assert fit_history(tokenizer, no_system, prompt_tokens(tokenizer, no_system[-1:])) == no_system[-1:]


def test_fit_history_keeps_tool_messages_with_their_turn(tokenizer):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
                {"role": "user", "content": "thanks"}]
    assert fit_history(tokenizer, messages, 10_000, keep_turns=1) == messages
    assert fit_history(tokenizer, messages, 10_000, keep_turns=0) == messages[-1:]


def test_fit_history_never_drops_the_last_user_turn(tokenizer):
    messages = conversation_of(3)
    with pytest.raises(PromptTooLong):
        fit_history(tokenizer, messages, prompt_tokens(tokenizer, [messages[0], messages[-1]]) - 1)


def test_fit_history_without_a_token_budget_needs_no_tokenizer():
    """What an API client sends: the same turns, the fitting to the context left to the server."""
    messages = conversation_of(4)
    assert fit_history(None, messages) == messages
    assert fit_history(None, messages, keep_turns=1) == messages[:1] + messages[5:]
    assert fit_history(None, messages, keep_turns=0) == [messages[0], messages[-1]]


# --- history modes: query-utterance pairing and none ---------------------------------------------

# The example: the query shares no term with the history, so both user utterances are kept.
BOOKING = [{"role": "user", "content": "我想订一张去上海的机票。"},
           {"role": "assistant", "content": "好的，请告诉我出发地和日期。"},
           {"role": "user", "content": "从北京出发，明天。"},
           {"role": "user", "content": "多少钱？"}]


def test_query_utterance_keeps_the_user_utterances_drops_the_assistant_and_is_shorter(tokenizer):
    fitted = fit_history(tokenizer, BOOKING, 10_000, history_mode="query_utterance")
    assert fitted == [{"role": "user", "content": "我想订一张去上海的机票。\n从北京出发，明天。\n多少钱？"}]
    prompt = render_prompt(tokenizer, fitted)
    assert prompt == tokenizer.apply_chat_template(fitted, tokenize=False, add_generation_prompt=True)
    assert "请告诉我出发地和日期" not in prompt and prompt.count("<|im_start|>user") == 1
    assert count_tokens(tokenizer, prompt) < count_tokens(tokenizer, render_prompt(tokenizer, fit_history(tokenizer, BOOKING)))


def test_none_sends_only_the_system_prompt_and_the_query(tokenizer):
    messages = conversation_of(4)
    assert fit_history(tokenizer, messages, 10_000, history_mode="none") == [messages[0], messages[-1]]
    assert fit_history(None, BOOKING, history_mode="none") == BOOKING[-1:]


def test_bm25_picks_the_relevant_utterance_over_more_recent_ones():
    earlier = ["我有 7 个苹果。", "今天天气怎么样？", "讲一个故事吧。"]
    assert select_utterances("又买了 5 个苹果，现在一共有几个苹果？", earlier, 1) == [0]
    assert select_utterances("How many apples do I have now?", ["I have 7 apples.", "Is it raining?", "Tell me a joke."], 1) == [0]
    # with fewer overlapping utterances than places, the rest go to the most recent, kept in order
    assert select_utterances("又买了 5 个苹果，现在一共有几个苹果？", earlier, 2) == [0, 2]


def test_bm25_ties_go_to_the_more_recent_utterance():
    assert select_utterances("多少钱？", ["第一句。", "第二句。", "第三句。"], 2) == [1, 2]
    assert select_utterances("apples", ["apples please", "apples please", "no"], 1) == [1]


def test_bm25_scores_by_hand():
    """Two documents, one query term in one of them: idf = ln(1 + 1.5 / 1.5); |d| = 2 terms = avgdl."""
    assert lexical_terms("Apples, 苹果!") == ["apples", "苹", "果", "苹果"]
    scores = bm25_scores("apples", ["apples please", "no thanks"])
    assert scores[1] == 0.0
    assert abs(scores[0] - math.log(2) * 1 * 2.2 / (1 + 1.2)) < 1e-12


def test_query_utterance_keeps_the_latest_turns_tool_messages_and_trims_oldest_utterance_first(tokenizer):
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]}
    messages = [{"role": "system", "content": "You are MiniMind."},
                {"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Nice."},
                {"role": "user", "content": "I like the rain in Paris."}, {"role": "assistant", "content": "Me too."},
                {"role": "user", "content": "Weather in Paris today?"}, call, {"role": "tool", "content": "sunny"}]
    both = fit_history(tokenizer, messages, 10_000, history_mode="query_utterance")
    assert both == [messages[0], {"role": "user", "content": "I live in Paris.\nI like the rain in Paris.\nWeather in Paris today?"},
                    call, messages[-1]]
    one = [messages[0], {"role": "user", "content": "I like the rain in Paris.\nWeather in Paris today?"}, call, messages[-1]]
    assert fit_history(tokenizer, messages, prompt_tokens(tokenizer, one), history_mode="query_utterance") == one
    alone = [messages[0], messages[5], call, messages[-1]]
    assert fit_history(tokenizer, messages, prompt_tokens(tokenizer, alone), history_mode="query_utterance") == alone
    with pytest.raises(PromptTooLong):
        fit_history(tokenizer, messages, prompt_tokens(tokenizer, alone) - 1, history_mode="query_utterance")
    with pytest.raises(PromptTooLong):
        fit_history(tokenizer, messages, prompt_tokens(tokenizer, alone) - 1, history_mode="none")


def test_an_unknown_history_mode_is_refused():
    with pytest.raises(ValueError, match="history_mode 'recent'"):
        fit_history(None, BOOKING, history_mode="recent")


# --- the terminal --------------------------------------------------------------------------------

def test_typed_questions_skip_blank_lines_and_end_at_end_of_input(monkeypatch):
    lines = iter(["first", "   ", "", " second "])

    def typed(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    assert list(typed_questions()) == ["first", "second"]


# --- the flags of every program that answers ------------------------------------------------------

def test_every_program_that_answers_spells_its_sampling_flags_alike():
    """eval_llm, the web demo, the server and the API client take one setting for the answer's length,
    `--max_new_tokens` (MiniMind's name) or `--max_tokens` (the OpenAI API's), and the thinking switch
    as `--open_thinking` (MiniMind's) or `--enable_thinking` (the chat template's)."""
    import eval_llm
    from scripts import chat_openai_api, serve_openai_api, web_demo

    for module in (eval_llm, web_demo, chat_openai_api, serve_openai_api):
        for spelling in ("--max_new_tokens", "--max_tokens"):
            args = module.parse_args([spelling, "7", "--temperature", "0.5", "--top_p", "0.9"])
            assert (args.max_new_tokens, args.temperature, args.top_p) == (7, 0.5, 0.9), module.__name__
    for module in (eval_llm, web_demo, chat_openai_api):
        for spelling in ("--open_thinking", "--enable_thinking"):
            assert module.parse_args([spelling, "0"]).open_thinking == 0, module.__name__
