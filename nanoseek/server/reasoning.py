"""Reasoning beside the answer: split a reply at `</think>`, whole or as it streams.

The R1 chat template ends the prompt with "<｜Assistant｜><think>\\n" (nanoseek/tokenizer.py), so
generation starts inside the reasoning and never writes `<think>` itself. vLLM's `deepseek_r1`
parser rule, which DeepSeek's API output matches (serving.md §3.1, §6.2): everything up to the
first `</think>` is `reasoning_content`, everything after it `content`, the tag itself in neither;
a reply that stops before `</think>` (max_tokens inside the reasoning) is all reasoning, with
content null. Decided here where vLLM returns null for an empty answer too: content is "" when
`</think>` came and nothing after it, so null means exactly "the answer never started".

Streaming (`ReasoningStream`): the engine hands over cumulative text; each call returns the new
reasoning and the new answer text. `</think>` is one token in our vocabulary, but a model can also
spell it in pieces ("</", "think", ">"), so a tail of the reasoning that could be the start of the
tag is held back until the next text decides (chat.py's terminal printer does the same).
"""
from __future__ import annotations

from nanoseek.tokenizer import END_THINK


def split(text: str) -> tuple[str, str | None]:
    """(reasoning, content) of a whole reply; content None when it never reached `</think>`.

    >>> split("add 2 and 2</think>\\n\\n4")
    ('add 2 and 2', '\\n\\n4')
    >>> split("still thinking")
    ('still thinking', None)
    """
    reasoning, sep, content = text.partition(END_THINK)
    return reasoning, (content if sep else None)


def reasoning_tokens(token_ids: list[int], end_think_id: int | None) -> int:
    """Generated tokens spent reasoning: up to and including `</think>`, all of them without one.

    >>> reasoning_tokens([10, 11, 6, 12], end_think_id=6), reasoning_tokens([10, 11], end_think_id=6)
    (3, 2)
    """
    if end_think_id is None:
        return 0
    return token_ids.index(end_think_id) + 1 if end_think_id in token_ids else len(token_ids)


class ReasoningStream:
    """Turns cumulative reply text into (reasoning delta, content delta) pairs.

    >>> s = ReasoningStream()
    >>> s.feed("Let me"), s.feed("Let me </th"), s.feed("Let me </think>\\n4"), s.feed("Let me </think>\\n42", final=True)
    (('Let me', ''), (' ', ''), ('', '\\n4'), ('', '2'))
    """

    def __init__(self):
        self.reasoning_sent = self.content_sent = 0
        self.in_content = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = split(text)
        if content is None and not final:        # hold back what may be the start of "</think>"
            hold = next((k for k in range(min(len(END_THINK) - 1, len(reasoning)), 0, -1)
                         if END_THINK.startswith(reasoning[-k:])), 0)
            reasoning = reasoning[:len(reasoning) - hold]
        r = reasoning[self.reasoning_sent:] if len(reasoning) > self.reasoning_sent else ""
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning))
        c = ""
        if content is not None:
            self.in_content = True
            c = content[self.content_sent:]
            self.content_sent = len(content)
        return r, c
