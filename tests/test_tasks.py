"""Task families: worked solutions reach the right answer, verifiers are strict, splits never overlap."""

import random

import pytest

from nanoseek.data.tasks import TASKS, Countdown, get_task, parse_int
from nanoseek.data.tasks.countdown import evaluate


@pytest.mark.parametrize("name", sorted(TASKS))
def test_solutions_verify_and_splits_are_disjoint(name):
    task, rng = get_task(name), random.Random(0)
    train = [task.sample(rng, "train") for _ in range(300)]
    test = task.heldout(40)
    assert {task.key(p.data) for p in train}.isdisjoint(task.key(p.data) for p in test)
    assert len({task.key(p.data) for p in test}) == 40
    assert [p.question for p in task.heldout(40)] == [p.question for p in test]  # same seed, same set
    for p in train + test:
        assert task.verify(p, p.answer), (p, p.answer)
        trace = task.solution(p)
        if name != "countdown":
            assert trace.endswith(f"-> {p.answer}"), trace
        else:
            assert trace.rstrip().endswith("ok")


@pytest.mark.parametrize("name", ["add", "sub", "mul", "linear"])
def test_arithmetic_answers_are_exact(name):
    task, rng = get_task(name), random.Random(1)
    for _ in range(200):
        p = task.sample(rng)
        d = p.data
        expected = {"add": lambda: d["a"] + d["b"], "sub": lambda: d["a"] - d["b"],
                    "mul": lambda: d["a"] * d["b"], "linear": lambda: d["x"]}[name]()
        assert int(p.answer) == expected
        assert not task.verify(p, str(expected + 1))


def test_phrasings_vary_and_contain_the_operands_in_digits_or_words():
    from nanoseek.data.tasks.phrasing import number_words

    task, rng = get_task("add"), random.Random(2)
    problems = [task.sample(rng) for _ in range(400)]
    assert len({p.question.split(str(p.data["a"]))[0] for p in problems}) > 30
    in_words = 0
    for p in problems:
        a, b, q = p.data["a"], p.data["b"], p.question.lower()
        if str(a) in q and str(b) in q:
            continue
        spelled = [number_words(n, hyphen, and_) for n in (a, b) for hyphen in (True, False) for and_ in (True, False)]
        assert sum(w in q for w in spelled) >= 2, q
        in_words += 1
    assert 10 < in_words < 100  # some, not most


@pytest.mark.parametrize("text,value", [
    ("1017", 1017), ("-351", -351), ("A: 42.", 42), ("1,017", 1017), ("**58**", 58), ("The answer is 7", 7),
    ("3 + 4 = 7", None), ("", None), ("no idea", None), ("12 or 13", None),
])
def test_parse_int(text, value):
    assert parse_int(text) == value


def test_countdown_verifier_is_strict():
    task = Countdown()
    p = task.heldout(1)[0]
    a, b, c = p.data["nums"]
    assert task.verify(p, p.answer) and task.verify(p, p.answer + " = " + str(p.data["target"]))
    assert not task.verify(p, f"{p.data['target']}")  # the target alone uses none of the numbers
    assert not task.verify(p, f"{a}+{b}")  # c unused
    assert not task.verify(p, "__import__('os')")
    assert evaluate("(4+24)*3", [3, 4, 24]) == 84
    assert evaluate("(4+24)*3", [3, 4, 4]) is None
    assert evaluate("8/(3-3)", [8, 3, 3]) is None


@pytest.mark.parametrize("a,b,relation,readback", [
    (461, 463, "4 vs 4 =, 6 vs 6 =, 1 vs 3 < so 461<463", "-> 002 -> 2 -> -2"),
    (166, 85, "3 digits vs 2 so 166>85", "-> 081 -> 81"),
    (500, 500, "5 vs 5 =, 0 vs 0 =, 0 vs 0 = so 500=500", "-> 000 -> 0"), (52, 38, "5 vs 3 > so 52>38", "-> 14"),
])
def test_subtraction_trace_settles_the_sign_by_a_written_comparison(a, b, relation, readback):
    from nanoseek.data.tasks.base import Problem
    trace = get_task("sub").solution(Problem("sub", "", str(a - b), {"a": a, "b": b}))
    assert trace.startswith(f"{a}-{b}: {relation} | ") and trace.endswith(readback), trace
    assert (f"-({b}-{a})" in trace) == (a < b)


