"""R1-style reinforcement learning: GRPO with rule-based rewards, on the one training loop.

Each training step's "batch" is a fresh set of rollouts (`Rollouts`, the loop's data source):
P train-split problems, G samples each through the engine (the prompt is prefilled once and
shared by its G samples), scored by the task's rewards (accuracy from after </think>, plus a
format bonus), turned into group-normalised advantages. Groups whose rewards are all equal
carry no signal and are dropped. The calculator family is asked with the calculator offered (as
the server offers it): a reply that calls it gets the result back, the model answers from it, and
the sample trains on both of its turns (the call, and the answer after a right result). The
behaviour policy's log-probabilities (and the reference model's, when beta > 0) are computed by
`GRPOObjective` at the batch's first update, in the precision the update runs in (so the first
update's ratio is exactly 1 and KL to an unchanged policy 0); the objective is the clipped
surrogate plus beta * KL (k3). Modes: R1 (after SFT, the chat template) and R1-Zero (straight
from a pretrained base, with the R1-Zero prompt).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from ..checkpoint import load_model, refuse_quantized
from ..data.tasks import token_budget
from ..data.tasks.rewards import accuracy_reward, format_reward, reward, without_thinking
from ..data.tool_use import Calculator, rl_task
from ..eval.tasks import thinking_off
from ..eval.tool_use import ANSWER_TOKENS, CalculatorOffer
from ..inference import Engine, SamplingParams
from ..model.config import ConfigError
from ..tokenizer import DeepSeekTokenizer
from . import distributed as D
from .loop import Trainer
from ..machine import decide_rollout_compile, use_disk_cache
from .losses import clipped_policy_loss, group_advantages, kl_k3, reduce_loss, token_logprobs, varied_groups
from .runs import recorded_run, run_stage
from .settings import RL_TRAIN, GRPOConfig, TrainConfig

R1_ZERO_TEMPLATE = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves "
                    "it. The Assistant first thinks about the reasoning process and then gives the User the answer. "
                    "The reasoning ends with </think>, followed by the answer.\nUser: {question}\nAssistant: <think>\n")


def prompt_ids(tok: DeepSeekTokenizer, question: str, mode: str, thinking: bool = True) -> list[int]:
    if mode == "r1-zero":
        return [tok.bos_id] + tok.encode(R1_ZERO_TEMPLATE.format(question=question))
    return tok.render_prompt([{"role": "user", "content": question}], thinking=thinking)


class Rollouts:
    """The RL 'data source': each next() samples, scores and packs one step of rollouts."""

    def __init__(self, model, tok: DeepSeekTokenizer, cfg: GRPOConfig, max_batch: int = 256, compile: bool = False,
                 console: Console | None = None):
        self.model, self.tok, self.cfg, self.console = model, tok, cfg, console
        self.tasks = {t: rl_task(t) for t in cfg.tasks}
        # the calculator family: hard problems with the calculator offered, its calls run for real
        self.offer = CalculatorOffer(tok, model.config.vocab_size) if Calculator.name in cfg.tasks else None
        # without a call the model works a big multiplication out: mul's budget
        self.budget = {t: cfg.max_new_tokens or token_budget(tok, "mul" if t == Calculator.name else t)
                       for t in cfg.tasks}
        tools_prompt = len(self.offer.prompt(self.offer.chat(""))) if self.offer else 0  # the tools' description
        # every sample of a step decodes in one batch (a second wave would wait on the first's stragglers);
        # compiled, the engine notices the weights changed between rollouts (Engine._check_weights)
        # no decode function: the engine would decode every row's text at every step; the texts are
        # decoded once, when the rollouts are done
        self.engine = Engine(model, max_batch=min(max_batch, cfg.prompts_per_step * cfg.group_size),
                             max_len=max(self.budget.values()) + 256 + tools_prompt, eos_token_id=tok.eos_id,
                             compile=compile, native=True)
        self.thinking_off = thinking_off(tok)  # what a thinking-off rollout follows, as serving asks it
        self.rng = random.Random(cfg.seed)
        self.draws = 0
        self._last: dict | None = None  # the latest rollouts, reused for updates_per_rollout steps
        self._uses = 0

    def state_dict(self) -> dict:
        # rollouts with updates still to serve (their frozen log-probs too): a run resumed between two updates on one
        # batch updates on it again, as the run never stopped does (it had drawn new rollouts there)
        left = self._last is not None and self._uses < self.cfg.updates_per_rollout
        return {"rng": self.rng.getstate(), "draws": self.draws, "last": self._last if left else None,
                "uses": self._uses if left else 0}

    def load_state_dict(self, s: dict) -> None:
        self.rng.setstate(s["rng"])
        self.draws = s["draws"]
        self._last, self._uses = s.get("last"), s.get("uses", 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """Sample until some group has varied rewards (at most 3 tries); with updates_per_rollout > 1 the
        same rollouts (and their behaviour log-probs) serve several steps, logged once."""
        if self._last is not None and self._uses < self.cfg.updates_per_rollout:
            self._uses += 1
            return {**self._last, "stats": {}}
        for _ in range(3):
            batch = self._sample()
            if batch["n"]:
                break
        if self.console is not None and self._last is None and self.cfg.mode == "r1" and not batch["stats"]["format_rate"]:
            self.console.print("[yellow]no rollout closed its reasoning with </think> and answered[/]: R1 mode asks "
                               "through the chat template, and this model has not learned to answer there (a base "
                               "model, or too short an SFT): train it with --mode r1-zero, or (more) `nanoseek sft` "
                               "first")
        self._last, self._uses = batch, 1
        return batch

    @torch.no_grad()
    def _sample(self) -> dict:
        cfg, tok = self.cfg, self.tok
        t0 = time.perf_counter()
        problems = []
        for _ in range(cfg.prompts_per_step):
            name = self.rng.choice(cfg.tasks)
            problem = self.tasks[name].sample(self.rng, "train", canonical=cfg.canonical)
            thinking = not (cfg.no_thinking_share and cfg.mode == "r1" and name != Calculator.name
                            and self.rng.random() < cfg.no_thinking_share)
            problems.append((name, problem, thinking))
        samples, prompts, params = [], [], []  # samples: (task, problem, chat when the calculator is offered)
        thinks = []  # per sample: was it asked with thinking on
        for name, p, thinking in problems:
            chat = self.offer.chat(p.question) if name == Calculator.name else None
            ids = self.offer.prompt(chat) if chat else prompt_ids(tok, p.question, cfg.mode, thinking)
            room = self.engine.max_len - len(ids)  # a small model's context may not hold the whole budget
            if room < 1:
                raise ConfigError(f"{name}: a prompt of {len(ids)} tokens fills the model's {self.engine.max_len}-token "
                                  "context")
            for _ in range(cfg.group_size):
                samples.append((self.tasks[name], p, chat))
                prompts.append(ids)
                thinks.append(thinking)
                grammar = self.offer.grammar if chat else None if thinking else self.thinking_off
                params.append(self._params(min(self.budget[name], room), grammar))
        self.model.eval()
        reqs = self.engine.generate(prompts, params)
        texts = [tok.decode([t for t in r.tokens if t != tok.eos_id]) for r in reqs]  # as the engine would show them
        # a thinking-off reply is scored as evaluation scores it: its last line is the answer
        texts = [text if thinking else without_thinking(text) for text, thinking in zip(texts, thinks)]
        rows = [[(prompt, r.tokens)] for prompt, r in zip(prompts, reqs)]  # each sample's (prompt, completion)s
        answers, calls = self._follow_calls(samples, prompts, texts, rows)
        rollout_time = time.perf_counter() - t0
        rewards = torch.tensor([reward(task, p, text, cfg.format_weight, answer)
                                for (task, p, _), text, answer in zip(samples, texts, answers)])
        accuracy = torch.tensor([accuracy_reward(task, p, text, answer)
                                 for (task, p, _), text, answer in zip(samples, texts, answers)])
        # the rate among the replies that reasoned (a thinking-off reply without think tags is well-formed as scored)
        format_rate = torch.tensor([format_reward(text) for text in
                                    [text for text, thinking in zip(texts, thinks) if thinking] or texts])
        adv = group_advantages(rewards, cfg.group_size, scale=not cfg.dr_grpo)
        keep = varied_groups(rewards, cfg.group_size)
        lengths = torch.tensor([sum(len(c) for _, c in r) for r in rows], dtype=torch.float)
        stats = {"reward": rewards.mean().item(), "accuracy": accuracy.mean().item(),
                 "format_rate": format_rate.mean().item(),
                 "response_length": lengths.mean().item(), "groups_kept": keep.float().mean().item(),
                 "rollout_s": rollout_time}
        if not all(thinks):
            stats["accuracy_thinking_off"] = accuracy[[not t for t in thinks]].mean().item()
        offered = [i for i, s in enumerate(samples) if s[2] is not None]
        if offered:
            stats["calculator_calls"] = calls / len(offered)
        # a sample that called the calculator trains on its turns (see _follow_calls), each with its advantage
        picked = [(prompt, completion, adv[i]) for i in keep.nonzero().flatten().tolist() for prompt, completion in rows[i]]
        batch = {"stats": stats, "n": len(picked)}
        if picked:
            batch.update(self._pack([p for p, _, _ in picked], [c for _, c, _ in picked],
                                    torch.stack([a for _, _, a in picked])))
        self.model.train()
        return batch

    def _params(self, max_new_tokens: int, grammar=None) -> SamplingParams:
        self.draws += 1
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              seed=self.cfg.seed * 1_000_003 + self.draws - 1, grammar=grammar)

    def _follow_calls(self, samples, prompts, texts, rows) -> tuple[list[str | None], int]:
        """Run the calculator calls the replies made and sample each caller's answer from the results (the
        conversation rendered as serving renders it: the calls, then their results). The answer's (prompt,
        completion) joins the sample's rows when the results hold the right answer: after a wrong call the
        sample's reward says nothing of the answer turn (a faithful answer from a wrong result would be
        punished, and measured so: answers from right results got worse). -> (each sample's answer when it
        came after a call, else None: the answer is the one after the reasoning; the number of samples
        that called). A call whose result leaves no room for an answer is graded on that: wrong."""
        answers: list[str | None] = [None] * len(samples)
        continued = {}  # sample -> its conversation with the calls and their results
        for i, ((_, _, chat), prompt, text) in enumerate(zip(samples, prompts, texts)):
            if chat is not None and (after := self.offer.follow_up(chat, prompt, text)[1]) is not None:
                continued[i] = after
        follow = self.offer.answer_prompts(continued, self.engine.max_len) if continued else {}
        if follow:
            reqs = self.engine.generate(list(follow.values()), [self._params(ANSWER_TOKENS) for _ in follow])
            for (i, prompt), r in zip(follow.items(), reqs):
                answers[i] = self.tok.decode([t for t in r.tokens if t != self.tok.eos_id])
                task, problem, _ = samples[i]
                if any(task.verify(problem, m["content"]) for m in continued[i] if m["role"] == "tool"):
                    rows[i].append((prompt, r.tokens))
        return answers, len(continued)

    def _pack(self, prompts: list[list[int]], completions: list[list[int]], adv: torch.Tensor) -> dict:
        """Right-padded prompt+completion rows, longest first, and the completion mask. `frozen` holds
        the behaviour and reference log-probs once the objective has computed them (shared by every
        update on these rollouts)."""
        order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
        prompts, completions, adv = [prompts[i] for i in order], [completions[i] for i in order], adv[order]
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        N, L = len(prompts), lengths[0]
        ids = torch.full((N, L), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros(N, L - 1, dtype=torch.bool)  # position t predicts token t + 1
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p) - 1: len(p) + len(c) - 1] = True
        device = next(self.model.parameters()).device
        return {"ids": ids.to(device), "mask": mask.to(device), "lengths": lengths, "adv": adv.to(device),
                "frozen": {}, "max_len": max(self.budget.values())}


def length_chunks(lengths: list[int], max_tokens: int = 8192, slack: float = 0.15) -> list[tuple[slice, int]]:
    """Consecutive rows of a longest-first batch in chunks: (rows, the chunk's own padded length).
    A chunk holds at most about max_tokens padded tokens, and only rows at least (1 - slack) of its
    longest, so padding stays under slack of the tokens computed (a batch of one long completion
    and many short ones was padded to the longest: twice the tokens a GRPO step needed)."""
    out, start = [], 0
    while start < len(lengths):
        width, stop = lengths[start], start + 1
        while (stop < len(lengths) and lengths[stop] >= (1 - slack) * width
               and (stop - start + 1) * width <= max_tokens):
            stop += 1
        out.append((slice(start, stop), width))
        start = stop
    return out


def sequence_logprobs(model, ids: torch.Tensor, lengths: list[int] | None = None,
                      max_tokens: int = 8192) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) for every position -> [N, L - 1]. With the rows' lengths
    (longest first) each chunk of rows runs at its longest row's length (0 beyond it)."""
    N, L = ids.shape
    parts = []
    for rows, width in length_chunks(lengths or [L] * N, max_tokens):
        hidden = model(ids[rows, :width], logits=False).hidden[:, :-1]
        logp = token_logprobs(model.lm_head(hidden), ids[rows, 1:width])
        parts.append(F.pad(logp, (0, L - width)))  # (rows, L - 1)
    return torch.cat(parts)


class GRPOObjective:
    """The clipped surrogate + beta * KL to `ref_model` (the frozen starting policy; needed when beta > 0)."""

    def __init__(self, cfg: GRPOConfig, ref_model=None):
        if cfg.beta > 0 and ref_model is None:
            raise ValueError("a KL penalty (beta > 0) needs the reference model")
        self.cfg, self.ref = cfg, ref_model

    @torch.no_grad()
    def frozen_logprobs(self, model, batch: dict) -> dict:
        """The behaviour policy's log-probs (only when the rollouts serve several updates: with one, they
        are the update's own, detached) and the reference model's, computed at the batch's first update
        under the same autocast as the update, and kept for the batch's later updates."""
        frozen = batch["frozen"]
        if not frozen:
            ids, lengths = batch["ids"], batch["lengths"]
            was_training = model.training
            model.eval()
            frozen["old"] = sequence_logprobs(model, ids, lengths) if self.cfg.updates_per_rollout > 1 else None
            model.train(was_training)
            frozen["ref"] = sequence_logprobs(self.ref, ids, lengths) if self.cfg.beta > 0 else None
        return frozen

    def weight(self, batch: dict) -> float:
        if batch["n"] == 0:
            return 0.0
        mask = batch["mask"]
        return reduce_loss(torch.zeros_like(mask, dtype=torch.float), mask, self.cfg.loss_norm, batch["max_len"])[1]

    def __call__(self, model, batch: dict):
        w = self.weight(batch)
        stats = {k: torch.tensor(v * max(w, 1.0)) for k, v in batch["stats"].items()}  # means, as sums
        if batch["n"] == 0:  # every group was uniform: nothing to learn from this step
            zero = sum(p.sum() * 0 for p in model.parameters())
            return zero, stats
        ids, mask = batch["ids"], batch["mask"]
        frozen = self.frozen_logprobs(model, batch)
        logp = sequence_logprobs(model, ids, batch["lengths"])
        old_logp = frozen["old"] if frozen["old"] is not None else logp.detach()
        per_token, clipped = clipped_policy_loss(logp, old_logp, batch["adv"], self.cfg.eps_low,
                                                 self.cfg.eps_high)
        kl = kl_k3(logp, frozen["ref"]) if frozen["ref"] is not None else torch.zeros_like(logp)
        if self.cfg.beta > 0:
            per_token = per_token + self.cfg.beta * kl
        loss, weight = reduce_loss(per_token, mask, self.cfg.loss_norm, batch["max_len"])
        m = mask.float()
        n_tok = m.sum().clamp(min=1)
        scale = weight / n_tok  # report token means, expressed as sums over this batch's weight
        stats.update({"kl": (kl.detach() * m).sum() * scale, "clip_fraction": (clipped.float() * m).sum() * scale,
                      "entropy_proxy": (-logp.detach() * m).sum() * scale})
        return loss, stats


def rl(model_dir: str | Path, out: str | Path, cfg: GRPOConfig | None = None, train: TrainConfig | None = None,
       device: str | None = None, console: Console | None = None) -> dict[str, float]:
    """GRPO from a model folder; writes out/model at the end. One process (rollouts are local)."""
    cfg, train = cfg or GRPOConfig(), train or RL_TRAIN
    console = console or Console()
    with D.process_group(device) as info:
        if info.active:
            raise ConfigError("nanoseek rl runs in one process (rollouts and updates share the model)")
        refuse_quantized(model_dir)
        recorded_run(Path(out), "rl")  # (refused before the model loads: another command's folder, or a model's)
        tok = DeepSeekTokenizer.load(model_dir)
        torch.manual_seed(train.seed)
        model = load_model(model_dir, dtype=torch.float32, device=info.device)
        ref = None
        if cfg.beta > 0:
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
        # `compile` applies to the rollouts (decoding is most of a GRPO step); the policy's layers stay
        # eager, since the engine's prefill and compiled decode call them at ever-changing shapes
        compile_rollouts, why = decide_rollout_compile(train.compile, info.device, train.time_budget)
        console.print(f"rollouts: {'compiled' if compile_rollouts else 'eager'} ({why})")
        if compile_rollouts:
            use_disk_cache()
        rollouts = Rollouts(model, tok, cfg, compile=compile_rollouts, console=console)
        run_config = {"command": "rl", "base_model": str(model_dir), "grpo": asdict(cfg),
                      "rollouts_compiled": compile_rollouts}
        return run_stage(Trainer(out, model, rollouts, GRPOObjective(cfg, ref), replace(train, compile=False),
                                 run_config=run_config, save_extra=tok.save, console=console, dist=info,
                                 compile_why="the policy's updates; --compile is the rollouts'"))
