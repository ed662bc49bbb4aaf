"""GRPO throughput: nanoseek's RL loop vs TRL's GRPOTrainer on the same model, task, reward and settings.

Both train the shipped model (nanoseek/assets/model; transformers' DeepseekV3ForCausalLM loads the
same folder, its MTP layer left out) on the same problems of one task family, rendered by the same
chat template (R1 mode, thinking on; the token ids are checked equal), scored by nanoseek's reward
(accuracy + 0.1 format), with the same group size, completion budget, temperature, KL beta, clip
range, learning rate and one update per batch of rollouts. nanoseek runs its real training loop
(`Trainer.fit` over `Rollouts` and `GRPOObjective`); TRL runs `GRPOTrainer.train` (generation with
transformers' `generate`, CPU, fp32). The two run interleaved in one process (TRL k steps, nanoseek
k steps, repeat), because this machine's speed drifts between minutes.

A step = sample prompts x group completions, score them, one optimizer step. samples/s counts
completions generated per second of step time (nanoseek drops groups whose rewards are all equal
before the update, and resamples if every group is uniform: generated samples are counted either way).

    python bench/grpo_throughput.py                        # countdown, 8 prompts x 8, 3 timed rounds (~6 min)
    python bench/grpo_throughput.py --prompts 16 --rounds 4   # the speedrun's 16 x 8 = 128 completions a step
    python bench/grpo_throughput.py --prompts 2 --rounds 1 --warmup 0   # a quick end-to-end check
    python bench/grpo_throughput.py --task mul --eager     # the mul family; nanoseek's rollouts decoding eagerly
    OMP_NUM_THREADS=1 python bench/grpo_throughput.py      # on a shared machine: two threads on two busy cores
                                                           # run many times slower (threads wait on each other)
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

import nanoseek
from nanoseek.data.tasks import TASKS, Problem, get_task
from nanoseek.data.tasks.rewards import reward
from nanoseek.inference import Engine
from nanoseek.machine import decide_rollout_compile
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.train.grpo import GRPOObjective, Rollouts, prompt_ids
from nanoseek.train.loop import Trainer
from nanoseek.train.settings import RL_TRAIN, GRPOConfig, TrainConfig

MODEL = Path(nanoseek.__file__).parent / "assets" / "model"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def rollout_problems(cfg: GRPOConfig, n: int) -> list[Problem]:
    """The first n problems nanoseek's `Rollouts` draws (the same random sequence as Rollouts._sample)."""
    rng, tasks = random.Random(cfg.seed), {t: get_task(t) for t in cfg.tasks}
    return [tasks[name].sample(rng, "train", canonical=cfg.canonical)
            for name in (rng.choice(cfg.tasks) for _ in range(n))]


class CountedRollouts:
    """nanoseek's Rollouts, recording for each step the completions generated (retries included) and
    the seconds taken by the rollouts (sampling and rewards)."""

    def __init__(self, rollouts: Rollouts):
        self.rollouts, self.samples, self.rollout_s = rollouts, [], []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        before, t0 = self.rollouts.draws, time.perf_counter()
        batch = next(self.rollouts)
        self.rollout_s.append(time.perf_counter() - t0)
        self.samples.append(self.rollouts.draws - before)
        return batch

    def state_dict(self) -> dict:
        return self.rollouts.state_dict()