@pytest.mark.parametrize("a,b,head,steps", [
    (934, 48, "934+48: 934+048 | ", ["4+8+0=12 c1 -> 2", "3+4+1=8 c0 -> 82", "9+0+0=9 c0 -> 982"]),
    (48, 934, "48+934: 048+934 | ", ["8+4+0=12 c1 -> 2", "4+3+1=8 c0 -> 82", "0+9+0=9 c0 -> 982"]),
    (7, 95, "7+95: 07+95 | ", ["7+5+0=12 c1 -> 2", "0+9+1=10 c1 -> 02 -> 102"]),
    (876, 141, "876+141: ", ["6+1+0=7 c0 -> 7", "7+4+0=11 c1 -> 17", "8+1+1=10 c1 -> 017 -> 1017"]),
    (501, 402, "501+402: ", ["1+2+0=3 c0 -> 3", "0+0+0=0 c0 -> 03", "5+4+0=9 c0 -> 903"]),
])
def test_addition_restates_unequal_lengths_zero_padded_before_the_column_steps(a, b, head, steps):
    from nanoseek.data.tasks.base import Problem
    trace = get_task("add").solution(Problem("add", "", str(a + b), {"a": a, "b": b}))
    assert trace == head + " | ".join(steps) and trace.endswith(f"-> {a + b}")


def test_commutative_wordings_name_the_operands_in_the_order_the_solution_restates_them():
    # the worked solution starts with 'a+b' / 'a*b': a wording that says b first would ask the model
    # to reorder while copying, which it gets wrong ("If you add 18 to 99" -> "99+48")
    from nanoseek.data.tasks.arithmetic import ADD_FRAMES, MUL_FRAMES
    for t in ADD_FRAMES + MUL_FRAMES:
        assert t.index("{a}") < t.index("{b}"), t


def test_countdown_trace_names_the_pair_and_never_multiplies_two_big_numbers():
    from nanoseek.data.tasks.countdown import solve
    lines, expr = solve([13, 16, 4], 68, division=False)  # keep 4: 13+16=29, 16-13=3, 13*16 is big; keep 16: 13+4=17, 13-4=9, 13*4=52 ok
    assert lines[0].startswith("keep 4 (13 16): need") and "13*16 big" in lines[0] and lines[0].endswith(" no")
    assert lines[1].startswith("keep 16 (13 4): need") and lines[1].endswith("13*4=52 ok") and expr == "(13*4)+16"
    assert evaluate(expr, [13, 16, 4]) == 68


@pytest.mark.parametrize("family", ["add", "sub", "mul"])
def test_training_asks_with_one_or_both_operands_single_digits(family):
    """People ask "what's 7 plus 8?": training draws one single-digit operand, and sometimes two, and
    their worked solutions are right; the evaluation's default draws keep to the family's sizes."""
    import random

    from nanoseek.data.builtin import TRAINING_OPTIONS
    from nanoseek.data.tasks.base import Problem

    task, rng = get_task(family, **TRAINING_OPTIONS[family]), random.Random(0)
    draws = [task.draw(rng) for _ in range(3000)]
    small = [sum(d[k] < 10 for k in "ab") for d in draws]
    assert 0.05 < small.count(1) / len(draws) < 0.1 and 0.02 < small.count(2) / len(draws) < 0.05
    for d in (d for d, n in zip(draws, small) if n == 2):
        problem = Problem(family, "", task.answer(d), d)
        assert task.solution(problem).endswith(f"-> {task.answer(d)}") or task.solution(problem).endswith(
            f" {task.answer(d)}"), task.solution(problem)
    default = get_task(family)
    assert all(min(d["a"], d["b"]) >= 10 for d in (default.draw(rng) for _ in range(500)))
