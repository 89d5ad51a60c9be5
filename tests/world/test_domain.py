"""The miniature world's domain: answers, chains, the fixed split and the rendered images."""

from __future__ import annotations

import itertools
import random

import numpy as np

from r1v.grading.rewards import accuracy, format_reward
from r1v.world.domain import Problem, make_problem, reasoning_answer, split_of, text_question
from r1v.world.render import render_digits, tile_array


def test_answers_follow_precedence_and_chain_shows_each_step() -> None:
    p = Problem((3, 7, 5, 2), "A * C + D", 2)
    assert p.answer == 17
    assert p.chain() == "A = 3, C = 5, D = 2. 3 * 5 = 15. 15 + 2 = 17."
    q = Problem((3, 7, 5, 2), "B * A - C * D", 3)
    assert q.answer == 21 - 10
    assert [s[3] for s in q.steps()] == [21, 10, 11]


def test_reasoning_answer_earns_both_rewards() -> None:
    p = Problem((9, 9, 9, 9), "A * B + C * D", 3)
    completion = reasoning_answer(p).removeprefix("<think>\n")  # the prompt opens <think>
    assert accuracy(completion, {"answer": "162"}) == 1.0
    assert format_reward(completion, {}) == 1.0


def test_split_is_fixed_and_about_a_fifth_is_held_out() -> None:
    tuples = list(itertools.product(range(10), repeat=4))
    test = [d for d in tuples if split_of(d) == "test"]
    assert 1800 < len(test) < 2200
    rng = random.Random(0)
    assert all(split_of(make_problem(rng, "test").digits) == "test" for _ in range(200))
    assert all(split_of(make_problem(rng, "train").digits) == "train" for _ in range(200))


def test_text_question_writes_the_digits_out() -> None:
    assert text_question(Problem((0, 1, 2, 3), "A + B", 1)) == "<img>A0B1C2D3</img>\nCompute A + B."


def test_render_is_seeded_and_digits_differ_by_quadrant() -> None:
    a = tile_array(render_digits((1, 2, 3, 4), random.Random(5)))
    b = tile_array(render_digits((1, 2, 3, 4), random.Random(5)))
    c = tile_array(render_digits((8, 2, 3, 4), random.Random(5)))
    assert a.shape == (3, 56, 56) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a[:, :28, :28], c[:, :28, :28])
