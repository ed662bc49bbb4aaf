"""How people ask: a grammar of question phrasings, with whole templates held out.

A question is composed from independently drawn parts:

    [context sentence] [prefix] frame [closing]

A *frame* is a sentence pattern ("{tell} what {a} {op} {b} is."); its `{slots}` are
filled from word lists (`{op}`: "+" or "plus"), its values (`{a}`, `{nums}`) with the problem's
numbers, in digits or, in frames that read as prose, in words ("forty-seven"). Surface noise
follows what people type: casing, a typo in one word, doubled spaces, line breaks between the
context and the question, dropped or doubled question marks. The parts multiply into thousands
of distinct forms per family.

Frames, context sentences and closings are *templates*: a stable hash of each text puts a fifth
of them in the held-out set, which training never draws (`templates="train"`) and evaluation asks
with held-out problems (`templates="test"`), so accuracy on held-out templates measures whether
the model understood the task rather than memorised its wordings. The first frame is the family's
canonical wording, used when no random generator is given; it and the commonest forms after it
are always trained.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

HELD_OUT_SHARE = 0.2  # of each family's frames, and of the shared context sentences and closings
WORDS_RATE = 0.12  # questions whose numbers are written in words (in frames that read as prose)
TYPO_RATE = 0.12  # questions with one mistyped word
SPACING_RATE = 0.15  # questions whose operators and '=' lose their spaces ('12+7=?') or gain them ('12 + 7')

# words shared by every family's frames
SHARED_SLOTS = {
    "what": ["what is", "what's", "whats", "what is the answer to", "what do you get for"],
    "calc": ["compute", "calculate", "work out", "figure out", "evaluate", "find", "do", "determine"],
    "tell": ["tell me", "can you tell me", "could you tell me", "do you know", "i want to know", "i'd like to know"],
    "pre": ["", "", "please ", "can you ", "could you ", "pls ", "i need you to ", "would you "],
    "things": ["apples", "books", "marbles", "coins", "stickers", "cards", "pencils", "eggs"],
}

CONTEXTS = [
    "quick question.", "i'm doing my homework.", "my teacher gave us this one.", "i'm trying to check my answer.",
    "this is for a game.", "help me with this one.", "line one", "here's a problem for you.", "i've been stuck on this.",
    "let's test you.", "ok next one.", "another one:", "i have a maths question.", "for my kid's worksheet:",
    "riddle time.", "hi!", "hey there.", "good morning.", "hello,", "so,", "question:", "can you help?",
    "i need some help with numbers.", "this came up at work.", "no calculator here.", "just curious.",
    "my friend says this is easy.", "we're playing a numbers game.", "here's one more.", "try this:",
]
CONTEXT_SEPARATORS = [" ", " ", "\n", "\n\n", " - "]
CLOSINGS = [
    "please.", "thanks!", "thank you", "show your work.", "explain.", "step by step please.", "i need the exact answer.",
    "quickly!", ":)", "answer only please.", "thx", "be careful.", "no rush.", "can you do it?", "what do you think?",
]

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int, hyphen: bool = True, and_: bool = False) -> str:
    """47 -> 'forty-seven' (or 'forty seven'); 412 -> 'four hundred twelve' (or '... and twelve')."""
    if n < 0:
        return "minus " + number_words(-n, hyphen, and_)
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else ("-" if hyphen else " ") + ONES[ones])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            high, rest = divmod(n, size)
            head = f"{number_words(high, hyphen, and_)} {name}"
            if rest == 0:
                return head
            joint = " and " if and_ and rest < 100 else " "
            return head + joint + number_words(rest, hyphen, and_)
    raise AssertionError("unreachable")


def held_out(texts: list[str], salt: str, keep: tuple[str, ...] = (),
             covered: Callable[[frozenset[str]], bool] | None = None) -> frozenset[str]:
    """The templates kept for evaluation: a fixed share, picked by a stable hash of each text
    (never one of `keep`, such as the canonical wording), at least one. With `covered`, a template
    joins the held-out set only if covered(set) still holds (frames: every word of a held-out frame
    is trained in another, see Phrasing.covers), so the set may come out smaller."""
    ranked = sorted((t for t in texts if t not in keep), key=lambda t: hashlib.sha256(f"{salt}:{t}".encode()).digest())
    size = max(1, math.ceil(HELD_OUT_SHARE * len(texts)))
    if covered is None:
        return frozenset(ranked[:size])
    held: frozenset[str] = frozenset()
    for text in ranked:
        if len(held) < size and covered(held | {text}):
            held |= {text}
    return held


def pick(texts: list[str], test: frozenset[str], templates: str, rng: random.Random) -> str:
    """A random template from the split's side of a list."""
    if templates not in ("train", "test"):
        raise ValueError(f"templates must be 'train' or 'test', got {templates!r}")
    pool = [t for t in texts if (t in test) == (templates == "test")]
    return rng.choice(pool)


