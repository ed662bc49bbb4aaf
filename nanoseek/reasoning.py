"""Separating a reasoning model's thinking from its answer, whole or while it streams.

R1-style prompts end with `<think>\\n`, so generated text starts inside the reasoning; it ends
at `</think>`, after which comes the answer. Used by the terminal chat and the API server
(`reasoning_content` vs `content`).
"""

from __future__ import annotations

from .tokenizer import END_THINK, THINK


def split_reasoning(text: str, started: bool = True, continued: bool = False, cut: bool = False) -> tuple[str, str]:
    """Whole generated text -> (reasoning, answer). started: the prompt already opened <think>.
    Without a closing tag, everything is reasoning (the model was cut off while thinking). Each part
    loses the whitespace around it (what the template puts after its tags), except where the text
    goes on from a prefix the client wrote (`continued`: its first part keeps its leading whitespace,
    " world" after "hello") or a stop string ended it (`cut`: its last part keeps what came before the
    stop string, as OpenAI returns the text up to it)."""
    if not started and not continued and text.lstrip().startswith(THINK):  # the reply opened its reasoning itself
        text, started = text.lstrip()[len(THINK):], True
    if not started:
        return "", _trimmed(text, lead=not continued, end=not cut)
    if END_THINK not in text:
        return _trimmed(text, lead=not continued, end=not cut), ""
    reasoning, answer = text.split(END_THINK, 1)
    return _trimmed(reasoning, lead=not continued, end=True), _trimmed(answer, lead=True, end=not cut)


def _trimmed(text: str, lead: bool, end: bool) -> str:
    text = text.lstrip() if lead else text
    return text.rstrip() if end else text


class ReasoningStream:
    """Feed text deltas; get ("reasoning" | "answer", text) pieces in order. A `</think>` split
    across deltas is recognised: text that might be the start of the tag is held back."""

    def __init__(self, started: bool = True, continued: bool = False):
        self.thinking, self.buffer = started, ""
        self._lead = not started and not continued  # may still open with <think>
        # a part under way: its leading whitespace is kept (the part a prefix began: see split_reasoning)
        self._started = {"reasoning": started and continued, "answer": not started and continued}
        self._held = ""  # trailing whitespace, sent only if more text of the same part follows

    def feed(self, delta: str, final: bool = False, cut: bool = False) -> list[tuple[str, str]]:
        """cut (with final): a stop string ended the text, so the last part keeps its trailing whitespace."""
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
                self._piece(out, "reasoning", piece, last=final, keep_end=cut)
                return out
        piece, self.buffer = self.buffer, ""
        self._piece(out, "answer", piece, last=final, keep_end=cut)
        return out

    def _piece(self, out: list, kind: str, text: str, last: bool, keep_end: bool = False) -> None:
        """Append text of one part with the part's leading and trailing whitespace left out, as
        split_reasoning leaves it out of the whole reply."""
        text = self._held + text
        if not self._started[kind]:
            text = text.lstrip()
        body = text if last and keep_end else text.rstrip()
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
