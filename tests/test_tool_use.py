"""Teaching calculator use and thinking off: the problems and conversations (data/tool_use.py), a
model gaining the tool tokens (resize_vocab), the SFT mixture, and the tool-use evaluation."""

import json
import random
from collections import Counter
from pathlib import Path

import torch

from conftest import randomize_
from nanoseek.data.builtin import builtin_conversations
from nanoseek.data.small_talk import INTENTS
from nanoseek.data.tasks import get_task
from nanoseek.data.tasks.rewards import accuracy_reward, without_thinking
from nanoseek.data.tool_use import expression, hard_problem, tool_use_conversations, value
from nanoseek.eval.tool_use import evaluate_tool_use
from nanoseek.inference import Engine
from nanoseek.model import build_model, get_preset, padded_vocab
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.tools import CALCULATOR, CallFormat, calculate, describe_tools
from nanoseek.train.sft import SFTConfig, builtin_mixture

SHIPPED = Path(__file__).parents[1] / "nanoseek" / "assets" / "model"


def test_problems_agree_with_the_calculator_and_are_hard():
    rng = random.Random(0)
    for _ in range(500):
        terms = hard_problem(rng)
        assert value(terms) == calculate(expression(terms))
        assert len(terms) >= 5 or (terms[1] == "*" and terms[0] >= 100)
        written = expression(terms, rng)  # "x", "times", "×" parse back to the same value once normalised
        assert value(terms) == calculate(written.replace("times", "*").replace("plus", "+").replace("minus", "-")
                                         .replace(" x ", " * "))


def test_results_run_from_a_few_digits_to_ten():
    """The answers copied from the calculator's results come in every length from 3 to 10 digits (a model
    trained on 4-7 digit results cut 8-digit ones and padded 3-digit ones), none dominating."""
    rng = random.Random(1)
    lengths = Counter(len(str(abs(value(hard_problem(rng))))) for _ in range(3000))
    assert all(lengths[n] >= 0.03 * 3000 for n in range(3, 11)), lengths
    assert max(lengths.values()) < 0.25 * 3000, lengths


def test_conversations_call_for_hard_problems_only_and_hold_out_by_seed():
    tok = DeepSeekTokenizer.load(SHIPPED)
    prompt = describe_tools([CALCULATOR], CallFormat.probe(tok))
    train = list(tool_use_conversations(200, prompt, split="train"))
    test = list(tool_use_conversations(200, prompt, split="test"))
    assert not {c[1]["content"] for c in train} & {c[1]["content"] for c in test if c[1]["role"] == "user"} - {""}
    calls = [c for c in train if any(m.get("tool_calls") for m in c)]
    assert 0.3 < len(calls) / len(train) < 0.8
    for conv in train:
        assert conv[0] == {"role": "system", "content": prompt}
        ids, mask = tok.render_conversation(conv)  # every conversation renders, something is trained
        assert any(mask)
        if conv[-1]["role"] == "assistant" and conv[-2]["role"] == "tool":
            assert conv[-1]["content"] == conv[-2]["content"]  # the answer is read from the result
    assert any(c[-1].get("thinking") is False for c in train)


def test_a_model_gains_rows_without_changing_old_logits():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=512)).eval()
    randomize_(model)
    ids = torch.randint(0, 512, (2, 9))
    before = model(ids).logits
    model.resize_vocab(576)
    after = model(ids).logits
    assert after.shape[-1] == 576 and torch.allclose(after[..., :512], before, atol=1e-5)
    assert model.mtp_layers[0].shared_head.head is model.lm_head and model.config.vocab_size == 576
    model(torch.full((1, 3), 570), labels=torch.full((1, 3), 571)).loss.backward()  # new rows train


def test_sft_mixture_adds_tool_and_thinking_off_conversations():
    tok = DeepSeekTokenizer.load(SHIPPED)
    convs = builtin_mixture(tok, 400, SFTConfig(), seed=0)
    assert len(convs) == 400 + 60
    assert sum(any(m.get("tool_calls") for m in c) for c in convs) > 10
    assert sum(c[-1].get("thinking") is False for c in convs) > 40
    no_calls = DeepSeekTokenizer(tok.tok, {**tok.config, "chat_template": "{% for m in messages %}{{ m['content'] }}"
                                                                           "{% endfor %}"})
    plain = builtin_mixture(no_calls, 400, SFTConfig(), seed=0)  # a template without tool calls: no tools
    assert not any(m.get("tool_calls") for c in plain for m in c)


