"""Chat in the terminal with a model behind an OpenAI-compatible API: MiniMind served by
scripts/serve_openai_api.py, or any other such endpoint. Answers stream in as they are written; the
model's reasoning, when it sends some, is shown dimmed after "💭".

    python scripts/serve_openai_api.py            # first, in another terminal
    python scripts/chat_openai_api.py             # type questions; an empty line is skipped, Ctrl-D ends
    python scripts/chat_openai_api.py --historys 0 --temperature 0
    python scripts/chat_openai_api.py --base_url https://api.example.com/v1 --api_key sk-... --model some-model
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import OpenAI, OpenAIError

from model.chat_format import fit_history, start_messages, typed_questions
from model.cli import add_sampling_args, add_switch, add_thinking_switch

DIM, RESET = "\033[2m", "\033[0m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_url", default="http://127.0.0.1:8998/v1", help="(default: http://127.0.0.1:8998/v1)")
    parser.add_argument("--api_key", default=os.environ.get("OPENAI_API_KEY", "none"),
                        help="(default: $OPENAI_API_KEY; our server needs none)")
    parser.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    parser.add_argument("--system_prompt", default=None, help="persona as a system message")
    parser.add_argument("--historys", type=int, default=8,
                        help="past exchanges (question + answer) sent with each question; 0 = none (default: 8)")
    add_sampling_args(parser)
    add_thinking_switch(parser)
    add_switch(parser, "--stream", default=1, help="1 = print the answer as it is written")
    return parser.parse_args(argv)


class Printer:
    """Prints reasoning dimmed (plain, after its marker, when the output is not a terminal), then the answer."""

    def __init__(self):
        self.dim = sys.stdout.isatty()
        self.section: str | None = None

    def write(self, section: str, text: str) -> None:
        if section != self.section:
            if self.section == "reasoning":
                print(RESET if self.dim else "", end="\n")
            print("💭 " + (DIM if self.dim else "") if section == "reasoning" else "🤖: ", end="")
            self.section = section
        print(text, end="", flush=True)

    def end(self) -> None:
        if self.section == "reasoning" and self.dim:
            print(RESET, end="")
        print("\n")


def ask(client: OpenAI, args: argparse.Namespace, model: str, messages: list[dict]) -> dict:
    """Send the conversation, print the answer as it arrives, and return it as an assistant message."""
    extra = {"chat_template_kwargs": {"enable_thinking": bool(args.open_thinking)}} if args.open_thinking is not None else None
    request = dict(model=model, messages=messages, max_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, extra_body=extra)
    printer, content, tool_calls = Printer(), [], []
    if args.stream:
        for chunk in client.chat.completions.create(stream=True, **request):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if getattr(delta, "reasoning_content", None):
                printer.write("reasoning", delta.reasoning_content)
            if delta.content:
                printer.write("answer", delta.content)
                content.append(delta.content)
            for call in delta.tool_calls or []:
                printer.write("answer", f"[tool call] {call.function.name}({call.function.arguments})")
                tool_calls.append({"id": call.id, "type": "function",
                                   "function": {"name": call.function.name, "arguments": call.function.arguments}})
    else:
        message = client.chat.completions.create(**request).choices[0].message
        if getattr(message, "reasoning_content", None):
            printer.write("reasoning", message.reasoning_content)
        printer.write("answer", message.content or "")
        content.append(message.content or "")
        for call in message.tool_calls or []:
            printer.write("answer", f"\n[tool call] {call.function.name}({call.function.arguments})")
            tool_calls.append(call.model_dump())
    printer.end()
    answer = {"role": "assistant", "content": "".join(content)}
    if tool_calls:
        answer["tool_calls"] = tool_calls
    return answer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except OpenAIError as error:
        sys.exit(f"error: cannot reach {args.base_url} ({error}); start the server with python scripts/serve_openai_api.py")
    conversation = start_messages(args.system_prompt)
    for question in typed_questions():
        conversation.append({"role": "user", "content": question})
        try:  # the server fits the prompt to its context; only the number of past exchanges is chosen here
            answer = ask(client, args, model, fit_history(None, conversation, keep_turns=args.historys))
        except OpenAIError as error:
            print(f"\n(error: {error})", file=sys.stderr)
            conversation.pop()
            continue
        conversation.append(answer)


if __name__ == "__main__":
    main()
