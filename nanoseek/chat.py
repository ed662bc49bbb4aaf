"""The terminal chat: replies stream with the reasoning dimmed above the answer.

End a line with \\ to continue typing on the next line. Commands: /reset (new conversation),
/system TEXT (set the system prompt), /temp T (set the temperature), /exit. Ctrl-C stops the
current reply, and at the prompt drops what was typed (as Python's prompt does: a second Ctrl-C pressed to stop a reply
had ended the chat and its conversation); Ctrl-D or /exit leaves.

When the model's chat template writes tool calls, the model is offered the calculator (as the
API's tool_choice "auto": a grammar keeps each call's arguments to the tool's schema once the
reply opens a block of calls). Each call is printed dimmed with its result, the result goes back
to the model, and the reply continues, for at most MAX_TOOL_ROUNDS rounds a message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.console import Console
from rich.text import Text

from .inference import ContextOverflow, Engine, EngineBusy, InvalidRequest, Request, SamplingParams
from .inference.constraints import Grammar, vocabulary
from .reasoning import ReasoningStream
from .tokenizer import ChatFormatError, DeepSeekTokenizer, is_text
from .tools import (CALCULATOR, CallFormat, CallStream, calculator_format, call_tokens, call_trigger, describe_tools,
                    hidden_in_chat, renders_tools, run_calculator)

MAX_TOOL_ROUNDS = 4  # rounds of calls per user message; the reply after the last may not call
REPLY_TOKENS = 1024  # a reply's most tokens when --max-tokens is not given (or what the context leaves)


@dataclass(frozen=True)
class Tools:
    """The calculator for one model: its call format, the grammar of a reply that may call it, and
    the grammar of one that may not (the opener banned)."""

    fmt: CallFormat
    calls: Grammar
    no_calls: Grammar

    @staticmethod
    def offer(engine: Engine, tok: DeepSeekTokenizer) -> "Tools | None":
        """None unless the calculator is worth offering (tools.calculator_format)."""
        fmt = calculator_format(tok, engine.max_len)
        if fmt is None:
            return None
        vocab = vocabulary(tok.tok.to_str(), engine.config.vocab_size, tok.eos_ids)
        calls = Grammar.compile(vocab, "start: answer\n" + fmt.grammar([CALCULATOR], tok, rule="answer"),
                                call_trigger(tok, fmt))
        return Tools(fmt, calls, no_calls(tok, fmt))

    def prompt(self, tok: DeepSeekTokenizer, convo: list[dict], think: bool) -> list[int]:
        """The prompt with the calculator described, by the template itself or in the system message."""
        if renders_tools(tok):
            return tok.render_prompt(convo, thinking=think, tools=[CALCULATOR])
        note = describe_tools([CALCULATOR], self.fmt)
        if convo and convo[0]["role"] == "system":
            return tok.render_prompt([{**convo[0], "content": convo[0]["content"] + "\n\n" + note}, *convo[1:]],
                                     thinking=think)
        return tok.render_prompt([{"role": "system", "content": note}, *convo], thinking=think)


def no_calls(tok: DeepSeekTokenizer, fmt: CallFormat | None, thinking: bool = True) -> Grammar | None:
    """What a reply that may call no tool follows: `call_tokens` banned, as the server bans them, and with
    thinking off the think tags."""
    banned = call_tokens(tok, fmt) | (frozenset() if thinking else tok.think_tags)
    return Grammar.compile(None, None, banned=banned) if banned else None


def stream_reply(engine: Engine, req: Request, thinking: bool, console: Console,
                 calls: CallFormat | None = None, answer_label: str | None = "Answer:") -> tuple[str, str]:
    """Drive the engine until req ends, printing reasoning dimmed and the answer plainly (without
    its block of tool calls, if `calls` is the format they come in) after `answer_label` (None: no
    label, for a raw continuation); Ctrl-C stops the reply. Returns (reasoning, answer), the answer with
    its calls."""
    splitter, parts, shown = ReasoningStream(started=thinking), {"reasoning": "", "answer": ""}, None
    hidden = CallStream(calls) if calls is not None else None

    def show(kind: str, text: str) -> None:
        nonlocal shown
        if not text:
            return
        if kind != shown:
            if kind == "reasoning":
                console.print("[dim italic]Thinking...[/]\n", end="")
            elif answer_label:
                console.print(f"\n[bold]{answer_label}[/] ", end="")
            shown = kind
        console.print(text, style="dim" if kind == "reasoning" else None, end="", markup=False, highlight=False)

    try:
        while not req.finished:
            engine.step()
            while not req.events.empty():
                ev = req.events.get()
                final = ev.finish_reason is not None
                for kind, text in splitter.feed(ev.text, final=final):
                    parts[kind] += text
                    if kind == "reasoning" or hidden is None:
                        show(kind, text)
                if hidden is not None:
                    show("answer", hidden.feed(parts["answer"], final=final)[0])
    except KeyboardInterrupt:
        engine.cancel(req)
        while engine.has_work:
            engine.step()
        console.print("\n[yellow](stopped)[/]", end="")
    console.print()
    if req.finish_reason == "error":  # the engine failed this request (its step raised): say why
        console.print(Text(f"error: the model failed to reply: {type(req.error).__name__}: {req.error}", style="red"))
    return parts["reasoning"], parts["answer"]


def read_message(prompt: str = "> ") -> str:
    """One message from the terminal; a line ending in \\ continues on the next (the input ending there
    sends what came: the next read ends the chat)."""
    lines = [input(prompt)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines).strip()


def run_tool(name: str, arguments: str) -> str:
    """A call's result as text: the calculator's answer, or an error the model can read."""
    if name != CALCULATOR["function"]["name"]:
        return f"error: no tool {name!r}"
    return run_calculator(arguments)


def reply(engine: Engine, tok: DeepSeekTokenizer, console: Console, messages: list[dict], params: SamplingParams,
          system: str = "", think: bool = True, tools: Tools | None = None, fit: bool = False) -> list[Request]:
    """One turn: the model answers `messages` (the user's message last) and the reply is appended; returns the
    requests it took (one per round of calls).
    With tools, a reply that calls the calculator is followed by the calls' results (printed, and
    appended as `tool` messages) and another reply, until one makes no call or MAX_TOOL_ROUNDS
    rounds are done. `fit`: params.max_new_tokens is a default, cut to what the context leaves after
    the prompt. Raises InvalidRequest, EngineBusy or ChatFormatError if a prompt is refused."""
    reqs = []
    for round_ in range(MAX_TOOL_ROUNDS + 1):
        ids = prompt_ids(tok, messages, system, think, tools)
        grammar = params.grammar if tools is None else tools.calls if round_ < MAX_TOOL_ROUNDS else tools.no_calls
        new = engine.fitting(len(ids), params.max_new_tokens) if fit else params.max_new_tokens
        req = engine.submit(ids, replace(params, grammar=grammar, max_new_tokens=new))
        reqs.append(req)
        reasoning, answer = stream_reply(engine, req, tok.opens_thinking(ids), console,
                                         tools.fmt if tools else None)
        if req.finish_reason == "error":  # (said by stream_reply) no reply to keep: the conversation stays as it was
            return reqs
        content, calls, complete = tools.fmt.split(answer) if tools is not None else (answer, [], True)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        if not calls or not complete or req.finish_reason != "stop":  # no calls, or cut short: the turn ends
            if calls:
                console.print("[yellow](the reply ended inside a tool call)[/]")
            elif req.finish_reason == "length":
                full = len(ids) + new == engine.max_len
                console.print(f"[yellow](cut off at {new} tokens: " + ("the model's context is full: /reset starts "
                              "anew)[/]" if full else "--max-tokens)[/]"))
            messages.append(message)
            return reqs
        messages.append({**message, "content": content or None, "tool_calls": calls})
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            result = run_tool(name, arguments)
            console.print(Text.assemble(("  ↳ ", "dim"), (name, "dim bold"), (" " + arguments, "dim")))
            console.print(Text.assemble(("  = ", "dim"), (result, "dim italic")))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def prompt_ids(tok: DeepSeekTokenizer, messages: list[dict], system: str, think: bool,
               tools: Tools | None) -> list[int]:
    convo = ([{"role": "system", "content": system}] if system else []) + messages
    return tok.render_prompt(convo, thinking=think) if tools is None else tools.prompt(tok, convo, think)


def check_room(engine: Engine, tok: DeepSeekTokenizer, system: str, think: bool, tools: Tools | None,
               reply_tokens: int) -> None:
    """ContextOverflow if a one-character message with this system prompt leaves no room for reply_tokens."""
    shortest = len(prompt_ids(tok, [{"role": "user", "content": "?"}], system, think, tools))
    if shortest + reply_tokens > engine.max_len:
        raise ContextOverflow(shortest, reply_tokens, engine.max_len)


def chat(engine: Engine, tok: DeepSeekTokenizer, console: Console, system: str = "", temperature: float = 0.6,
         top_p: float = 0.95, max_tokens: int | None = None, think: bool = True, tools: bool = True) -> None:
    """Talk with the model until /exit or Ctrl-D; `tools`: offer the
    calculator if the model's template can write tool calls. max_tokens None: REPLY_TOKENS, or what the
    context leaves. Raises ContextOverflow at once when the system prompt and max_tokens leave no room
    for a message (every message would have been refused)."""
    messages: list[dict] = []
    offered = Tools.offer(engine, tok) if tools else None
    check_room(engine, tok, system, think, offered, max_tokens or 1)
    # no tools: no raw calls either (unless speculating: drafts are verified without a token ban)
    fmt = CallFormat.probe(tok)
    plain = None if offered is not None or engine.speculative else no_calls(tok, fmt, think)
    hidden = hidden_in_chat(tok, fmt)
    if offered is not None:
        console.print("[dim](the model may use a calculator; --no-tools turns it off)[/]")
    while True:
        try:
            text = read_message()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit leaves)[/]")
            continue
        if not text:
            continue
        if not is_text(text):
            console.print("[red]that message is not UTF-8 text (a byte that is not a character): not sent[/]")
            continue
        if text.startswith("//"):  # a message that starts with "/": typed with two
            text = text[1:]
        elif text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/reset") and arg.strip():
                console.print(f"[red]{cmd} takes nothing after it[/] (a message starting with / is typed //...)")
                continue
            if cmd == "/exit":
                return
            if cmd == "/reset":
                messages = []
                console.print("[dim](new conversation)[/]")
            elif cmd == "/system":
                try:  # (one that leaves no room had every later message refused, and /reset keeps it)
                    check_room(engine, tok, arg.strip(), think, offered, max_tokens or 1)
                except ContextOverflow as e:
                    console.print(f"[red]that system prompt takes {e.prompt_tokens - 1} or more of the model's "
                                  f"{e.context} tokens of context, leaving no room for a message: not set[/]")
                    continue
                system = arg.strip()
                console.print(f"[dim](system prompt {'set' if system else 'cleared'})[/]")
            elif cmd == "/help":
                console.print(f"[dim]/reset new conversation · /system TEXT system prompt · /temp T temperature (now "
                              f"{temperature}) · /exit (or Ctrl-D) · a line ending in \\ continues on the next · a "
                              "message starting with / is typed //...[/]")
            elif cmd == "/temp" and not arg.strip():
                console.print(f"[dim](temperature {temperature}; /temp T sets it)[/]")
            elif cmd == "/temp":
                try:
                    value = float(arg)
                except ValueError:
                    value = -1.0
                if 0 <= value <= 100:  # what --temperature takes (nan and inf are not in it)
                    temperature = value
                    console.print(f"[dim](temperature {temperature})[/]")
                else:
                    console.print("[red]usage: /temp T, with T from 0 to 100 (e.g. /temp 0.7)[/]")
            else:
                console.print(f"[red]unknown command {cmd}[/] (/help /reset /system /temp /exit; a message starting "
                              "with / is typed //...)")
            continue
        before = len(messages)
        messages.append({"role": "user", "content": text})
        try:
            reply(engine, tok, console, messages, SamplingParams(max_new_tokens=max_tokens or REPLY_TOKENS,
                                                                 temperature=temperature, top_p=top_p, grammar=plain,
                                                                 skip_token_ids=hidden),
                  system, think, offered, fit=max_tokens is None)
        except ContextOverflow as e:  # in the command's terms (the engine's are max_new_tokens)
            del messages[before:]
            room = e.context - e.prompt_tokens
            # what helps: a new conversation, or for a first message the message, --max-tokens, the system prompt
            fixes = ["/reset starts anew"] if messages else ["a shorter message", *(["a smaller --max-tokens"] * (
                room > 0)), *(["a shorter /system prompt"] * bool(system))]
            console.print(f"[red]the conversation ({e.prompt_tokens} tokens) leaves " + (
                f"{room} of the model's {e.context} tokens of context, fewer than --max-tokens {e.max_new_tokens}[/]"
                if room > 0 else f"no room in the model's {e.context} tokens of context[/]") + f" ({', '.join(fixes)})")
        except (InvalidRequest, EngineBusy, ChatFormatError) as e:
            del messages[before:]
            console.print(f"[red]{e}[/] (try /reset)")
