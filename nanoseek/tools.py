"""Function calling: the call format of a model's chat template, the tools described to the model,
the grammar its calls must follow, its reply parsed into OpenAI `tool_calls`, and a calculator.

The format is not hard-coded per model: `CallFormat.probe` renders two placeholder calls through
the tokenizer's own chat template and reads off the text around the name and the arguments. For
DeepSeek-V3/R1 that is
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
and for V3.1 `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...`. A model
writes calls in the format it was trained on, and the server parses them back with the same format.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import uuid
from dataclasses import dataclass, replace

from .inference.constraints import json_rule, literal
from .reasoning import partial_suffix
from .tokenizer import ChatFormatError, DeepSeekTokenizer, thinking_variables

_NAMES, _ARGS = ("nanoseek_probe_a", "nanoseek_probe_b"), ('{"probe": 1}', '{"probe": 2}')


ANNOTATIONS = {"type", "title", "description", "required", "$schema"}  # keys that declare no argument


def declared_arguments(parameters: dict | None) -> dict:
    """A function's parameters schema as its calls follow it: none when it declares none (no `parameters`,
    `{}`, a bare object: OpenAI's empty parameter list; a model called a clock with `{"expression": ...}`).
    Where it declares them and says nothing of others, only those: json_rule closes every such object."""
    if not parameters or (set(parameters) <= ANNOTATIONS and parameters.get("type", "object") == "object"
                          and not parameters.get("required")):
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters


def call_trigger(tok: DeepSeekTokenizer, fmt: "CallFormat | None") -> int | None:
    """The token that opens a block of calls where one does, so a reply may call at any point (the grammar of the
    block starts at it): the opener if it is one token (DeepSeek's `<｜tool▁calls▁begin｜>`), or its first token if
    that is a control token no text writes (Qwen's `<tool_call>`, then the rest of `{"name": "`). None otherwise
    (Llama 3.1's opener is plain text)."""
    opener = tok.encode(fmt.opener) if fmt is not None else []
    return opener[0] if len(opener) == 1 or (opener and opener[0] in tok.added_ids) else None


def call_tokens(tok: DeepSeekTokenizer, fmt: "CallFormat | None") -> frozenset[int]:
    """The tokens that write tool calls and tool outputs, the format's trigger among them (`call_trigger`): what a
    reply that may call no tool is kept from writing (a model taught to call the calculator wrote a raw call into a
    reply to a request without tools). None without a call format."""
    if fmt is None:
        return frozenset()
    trigger = call_trigger(tok, fmt)
    return tok.tool_ids | ({trigger} if trigger is not None else frozenset())


@dataclass(frozen=True)
class CallFormat:
    """The text of a block of calls: begin, then per call `before NAME between ARGS after`, `sep`
    between calls, then end. `single`: the template renders one call a turn (Llama 3.1's refuses more)."""

    begin: str
    before: str
    between: str
    after: str
    sep: str
    end: str
    single: bool = False

    @property
    def texts(self) -> tuple[str, ...]:
        return self.begin, self.before, self.between, self.after, self.sep, self.end

    @staticmethod
    def probe(tok: DeepSeekTokenizer) -> "CallFormat | None":
        """The template's call format, or None if its template does not render tool calls. Two calls tell
        the block's ends from each call's; a template that renders only one a turn gives a `single` format,
        the text around that call its own."""
        calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                 for i, (n, a) in enumerate(zip(_NAMES, _ARGS))]
        user = {"role": "user", "content": "probe"}
        try:
            head = tok.encode(tok.apply_chat_template([user], add_generation_prompt=True, **thinking_variables(False)))
        except ChatFormatError:
            return None
        for count in (2, 1):
            turn = {"role": "assistant", "content": None, "tool_calls": calls[:count]}
            try:
                text = tok.apply_chat_template([user, turn], add_generation_prompt=False, **thinking_variables(False))
            except ChatFormatError:
                continue
            spots = [text.find(x) for x in (_NAMES[0], _ARGS[0], _NAMES[1], _ARGS[1])[:2 * count]]
            if -1 in spots or spots != sorted(spots):
                return None
            fmt = (CallFormat._read if count == 2 else CallFormat._read_one)(tok, head, text, spots)
            return fmt and fmt._unspaced()
        return None

    def _unspaced(self) -> "CallFormat":
        """The format without the whitespace it opens with (Qwen2.5's template writes a newline between a turn's
        content and its calls, there when the content is empty too): a reply's calls may start it, and the text
        before them is its content, stripped; between calls the whitespace stays."""
        if self.begin:
            return replace(self, begin=self.begin.lstrip())
        before = self.before.lstrip()
        return replace(self, before=before, sep=self.sep + self.before[: len(self.before) - len(before)])

    @staticmethod
    def _read_one(tok: DeepSeekTokenizer, head: list[int], text: str, spots: list[int]) -> "CallFormat | None":
        """A format from one call: what the turn writes after the generation prompt up to the name is `before`,
        after the arguments up to the end of the turn `after`."""
        (a, b), enc = spots, tok.encode
        lead, tail = enc(text[:a]), enc(text[b + len(_ARGS[0]):])
        before = lead[_common_prefix(head, lead):]
        after = tail[: next((i for i, t in enumerate(tail) if t in tok.eos_ids), len(tail))]
        if not before:
            return None
        dec = tok.decode
        return CallFormat("", dec(before), text[a + len(_NAMES[0]): b], dec(after), "", "", single=True)

    @staticmethod
    def _read(tok: DeepSeekTokenizer, head: list[int], text: str, spots: list[int]) -> "CallFormat | None":
        (a, b, c, d), enc = spots, tok.encode
        lead, between = enc(text[:a]), text[a + len(_NAMES[0]): b]
        middle, tail = enc(text[b + len(_ARGS[0]): c]), enc(text[d + len(_ARGS[1]):])
        # middle = after + sep + before: after starts the tail, before ends the lead
        k = _common_prefix(middle, tail)
        j = _common_prefix(middle[k:][::-1], lead[::-1])
        after, sep, before = middle[:k], middle[k: len(middle) - j], middle[len(middle) - j:]
        begin = lead[_common_prefix(head, lead): len(lead) - len(before)]
        rest = tail[k:]
        end = rest[: next((i for i, t in enumerate(rest) if t in tok.eos_ids), len(rest))]
        if not (begin or before):
            return None
        dec = tok.decode
        return CallFormat(dec(begin), dec(before), between, dec(after), dec(sep), dec(end))

    @property
    def opener(self) -> str:
        return self.begin or self.before

    def render(self, calls: list[tuple[str, str]]) -> str:
        return self.begin + self.sep.join(f"{self.before}{n}{self.between}{a}{self.after}" for n, a in calls) + self.end

    def grammar(self, tools: list[dict], tok: DeepSeekTokenizer, rule: str = "start", single: bool = False) -> str:
        """Lark (llguidance) rules, the top one named `rule`, for a block of calls to the given tools
        (one call if `single`), each call's arguments following that function's JSON schema."""
        def lit(text: str) -> str:
            return lark_text(text, tok)

        more = "" if single else f" ({lit(self.sep)} call)*"
        rules = [f"{rule}: {lit(self.begin)} call{more} {lit(self.end)}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            f = t["function"]
            rules.append(f"call_{i}: {lit(self.before + f['name'] + self.between)} "
                         f"{json_rule(declared_arguments(f.get('parameters')))} {lit(self.after)}")
        return "\n".join(rules) + "\n"

    def split(self, text: str) -> tuple[str, list[dict], bool]:
        """An answer -> (content before the calls, the calls as OpenAI tool_calls, complete?). A
        block cut short keeps its complete calls; `complete` is False then."""
        at = text.find(self.opener)
        if at < 0:
            return text, [], True
        content, block = text[:at], text[at + len(self.begin):]
        calls = []
        pattern = re.compile(re.escape(self.before) + r"(.*?)" + re.escape(self.between) + r"(.*?)" + re.escape(self.after), re.S)
        pos = 0
        while (m := pattern.match(block, pos)) is not None:
            calls.append(tool_call(m.group(1), m.group(2)))
            pos = m.end() + (len(self.sep) if block.startswith(self.sep, m.end()) else 0)
        return content.rstrip(), calls, block[pos:].startswith(self.end) if self.end else pos > 0


def lark_text(text: str, tok: DeepSeekTokenizer) -> str:
    """`text` as a Lark expression: control tokens as `<[id]>` (llguidance never matches them as
    text), the text between them as string literals; "" for no text."""
    added = tok.added_ids
    parts, run = [], []
    for t in tok.encode(text):
        if t in added:
            parts += [literal(tok.decode(run))] if run else []
            parts.append(f"<[{t}]>")
            run = []
        else:
            run.append(t)
    parts += [literal(tok.decode(run))] if run else []
    return " ".join(parts) or '""'


def _common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"id": call_id or "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}


class CallStream:
    """Streams a reply's tool calls the way OpenAI streams them: feed the whole answer so far,
    get deltas `{"index", "id", "type", "function": {"name", "arguments"}}` (the first of each call)
    and `{"index", "function": {"arguments": more}}`; text before the block comes back as content."""

    def __init__(self, fmt: CallFormat):
        self.fmt, self.content_sent, self.calls = fmt, 0, []  # calls: [id, name, args sent]

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        fmt, deltas = self.fmt, []
        at = text.find(fmt.opener)
        visible = len(text) if at < 0 else at
        if at < 0 and not final:
            visible -= partial_suffix(text, fmt.opener)
        content = text[self.content_sent: visible] if visible > self.content_sent else ""
        self.content_sent = max(self.content_sent, visible)
        if at < 0:
            return content, deltas
        parts = text[at + len(fmt.begin):].split(fmt.before)[1:]
        for i, part in enumerate(parts):
            if fmt.between not in part:
                break
            name, args = part.split(fmt.between, 1)
            done = fmt.after in args
            # (a call cut short at the end keeps what it wrote of its arguments, never the start of the block's close)
            args = args.split(fmt.after, 1)[0] if done else args[: len(args) - partial_suffix(args, fmt.after)]
            if i == len(self.calls):
                self.calls.append([tool_call(name, "")["id"], name, 0])
                deltas.append({"index": i, "id": self.calls[i][0], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            if len(args) > self.calls[i][2]:
                more = args[self.calls[i][2]:]
                if deltas and deltas[-1]["index"] == i:  # one entry per call in a delta, as OpenAI sends them
                    deltas[-1]["function"]["arguments"] += more
                else:
                    deltas.append({"index": i, "function": {"arguments": more}})
                self.calls[i][2] = len(args)
        return content, deltas


def hidden_in_chat(tok: DeepSeekTokenizer, fmt: CallFormat | None) -> frozenset[int]:
    """The control tokens a chat reply's text leaves out: every token the tokenizer adds but the think tags and
    those that write tool calls (`fmt`), which the reply's parser reads. vLLM's skip_special_tokens leaves out
    only the tokens marked special, and DeepSeek's tokenizer marks its role tokens (`<｜User｜>`) plain. (A random
    model wrote image and file placeholders into one reply in eight.)"""
    kept = set(tok.encode("".join(fmt.texts))) if fmt else set()
    kept |= {tok.think_id, tok.end_think_id}
    return tok.added_ids - kept


def describe_tools(tools: list[dict], fmt: CallFormat) -> str:
    """A system-prompt section that lists the tools and shows the call format, for chat templates
    that do not render `tools` themselves (DeepSeek-V3's and V3.1's do not)."""
    lines = ["## Tools", "You can call the functions below. To call them, answer with only a block like this one:",
             fmt.render([("FUNCTION_NAME", '{"ARGUMENT": VALUE}')]),
             "with the function's arguments as one JSON object" + (", one call at a time." if fmt.single else
                                                                     ", and one call after the other inside the block "
                                                                     "to call several.")
             + " The results come back in the next message: answer from them.", ""]
    for t in tools:
        f = t["function"]
        lines += [f"### {f['name']}", *([f["description"]] if f.get("description") else []),
                  "Parameters: " + json.dumps(f.get("parameters") or {"type": "object", "properties": {}},
                                              ensure_ascii=False), ""]
    return "\n".join(lines).rstrip()


def calculator_format(tok: DeepSeekTokenizer, max_len: int) -> CallFormat | None:
    """The call format, if the built-in calculator is worth offering to this model: its template writes
    calls, opens them with a token of their own (`call_trigger`: a reply may call at any point), and the calculator's
    description takes at most a quarter of the context."""
    fmt = CallFormat.probe(tok)
    if fmt is None or call_trigger(tok, fmt) is None:
        return None
    return fmt if len(tok.encode(describe_tools([CALCULATOR], fmt))) <= max_len // 4 else None


def renders_tools(tok: DeepSeekTokenizer) -> bool:
    """Does the chat template render the `tools` variable itself?"""
    return bool(tok.chat_template) and re.search(r"\btools\b", tok.chat_template) is not None


# ---- the built-in calculator (web app and terminal chat) ----
CALCULATOR = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses, integers and decimals.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"], "additionalProperties": False}}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 1000


def calculate(expression: str) -> int | float:
    """Evaluates arithmetic by walking Python's AST (numbers and operators only, never `eval`).
    Raises ValueError with a reason for anything else, division by zero, or huge numbers."""
    source = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    except (RecursionError, MemoryError):
        raise ValueError("the expression is nested too deeply") from None

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if not math.isfinite(node.value):  # 1e999
                raise ValueError("the number is too large")
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and left != 0 and right * math.log10(abs(left)) > MAX_DIGITS:  # (digits)
                raise ValueError("the result is too large")
            try:
                result = _OPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:  # a float power past 1.8e308
                raise ValueError("the result is too large") from None
            if isinstance(result, complex):  # a fractional power of a negative number
                raise ValueError("the result is not a real number")
            if isinstance(result, int) and result.bit_length() > MAX_DIGITS * 3.33:  # a product chain grows too
                raise ValueError("the result is too large")
            if isinstance(result, float) and not math.isfinite(result):
                raise ValueError("the result is too large")
            if result == 0 and isinstance(result, float) and left != 0 and (right != 0 or isinstance(node.op, ast.Pow)) \
                    and isinstance(node.op, (ast.Mult, ast.Div, ast.Pow)):  # 10**-400: below what a float holds
                raise ValueError("the result is too small (below 1e-308) to hold")
            return result
        what = ast.get_source_segment(source, node) or type(node).__name__.lower()
        raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {what!r}")

    try:
        result = walk(tree.body)
    except RecursionError:
        raise ValueError("the expression is nested too deeply") from None
    if isinstance(result, float) and result.is_integer() and abs(result) < 2 ** 53:
        result = int(result)
    return result


def run_calculator(arguments: str) -> str:
    """The calculator as a tool: JSON arguments in, the result (or the error, said for the model to
    read: it may try again) as text out."""
    try:
        args = json.loads(arguments)
    except (ValueError, RecursionError):  # not JSON, or JSON Python cannot read (digits past its limit, deep nesting)
        return 'error: the arguments are not JSON; call with {"expression": "..."}'
    if not isinstance(args, dict) or not isinstance(args.get("expression"), (str, int, float)):
        return 'error: the arguments need an "expression": a string such as "17 * 23"'
    try:
        return str(calculate(str(args["expression"])))
    except (ValueError, OverflowError) as e:
        return f"error: {e}"
