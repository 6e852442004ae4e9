"""Turn a PromptItem's turn k into the text the model sees, with the model's chat template.

Multi-turn follows SGLang's MT-Bench bench: turn 2 is [user q1, assistant <the model's own
answer to q1>, user q2].  The benchmark feeds every arm the SAME turn-2 prompt (built from the
plain baseline's turn-1 answer), so arms are compared on identical inputs; under greedy decoding
every arm's answer is the same anyway.
"""
from __future__ import annotations

from specplug.datasets import PromptItem


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, item: PromptItem, turn: int, answers: list[str], use_chat: bool) -> str:
    """Prompt text for turn `turn` (0-based) given the model's answers to earlier turns."""
    if len(answers) < turn:
        raise ValueError(f"prompt {item.id}: turn {turn + 1} needs {turn} earlier answers, "
                         f"got {len(answers)}")
    if not item.chat or not use_chat:
        return _plain(item, turn, answers)
    messages = []
    for k in range(turn + 1):
        messages.append({"role": "user", "content": item.turns[k]})
        if k < turn:
            messages.append({"role": "assistant", "content": answers[k]})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _plain(item: PromptItem, turn: int, answers: list[str]) -> str:
    if turn == 0:
        return item.turns[0]
    # no template: a plain transcript keeps the two turns apart
    parts = []
    for k in range(turn):
        parts += [f"User: {item.turns[k]}", f"Assistant: {answers[k]}"]
    parts += [f"User: {item.turns[turn]}", "Assistant:"]
    return "\n".join(parts)


def encode(tokenizer, text: str, use_chat: bool) -> list[int]:
    # a rendered chat template already carries its special tokens (BOS etc.)
    return tokenizer(text, add_special_tokens=not use_chat)["input_ids"]
