"""Held-out accuracy of calculator use: hard problems (data/tool_use.py, test split) asked with the
calculator offered (the model may call it; calls run for real, and the model answers from the
result) or not offered (it must work them out), with thinking on or off.

The calls follow the same grammar and tool description as the server's `tool_choice: "auto"`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..data.tool_use import ASK, expression, hard_problem, value
from ..inference import Engine, SamplingParams
from ..inference.constraints import Grammar, vocabulary
from ..reasoning import split_reasoning
from ..tokenizer import DeepSeekTokenizer
from ..tools import CALCULATOR, CallFormat, describe_tools, run_calculator


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


def evaluate_tool_use(engine: Engine, tok: DeepSeekTokenizer, n: int = 100, offered: bool = True,
                      thinking: bool = True, max_new_tokens: int = 384, seed: int = 1234) -> ToolUseResult:
    fmt = CallFormat.probe(tok)
    if offered and fmt is None:
        raise ValueError("this model's chat template has no tool-call format")
    rng = random.Random(seed + (1 << 20))  # the held-out split's seeds
    problems = [hard_problem(rng) for _ in range(n)]
    chats = [[{"role": "user", "content": rng.choice(ASK).format(e=expression(t, rng))}] for t in problems]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(tok.eos_ids))
    if offered:
        for chat in chats:
            chat.insert(0, {"role": "system", "content": describe_tools([CALCULATOR], fmt)})
        vocab = vocabulary(tok.tok.to_str(), engine.config.vocab_size, tok.eos_ids)
        opener = tok.encode(fmt.opener)[0]
        grammar = Grammar.compile(vocab, "start: answer\n" + fmt.grammar([CALCULATOR], tok, rule="answer"), opener)
        params = replace(params, grammar=grammar)
    prompts = [tok.render_prompt(chat, thinking=thinking) for chat in chats]
    first = engine.generate(prompts, [params] * n)
    answers, called = [], []
    for chat, prompt, req in zip(chats, prompts, first):
        _, answer = split_reasoning(req.text, started=tok.opens_thinking(prompt))
        content, calls, _ = fmt.split(answer) if offered else (answer, [], True)
        called.append(bool(calls))
        if calls:  # run them and let the model answer from the results
            chat += [{"role": "assistant", "content": content or None, "tool_calls": calls}]
            chat += [{"role": "tool", "tool_call_id": c["id"], "content": run_calculator(c["function"]["arguments"])}
                     for c in calls]
        answers.append(content)
    again = [i for i, c in enumerate(called) if c]
    plain = SamplingParams(max_new_tokens=64, temperature=0.0, stop_token_ids=tuple(tok.eos_ids))
    for i, req in zip(again, engine.generate([tok.render_prompt(chats[i]) for i in again], [plain] * len(again))):
        answers[i] = req.text
    correct = [a.strip().rstrip(".").replace(",", "") == str(value(t)) for a, t in zip(answers, problems)]
    return ToolUseResult(offered, thinking, n, sum(correct) / n, sum(called) / n)
