"""Terminal input shared by the chat programs (`eval_llm.py --mode chat`, `scripts/chat_openai_api.py`).
Kept free of torch and of the model code, so the API client starts instantly."""

from typing import Iterator


def typed_questions(prompt: str = "👶: ") -> Iterator[str]:
    """Questions typed at the prompt, until end of input (Ctrl-D); blank lines are skipped."""
    while True:
        try:
            question = input(prompt).strip()
        except EOFError:
            print()
            return
        if question:
            yield question
