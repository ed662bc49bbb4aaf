"""The phrasing grammar: thousands of surface forms per family, and held-out templates (frames,
context sentences, closings, small-talk phrasings) that no training data path ever draws."""

import random

import pytest

from nanoseek.data import small_talk
from nanoseek.data.builtin import builtin_conversations, task_documents, task_texts
from nanoseek.data.tasks import TASKS, get_task, phrasing
from nanoseek.data.tasks.phrasing import CLOSINGS, CONTEXTS, Phrasing, held_out, number_words, typo
from nanoseek.eval.small_talk import small_talk_chats
from nanoseek.data.tasks import problems_for
from nanoseek.tokenizer import DeepSeekTokenizer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_family_has_thousands_of_surface_forms_for_one_problem(name):
    task, rng = get_task(name), random.Random(0)
    data = task.heldout(1)[0].data
    forms = {task.phrase(data, rng) for _ in range(5000)}
    assert len(forms) > 1500, len(forms)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_templates_are_a_fixed_share_and_never_the_common_forms(name):
    p = get_task(name).phrasing
    test = p.held_out_frames()
    assert len(test) >= 4 and len(test) <= 0.25 * len(p.frames) + 1
    assert not test & set(p.frames[:p.core]) and p.canonical not in test
    assert test == get_task(name).phrasing.held_out_frames()  # stable: a hash, not a random draw


@pytest.fixture
def picks(monkeypatch):
    """Every template choice the grammar makes: (chosen text, was it held out?, split asked for)."""
    made = []
    original = phrasing.pick

    def recording(texts, test, templates, rng):
        choice = original(texts, test, templates, rng)
        made.append((choice, choice in test, templates))
        return choice

    monkeypatch.setattr(phrasing, "pick", recording)
    monkeypatch.setattr(small_talk, "pick", recording)
    return made


def test_no_training_data_path_draws_a_held_out_template(picks):
    tok = DeepSeekTokenizer.train(list(task_texts(200)), vocab_size=300)
    list(task_documents(tok, 3000, seed=1))  # pretraining documents
    builtin_conversations(3000, seed=2)  # SFT conversations
    rng = random.Random(3)
    for name in TASKS:  # GRPO prompts and distillation traces
        for _ in range(300):
            get_task(name).sample(rng, "train")
    assert len(picks) > 8000
    leaked = [choice for choice, held, _ in picks if held]
    assert not leaked, leaked[:5]
    kinds = {choice for choice, *_ in picks}
    assert kinds & set(CONTEXTS) and kinds & set(CLOSINGS) and kinds & set(small_talk.INTENTS[0].asks)


def test_held_out_evaluation_asks_only_held_out_templates(picks):
    for family in TASKS:
        _, problems = problems_for(family, 20, "held-out")
        assert all(p.template in get_task(family).phrasing.held_out_frames() for p in problems)
        _, problems = problems_for(family, 20, "varied")
        assert not any(p.template in get_task(family).phrasing.held_out_frames() for p in problems)
    small_talk_chats(30, after_task=True)
    assert picks and all(held for _, held, templates in picks if templates == "test")
    with pytest.raises(ValueError, match="wording"):
        problems_for("add", 3, "typos")


def test_held_out_picks_are_stable_and_disjoint():
    texts = [f"frame {i}" for i in range(30)]
    test = held_out(texts, "salt", keep=("frame 0",))
    assert len(test) == 6 and "frame 0" not in test and test == held_out(texts, "salt", keep=("frame 0",))
    rng = random.Random(0)
    assert {phrasing.pick(texts, test, "test", rng) for _ in range(200)} == test
    assert not {phrasing.pick(texts, test, "train", rng) for _ in range(200)} & test


@pytest.mark.parametrize("n,words", [(7, "seven"), (47, "forty-seven"), (90, "ninety"), (100, "one hundred"),
                                     (412, "four hundred twelve"), (1005, "one thousand five"), (-3, "minus three")])
