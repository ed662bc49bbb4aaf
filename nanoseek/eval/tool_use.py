"""Held-out accuracy of calculator use: hard problems (data/tool_use.py's Calculator family, test
split) asked with the calculator offered (the model may call it; calls run for real, and the model
answers from the result) or not offered (it must work them out), with thinking on or off.

`CalculatorOffer` is the calculator offered the way the server offers it under `tool_choice: "auto"`
(the same tool description and call grammar); GRPO's rollouts offer it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.tasks import Problem
from ..data.tool_use import Calculator
from ..inference import Engine, SamplingParams
from ..inference.constraints import Grammar, vocabulary
from ..reasoning import split_reasoning
from ..tokenizer import DeepSeekTokenizer
from ..tools import CALCULATOR, CallFormat, call_trigger, describe_tools, renders_tools, run_calculator

ANSWER_TOKENS = 64  # the reply after the calculator's result: the answer alone


class CalculatorOffer:
    """The calculator offered to a model as the server offers it: described by the chat template if it
    renders tools, else in a system message; and a grammar under which a reply is free text until it
    opens a block of calls, each valid for the calculator."""

    def __init__(self, tok: DeepSeekTokenizer, n_vocab: int):
        fmt = CallFormat.probe(tok)
        if fmt is None:
            raise ValueError("this model's chat template has no tool-call format")
        self.tok, self.fmt = tok, fmt
        self.tools = [CALCULATOR] if renders_tools(tok) else None  # what the template is given
        self.system = None if self.tools else describe_tools([CALCULATOR], fmt)
        vocab = vocabulary(tok.tok.to_str(), n_vocab, tok.eos_ids)
        self.grammar = Grammar.compile(vocab, "start: answer\n" + fmt.grammar([CALCULATOR], tok, rule="answer"),
                                       call_trigger(tok, fmt))

    def chat(self, question: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": question}]

    def prompt(self, chat: list[dict], thinking: bool = True) -> list[int]:
        return self.tok.render_prompt(chat, thinking=thinking, tools=self.tools)

    def follow_up(self, chat: list[dict], prompt: list[int], reply: str) -> tuple[str, list[dict] | None]:
        """(the reply's answer text, the conversation continued with the calls and their results, or None
        when the reply called nothing). The calls run for real."""
        _, answer = split_reasoning(reply, started=self.tok.opens_thinking(prompt))
        content, calls, _ = self.fmt.split(answer)
        if not calls:
            return content, None
        return content, chat + [{"role": "assistant", "content": content or None, "tool_calls": calls}] + [
            {"role": "tool", "tool_call_id": c["id"], "content": run_calculator(c["function"]["arguments"])}
            for c in calls]

    def answer_prompts(self, continued: dict[int, list[dict]], max_len: int) -> dict[int, list[int]]:
        """The conversations continued after their calls, rendered for the answer; one with no room left
        for it within max_len tokens (a result thousands of digits long) is left out: unanswered."""
        prompts = {i: self.prompt(chat) for i, chat in continued.items()}
        return {i: p for i, p in prompts.items() if len(p) + ANSWER_TOKENS <= max_len}


@dataclass
class ToolUseResult:
    offered: bool
    thinking: bool
    n: int
    accuracy: float
    called: float  # share of questions where the model called the calculator

    def row(self) -> str:
        return (f"| {'yes' if self.offered else 'no'} | {'on' if self.thinking else 'off'} | {self.n} | "
                f"{self.accuracy:.1%} | {self.called:.0%} |")


def tool_table(results: list[ToolUseResult]) -> str:
    return ("| calculator offered | thinking | n | accuracy | called |\n|---|---|---|---|---|\n"
            + "\n".join(r.row() for r in results))


def evaluate_tool_use(engine: Engine, tok: DeepSeekTokenizer, n: int = 100, offered: bool = True,
                      thinking: bool = True, max_new_tokens: int = 384, seed: int = 1234) -> ToolUseResult:
    task = Calculator()
    problems: list[Problem] = task.heldout(n, seed, canonical=False)
    offer = CalculatorOffer(tok, engine.config.vocab_size) if offered else None
    chats = [offer.chat(p.question) if offer else [{"role": "user", "content": p.question}] for p in problems]
    prompts = [offer.prompt(chat, thinking) if offer else tok.render_prompt(chat, thinking=thinking) for chat in chats]
    room = engine.max_len - max(map(len, prompts))  # a small model's context may not hold max_new_tokens more
    if room < 1:
        raise ValueError(f"the questions fill this engine's {engine.max_len}-token context: no room to answer")
    params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0.0,
                            stop_token_ids=tuple(tok.eos_ids), grammar=offer.grammar if offer else None)
    answers, follow = [], {}
    for i, (chat, prompt, req) in enumerate(zip(chats, prompts, engine.generate(prompts, [params] * n))):
        if offer:
            answer, continued = offer.follow_up(chat, prompt, req.text)
            if continued:
                follow[i] = continued
        else:
            answer = split_reasoning(req.text, started=tok.opens_thinking(prompt))[1]
        answers.append(answer)
    plain = SamplingParams(max_new_tokens=ANSWER_TOKENS, temperature=0.0, stop_token_ids=tuple(tok.eos_ids))
    if follow:
        again = offer.answer_prompts(follow, engine.max_len)
        for i, req in zip(again, engine.generate(list(again.values()), [plain] * len(again))):
            answers[i] = req.text
    correct = sum(task.verify(p, a) for p, a in zip(problems, answers))
    return ToolUseResult(offered, thinking, n, correct / n, len(follow) / n)
