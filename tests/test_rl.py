"""Rewards (and their known hacks), GRPO's pure functions on hand-computed examples, and one GRPO
step on a tiny model raising the log-probability of the rewarded sample."""

import math

import pytest
import torch

from conftest import randomize_
from nanoseek.data.tasks import get_task
from nanoseek.data.tasks.rewards import accuracy_reward, final_answer, format_reward, reward
from nanoseek.model import build_model, get_preset
from nanoseek.train.grpo import length_chunks, sequence_logprobs
from nanoseek.train.losses import (clipped_policy_loss, distill_kl, group_advantages, kl_k3, reduce_loss,
                                   varied_groups)

ADD = get_task("add")
P = ADD.heldout(1)[0]  # a held-out addition problem
GOLD = P.answer


@pytest.mark.parametrize("completion, acc, fmt", [
    (f"work it out\n</think>\n\n{GOLD}", 1, 1),  # well formed and right
    (f"work\n</think>\n\nThe answer is {GOLD}.", 1, 1),
    (f"work\n</think>\n\n{int(GOLD) + 1}", 0, 1),  # well formed, wrong
    (f"the answer is {GOLD}", 0, 0),  # hack: answer only inside the thinking (never closed)
    (f"{GOLD}\n</think>\n\n", 0, 0),  # hack: answer only inside the thinking, nothing after
    (f"a</think>b</think>{GOLD}", 0, 0),  # hack: several think blocks
    (f"a\n</think>\n<think>b</think>\n{GOLD}", 0, 0),
    (f"work\n</think>\n\n{GOLD} {int(GOLD) + 1} {int(GOLD) - 1}", 0, 1),  # hack: several answers
    (f"work\n</think>\n\n{GOLD}\n{GOLD}", 0, 1),  # repeated answer lines are not one answer
    (f"\n</think>\n\n{GOLD}", 0, 0),  # hack: empty thinking
    (f"work\n</think>\n\n{int(GOLD):,}", 1, 1),  # 1,017 style (math-verify / parse_int)
])
def test_rewards_and_hacks(completion, acc, fmt):
    assert accuracy_reward(ADD, P, completion) == acc
    assert format_reward(completion) == fmt
    assert reward(ADD, P, completion, format_weight=0.1) == pytest.approx(acc + 0.1 * fmt)


def test_final_answer_is_taken_after_the_think_block():
    assert final_answer("x = 3\n</think>\n\nAnswer: 42") == "42"
    assert final_answer("42") is None


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a], rel=1e-5)
    assert adv[4:].abs().sum() == 0
    dr = group_advantages(r, 4, scale=False)
    assert dr[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert varied_groups(r, 4).tolist() == [True] * 4 + [False] * 4


def test_clipped_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old_logp = 0
    old = torch.zeros(1, 3)
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([2.0]), eps_low=0.2, eps_high=0.3)
    # A > 0: min(rho A, clip(rho) A) -> 1.3*2, 0.5*2, 1*2
    assert (-loss).tolist()[0] == pytest.approx([2.6, 1.0, 2.0])
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.3)
    # A < 0: min(-rho, -clip(rho)) -> -1.5, -0.8, -1
    assert (-loss).tolist()[0] == pytest.approx([-1.5, -0.8, -1.0])
    assert clipped.tolist() == [[False, True, False]]


def test_kl_k3_is_zero_at_equality_and_positive_otherwise():
    a = torch.randn(100)
    assert kl_k3(a, a).abs().max() == 0
    b = a + 0.3 * torch.randn(100)
    assert (kl_k3(a, b) >= 0).all() and kl_k3(a, b).sum() > 0
    # k3 is an unbiased estimate of KL(p || q) when x ~ p: check on a small categorical
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    est = (p * kl_k3(p.log(), q.log())).sum()
    assert est == pytest.approx(float(exact), rel=1e-5)


def test_loss_normalisations_by_hand():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    s, w = reduce_loss(per_token, mask, "token", max_len=4)
    assert (s / w).item() == pytest.approx(5 / 4)
    s, w = reduce_loss(per_token, mask, "sequence", max_len=4)
    assert (s / w).item() == pytest.approx((1 + 2) / 2)
    s, w = reduce_loss(per_token, mask, "dr_grpo", max_len=4)
    assert (s / w).item() == pytest.approx(5 / 8)