def test_thinking_off_task_replies_show_their_working_above_the_answer():
    """A task problem answered with thinking off writes the worked solution in the reply, then its answer
    alone on the next line (what the thinking-off scorer reads); small talk gives its reply alone; the
    problems drawn do not depend on the share answered with thinking off."""
    on, off = builtin_conversations(300, seed=3), builtin_conversations(300, seed=3, no_thinking=0.5)
    assert [c[-2]["content"] for c in on] == [c[-2]["content"] for c in off]  # the same questions
    shown = 0
    for plain, c in zip(on, off):
        reply = c[-1]
        if reply.get("thinking") is not False:
            assert reply == plain[-1]
            continue
        assert "reasoning_content" not in reply
        if plain[-1]["reasoning_content"] in (i.reasoning for i in INTENTS):  # small talk
            assert reply["content"] == plain[-1]["content"]
            continue
        shown += 1
        assert reply["content"] == f"{plain[-1]['reasoning_content']}\n{plain[-1]['content']}"
        assert without_thinking(reply["content"]).endswith(f"\n\n{plain[-1]['content']}")
    assert 100 < shown < 200
    assert not any(c[-1].get("thinking") is False for c in on)


def test_thinking_off_replies_are_scored_by_their_last_line():
    task = get_task("add")
    problem = task.heldout(1)[0]
    worked = task.conversation(problem, thinking=False)[-1]["content"]
    assert accuracy_reward(task, problem, without_thinking(worked)) == 1.0
    assert accuracy_reward(task, problem, without_thinking(problem.answer)) == 1.0  # an answer alone
    assert accuracy_reward(task, problem, without_thinking(f"{problem.answer}\n{int(problem.answer) + 1}")) == 0
    assert accuracy_reward(task, problem, without_thinking(f"{task.solution(problem)} {problem.answer}")) == 0


def test_thinking_off_is_asked_as_the_server_asks_it():
    """Evaluation, the terminal chat and `generate` ask with thinking off as the server does: the think tags banned
    (the shipped pipeline's SFT model closed the block the prompt had closed, after its working, on every problem)."""
    from types import SimpleNamespace

    from nanoseek.chat import no_calls
    from nanoseek.eval.tasks import evaluate_many

    tok = DeepSeekTokenizer.load(SHIPPED)

    class Asked:
        def generate(self, prompts, params):
            self.params = params
            return [SimpleNamespace(text="12\n\n12", tokens=[1]) for _ in prompts]

    for thinking in (True, False):
        engine = Asked()
        evaluate_many(engine, tok, [("add", "canonical")], n=3, thinking=thinking)
        assert all((p.grammar is None) if thinking else p.grammar.banned == tok.think_tags for p in engine.params)
    fmt = CallFormat.probe(tok)
    assert tok.think_tags == {tok.think_id, tok.end_think_id}
    assert not no_calls(tok, fmt).banned & tok.think_tags and no_calls(tok, fmt, thinking=False).banned >= tok.think_tags


def test_tool_use_evaluation_runs_the_calls():
    tok = DeepSeekTokenizer.load(SHIPPED)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=padded_vocab(tok.vocab_size), eos_token_id=tok.eos_id,
                                   max_position_embeddings=1024)).eval()
    randomize_(model, std=0.05)
    with torch.no_grad():  # make the random model open a block of calls whenever it may
        model.lm_head.weight[tok.encode(CallFormat.probe(tok).opener)[0]] = 40 * model.model.norm.weight.sign()
    engine = Engine(model, decode=tok.decode, max_batch=4, max_len=1024)
    r = evaluate_tool_use(engine, tok, n=4, offered=True, thinking=False, max_new_tokens=60)
    assert r.called == 1.0 and 0 <= r.accuracy <= 1
    r = evaluate_tool_use(engine, tok, n=4, offered=False, thinking=True, max_new_tokens=20)
    assert r.called == 0.0


