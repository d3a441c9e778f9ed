"""Chat with MiniMind in the browser: a Streamlit page over the shared loader (model/loader.py).

    streamlit run scripts/web_demo.py                                      # a .pth from out/, picked in the sidebar
    streamlit run scripts/web_demo.py -- --load_from path/to/hf_dir        # any transformers chat model
    streamlit run scripts/web_demo.py -- --api_base http://127.0.0.1:8998/v1   # an OpenAI-compatible server
    python scripts/web_demo.py --help                                      # these flags (plain python starts streamlit)

Flags for the page go after `--`; Streamlit's own (`--server.port 8501`) before it. The sidebar picks
the model and the sampling settings; the flags only set where it starts.

How the page works, as Streamlit runs it: the whole script reruns top to bottom on every click or
message, so everything that must survive a rerun (the conversation) lives in `st.session_state`, and
the model, which must not be reloaded on every rerun, is cached with `st.cache_resource`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import streamlit as st
from streamlit import runtime

from model.chat_format import HISTORY_MODES, PromptTooLong, fit_history, split_reasoning, split_turns, start_messages
from model.cli import add_history_args, add_sampling_args, add_thinking_switch
from model.loader import (DEFAULT_SAVE_DIR, NATIVE, add_model_args, chat_stream, context_length, describe,
                          load_model_and_tokenizer, resolve_path, size_config, weight_file_name)

DEFAULT_API_BASE = "http://127.0.0.1:8998/v1"  # scripts/serve_openai_api.py's default address
LOCAL, API = "Local model", "OpenAI-compatible API"
TYPE_A_PATH = "(type a path below)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    api = parser.add_argument_group("OpenAI-compatible API (instead of a local model)")
    api.add_argument("--api_base", default=None, help=f"start with the API selected, at this base URL (e.g. {DEFAULT_API_BASE})")
    api.add_argument("--api_model", default="minimind", help="model name sent to the API (default: minimind)")
    api.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", "none"), help="default: $OPENAI_API_KEY, else 'none'")
    chat = parser.add_argument_group("starting values of the sidebar")
    chat.add_argument("--historys", type=int, default=4, help="with --history_mode full: past exchanges kept in the prompt (default: 4)")
    add_history_args(chat, full="past exchanges as --historys says", none="the system prompt and the question alone")
    add_sampling_args(chat)
    add_thinking_switch(chat, default=0, help_default="0")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Finding and loading a local model
# ---------------------------------------------------------------------------------------------

def local_models(save_dir: Path) -> list[Path]:
    """What the trainers left in `save_dir`: weight files (`full_sft_512.pth`, ...) and HF directories
    (`scripts/convert_model.py` output). LoRA adapters (`lora/`) are not whole models, so not listed."""
    if not save_dir.is_dir():
        return []
    weights = sorted(save_dir.glob("*.pth"))
    directories = sorted(path for path in save_dir.iterdir() if (path / "config.json").is_file())
    return weights + directories


def preferred_index(models: list[Path], args: argparse.Namespace) -> int:
    """The file `--weight` and the size flags name (`full_sft_512.pth` by default), else the newest."""
    wanted = weight_file_name(args.weight, size_config(args.hidden_size, args.num_hidden_layers, bool(args.use_moe), args.preset))
    names = [path.name for path in models]
    if wanted in names:
        return names.index(wanted)
    return max(range(len(models)), key=lambda i: models[i].stat().st_mtime)


def load_options(args: argparse.Namespace) -> dict:
    """The flags that shape how a path loads: sizes of a `.pth` without sidecar, LoRA adapter (a name is
    looked up in <save_dir>/lora), tokenizer, device."""
    return dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe),
                preset=args.preset, inference_rope_scaling=bool(args.inference_rope_scaling), lora_weight=args.lora_weight,
                save_dir=args.save_dir, tokenizer_path=args.tokenizer_path, device=args.device, dtype=args.dtype)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_local(path: str, version: float, options: dict):
    """Loaded once per (path, version, options) for every browser tab: a rerun reuses it. `version`
    is the file's modification time, so a model retrained under the same name is picked up, not the
    stale copy. At most two are kept, so switching models back and forth does not fill the memory."""
    return load_model_and_tokenizer(path, **options)


# ---------------------------------------------------------------------------------------------
# The sidebar: which model, and how it samples
# ---------------------------------------------------------------------------------------------

@dataclass
class Settings:
    source: str
    model_path: str | None  # local: a .pth or HF directory; None = nothing to load
    api_base: str
    api_model: str
    api_key: str
    history_turns: int
    history_mode: str
    history_utterances: int
    max_new_tokens: int
    temperature: float
    top_p: float
    thinking: bool
    system_prompt: str | None


def sidebar(args: argparse.Namespace, save_dir: Path) -> Settings:
    bar = st.sidebar
    bar.title("MiniMind")
    source = bar.radio("Model source", [LOCAL, API], index=1 if args.api_base else 0, key="source")
    model_path, api_base, api_model, api_key = None, args.api_base or DEFAULT_API_BASE, args.api_model, args.api_key
    if source == LOCAL:
        typed_default = "" if args.load_from == NATIVE else args.load_from
        models = local_models(save_dir)
        if models:
            choice = bar.selectbox(f"Weights in {save_dir}", [*models, TYPE_A_PATH], index=preferred_index(models, args),
                                   format_func=lambda path: path if path == TYPE_A_PATH else path.name, key="local_model")
            model_path = None if choice == TYPE_A_PATH else str(choice)
        typed = bar.text_input("…or a .pth file / HF directory", value=typed_default, key="model_path",
                               help="Relative paths start where streamlit was started")
        model_path = typed.strip() or model_path
    else:
        api_base = bar.text_input("Base URL", value=api_base, key="api_base")
        api_model = bar.text_input("Model name", value=api_model, key="api_model")
        api_key = bar.text_input("API key", value=api_key, type="password", key="api_key")
    bar.divider()
    return Settings(
        source=source, model_path=model_path, api_base=api_base, api_model=api_model, api_key=api_key,
        history_mode=bar.selectbox("History mode", HISTORY_MODES, index=HISTORY_MODES.index(args.history_mode),
                                   key="history_mode", help="full: past exchanges as the slider below says; "
                                   "query_utterance: the earlier user messages most like the new one (BM25), one per line "
                                   "before it, answers left out; none: the question alone"),
        history_turns=bar.slider("History (past exchanges kept, full mode)", 0, 20, args.historys, key="history_turns"),
        history_utterances=bar.slider("Earlier user messages kept (query_utterance mode)", 0,
                                      max(8, args.history_utterances), args.history_utterances, key="history_utterances"),
        max_new_tokens=bar.slider("Max new tokens", 16, 4096, args.max_new_tokens, step=16, key="max_new_tokens"),
        temperature=bar.slider("Temperature (0 = greedy)", 0.0, 1.5, args.temperature, step=0.05, key="temperature"),
        top_p=bar.slider("Top-p", 0.05, 1.0, args.top_p, step=0.05, key="top_p"),
        thinking=bar.toggle("Thinking mode (reason first, in a block)", value=bool(args.open_thinking), key="thinking"),
        system_prompt=bar.text_area("System prompt", value=args.system_prompt or "", key="system_prompt",
                                    help="Empty = the chat template's default").strip() or None,
    )


# ---------------------------------------------------------------------------------------------
# Replies: the model's raw text split into its thinking and its answer
# ---------------------------------------------------------------------------------------------

def conversation_for_model(messages: list[dict], settings: Settings) -> list[dict]:
    """The system prompt and the conversation, its history trimmed later by `fit_history`. Past
    answers go without their reasoning, as reasoning models are trained (it would also fill the context)."""
    return start_messages(settings.system_prompt) + [
        {"role": message["role"], "content": message["content"]} for message in messages]


def local_reply(model, tokenizer, conversation: list[dict], settings: Settings) -> Iterator[tuple[str, str]]:
    """(reasoning, answer) so far, after every piece the model writes. Leaving the loop early (the
    user clicked something, so Streamlit stops this run) closes the stream, which stops generating."""
    budget = context_length(model) - settings.max_new_tokens
    if budget <= 0:
        raise ValueError(f"Max new tokens {settings.max_new_tokens} leaves no room for a prompt in this model's "
                         f"{context_length(model)}-token context: lower it in the sidebar.")
    conversation = fit_history(tokenizer, conversation, budget, settings.history_turns, enable_thinking=settings.thinking,
                               history_mode=settings.history_mode, history_utterances=settings.history_utterances)
    text = ""
    with chat_stream(model, tokenizer, conversation, max_new_tokens=settings.max_new_tokens,
                     temperature=settings.temperature, top_p=settings.top_p,
                     enable_thinking=settings.thinking) as stream:
        for piece in stream:
            text += piece
            yield split_reasoning(text)


def api_reply(conversation: list[dict], settings: Settings) -> Iterator[tuple[str, str]]:
    """The same through an OpenAI-compatible server. Ours (and vLLM's) sends the thinking apart, as
    `reasoning_content`; a server that leaves it in the text gets it split here. The server fits the
    history to its model's context; which past messages go (the history mode) is chosen here."""
    from openai import OpenAI, OpenAIError  # optional: only this source needs it

    client = OpenAI(base_url=settings.api_base, api_key=settings.api_key or "none")
    conversation = fit_history(None, conversation, keep_turns=settings.history_turns, history_mode=settings.history_mode,
                               history_utterances=settings.history_utterances)
    reasoning, content = "", ""
    try:
        with client.chat.completions.create(
                model=settings.api_model, messages=conversation, stream=True, max_tokens=settings.max_new_tokens,
                temperature=settings.temperature, top_p=settings.top_p,
                extra_body={"chat_template_kwargs": {"enable_thinking": settings.thinking}}) as response:
            for chunk in response:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                reasoning += getattr(delta, "reasoning_content", None) or ""
                content += delta.content or ""
                yield (reasoning.strip(), content.strip()) if reasoning else split_reasoning(content)
    except OpenAIError as error:  # unreachable, refused, 4xx: said on the page, not a traceback
        raise ValueError(f"The API at {settings.api_base} failed: {error}") from error


# ---------------------------------------------------------------------------------------------
# Showing the conversation. Everything the model wrote goes through st.text, which displays a string
# as it is: a reply containing Markdown or <script> shows those characters, it never becomes markup.
# ---------------------------------------------------------------------------------------------

def show_reply(reasoning: str, answer: str, thinking_now: bool = False) -> None:
    if reasoning:
        with st.expander("Thinking…" if thinking_now else "Thought", expanded=thinking_now, icon=":material/psychology:"):
            st.text(reasoning)
    if answer or not reasoning:
        st.text(answer)


def show_message(message: dict) -> None:
    if message["role"] == "assistant":
        show_reply(message.get("reasoning_content", ""), message["content"])
    else:
        st.text(message["content"])


def delete_turn(index: int) -> None:
    """Button callback (runs before the rerun draws the page): drop question `index` and its answer."""
    _, turns = split_turns(st.session_state.messages)
    st.session_state.messages = [message for i, turn in enumerate(turns) if i != index for message in turn]


def regenerate() -> None:
    """Button callback: drop the last answer and ask for a new one."""
    while st.session_state.messages and st.session_state.messages[-1]["role"] == "assistant":
        st.session_state.messages.pop()
    st.session_state.pending_reply = True


def clear_chat() -> None:
    st.session_state.messages = []
    st.session_state.pending_reply = False


def turn_buttons(index: int, last: bool) -> None:
    row = st.container(horizontal=True)
    row.button("Delete", key=f"delete_{index}", icon=":material/delete:", type="tertiary",
               help="Remove this question and its answer", on_click=delete_turn, args=(index,))
    if last:
        row.button("Regenerate", key="regenerate", icon=":material/refresh:", type="tertiary",
                   help="Answer the last question again", on_click=regenerate)


def show_conversation(pending: bool) -> int:
    """Each exchange with its buttons, except the one still waiting for its answer. Returns how
    many exchanges there are."""
    _, turns = split_turns(st.session_state.messages)
    for index, turn in enumerate(turns):
        for message in turn:
            with st.chat_message(message["role"]):
                show_message(message)
        last = index == len(turns) - 1
        if not (pending and last):
            turn_buttons(index, last)
    return len(turns)


def stream_answer(replies: Iterator[tuple[str, str]]) -> None:
    """Draw the reply as it grows, then keep it in the conversation."""
    with st.chat_message("assistant"):
        slot = st.empty()
        reasoning, answer = "", ""
        for reasoning, answer in replies:
            with slot.container():
                show_reply(reasoning, answer, thinking_now=bool(reasoning) and not answer)
    st.session_state.messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})