class NanoseekGRPO:
    """nanoseek's GRPO run (as `nanoseek rl` sets it up) in a temporary run folder, advanced k steps at a time."""

    def __init__(self, model_dir: Path, cfg: GRPOConfig, train: TrainConfig, run_dir: Path, compile: bool):
        tok = DeepSeekTokenizer.load(model_dir)
        torch.manual_seed(train.seed)
        model = nanoseek.load_model(model_dir, dtype=torch.float32)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        rollouts = Rollouts(model, tok, cfg)
        if compile:  # the same engine, with compiled decode steps (a small MLA model's go through the C++ step either way)
            rollouts.engine = Engine(model, decode=tok.decode, max_batch=rollouts.engine.max_batch,
                                     max_len=rollouts.engine.max_len, eos_token_id=tok.eos_id, compile=True, native=True)
        self.data = CountedRollouts(rollouts)
        self.budget = rollouts.budget
        # as `nanoseek rl`: the policy trains eagerly (the engine calls its layers at ever-changing shapes),
        # in the precision the trainer picks for this machine
        self.trainer = Trainer(run_dir, model, self.data, GRPOObjective(cfg, ref), replace(train, compile=False),
                               console=Console(file=io.StringIO()))

    def run(self, steps: int) -> None:
        self.trainer.cfg = replace(self.trainer.cfg, max_steps=self.trainer.step + steps)
        self.trainer.fit()

    def step_times(self) -> list[float]:
        """Seconds of each step, from the run's metrics log (the loop times each step itself)."""
        records = [json.loads(line) for line in (self.trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [0.0] + [r["time"] for r in records]
        return [b - a for a, b in itertools.pairwise(times)]


def trl_trainer(model_dir: Path, problems: list[Problem], cfg: GRPOConfig, train: TrainConfig, budget: int,
                steps: int, out: Path, on_step):
    """TRL's GRPOTrainer with the same settings; on_step(trainer_state, seconds) after each optimizer step."""
    import datasets
    import transformers
    import trl

    tasks = {name: get_task(name) for name in cfg.tasks}

    def nanoseek_reward(completions, index, **_):
        return [reward(tasks[problems[i].family], problems[i], c[0]["content"], cfg.format_weight)
                for c, i in zip(completions, index)]

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **_):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            on_step(state, time.perf_counter() - self.t0)

    rows = [{"prompt": [{"role": "user", "content": p.question}], "index": i} for i, p in enumerate(problems)]
    args = trl.GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=10**9,
        disable_tqdm=True, seed=train.seed, max_steps=steps, shuffle_dataset=False,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size, gradient_accumulation_steps=1,
        num_generations=cfg.group_size, steps_per_generation=1, num_iterations=cfg.updates_per_rollout,
        max_completion_length=budget, temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta,
        epsilon=cfg.eps_low, epsilon_high=cfg.eps_high, loss_type="grpo", scale_rewards="group",
        learning_rate=train.lr, lr_scheduler_type="constant", weight_decay=train.weight_decay,
        adam_beta1=train.beta1, adam_beta2=train.beta2, max_grad_norm=train.grad_clip,
        gradient_checkpointing=False,  # TRL's default recomputes activations (memory for time); nanoseek doesn't
        model_init_kwargs={"dtype": torch.float32})
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(model=str(model_dir), reward_funcs=nanoseek_reward, args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[StepTimer()])
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training metrics dict
    return trainer


def check_same_model_and_prompts(model_dir: Path, problem: Problem, hf_tokenizer) -> float:
    """TRL's prompt rendering gives nanoseek's prompt ids, and transformers' model nanoseek's logits;
    returns the largest logit difference."""
    import transformers

    tok = DeepSeekTokenizer.load(model_dir)
    ours = prompt_ids(tok, problem.question, "r1")
    theirs = hf_tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)
    if list(theirs["input_ids"]) != ours:
        raise SystemExit(f"error: TRL's prompt ids {list(theirs['input_ids'])} differ from nanoseek's {ours}")
    x = torch.tensor([ours])
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - nanoseek.load_model(model_dir, dtype=torch.float32)(x).logits).abs().max()
    if diff > 1e-3:
        raise SystemExit(f"error: transformers' and nanoseek's logits differ by {diff:.2g}: not the same model")
    return float(diff)


