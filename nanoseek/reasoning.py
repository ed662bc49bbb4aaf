"""Separating a reasoning model's thinking from its answer, whole or while it streams.

R1-style prompts end with `<think>\\n`, so generated text starts inside the reasoning; it ends
at `</think>`, after which comes the answer. Used by the terminal chat and the API server
(`reasoning_content` vs `content`).
"""

from __future__ import annotations

from .tokenizer import END_THINK, THINK


def split_reasoning(text: str, started: bool = True) -> tuple[str, str]:
    """Whole generated text -> (reasoning, answer). started: the prompt already opened <think>.
    Without a closing tag, everything is reasoning (the model was cut off while thinking)."""
    if not started:
        stripped = text.lstrip()
        if not stripped.startswith(THINK):
            return "", text.strip()
        text = stripped[len(THINK):]
    if END_THINK not in text:
        return text.strip(), ""
    reasoning, answer = text.split(END_THINK, 1)
    return reasoning.strip(), answer.strip()


class ReasoningStream:
    """Feed text deltas; get ("reasoning" | "answer", text) pieces in order. A `</think>` split
    across deltas is recognised: text that might be the start of the tag is held back."""

    def __init__(self, started: bool = True):
        self.thinking, self.buffer = started, ""
        self._lead = not started  # may still open with <think>
        self._started = {"reasoning": False, "answer": False}
        self._held = ""  # trailing whitespace, sent only if more text of the same part follows

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        self.buffer += delta
        out: list[tuple[str, str]] = []
        if self._lead:
            stripped = self.buffer.lstrip()
            if THINK.startswith(stripped) and not final and len(stripped) < len(THINK):
                return out
            self._lead = False
            if stripped.startswith(THINK):
                self.thinking, self.buffer = True, stripped[len(THINK):]
        if self.thinking:
            if END_THINK in self.buffer:
                reasoning, self.buffer = self.buffer.split(END_THINK, 1)
                self._piece(out, "reasoning", reasoning, last=True)
                self.thinking = False
            else:
                keep = 0 if final else partial_suffix(self.buffer, END_THINK)
                piece, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                self._piece(out, "reasoning", piece, last=final)
                return out
        piece, self.buffer = self.buffer, ""
        self._piece(out, "answer", piece, last=final)
        return out

    def _piece(self, out: list, kind: str, text: str, last: bool) -> None:
        """Append text of one part with the part's leading and trailing whitespace left out, as
        split_reasoning's strip() leaves it out of the whole reply."""
        text = self._held + text
        if not self._started[kind]:
            text = text.lstrip()
        body = text.rstrip()
        self._held = "" if last else text[len(body):]
        if body:
            self._started[kind] = True
            out.append((kind, body))


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