# ---------------------------------------------------------------------------------------------

def no_model_message(save_dir: Path) -> str:
    return (f"No model in `{save_dir}`: run `python trainer/train_pretrain.py` then "
            f"`python trainer/train_full_sft.py`, or point the sidebar at an HF directory (or a `.pth` file).")


def app(args: argparse.Namespace) -> None:
    st.set_page_config(page_title="MiniMind", page_icon=":material/smart_toy:")
    save_dir = resolve_path(args.save_dir, DEFAULT_SAVE_DIR)
    st.session_state.setdefault("messages", [])
    st.session_state.setdefault("pending_reply", False)
    settings = sidebar(args, save_dir)
    st.sidebar.button("Clear the chat", icon=":material/delete_sweep:", on_click=clear_chat)

    model = tokenizer = None
    problem = None
    if settings.source == LOCAL:
        if settings.model_path is None:
            problem = no_model_message(save_dir)
        else:
            try:
                model, tokenizer = load_local(settings.model_path, resolve_path(settings.model_path).stat().st_mtime,
                                              load_options(args))
            except (FileNotFoundError, ValueError) as error:
                problem = f"Could not load `{settings.model_path}`: {error}"
        if model is not None:
            st.caption(describe(model))
    else:
        try:
            import openai  # noqa: F401
            st.caption(f"{settings.api_model} at {settings.api_base}")
        except ImportError:
            problem = "The `openai` package is not installed: `pip install openai` to chat through an API."
    if problem:
        st.warning(problem)

    prompt = st.chat_input("Ask MiniMind something", disabled=problem is not None, key="prompt")
    if prompt:
        st.session_state.messages.append({"role": "user", "content": prompt})
        st.session_state.pending_reply = True
    pending = st.session_state.pending_reply and problem is None
    turns = show_conversation(pending)
    if not pending:
        return
    st.session_state.pending_reply = False
    conversation = conversation_for_model(st.session_state.messages, settings)
    try:
        stream_answer(local_reply(model, tokenizer, conversation, settings) if settings.source == LOCAL
                      else api_reply(conversation, settings))
    except (PromptTooLong, ValueError) as error:  # too long even alone, no room for an answer, API failed
        st.error(str(error))
        turn_buttons(turns - 1, last=True)  # to delete the question, or try again
        return
    st.rerun()  # draw the finished exchange with its buttons


def main() -> None:
    if runtime.exists():  # `streamlit run scripts/web_demo.py -- ARGS`
        app(parse_args(sys.argv[1:]))
    else:  # `python scripts/web_demo.py ARGS`: check the flags (and --help), then let streamlit run us
        parse_args(sys.argv[1:])
        os.execvp(sys.executable, [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()), "--", *sys.argv[1:]])


if __name__ == "__main__":
    main()