def test_number_words(n, words):
    assert number_words(n) == words
    assert number_words(412, hyphen=False, and_=True) == "four hundred and twelve"
    assert number_words(47, hyphen=False) == "forty seven"


def test_typos_change_one_word_and_never_a_value():
    rng = random.Random(0)
    for _ in range(300):
        out = typo("use {nums} to make {t} please", rng)
        assert "{nums}" in out and "{t}" in out and out != "use {nums} to make {t} please"
        assert sum(a != b for a, b in zip(out.split(), "use {nums} to make {t} please".split())) <= 1


def test_arithmetic_sentence_patterns_do_not_tell_the_operation():
    """Most patterns are shared by addition, subtraction and multiplication, the operation a slot, so a
    model must read the operation's words; a shared pattern held out is held out in every family."""
    from nanoseek.data.tasks.arithmetic import ADD_FRAMES, MUL_FRAMES, SUB_FRAMES
    families = {"add": ADD_FRAMES, "sub": SUB_FRAMES, "mul": MUL_FRAMES}
    for name, frames in families.items():
        shared = [f for f in frames if sum(f in other for other in families.values()) > 1]
        assert len(shared) >= 0.7 * len(frames), name
    held = {name: get_task(name).phrasing.held_out_frames() for name in families}
    for name, frames in families.items():
        for other, other_frames in families.items():
            common = set(frames) & set(other_frames)
            assert held[name] & common == held[other] & common
    rng, seen = random.Random(0), {name: set() for name in families}
    for name in families:
        for _ in range(3000):
            seen[name].add(get_task(name).phrasing.compose({"a": 52, "b": 38}, rng)[0].lower())
    assert any("sum of 52 and 38" in q for q in seen["add"]) and any("difference of 52 and 38" in q for q in seen["sub"])
    assert any("fell by 38" in q for q in seen["sub"]) and any("rose by 38" in q for q in seen["add"])
    assert not any("rose" in q for q in seen["sub"] | seen["mul"]) and not any("sum" in q for q in seen["sub"])


@pytest.mark.parametrize("text,spaced", [
    ("{a} + {b} = ?", "{a}+{b}=?"), ("{a}+{b}=", "{a} + {b} ="), ("what is {a} x {b}, then", "what is {a}x{b}, then"),
    ("{a}×{b}", "{a} × {b}"), ("{a} - {b} = ?? not sure", "{a}-{b}=?? not sure"),
    ("{a} {b} xylophones", "{a} {b} xylophones"), ("{nums} -> {t}", "{nums} -> {t}"),
])
def test_spacing_around_operators_is_dropped_or_added(text, spaced):
    assert phrasing.spacing(text) == spaced


def test_trained_frames_ask_both_tight_and_spaced():
    """'992+513=' and '992 + 513 = ?' both come out of trained templates (a run that saw '=' only after
    a space read '992+513=' as 992+51)."""
    task, rng = get_task("add"), random.Random(0)
    forms = {task.phrasing.compose({"a": 992, "b": 513}, rng)[0].lower() for _ in range(4000)}
    assert any(q.startswith("992+513=") for q in forms) and any("992 + 513 =" in q for q in forms)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_frames_are_new_sentences_of_trained_words(name):
    """A held-out frame may arrange words anew, but each of its words (its slots' choices included) is
    trained in another frame of the family, a shared slot, a context sentence or a closing."""
    p = get_task(name).phrasing
    assert p.covers(p.held_out_frames())
    toy = Phrasing("toy", ["what is {a} plus {b}?", "{a} + {b}", "{a} plus {b}", "frobnicate {a} and {b}"], {}, core=1)
    assert not toy.covers(frozenset({"frobnicate {a} and {b}"})) and toy.covers(frozenset({"{a} plus {b}"}))
    assert "frobnicate {a} and {b}" not in toy.held_out_frames()