def summary(name: str, times: list[float], samples: list[int]) -> float:
    """Prints one line; returns the median samples/s."""
    rates = [n / t for n, t in zip(samples, times)]
    med = statistics.median(rates)
    print(f"{name:>9}: step min {min(times):6.2f} s  median {statistics.median(times):6.2f} s  "
          f"samples/s median {med:6.1f} (best {max(rates):6.1f})  "
          f"updates/s median {statistics.median(1 / t for t in times):.3f}")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="countdown",
                    help="one task family, so both have the same completion budget (nanoseek's token_budget); "
                    "countdown: the speedrun's RL family whose groups vary (the shipped model solves ~30%%; it solves "
                    "add nearly always, so nanoseek would resample and skip its updates)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (completions = prompts x group)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (TRL's num_generations)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs --block steps of TRL, then of nanoseek")
    ap.add_argument("--block", type=int, default=1, help="steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each before the rounds")
    ap.add_argument("--eager", action="store_true", help="nanoseek's rollouts decode eagerly (by default they compile "
                    "where `nanoseek rl` would: wherever a compiler is)")
    args = ap.parse_args()
    for flag in ("prompts", "rounds", "block"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1")
    if args.group < 2:
        ap.error("--group must be >= 2 (advantages are relative within a group)")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")

    import transformers

    transformers.logging.set_verbosity_error()  # the MTP layer's weights, unknown to transformers, are skipped
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed gradient-checkpointing calls
    cfg = GRPOConfig(tasks=[args.task], prompts_per_step=args.prompts, group_size=args.group,
                     no_thinking_share=0.0)  # TRL asks every prompt with thinking on
    train = replace(RL_TRAIN, warmup_steps=0, max_steps=1, checkpoint_every=0)
    total = args.warmup + args.rounds * args.block
    problems = rollout_problems(cfg, total * args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = decide_rollout_compile(False if args.eager else None, torch.device("cpu"))[0]
        ours = NanoseekGRPO(MODEL, cfg, train, Path(tmp) / "nanoseek", compiled)
        budget = ours.budget[args.task]
        trl_times: list[float] = []

        def after_trl_step(state, seconds):
            trl_times.append(seconds)
            done = state.global_step - args.warmup
            if done == 0 or (done > 0 and done % args.block == 0):  # then the same steps of nanoseek
                ours.run(args.warmup if done == 0 else args.block)

        theirs = trl_trainer(MODEL, problems, cfg, train, budget, total, Path(tmp) / "trl", after_trl_step)
        diff = check_same_model_and_prompts(MODEL, problems[0], theirs.processing_class)
        print(f"{cpu_name()}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, trl {sys.modules['trl'].__version__}")
        print(f"task {args.task}: {args.prompts} prompts x {args.group} = {args.prompts * args.group} completions "
              f"per step, max {budget} new tokens, temperature {cfg.temperature}, beta {cfg.beta}, lr {train.lr}, "
              f"fp32 weights (nanoseek's update in {ours.trainer.precision.name}, TRL's in fp32); nanoseek engine "
              f"{'compiled' if compiled else 'eager'}; {args.rounds} rounds of "
              f"{args.block} steps each after {args.warmup} warm-up; same model (max logit diff {diff:.1e})")
        theirs.train()
        our_times = ours.step_times()[args.warmup:]
    trl_times = trl_times[args.warmup:]
    our_samples = ours.data.samples[args.warmup:]
    trl_rate = summary("TRL", trl_times, [args.prompts * args.group] * len(trl_times))
    our_rate = summary("nanoseek", our_times, our_samples)
    rollout = statistics.median(ours.data.rollout_s[args.warmup:])
    print(f"nanoseek median step: {rollout:.2f} s rollouts (sampling, rewards), "
          f"{statistics.median(our_times) - rollout:.2f} s update (reference and policy log-probs, backward, optimizer)")
    print(f"ratio nanoseek / TRL samples/s (median): {our_rate / trl_rate:.2f}x;  updates/s: "
          f"{statistics.median(trl_times) / statistics.median(our_times):.2f}x")


if __name__ == "__main__":
    main()
