"""Every stage's settings and their defaults, in one torch-free module: the stages and the speedrun
run on them, and the CLI shows them in `--help` without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..data.tool_use import rl_task
from ..model.config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")  # auto: what trains fastest on this machine (machine.py)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (the schedule's length unless time_budget ends first)
    time_budget: float = 0.0  # seconds of training (evaluation and checkpoints excluded); 0 = none
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "wsd"  # "wsd" (warmup, constant, linear decay) | "cosine" | "constant"
    decay_fraction: float = 0.3  # wsd: the last fraction of training that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    precision: str = "auto"  # fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (measured per machine)
    compile: bool | None = None  # torch.compile each layer's fixed-shape parts; None: on CUDA and for bf16 on a CPU (decide_compile)
    bias_gamma: float = 0.001  # aux-loss-free router bias update speed (0 = off)
    aux_alpha: float | None = None  # sequence-wise balance loss weight (None = the model config's)
    eval_every: int = 100  # steps (0 = only at the end)
    checkpoint_every: int = 200  # steps (a checkpoint is always written at the end)
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        for f in ("max_steps", "grad_accum", "warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, f) < 0:
                raise ConfigError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.max_steps == 0 and self.time_budget <= 0:
            raise ConfigError("give max_steps or a time_budget")
        if self.grad_accum < 1 or self.keep_checkpoints < 1:
            raise ConfigError("grad_accum and keep_checkpoints must be >= 1")
        if self.schedule not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"schedule must be wsd, cosine or constant, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["tasks", "stdlib"])
    seq_len: int = 512
    batch_size: int = 8  # rows per micro-batch per process
    vocab_size: int | None = 2048  # when a tokenizer is trained for the run (None with `tokenizer`)
    tokenizer: str | None = None  # a tokenizer folder to use instead of training one
    task_documents: int = 100_000  # "tasks": conversations generated for the train split
    # "tasks": the share answered with thinking off (the working shown in the reply), as chat SFT's: a model whose
    # pretraining never showed that form answered it 0-68% after SFT where thinking on gave 72-100%
    no_thinking_share: float = 0.15
    code_chars: int = 2_000_000  # "stdlib": characters of standard-library source
    fim_rate: float = 0.1  # FIM rate for corpus documents (DeepSeek-V3: 0.1)
    code_fim_rate: float = 0.5  # FIM rate for code (DeepSeek-Coder: 0.5)
    eval_documents: int = 1000  # held-out documents per source
    skip_bad_records: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 8 or self.batch_size < 1:
            raise ConfigError(f"seq_len must be >= 8 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if not self.sources:
            raise ConfigError("no data sources")


@dataclass
class SFTConfig:
    data: str = "builtin"  # a .jsonl of conversations, or "builtin"
    builtin_conversations: int = 30_000
    seq_len: int = 512
    batch_size: int = 8
    eval_conversations: int = 300
    mtp_lambda: float = 0.3
    seed: int = 0
    tool_share: float = 0.15  # builtin data: calculator conversations (data/tool_use.py) added on top
    no_thinking_share: float = 0.15  # builtin data: answered with thinking off


@dataclass
class GRPOConfig:
    tasks: list[str] = field(default_factory=lambda: ["mul"])
    prompts_per_step: int = 16
    group_size: int = 8
    updates_per_rollout: int = 1  # optimizer steps on each batch of rollouts (GRPO's mu; > 1 makes the clip matter)
    temperature: float = 0.7  # rollouts near the greedy policy: at 1.0 a tiny model samples too many slips
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = 1.5x the longest worked solution of the family
    beta: float = 0.02  # KL to the reference model (0 = no reference model kept)
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)
    loss_norm: str = "sequence"  # sequence (GRPO) | token (DAPO) | dr_grpo
    dr_grpo: bool = False  # no std division in the advantages
    format_weight: float = 0.1
    mode: str = "r1"  # r1 (chat template, after SFT) | r1-zero (R1-Zero prompt on a base model)
    canonical: bool = False  # train prompts in the canonical wording only
    # r1 mode: the share of prompts (whole groups; not the calculator's) asked with thinking off, the reply's last
    # line scored: rewarding thinking on alone wore the thinking-off replies down (after SFT -> after GRPO:
    # addition 68% -> 40%, subtraction 28% -> 8%; session 20's speedrun)
    no_thinking_share: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("r1", "r1-zero"):
            raise ConfigError(f"mode must be r1 or r1-zero, got {self.mode!r}")
        if not 0 <= self.no_thinking_share <= 1:
            raise ConfigError(f"no_thinking_share must be in [0, 1], got {self.no_thinking_share}")
        if self.group_size < 2:
            raise ConfigError("group_size must be >= 2 (advantages are relative within a group)")
        if self.updates_per_rollout < 1:
            raise ConfigError("updates_per_rollout must be >= 1")
        for t in self.tasks:
            rl_task(t)
        if self.mode == "r1-zero" and "calculator" in self.tasks:
            raise ConfigError("the calculator family needs the chat template (mode r1): R1-Zero's prompt offers no tools")


@dataclass
class SpeedrunConfig:
    budget: float = 30 * 60  # seconds for the whole pipeline
    # shares of the budget per training stage (the rest goes to data, rollouts of traces, evaluation)
    pretrain_share: float = 0.44
    sft_share: float = 0.12
    rl_share: float = 0.14
    student_pretrain_share: float = 0.07  # the student's own pretraining on the same data, before distillation
    distill_share: float = 0.06
    preset: str = "cpu-tiny"
    student: str = "cpu-dense-small"
    rl_tasks: list[str] | None = None  # None: the families the SFT model solves 10-90% of (where groups vary)
    eval_n: int = 40  # held-out problems per family
    traces: int = 600  # verified teacher traces for the student
    # pretraining reads 3.1-7.2M tokens in its share of the budget on a 2-core Xeon (AMX; 4,065-9,073 tokens/s
    # between runs), in a random order over the whole corpus: 50,000 conversations + 0.5M characters of code
    # (6.1-6.6M tokens as the traces grew, ~5% code; tokenized in 21 s) where 100,000 + 1M (12.2M) took 102 s
    # to generate and tokenize for a quarter to a third of them to be read. The fastest run read them 1.09 times.
    task_documents: int = 50_000
    code_chars: int = 500_000  # standard-library source in the pretraining mix
    sft_conversations: int = 40_000
    seq_len: int = 512
    max_new_tokens: int | None = None  # generation cap for evaluation, RL and traces (None = per-family budget)
    precision: str = "auto"  # every training stage's (TrainConfig.precision)
    compile: bool | None = None  # every training stage's (TrainConfig.compile)
    seed: int = 0


PRETRAIN_TRAIN = TrainConfig()  # `nanoseek pretrain` and the speedrun override its length and a few settings
SFT_TRAIN = TrainConfig(lr=5e-4, warmup_steps=20, schedule="cosine")  # `nanoseek sft` and the speedrun override it
RL_TRAIN = TrainConfig(lr=2e-5, warmup_steps=5, schedule="constant", max_steps=100, bias_gamma=0.0, eval_every=0,
                       checkpoint_every=20, grad_clip=1.0)  # `nanoseek rl` and the speedrun override it
DISTILL_TRAIN = replace(SFT_TRAIN, lr=2e-3)  # `nanoseek distill` and the speedrun override it
