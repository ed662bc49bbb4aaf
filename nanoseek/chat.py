"""The terminal chat: replies stream with the reasoning dimmed above the answer.

End a line with \\ to continue typing on the next line. Commands: /reset (new conversation),
/system TEXT (set the system prompt), /temp T (set the temperature), /exit. Ctrl-C stops the
current reply; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

from rich.console import Console

from .inference import Engine, EngineBusy, InvalidRequest, Request, SamplingParams
from .reasoning import ReasoningStream
from .tokenizer import ChatFormatError, DeepSeekTokenizer


def stream_reply(engine: Engine, req: Request, thinking: bool, console: Console) -> tuple[str, str]:
    """Drive the engine until req ends, printing reasoning dimmed and the answer plainly; Ctrl-C
    stops the reply. Returns (reasoning, answer)."""
    splitter, parts, shown = ReasoningStream(started=thinking), {"reasoning": "", "answer": ""}, None
    try:
        while not req.finished:
            engine.step()
            while not req.events.empty():
                ev = req.events.get()
                for kind, text in splitter.feed(ev.text, final=ev.finish_reason is not None):
                    if kind != shown:
                        header = "[dim italic]Thinking...[/]\n" if kind == "reasoning" else "\n[bold]Answer:[/] "
                        console.print(header, end="")
                        shown = kind
                    parts[kind] += text
                    console.print(text, style="dim" if kind == "reasoning" else None, end="", markup=False,
                                  highlight=False)
    except KeyboardInterrupt:
        engine.cancel(req)
        while engine.has_work:
            engine.step()
        console.print("\n[yellow](stopped)[/]", end="")
    console.print()
    return parts["reasoning"], parts["answer"]


def read_message(prompt: str = "> ") -> str:
    """One message from the terminal; a line ending in \\ continues on the next."""
    lines = [input(prompt)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("... "))
    return "\n".join(lines).strip()


def chat(engine: Engine, tok: DeepSeekTokenizer, console: Console, system: str = "", temperature: float = 0.6,
         top_p: float = 0.95, max_tokens: int = 1024, think: bool = True) -> None:
    """Talk with the model until /exit, Ctrl-D or Ctrl-C at the prompt."""
    messages: list[dict] = []
    while True:
        try:
            text = read_message()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/exit":
                return
            if cmd == "/reset":
                messages = []
                console.print("[dim](new conversation)[/]")
            elif cmd == "/system":
                system = arg.strip()
                console.print(f"[dim](system prompt {'set' if system else 'cleared'})[/]")
            elif cmd == "/temp":
                try:
                    temperature = float(arg)
                    console.print(f"[dim](temperature {temperature})[/]")
                except ValueError:
                    console.print("[red]usage: /temp 0.7[/]")
            else:
                console.print(f"[red]unknown command {cmd}[/] (/reset /system /temp /exit)")
            continue
        messages.append({"role": "user", "content": text})
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            ids = tok.render_prompt(convo, thinking=think)
            req = engine.submit(ids, SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p))
        except (InvalidRequest, EngineBusy, ChatFormatError) as e:
            messages.pop()
            console.print(f"[red]{e}[/] (try /reset)")
            continue
        reasoning, answer = stream_reply(engine, req, tok.opens_thinking(ids), console)
        messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
