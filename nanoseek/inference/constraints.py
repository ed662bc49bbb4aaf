"""JSON mode: constrain generation so the output is a JSON object.

`JsonPrefix` is an incremental JSON recogniser (a pushdown automaton over characters). The engine
keeps one per JSON-mode request, and at each step only lets through tokens whose text keeps
the output a valid prefix of a JSON object; the end-of-sequence token is allowed only once the
object is complete. `closing()` is the shortest text that completes the current prefix, which
the engine writes out when the token budget is about to run out, so the output always parses.
"""

from __future__ import annotations

import copy

WS = " \t\n\r"
LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonPrefix:
    def __init__(self, top_object: bool = True):
        self.stack: list[str] = []  # "{" or "["
        self.state = "start"  # start, value, key_or_end, key, colon, comma_or_end, string, number, literal, done
        self.top_object = top_object
        self.is_key = False  # the string being read is an object key
        self.escape = ""  # "" | "\\" | "u", "uX", "uXX", "uXXX"
        self.number = ""  # the number read so far
        self.literal = ""  # the rest of true/false/null still to read

    def copy(self) -> "JsonPrefix":
        return copy.deepcopy(self)

    @property
    def complete(self) -> bool:
        return self.state == "done" or (self.state == "number" and not self.stack and _number_done(self.number))

    def feed_text(self, text: str) -> bool:
        return all(self.feed(c) for c in text)

    def feed(self, c: str) -> bool:
        s = self.state
        if s == "string":
            return self._string(c)
        if s == "literal":
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._after_value()
            return True
        if s == "number":
            if _number_ok(self.number + c):
                self.number += c
                return True
            if not _number_done(self.number):
                return False
            self._after_value()
            return self.feed(c)
        if c in WS:
            return True
        if s == "done":
            return False
        if s == "start":
            if c == "{" or (c == "[" and not self.top_object):
                return self._open(c)
            return False
        if s == "value":
            return self._value(c)
        if s == "key_or_end":
            if c == "}":
                return self._close("{")
            return self._key_start(c)
        if s == "key":
            return self._key_start(c)
        if s == "colon":
            if c == ":":
                self.state = "value"
                return True
            return False
        if s == "comma_or_end":
            if c == ",":
                self.state = "key" if self.stack[-1] == "{" else "value"
                return True
            if c in "}]":
                return self._close("{" if c == "}" else "[")
            return False
        if s == "value_or_end":  # just after "["
            if c == "]":
                return self._close("[")
            return self._value(c)
        return False

    # ---- helpers ----
    def _value(self, c: str) -> bool:
        if c in "{[":
            return self._open(c)
        if c == '"':
            self.state, self.is_key = "string", False
            return True
        if c == "-" or c.isdigit():
            self.state, self.number = "number", c
            return True
        if c in LITERALS:
            self.state, self.literal = "literal", LITERALS[c][1:]
            return True
        return False

    def _key_start(self, c: str) -> bool:
        if c == '"':
            self.state, self.is_key = "string", True
            return True
        return False

    def _open(self, c: str) -> bool:
        self.stack.append(c)
        self.state = "key_or_end" if c == "{" else "value_or_end"
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack.pop()
        self._after_value()
        return True

    def _after_value(self) -> None:
        self.state = "comma_or_end" if self.stack else "done"

    def _string(self, c: str) -> bool:
        if self.escape == "\\":
            if c in '"\\/bfnrt':
                self.escape = ""
                return True
            if c == "u":
                self.escape = "u"
                return True
            return False
        if self.escape.startswith("u"):
            if c not in "0123456789abcdefABCDEF":
                return False
            self.escape = "" if len(self.escape) == 4 else self.escape + c
            return True
        if c == "\\":
            self.escape = "\\"
            return True
        if c == '"':
            if self.is_key:
                self.state = "colon"
            else:
                self._after_value()
            return True
        return ord(c) >= 0x20  # control characters must be escaped

    def closing(self) -> str:
        """The shortest text that turns the current prefix into a complete JSON value."""
        out, p = "", self.copy()
        for _ in range(4 * len(self.stack) + 16):
            if p.complete:
                return out
            step = {"start": "{", "value": "null", "key_or_end": "}", "key": '""', "colon": ":",
                    "value_or_end": "]", "literal": p.literal, "string": '"' if not p.escape else
                    ("n" if p.escape == "\\" else "0" * (5 - len(p.escape)) + '"'),
                    "number": "0" if not _number_done(p.number) else ("}" if p.stack[-1:] == ["{"] else "]"),
                    "comma_or_end": "}" if p.stack[-1:] == ["{"] else "]"}[p.state]
            if not p.feed_text(step):
                raise AssertionError(f"cannot close JSON from state {p.state}")
            out += step
        return out


def _number_ok(s: str) -> bool:
    """Is s a prefix of a JSON number?"""
    i, n = 0, len(s)
    if i < n and s[i] == "-":
        i += 1
    if i == n:
        return True
    if s[i] == "0":
        i += 1
    elif s[i].isdigit():
        while i < n and s[i].isdigit():
            i += 1
    else:
        return False
    if i < n and s[i] == ".":
        i += 1
        while i < n and s[i].isdigit():
            i += 1
        if i == n:
            return True
    if i < n and s[i] in "eE":
        i += 1
        if i < n and s[i] in "+-":
            i += 1
        while i < n and s[i].isdigit():
            i += 1
    return i == n


def _number_done(s: str) -> bool:
    return bool(s) and s[-1].isdigit() and _number_ok(s)
