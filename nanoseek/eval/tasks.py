"""Held-out task accuracy through the engine: pass@1, pass@k, majority vote, format rate, length.

The same rewards RL trains on (data/tasks/rewards.py) score the completions here, so what RL
optimises and what evaluation reports cannot drift apart.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.tasks import problems_for, token_budget
from ..data.tasks.rewards import accuracy_reward, final_answer, format_reward, without_thinking
from ..inference import Engine, SamplingParams
from ..inference.constraints import Grammar
from ..tokenizer import END_THINK, DeepSeekTokenizer


@dataclass
class FamilyResult:
    family: str
    n: int
    samples: int
    accuracy: float  # mean over problems and samples (pass@1)
    pass_at_k: float  # at least one of the samples correct
    majority: float  # the most common answer among the samples is correct
    format_rate: float
    mean_length: float  # generated tokens per sample

    def row(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def thinking_off(tok: DeepSeekTokenizer) -> Grammar | None:
    """What a reply asked with thinking off follows, as the server asks it: the think tags banned."""
    return Grammar.compile(None, None, banned=tok.think_tags) if tok.think_tags else None


def prompts_for(tok: DeepSeekTokenizer, family: str, n: int, wording: str, thinking: bool = True, seed: int = 1234):
    """n held-out problems of a family and their prompt ids."""
    task, problems = problems_for(family, n, wording, seed)
    return task, problems, [tok.render_prompt([{"role": "user", "content": p.question}], thinking=thinking)
                            for p in problems]


@dataclass
class _Answered:
    """A remote model's completion, shaped like a finished engine request (`tokens`: as many as it had)."""
    text: str
    tokens: Sequence


def _counted(reply: str) -> Sequence:
    """A remote reply's tokens as many as the server counted (its words where it reported no usage)."""
    n = getattr(reply, "completion_tokens", None)
    return range(n) if n is not None else reply.split()


def sampling_temperature(temperature: float, samples: int) -> float:
    """The temperature an evaluation samples at: as given, but 0.7 where several samples of a problem
    would otherwise all be the same greedy reply."""
    return temperature if samples == 1 else (temperature or 0.7)


def evaluate_remote(ask, specs: list[tuple[str, str]], n: int = 100, samples: int = 1, max_new_tokens: int = 512,
                    seed: int = 0, thinking: bool = True) -> list[tuple[FamilyResult, list[dict]]]:
    """The same evaluation against an OpenAI-compatible endpoint; ask(questions, max_tokens, seed) returns
    'reasoning </think> answer' texts (see remote.remote_chat)."""
    out = []
    for family, wording in specs:
        task, problems = problems_for(family, n, wording)
        texts = ask([p.question for p in problems for _ in range(samples)], max_new_tokens, seed)
        answered = [_Answered(t if thinking else without_thinking(t.partition(END_THINK)[2]), _counted(t))
                    for t in texts]  # as evaluate_many
        out.append(_score(family, task, problems, answered, samples))
    return out


def evaluate_family(engine: Engine, tok: DeepSeekTokenizer, family: str, n: int = 100, samples: int = 1,
                    temperature: float = 0.0, wording: str = "canonical", max_new_tokens: int | None = None,
                    seed: int = 0, thinking: bool = True) -> tuple[FamilyResult, list[dict]]:
    return evaluate_many(engine, tok, [(family, wording)], n, samples, temperature, max_new_tokens, seed,
                         thinking)[0]


def evaluate_many(engine: Engine, tok: DeepSeekTokenizer, specs: list[tuple[str, str]], n: int = 100,
                  samples: int = 1, temperature: float = 0.0, max_new_tokens: int | None = None,
                  seed: int = 0, thinking: bool = True) -> list[tuple[FamilyResult, list[dict]]]:
    """Several (family, wording) evaluations in one batch through the engine. With thinking off the prompt closes
    the reasoning block itself, the reply may not write a think tag (thinking_off) and is scored by without_thinking."""
    temp = sampling_temperature(temperature, samples)
    grammar = None if thinking else thinking_off(tok)
    jobs, prompts, params = [], [], []
    for family, wording in specs:
        task, problems, ids = prompts_for(tok, family, n, wording, thinking)
        cap = max_new_tokens or token_budget(tok, family)
        jobs.append((family, task, problems, len(prompts)))
        for p in ids:
            for _ in range(samples):
                params.append(SamplingParams(max_new_tokens=cap, temperature=temp, seed=seed + len(prompts),
                                             grammar=grammar))
                prompts.append(p)
    reqs = engine.generate(prompts, params)
    if not thinking:
        reqs = [_Answered(without_thinking(r.text), r.tokens) for r in reqs]
    return [_score(family, task, problems, reqs[start:start + len(problems) * samples], samples)
            for family, task, problems, start in jobs]


def _score(family, task, problems, reqs, samples) -> tuple[FamilyResult, list[dict]]:
    correct = fmt = length = passk = majority = 0
    records = []
    for i, problem in enumerate(problems):
        outs = reqs[i * samples:(i + 1) * samples]
        texts = [r.text for r in outs]
        oks = [accuracy_reward(task, problem, t) for t in texts]
        correct += sum(oks)
        fmt += sum(format_reward(t) for t in texts)
        length += sum(len(r.tokens) for r in outs)
        passk += any(oks)
        answers = Counter(a for a in (final_answer(t) for t in texts) if a)
        if answers:
            top = answers.most_common(1)[0][0]
            majority += bool(task.verify(problem, top))
        records.append({"question": problem.question, "gold": problem.answer, "completions": texts, "correct": oks})
    total = len(problems) * samples
    return FamilyResult(family, len(problems), samples, correct / total, passk / len(problems),
                        majority / len(problems), fmt / total, length / total), records


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion p measured on n trials."""
    if n == 0:
        return 0.0, 1.0
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def markdown_table(results: list[FamilyResult]) -> str:
    lines = ["| family | n | samples | pass@1 | pass@k | majority | format | mean length |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.family} | {r.n} | {r.samples} | {r.accuracy:.1%} | {r.pass_at_k:.1%} | {r.majority:.1%} | "
                     f"{r.format_rate:.1%} | {r.mean_length:.0f} |")
    return "\n".join(lines)
