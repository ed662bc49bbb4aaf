"""JSON mode: the recogniser, its closing text, and the engine's constrained output."""

import json
import random

import pytest
import torch

from conftest import randomize_
from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.constraints import JsonPrefix
from nanoseek.model import build_model, get_preset

VALID = ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e+2, true, false, null], "b": {"c": "x\\n\\u00e9\\""}}',
         ' { "k" : [ ] , "z": {} } ', '{"a": -0.0}', '{"s": "with } and ] inside"}']
INVALID = ['[1]', '{a: 1}', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": 1,}', '{"a": "\\x"}', '{"a": 1}}',
           '{"a": .5}', '{"a": "line\nbreak"}']


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_and_all_their_prefixes_are_accepted(text):
    for i in range(len(text) + 1):
        p = JsonPrefix()
        assert p.feed_text(text[:i]), text[:i]
        closed = text[:i] + p.closing()
        assert isinstance(json.loads(closed), dict), closed  # every prefix closes into valid JSON
    p = JsonPrefix()
    p.feed_text(text)
    assert p.complete


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_rejected(text):
    p = JsonPrefix()
    ok = p.feed_text(text)
    assert not ok or not p.complete or text == '{"a": 1}}'
    if text == '{"a": 1}}':
        assert not ok


def test_engine_json_mode_always_parses():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=128, eos_token_id=1)).eval()
    randomize_(model, std=0.1)
    alphabet = [chr(c) for c in range(32, 127)] + ["\ufffd"] * 33  # token t -> one character

    def decode(ids):
        return "".join(alphabet[t % len(alphabet)] for t in ids)

    engine = Engine(model, decode=decode, max_batch=4)
    rng = random.Random(0)
    for max_new in (3, 8, 40):
        params = [SamplingParams(max_new_tokens=max_new, temperature=t, json_mode=True, seed=s)
                  for t, s in ((0.0, None), (1.0, 1), (1.5, 2))]
        for req in engine.generate([[rng.randrange(128) for _ in range(5)] for _ in params], params):
            assert isinstance(json.loads(req.text), dict), (max_new, req.text)
            assert len(req.tokens) <= max_new
