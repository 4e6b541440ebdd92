"""Training prompts: the order they are handed out in, and their token ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from vespo.tasks import Example

__all__ = ["PromptStream", "encode_prompt", "encode_prompts"]


class PromptStream:
    """An endless, reproducible stream of training examples: one shuffled pass after another.

    ``position`` (prompts handed out so far) is the whole state, so a resumed run continues with
    exactly the prompts it would have seen.
    """

    def __init__(self, examples: Sequence[Example], seed: int, position: int = 0):
        if not examples:
            raise ValueError("the task produced no training examples")
        self.examples = list(examples)
        self.seed = seed
        self.position = position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def index(self, position: int) -> int:
        """The example handed out at stream ``position``."""
        epoch, offset = divmod(position, len(self.examples))
        return self._order(epoch)[offset]

    def take(self, n: int) -> list[Example]:
        out = []
        size = len(self.examples)
        while len(out) < n:
            epoch, offset = divmod(self.position, size)
            order = self._order(epoch)
            chunk = order[offset : offset + (n - len(out))]
            out.extend(self.examples[i] for i in chunk)
            self.position += len(chunk)
        return out


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of ``prompt`` ready for generation.

    If the tokenizer has a chat template, the prompt (a string becomes one user message) is rendered
    with ``add_generation_prompt=True``. Otherwise the text (messages' contents joined by newlines) is
    encoded as plain text without special tokens.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:  # BatchEncoding in newer transformers
            out = out["input_ids"]
        if hasattr(out, "tolist"):
            out = out.tolist()
        if out and isinstance(out[0], list):
            out = out[0]
        return [int(t) for t in out]
    text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in messages)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompts(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    return [encode_prompt(tokenizer, ex.prompt) for ex in examples]