def test_grpo_calculator_rollouts_run_the_calls_and_train_both_turns():
    """Scripted replies (a random model does not call on cue): sample 1 calls with a wrong expression and
    answers from its result; samples 0, 2 and 3 call with the question's expression, and 2 answers 0."""
    from types import SimpleNamespace

    from nanoseek.tokenizer import END_THINK, OUTPUT_BEGIN, OUTPUT_END
    from nanoseek.train.grpo import GRPOConfig, Rollouts

    tok = DeepSeekTokenizer.load(SHIPPED)
    fmt = CallFormat.probe(tok)
    model = build_model(get_preset("tiny", vocab_size=padded_vocab(tok.vocab_size), eos_token_id=tok.eos_id,
                                   max_position_embeddings=1024))
    rollouts = Rollouts(model, tok, GRPOConfig(tasks=["calculator"], prompts_per_step=2, group_size=2,
                                               max_new_tokens=60, beta=0, canonical=True))
    seen = []

    def call(text, i):  # the canonical question: "What is <expression>?"
        e = "1 + 1" if i == 1 else text.rsplit("What is ", 1)[1].split("?")[0]
        return "It needs the calculator." + END_THINK + "\n\n" + fmt.render([("calculator", json.dumps({"expression": e}))])

    def answer(text, i):
        return "0" if i == 2 else text.rsplit(OUTPUT_BEGIN, 1)[1].split(OUTPUT_END)[0]

    def generate(prompts, params):
        texts = [tok.decode(p) for p in prompts]
        seen.append(texts)
        replies = [(call if len(seen) == 1 else answer)(t, i) for i, t in enumerate(texts)]
        return [SimpleNamespace(tokens=tok.encode(r) + [tok.eos_id]) for r in replies]

    rollouts.engine = SimpleNamespace(generate=generate, max_len=rollouts.engine.max_len)
    batch = rollouts._sample()
    assert len(seen) == 2 and batch["stats"]["calculator_calls"] == 1.0
    for text in seen[1]:  # the calls ran: each answer's prompt holds the expression's value
        e = json.loads(text.rsplit("```json\n", 1)[1].split("\n```")[0])["expression"]
        assert f"{OUTPUT_BEGIN}{calculate(e)}{OUTPUT_END}" in text
    assert batch["stats"]["accuracy"] == 0.5  # graded on the answer after the result
    # 4 samples, each trained on its call, and on its answer unless the call was wrong (sample 1)
    assert batch["n"] == 7
    answers = 0
    for ids, mask, length in zip(batch["ids"], batch["mask"], batch["lengths"]):
        ids = ids[:length].tolist()
        first = mask.tolist().index(True) + 1  # the first trained token
        prompt, completion = tok.decode(ids[:first]), tok.decode(ids[first:])
        assert all(mask[first - 1:length - 1]) and not any(mask[length - 1:])
        assert "calculator" in prompt  # the tool's description, as the server sends it
        if OUTPUT_BEGIN in prompt:  # the answer's turn: the call and its result are context, not trained
            answers += 1
            assert fmt.opener in prompt and OUTPUT_BEGIN not in completion and "1 + 1" not in prompt
        else:
            assert fmt.opener in completion
    assert answers == 3
    chat = rollouts.offer.chat("What is 9 ** 999?")  # a result too long to leave room for an answer: unanswered
    call = {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "9 ** 999"}'}}
    huge = chat + [{"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c", "content": str(calculate("9 ** 999"))}]
    assert rollouts.offer.answer_prompts({0: huge, 1: huge[:-1]}, rollouts.engine.max_len).keys() == {1}


def test_eval_cli_writes_the_calculator_rows(tmp_path):
    from typer.testing import CliRunner

    from nanoseek.cli import app

    out = tmp_path / "ev.json"
    r = CliRunner().invoke(app, ["eval", "--model", str(SHIPPED), "--tasks", "calculator,add", "--n", "3",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["family"] for row in rows] == ["add", "calculator", "calculator"]
    assert [row["offered"] for row in rows[1:]] == [True, False] and all(0 <= row["accuracy"] <= 1 for row in rows)
    table = out.with_suffix(".md").read_text()
    assert "| calculator offered |" in table and "canonical wording, thinking on, 1 sample(s)" in table  # how it was run
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {s["family"] for s in samples} == {"add"}  # each add problem, as asked and answered
    assert all(len(s["completions"]) == len(s["correct"]) == 1 and s["correct"][0] == (
        s["completions"][0].rsplit("</think>", 1)[-1].strip() == s["gold"]) for s in samples), samples


def test_the_calculator_is_offered_as_the_server_offers_it():
    """Described in a system message for a template that does not render tools (nanoseek's), given to
    the template for one that does (as Qwen's and Llama's do)."""
    from nanoseek.eval.tool_use import CalculatorOffer

    tok = DeepSeekTokenizer.load(SHIPPED)
    offer = CalculatorOffer(tok, padded_vocab(tok.vocab_size))
    chat = offer.chat("What is 4821 * 37?")
    assert chat[0] == {"role": "system", "content": describe_tools([CALCULATOR], CallFormat.probe(tok))}
    assert offer.prompt(chat) == tok.render_prompt(chat)
    renders = DeepSeekTokenizer(tok.tok, {**tok.config, "chat_template": "{% if tools %}TOOLS {{ tools | tojson }}\n"
                                          "{% endif %}" + tok.chat_template})
    offer = CalculatorOffer(renders, padded_vocab(tok.vocab_size))
    chat = offer.chat("What is 4821 * 37?")
    assert [m["role"] for m in chat] == ["user"]
    text = renders.decode(offer.prompt(chat))
    assert text.count('"name": "calculator"') == 1 and text.startswith("TOOLS ")
