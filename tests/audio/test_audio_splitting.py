"""``audio.splitting``: cuts fall at the quietest point before the limit, pieces cover the clip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gemma_mesh.audio.splitting import quietest_point, split_points

RATE = 1_000  # small rate: the policy is rate-independent and the arrays stay tiny


def test_short_clip_is_one_piece():
    assert split_points(np.ones(500, np.float32), RATE, 1_000, 0.2) == [(0, 500)]
    assert split_points(np.ones(1_000, np.float32), RATE, 1_000, 0.2) == [(0, 1_000)]


def test_cuts_at_the_silence_before_the_limit():
    x = np.ones(2_500, np.float32)
    x[850:900] = 0.0  # silence 0.85-0.90 s, inside the 0.2 s search window before 1.0 s
    x[1_700:1_760] = 0.0
    pieces = split_points(x, RATE, 1_000, 0.2)
    assert pieces[0][1] in range(850, 901) and pieces[1][1] in range(1_700, 1_761)
    assert pieces[0][0] == 0 and pieces[-1][1] == 2_500
    assert all(b - a <= 1_000 for a, b in pieces)
    assert all(p[1] == q[0] for p, q in itertools.pairwise(pieces))


def test_uniform_audio_still_respects_the_limit():
    pieces = split_points(np.ones(10_001, np.float32), RATE, 1_000, 0.5)
    assert all(0 < b - a <= 1_000 for a, b in pieces) and pieces[-1][1] == 10_001


def test_a_clip_just_over_the_limit_leaves_no_sliver():
    x = np.ones(1_005, np.float32)
    x[1_000:1_005] = 0.0  # the quietest point is in the last 5 samples
    pieces = split_points(x, RATE, 1_000, 0.2, min_piece_samples=100)
    assert pieces[-1][1] - pieces[-1][0] >= 100 and pieces[0][1] - pieces[0][0] <= 1_000


def test_quietest_point_and_bad_arguments():
    x = np.ones(100, np.float32)
    x[60:80] = 0
    assert 60 <= quietest_point(x, 0, 100, RATE) <= 80
    with pytest.raises(ValueError):
        split_points(x, RATE, 0, 0.1)
    with pytest.raises(ValueError):
        split_points(x, RATE, 50, 1.0)
    with pytest.raises(ValueError):
        split_points(x, RATE, 50, 0.01, min_piece_samples=26)