def test_distill_kl_is_zero_for_identical_logits():
    x = torch.randn(2, 3, 11)
    s, n = distill_kl(x, x, torch.ones(2, 3, dtype=torch.bool))
    assert abs(s.item()) < 1e-5 and n == 6
    s, _ = distill_kl(x, torch.randn(2, 3, 11), torch.ones(2, 3, dtype=torch.bool))
    assert s.item() > 0


def test_a_grpo_step_raises_the_rewarded_sample():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).train()
    randomize_(model, std=0.05)
    prompt = [5, 6, 7]
    good, bad = [11, 12, 13, 14], [21, 22, 23, 24]
    ids = torch.tensor([prompt + good, prompt + bad])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2:] = True
    with torch.no_grad():
        old = sequence_logprobs(model, ids)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logp = sequence_logprobs(model, ids)
    per_token, _ = clipped_policy_loss(logp, old, adv)
    loss, w = reduce_loss(per_token + 0.0 * kl_k3(logp, old), mask, "token", 4)
    (loss / w).backward()
    opt.step()
    with torch.no_grad():
        new = sequence_logprobs(model, ids)
    gain = ((new - old) * mask).sum(dim=1)
    assert gain[0] > 0 > gain[1], gain
    assert math.isfinite(loss.item())


def test_log_probs_in_length_chunks_equal_one_padded_batch():
    """Rows sorted longest first run in chunks at their chunk's length (within a token budget, and only
    rows at least 85% of the chunk's longest: 5 is not padded to 9, nor 3 to 5); each row's log-probs (up
    to its length) are those of the whole padded batch; past the chunk's length they are 0."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    randomize_(model, std=0.05)
    lengths = [12, 9, 9, 5, 3]
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), lengths[0]))
    chunks = length_chunks(lengths, max_tokens=20)
    assert [(c.start, c.stop, w) for c, w in chunks] == [(0, 1, 12), (1, 3, 9), (3, 4, 5), (4, 5, 3)]
    with torch.no_grad():
        whole = sequence_logprobs(model, ids)
        chunked = sequence_logprobs(model, ids, lengths, max_tokens=20)
    for rows, width in chunks:
        for i in range(rows.start, rows.stop):
            n = lengths[i]
            torch.testing.assert_close(chunked[i, : n - 1], whole[i, : n - 1], atol=1e-5, rtol=1e-5)
            assert (chunked[i, width - 1:] == 0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_log_probs_come_from_the_updates_precision_once_per_batch(monkeypatch, autocast):
    """The behaviour and reference log-probs are computed at a batch's first update, under the update's
    own autocast (bf16 here): with the policy still equal to the reference, the ratio is exactly 1 (nothing
    clipped) and KL exactly 0. A second update on the same rollouts reuses them."""
    import copy

    from nanoseek.train import grpo
    from nanoseek.train.settings import GRPOConfig

    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).train()
    randomize_(model, std=0.05)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    lengths = [9, 7, 6, 4]
    ids = torch.randint(0, model.config.vocab_size, (4, 9))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 2:n - 1] = True
    batch = {"n": 4, "ids": ids, "mask": mask, "lengths": lengths, "adv": torch.tensor([1.0, -1.0, 0.5, -0.5]),
             "frozen": {}, "max_len": 8, "stats": {}}
    objective = grpo.GRPOObjective(GRPOConfig(tasks=["add"], updates_per_rollout=2, beta=0.1), ref)
    calls = []
    real = grpo.sequence_logprobs
    monkeypatch.setattr(grpo, "sequence_logprobs", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, stats = objective(model, batch)
        assert float(stats["kl"]) == 0 and float(stats["clip_fraction"]) == 0
        assert len(calls) == 3  # behaviour, reference, the update's own
        objective(model, {**batch, "stats": {}})  # the batch's second update: only its own forward
    assert len(calls) == 4
    with pytest.raises(ValueError, match="reference model"):
        grpo.GRPOObjective(GRPOConfig(tasks=["add"], beta=0.1))


def test_a_run_resumed_between_two_updates_on_one_batch_updates_on_it_again(monkeypatch):
    """With updates_per_rollout 2, a checkpoint taken after a batch's first update resumed by drawing new rollouts where
    the run never stopped updates once more on that batch (its frozen log-probs included)."""
    import io

    import nanoseek
    from nanoseek.tokenizer import DeepSeekTokenizer
    from nanoseek.train.grpo import GRPOConfig, Rollouts

    shipped = nanoseek.__path__[0] + "/assets/model"
    model, tok = nanoseek.load_model(shipped), DeepSeekTokenizer.load(shipped)
    monkeypatch.setattr(Rollouts, "_sample", lambda self: {"n": 1, "stats": {"reward": 1.0}, "frozen": {},
                                                           "ids": torch.tensor([self.rng.random()])})
    cfg = GRPOConfig(tasks=["add"], updates_per_rollout=2, prompts_per_step=2, group_size=2)
    run = Rollouts(model, tok, cfg)
    first = next(run)
    first["frozen"]["old"] = torch.tensor([0.5])  # (the first update freezes the batch's log-probs)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    resumed = Rollouts(model, tok, cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    again, uninterrupted = next(resumed), next(run)
    assert torch.equal(again["ids"], first["ids"]) and torch.equal(uninterrupted["ids"], first["ids"])
    assert torch.equal(again["frozen"]["old"], torch.tensor([0.5])) and again["stats"] == {}
    assert torch.equal(next(resumed)["ids"], next(run)["ids"])  # then both draw the next batch


def test_rollouts_asked_with_thinking_off_are_scored_on_their_last_line():
    """A share of the problems is asked with thinking off (whole groups, the prompt closing the reasoning block):
    a reply that shows its working and then the answer on its last line earns the reward, one in the thinking-on shape does not,
    and the thinking-off accuracy is logged apart."""
    from types import SimpleNamespace

    import nanoseek
    from nanoseek.tokenizer import END_THINK, DeepSeekTokenizer
    from nanoseek.train.grpo import GRPOConfig, Rollouts, prompt_ids

    shipped = nanoseek.__path__[0] + "/assets/model"
    model, tok = nanoseek.load_model(shipped), DeepSeekTokenizer.load(shipped)
    for share in (0.0, 0.5, 1.0):
        cfg = GRPOConfig(tasks=["add"], prompts_per_step=12, group_size=2, no_thinking_share=share, seed=1)
        run = Rollouts(model, tok, cfg)
        task, problems, modes = run.tasks["add"], [], []
        sample = task.sample  # recorded: the step's problems in the order it asks them
        task.sample = lambda *a, **k: problems.append(sample(*a, **k)) or problems[-1]

        def generate(prompts, params):
            replies = []
            for i, prompt in enumerate(prompts):
                problem = problems[i // cfg.group_size]
                off = prompt == prompt_ids(tok, problem.question, "r1", thinking=False)
                assert off or prompt == prompt_ids(tok, problem.question, "r1")
                assert (params[i].grammar.banned == tok.think_tags) if off else params[i].grammar is None  # as served
                modes.append(off)
                work = task.solution(problem)
                # the first of each group right in its mode's shape, the second wrong in the other mode's
                answer = problem.answer if i % 2 == 0 else str(int(problem.answer) + 1)
                shaped = [f"{work}\n{answer}", f"{work}\n{END_THINK}\n\n{answer}"]
                replies.append(SimpleNamespace(tokens=tok.encode(shaped[(i % 2) ^ (not off)]) + [tok.eos_id]))
            return replies

        run.engine.generate = generate
        batch = run._sample()
        off = sum(modes) // cfg.group_size
        assert modes[::2] == modes[1::2]  # a group is asked one way
        assert off == {0.0: 0, 1.0: cfg.prompts_per_step}.get(share, off) and (share != 0.5 or 0 < off < 12)
        assert batch["stats"]["accuracy"] == pytest.approx(0.5)  # each group: one reply in its mode's shape
        assert batch["stats"].get("accuracy_thinking_off") == (None if share == 0 else pytest.approx(0.5))
        assert batch["n"] == 2 * cfg.prompts_per_step  # every group varied