_SLOT = re.compile(r"\{(\w+)\}")
_WORD = re.compile(r"[a-z]{4,}")
_ANY_WORD = re.compile(r"[a-z']+")


def frame_words(frame: str, slots: dict[str, list[str]]) -> frozenset[str]:
    """The words a frame can put in a question: its own and every choice of its slots'."""
    words = set(_ANY_WORD.findall(_SLOT.sub(" ", frame.lower())))
    for name in _SLOT.findall(frame):
        for choice in slots.get(name, ()):
            words |= set(_ANY_WORD.findall(choice.lower()))
    return frozenset(words)


def covers(frames: list[str], slots: dict[str, list[str]], held: frozenset[str]) -> bool:
    """Whether every word a held-out frame can use is one training uses: in a trained frame of the
    same family, a shared slot's choices, or a trained context sentence or closing. A held-out frame
    is then a new sentence of known words (`combine`, in one held-out frame alone, could only be
    guessed: the session-39 model read `what's the total when you combine 833 and 412?` as a product)."""
    slots = {**SHARED_SLOTS, **slots}
    known = set(COMMON_WORDS).union(*(frame_words(f, slots) for f in frames if f not in held))
    return all(frame_words(f, slots) <= known for f in held)


def outside_values(text: str, fn) -> str:
    """fn applied to the text between the values' {placeholders}, which stay as they are."""
    parts = re.split(r"(\{\w+\})", text)  # odd indices: placeholders
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def typo(text: str, rng: random.Random) -> str:
    """One word of 4+ letters mistyped: two letters swapped, one dropped or one doubled (never a
    value's {placeholder})."""
    words = [m for m in _WORD.finditer(text) if text[m.start() - 1:m.start()] != "{"]
    if not words:
        return text
    m = rng.choice(words)
    word, j = m.group(), rng.randrange(1, len(m.group()) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    elif kind == 1:
        word = word[:j] + word[j + 1:]
    else:
        word = word[:j] + word[j] + word[j:]
    return text[:m.start()] + word + text[m.end():]


_SPACED = re.compile(r"\} ([+\-*×x=])(?: |(?=[{?]|$))")  # '{a} + {b}', '{b} = ?'
_TIGHT = re.compile(r"\}([+\-*×x=])(\{)?(?=[?\s]|$|(?<=\{))")  # '{a}+{b}', '{b}='


def spacing(text: str) -> str:
    """'{a} + {b} = ?' as '{a}+{b}=?', and '{a}+{b}=' as '{a} + {b} =': people type both. Seen only
    one way in training, the session-39 model read '992+513=' as 992+51."""
    if _SPACED.search(text):
        return _SPACED.sub(r"}\1", text)
    return _TIGHT.sub(lambda m: f"}} {m[1]}" + (" {" if m[2] else ""), text)


def case(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return text  # frames are written the way people type them: all lower case
    if r < 0.98:
        return text[:1].upper() + text[1:]
    return outside_values(text, str.upper)


@dataclass(frozen=True)
class Phrasing:
    """A family's frames and slot words; compose() writes one question."""

    family: str
    frames: list[str]
    slots: dict[str, list[str]]
    prose: frozenset[str] = frozenset()  # frames whose numbers may be written in words
    core: int = 6  # the first frames (the canonical one and the commonest forms: "52-38") are always trained
    held: frozenset[str] | None = None  # held-out frames chosen with other families' (default: a fifth of these)

    def covers(self, held: frozenset[str]) -> bool:
        return covers(self.frames, self.slots, held)

    @cached_property
    def _held_out(self) -> frozenset[str]:
        if self.held is not None:
            return self.held
        return held_out(self.frames, self.family, keep=tuple(self.frames[:self.core]), covered=self.covers)

    @property
    def canonical(self) -> str:
        return self.frames[0]

    def held_out_frames(self) -> frozenset[str]:
        return self._held_out

    def compose(self, values: dict, rng: random.Random | None,
                templates: str = "train") -> tuple[str, str]:
        """(question, frame). values: slot name -> int (a number), list of ints (written as a list)
        or str (inserted verbatim). rng None: the canonical frame with each slot's first word."""
        slots = {**SHARED_SLOTS, **self.slots}
        if rng is None:
            text = _SLOT.sub(lambda m: slots[m.group(1)][0] if m.group(1) in slots else m.group(0), self.canonical)
            return case_canonical(fill(text, values, None)), self.canonical
        frame = pick(self.frames, self.held_out_frames(), templates, rng)
        words = {name: rng.choice(choices) for name, choices in slots.items()}  # one choice per slot and question
        text = _SLOT.sub(lambda m: words.get(m.group(1), m.group(0)), frame)
        if rng.random() < TYPO_RATE:
            text = typo(text, rng)
        in_words = frame in self.prose and rng.random() < WORDS_RATE
        if not in_words and rng.random() < SPACING_RATE:
            text = spacing(text)
        if rng.random() < 0.25:
            text = f"{text}{rng.choice([' ', ' ', chr(10)])}{pick(CLOSINGS, CLOSINGS_HELD_OUT, templates, rng)}"
        if rng.random() < 0.3:
            context = pick(CONTEXTS, CONTEXTS_HELD_OUT, templates, rng)
            text = f"{context}{rng.choice(CONTEXT_SEPARATORS)}{text}"
        text = punctuation(case(text, rng), rng)
        text = fill(text, values, rng, words=in_words)
        if rng.random() < 0.08:
            text = text.replace(" ", "  ", 1)
        return text, frame


CONTEXTS_HELD_OUT = held_out(CONTEXTS, "context")
CLOSINGS_HELD_OUT = held_out(CLOSINGS, "closing")
COMMON_WORDS = frozenset(w for text in [*(c for c in CONTEXTS if c not in CONTEXTS_HELD_OUT),
                                        *(c for c in CLOSINGS if c not in CLOSINGS_HELD_OUT),
                                        *(w for choices in SHARED_SLOTS.values() for w in choices)]
                         for w in _ANY_WORD.findall(text.lower()))
LIST_STYLES = ["{0}, {1} and {2}", "{0}, {1} and {2}", "{0} {1} {2}", "{0}, {1}, {2}", "{0},{1},{2}",
               "[{0}, {1}, {2}]", "{0}, {1}, and {2}", "{0} and {1} and {2}"]


def case_canonical(text: str) -> str:
    return text[:1].upper() + text[1:]


def punctuation(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return text.rstrip("?.!")
    if r < 0.2 and text.endswith("?"):
        return text + "?"
    return text


def fill(text: str, values: dict, rng: random.Random | None, words: bool = False) -> str:
    """Put the values in: numbers in digits, or in words (one style per question); lists in a
    random style (rng None: '3, 7 and 12')."""
    spell = str
    if words:
        hyphen, and_ = rng.random() < 0.7, rng.random() < 0.3
        spell = lambda n: number_words(n, hyphen, and_)  # noqa: E731
    style = LIST_STYLES[0] if rng is None else rng.choice(LIST_STYLES)

    def value(m):
        v = values.get(m.group(1))
        if v is None:
            return m.group(0)
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            return style.format(*map(spell, v))
        return spell(v)

    return _SLOT.sub(value, text)
