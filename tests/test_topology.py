"""Tests for dicejax.topology: builders, properties, neighbour lists, validation, files."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicejax import topology as tp

DESIGNED16_CSV = Path(__file__).parents[2] / "shared" / "data" / "dice_designed16.csv"

BUILDERS = {
    "ring1": lambda: tp.ring(1),
    "ring2": lambda: tp.ring(2),
    "ring3": lambda: tp.ring(3),
    "ring8": lambda: tp.ring(8),
    "exponential1": lambda: tp.exponential(1),
    "exponential16": lambda: tp.exponential(16),
    "exponential17": lambda: tp.exponential(17),
    "torus3x4": lambda: tp.torus(3, 4),
    "torus2x2": lambda: tp.torus(2, 2),
    "torus1x5": lambda: tp.torus(1, 5),
    "grid3x4": lambda: tp.grid(3, 4),
    "grid1x1": lambda: tp.grid(1, 1),
    "hypercube0": lambda: tp.hypercube(0),
    "hypercube4": lambda: tp.hypercube(4),
    "complete5": lambda: tp.complete(5),
    "star6": lambda: tp.star(6),
    "erdos_renyi": lambda: tp.erdos_renyi(12, 0.4, seed=3),
    "random_regular": lambda: tp.random_regular(10, 3, seed=1),
    "one_peer_exponential8": lambda: tp.one_peer_exponential(8),
    "one_peer_exponential6": lambda: tp.one_peer_exponential(6),
    "random_matching7": lambda: tp.random_matching(7, steps=5, seed=2),
}

EXPECTED_N = {
    "ring1": 1, "ring2": 2, "ring3": 3, "ring8": 8, "exponential1": 1, "exponential16": 16,
    "exponential17": 17, "torus3x4": 12, "torus2x2": 4, "torus1x5": 5, "grid3x4": 12,
    "grid1x1": 1, "hypercube0": 1, "hypercube4": 16, "complete5": 5, "star6": 6,
    "erdos_renyi": 12, "random_regular": 10, "one_peer_exponential8": 8,
    "one_peer_exponential6": 6, "random_matching7": 7,
}  # fmt: skip


def _loop_weights(matrix: np.ndarray, indices: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Brute-force twin of NeighborList.weights for [n, n] or [P, n, n]."""
    stacked = matrix if matrix.ndim == 3 else matrix[None]
    out = np.zeros((stacked.shape[0], *indices.shape))
    for p in range(stacked.shape[0]):
        for k in range(indices.shape[0]):
            for d in range(indices.shape[1]):
                if mask[k, d]:
                    out[p, k, d] = stacked[p, k, indices[k, d]]
    return out if matrix.ndim == 3 else out[0]


# ------------------------------------------------------------------------------------------
# Builders: generic invariants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(BUILDERS))
def test_builder_row_stochastic_and_n(key):
    topo = BUILDERS[key]()
    assert isinstance(topo, tp.Topology)
    assert topo.n == EXPECTED_N[key]
    assert topo.matrix.dtype == np.float64
    assert topo.name and topo.name != "custom"
    stacked = topo.stacked()
    assert stacked.shape == (topo.period, topo.n, topo.n)
    assert (stacked >= 0).all()
    np.testing.assert_allclose(stacked.sum(axis=-1), 1.0, atol=1e-12)
    tp.validate_mixing(topo.matrix)
    assert topo.is_strongly_connected
    assert not topo.matrix.flags.writeable


@pytest.mark.parametrize(
    ("key", "doubly", "symmetric"),
    [
        ("ring2", True, True),
        ("ring8", True, True),
        ("torus3x4", True, True),
        ("torus2x2", True, True),
        ("torus1x5", True, True),
        ("grid3x4", True, True),
        ("hypercube4", True, True),
        ("complete5", True, True),
        ("star6", True, True),
        ("erdos_renyi", True, True),
        ("random_regular", True, True),
        ("exponential16", True, False),
        ("exponential17", True, False),
        ("one_peer_exponential8", True, False),
        ("random_matching7", True, True),
    ],
)
def test_doubly_stochastic_and_symmetric(key, doubly, symmetric):
    topo = BUILDERS[key]()
    assert topo.is_doubly_stochastic is doubly
    assert topo.is_symmetric is symmetric


def test_ring_structure():
    topo = tp.ring(8)
    np.testing.assert_array_equal(topo.in_degree, 2)
    np.testing.assert_array_equal(topo.out_degree, 2)
    np.testing.assert_allclose(topo.matrix[3, [2, 3, 4]], 1 / 3)
    np.testing.assert_allclose(topo.matrix[0, [7, 0, 1]], 1 / 3)
    np.testing.assert_allclose(tp.ring(2).matrix, 0.5)
    np.testing.assert_array_equal(tp.ring(1).matrix, [[1.0]])


@pytest.mark.parametrize("n", [2, 5, 8, 16, 17, 32])
def test_exponential_structure(n):
    topo = tp.exponential(n)
    offsets = [0] + [2**i for i in range(n) if 2**i < n]
    assert len(offsets) == len(set(offsets))
    for k in range(n):
        expected = np.zeros(n)
        expected[[(k - o) % n for o in offsets]] = 1 / len(offsets)
        np.testing.assert_allclose(topo.matrix[k], expected)
    np.testing.assert_array_equal(topo.out_degree, len(offsets) - 1)  # non-zero offsets
    np.testing.assert_array_equal(topo.in_degree, len(offsets) - 1)
    np.testing.assert_allclose(topo.out_weight, 1.0)
    assert topo.is_doubly_stochastic
    if n > 2:
        assert not topo.is_symmetric
    if n == 32:  # the paper's anomaly setting: each node has 5 neighbours
        np.testing.assert_array_equal(topo.in_degree, 5)


def test_torus_structure():
    topo = tp.torus(4, 5)
    np.testing.assert_array_equal(topo.in_degree, 4)
    np.testing.assert_allclose(topo.matrix[topo.matrix > 0], 1 / 5)
    # node (1, 2) = 7 receives from (0,2)=2, (2,2)=12, (1,1)=6, (1,3)=8
    assert set(np.flatnonzero(topo.matrix[7])) == {2, 6, 7, 8, 12}
    # wrap-around: node (0, 0) = 0 receives from (3, 0) = 15 and (0, 4) = 4
    assert set(np.flatnonzero(topo.matrix[0])) == {0, 1, 4, 5, 15}
    # small sizes merge coinciding neighbours
    np.testing.assert_array_equal(tp.torus(2, 2).in_degree, 2)
    np.testing.assert_allclose(tp.torus(1, 5).matrix, tp.ring(5).matrix)
    np.testing.assert_array_equal(tp.torus(1, 1).matrix, [[1.0]])


def test_grid_metropolis_hastings():
    topo = tp.grid(3, 3)
    # corner 0 (deg 2) - edge 1 (deg 3): 1/4; edge 1 - centre 4 (deg 4): 1/5
    assert topo.matrix[0, 1] == pytest.approx(1 / 4)
    assert topo.matrix[1, 4] == pytest.approx(1 / 5)
    assert topo.matrix[0, 0] == pytest.approx(1 - 2 / 4)
    assert topo.matrix[4, 4] == pytest.approx(1 - 4 / 5)
    np.testing.assert_array_equal(topo.in_degree, [2, 3, 2, 3, 4, 3, 2, 3, 2])
    assert topo.matrix[0, 8] == 0


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_hypercube_structure(dim):
    topo = tp.hypercube(dim)
    assert topo.n == 2**dim
    np.testing.assert_array_equal(topo.in_degree, dim)
    np.testing.assert_allclose(topo.matrix[topo.matrix > 0], 1 / (dim + 1))
    assert topo.matrix[0, 1] > 0
    if dim > 1:
        assert topo.matrix[0, 3] == 0


def test_complete_and_star():
    topo = tp.complete(6)
    np.testing.assert_array_equal(topo.in_degree, 5)
    np.testing.assert_allclose(topo.matrix, 1 / 6)
    assert topo.spectral_gap == pytest.approx(1.0, abs=1e-12)
    assert topo.density == 1.0

    s = tp.star(6)
    assert s.in_degree[0] == 5 and s.out_degree[0] == 5
    np.testing.assert_array_equal(s.in_degree[1:], 1)
    np.testing.assert_allclose(s.matrix[0], 1 / 6)
    np.testing.assert_allclose(s.matrix[1:, 0], 1 / 6)
    np.testing.assert_allclose(np.diag(s.matrix)[1:], 5 / 6)
    np.testing.assert_array_equal(tp.star(1).matrix, [[1.0]])


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13, 32])
def test_ring_spectral_gap_closed_form(n):
    expected = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert tp.ring(n).spectral_gap == pytest.approx(expected, abs=1e-10)


def test_spectral_gap_edge_cases():
    assert tp.complete(1).spectral_gap == 1.0
    # two disconnected pairs: eigenvalue 1 twice -> gap 0
    w = np.kron(np.eye(2), np.full((2, 2), 0.5))
    topo = tp.from_matrix(w)
    assert topo.spectral_gap == pytest.approx(0.0, abs=1e-12)
    assert not topo.is_strongly_connected
    # periodic (bipartite swap) graph: eigenvalue -1 -> gap 0
    assert tp.from_matrix([[0.0, 1.0], [1.0, 0.0]]).spectral_gap == pytest.approx(0.0)
    # one-peer exponential on a power of 2 averages exactly over one period (|λ_2| of the
    # product is round-off, ~1e-16, and its cube root ~5e-6)
    assert tp.one_peer_exponential(8).spectral_gap == pytest.approx(1.0, abs=1e-4)
    # time-varying: per-step rate of the period product
    topo = tp.one_peer_exponential(6)
    product = topo.at(2) @ topo.at(1) @ topo.at(0)
    lam2 = np.sort(np.abs(np.linalg.eigvals(product)))[-2]
    assert topo.spectral_gap == pytest.approx(1 - lam2 ** (1 / 3))
    assert 0 < topo.spectral_gap < 1


def test_out_weight_density_and_degrees_directed():
    w = np.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [0.0, 0.0, 1.0]])
    topo = tp.from_matrix(w, name="chain")
    np.testing.assert_allclose(topo.out_weight, [0.5, 0.7, 1.8])
    np.testing.assert_array_equal(topo.in_degree, [1, 1, 0])
    np.testing.assert_array_equal(topo.out_degree, [0, 1, 1])
    assert topo.density == pytest.approx(5 / 9)
    assert not topo.is_strongly_connected
    assert not topo.is_doubly_stochastic and not topo.is_symmetric
    assert topo.name == "chain" and "chain" in repr(topo)


def test_designed16_is_bundled(monkeypatch):
    monkeypatch.delenv(tp.DESIGNED16_ENV, raising=False)
    topo = tp.designed16()  # the packaged copy: no file outside the package needed
    assert topo.n == 16 and topo.name == "designed16"
    assert not topo.is_time_varying
    np.testing.assert_allclose(topo.matrix.sum(axis=1), 1.0, atol=1e-12)
    assert topo.out_weight[0] == pytest.approx(1.7)
    assert int(np.argmax(topo.out_weight)) == 0
    assert not topo.is_doubly_stochastic and not topo.is_symmetric
    # a few entries of the paper's matrix (row k = what node k receives)
    assert topo.matrix[0, 0] == 0.8 and topo.matrix[1, 0] == 0.3 and topo.matrix[12, 10] == 0.3
    assert np.count_nonzero(topo.matrix) == 52
    # the paper's matrix is only weakly connected: nodes 2-5 receive from 0 and 14 but
    # send to nobody outside {2, 3, 4, 5}
    assert not topo.is_strongly_connected
    assert nx.is_weakly_connected(tp.to_networkx(topo))
    np.testing.assert_array_equal(tp.by_name("designed16", 16).matrix, topo.matrix)


@pytest.mark.skipif(not DESIGNED16_CSV.is_file(), reason="the steering copy is not beside the "
                    "repository (users never have it); the bundled copy is tested above")
def test_designed16_bundled_copy_equals_the_steering_file(monkeypatch):
    monkeypatch.delenv(tp.DESIGNED16_ENV, raising=False)
    np.testing.assert_array_equal(tp.designed16().matrix, tp.designed16(DESIGNED16_CSV).matrix)


def test_designed16_path_and_environment_override(monkeypatch, tmp_path):
    w = tp.designed16().matrix[::-1, ::-1].copy()  # still row-stochastic, 16 x 16
    path = tmp_path / "other16.csv"
    tp.save_csv(tp.from_matrix(w), path)
    np.testing.assert_array_equal(tp.designed16(path).matrix, w)
    np.testing.assert_array_equal(tp.by_name("designed16", 16, path=path).matrix, w)
    monkeypatch.setenv(tp.DESIGNED16_ENV, str(path))
    np.testing.assert_array_equal(tp.designed16().matrix, w)


def test_designed16_errors(monkeypatch, tmp_path):
    monkeypatch.delenv(tp.DESIGNED16_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="bundled copy"):
        tp.designed16(tmp_path / "missing.csv")
    small = tmp_path / "small.csv"
    tp.save_csv(tp.ring(4), small)
    with pytest.raises(ValueError, match="16 x 16"):
        tp.designed16(small)
    with pytest.raises(ValueError, match="n must be 16"):
        tp.by_name("designed16", 8)


# ------------------------------------------------------------------------------------------
# Time-varying topologies
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "period"), [(1, 1), (2, 1), (3, 2), (8, 3), (9, 4), (16, 4)])
def test_one_peer_exponential(n, period):
    topo = tp.one_peer_exponential(n)
    assert topo.is_time_varying and topo.period == period
    assert topo.matrix.shape == (period, n, n)
    assert topo.is_doubly_stochastic
    if n > 1:
        for t in range(period):
            w = topo.at(t)
            for k in range(n):
                expected = np.zeros(n)
                expected[k] += 0.5
                expected[(k - 2**t) % n] += 0.5
                np.testing.assert_allclose(w[k], expected)
        assert topo.is_strongly_connected
        np.testing.assert_array_equal(topo.in_degree, period)  # union over the period


def test_at_schedule_stacked():
    topo = tp.one_peer_exponential(8)
    np.testing.assert_array_equal(topo.at(4), topo.matrix[1])
    sched = topo.schedule(7)
    assert sched.shape == (7, 8, 8)
    for t in range(7):
        np.testing.assert_array_equal(sched[t], topo.matrix[t % 3])
    static = tp.ring(5)
    assert not static.is_time_varying and static.period == 1
    assert static.stacked().shape == (1, 5, 5)
    np.testing.assert_array_equal(static.at(10), static.matrix)
    np.testing.assert_array_equal(static.schedule(3), np.broadcast_to(static.matrix, (3, 5, 5)))
    with pytest.raises(ValueError, match="t must be an integer >= 0"):
        static.at(-1)
    with pytest.raises(ValueError, match="steps"):
        static.schedule(1.5)


@pytest.mark.parametrize("n", [6, 7])
def test_random_matching(n):
    topo = tp.random_matching(n, steps=20, seed=5)
    assert topo.matrix.shape == (20, n, n) and topo.period == 20
    assert ((topo.stacked() > 0).sum(axis=-1) <= 2).all()
    assert topo.is_doubly_stochastic and topo.is_symmetric
    for w in topo.stacked():
        partners = (w > 0).sum(axis=-1)
        assert (partners == 2).sum() == 2 * (n // 2)
        np.testing.assert_allclose(w[w > 0][w[w > 0] < 1], 0.5)
    again = tp.random_matching(n, steps=20, seed=5)
    np.testing.assert_array_equal(topo.matrix, again.matrix)
    assert not np.array_equal(topo.matrix, tp.random_matching(n, steps=20, seed=6).matrix)


# ------------------------------------------------------------------------------------------
# Neighbour lists
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["ring8", "star6", "grid3x4", "exponential17", "random_matching7", "ring1"]
)
def test_neighbor_list_matches_nonzeros(key):
    topo = BUILDERS[key]()
    nl = topo.neighbors
    n = topo.n
    assert nl.indices.dtype == np.int32 and nl.mask.dtype == bool
    support = (topo.stacked() > 0).any(axis=0)
    assert nl.indices.shape == (n, support.sum(axis=1).max())
    for k in range(n):
        real = nl.indices[k][nl.mask[k]]
        np.testing.assert_array_equal(real, np.flatnonzero(support[k]))
        np.testing.assert_array_equal(nl.indices[k][~nl.mask[k]], n)
    np.testing.assert_array_equal(nl.mask, nl.indices < n)
    # weights equal W gathered by a Python loop, for [n, n] and [P, n, n]
    for matrix in (topo.at(0), topo.stacked()):
        got = nl.weights(matrix)
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, _loop_weights(matrix, nl.indices, nl.mask))
    # weights of the support sum to the row sums
    np.testing.assert_allclose(nl.weights(topo.stacked()).sum(axis=-1), 1.0)


def test_neighbor_list_weights_jax_and_grad():
    topo = tp.random_matching(6, steps=3, seed=0)
    nl = topo.neighbors
    stacked = jnp.asarray(topo.stacked())
    got = jax.jit(nl.weights)(stacked)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), _loop_weights(topo.stacked(), nl.indices, nl.mask))

    static = tp.star(5)
    nl = static.neighbors
    w = jnp.asarray(static.matrix)
    grad = jax.grad(lambda m: nl.weights(m).sum())(w)
    np.testing.assert_array_equal(np.asarray(grad), static.support.astype(float))
    # dense (non-support) parameters get zero gradient too, also under jit on a stack
    dense = jnp.full((2, 5, 5), 0.2)
    grad = jax.jit(jax.grad(lambda m: nl.weights(m).sum()))(dense)
    np.testing.assert_array_equal(np.asarray(grad), np.broadcast_to(static.support, (2, 5, 5)))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 5, 5\]"):
        nl.weights(np.ones((4, 4)))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (np.ones((3, 4)) / 4, r"topology: matrix must be square, got shape \(3, 4\)"),
        (np.ones((2, 3, 4)) / 4, r"must be square, got shape \(2, 3, 4\)"),
        (np.ones(4), r"must have 2 axes \[n, n\] or 3 axes \[P, n, n\], got shape \(4,\)"),
        (np.ones((1, 1, 1, 1)), r"got shape \(1, 1, 1, 1\)"),
        (np.zeros((0, 0)), "at least one node"),
        (np.zeros((0, 2, 2)), "at least one step"),
        ([[1.1, -0.1], [0.5, 0.5]], r"topology: negative entry -0\.1 at \[0, 1\]"),
        (
            [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.3, 0.3, 0.3]],
            r"topology: row 2 sums to 0\.9, rows must sum to 1 \(row-stochastic",
        ),
        ([[0.5, np.nan], [0.5, 0.5]], r"non-finite entry nan at \[0, 1\]"),
        ([[1.0, 0.0], [np.inf, 0.5]], r"non-finite entry inf at \[1, 0\]"),
        (np.stack([np.eye(2), [[0.2, 0.2], [0.5, 0.5]]]), r"matrix\[1\] row 0 sums to 0\.4"),
        ([["a", "b"], ["c", "d"]], "real numeric"),
    ],
)
def test_validate_mixing_errors(matrix, match):
    with pytest.raises(ValueError, match=match):
        tp.validate_mixing(matrix)


def test_validate_mixing_names_and_tolerance():
    bad = [[0.5, 0.4], [0.5, 0.5]]
    with pytest.raises(ValueError, match=r"^W_ring: row 0 sums to 0\.9"):
        tp.validate_mixing(bad, name="W_ring")
    with pytest.raises(ValueError, match=r"topology 'mine': row 0"):
        tp.from_matrix(bad, name="mine")
    # float32 gets the looser tolerance, float64 the strict one
    w = np.array([[1 - 3e-6, 3e-6 + 4e-6], [0.5, 0.5]])
    tp.validate_mixing(w.astype(np.float32))
    with pytest.raises(ValueError, match="sums to"):
        tp.validate_mixing(w)
    tp.validate_mixing(w, atol=1e-5)
    with pytest.raises(ValueError, match="atol"):
        tp.validate_mixing(w, atol=-1.0)
    # concrete jax arrays are checked by value; tracers by shape only
    with pytest.raises(ValueError, match="negative"):
        tp.validate_mixing(jnp.array([[1.5, -0.5], [0.5, 0.5]]))

    def traced(m):
        tp.validate_mixing(m)  # values unknown: must not raise
        return m.sum()

    jax.jit(traced)(jnp.full((3, 3), 0.7))

    def traced_bad(m):
        tp.validate_mixing(m)
        return m.sum()

    with pytest.raises(ValueError, match="must be square"):
        jax.jit(traced_bad)(jnp.ones((2, 3)))


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="ring: n must be an integer >= 1, got 0"):
        tp.ring(0)
    with pytest.raises(ValueError, match="ring: n must be an integer"):
        tp.ring(3.0)
    with pytest.raises(ValueError, match="ring: n must be an integer"):
        tp.ring(True)
    with pytest.raises(ValueError, match="torus: cols"):
        tp.torus(3, 0)
    with pytest.raises(ValueError, match="hypercube: dim"):
        tp.hypercube(-1)
    with pytest.raises(ValueError, match=r"erdos_renyi: p must be a probability"):
        tp.erdos_renyi(5, 1.5)
    with pytest.raises(ValueError, match="erdos_renyi: no connected"):
        tp.erdos_renyi(5, 0.0, max_tries=3)
    with pytest.raises(ValueError, match="erdos_renyi: seed"):
        tp.erdos_renyi(5, 0.5, seed=-1)
    with pytest.raises(ValueError, match="n \\* degree must be even"):
        tp.random_regular(5, 3)
    with pytest.raises(ValueError, match="degree must be < n"):
        tp.random_regular(4, 4)
    with pytest.raises(ValueError, match="never connected"):
        tp.random_regular(6, 1)
    with pytest.raises(ValueError, match="random_matching: steps"):
        tp.random_matching(4, steps=0)
    with pytest.raises(ValueError, match="Topology: name must be a str"):
        tp.Topology(np.eye(2), name=3)
    with pytest.raises(ValueError, match="tracer"):
        jax.jit(lambda m: tp.from_matrix(m).n)(jnp.eye(2))


# ------------------------------------------------------------------------------------------
# Adjacency, networkx, files, by_name
# ------------------------------------------------------------------------------------------


def test_from_adjacency_path_graph_mh():
    # path 0 - 1 - 2 - 3, degrees 1, 2, 2, 1
    a = np.zeros((4, 4), dtype=int)
    for i in range(3):
        a[i, i + 1] = a[i + 1, i] = 1
    topo = tp.from_adjacency(a)
    expected = np.array(
        [
            [2 / 3, 1 / 3, 0, 0],
            [1 / 3, 1 / 3, 1 / 3, 0],
            [0, 1 / 3, 1 / 3, 1 / 3],
            [0, 0, 1 / 3, 2 / 3],
        ]
    )
    np.testing.assert_allclose(topo.matrix, expected, atol=1e-15)
    assert topo.is_symmetric and topo.is_doubly_stochastic
    # path 0 - 1 - 2, degrees 1, 2, 1: still 1/(1 + max(d_k, d_j)) = 1/3 on every edge
    np.testing.assert_allclose(
        tp.from_adjacency(a[:3, :3].astype(bool)).matrix,
        [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]],
    )
    # diagonal of the adjacency is ignored
    with_loops = a + np.eye(4, dtype=int)
    np.testing.assert_array_equal(tp.from_adjacency(with_loops).matrix, topo.matrix)


def test_from_adjacency_uniform_directed():
    a = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]])  # 1 -> 0, 2 -> 0, 2 -> 1
    topo = tp.from_adjacency(a, weights="uniform")
    np.testing.assert_allclose(topo.matrix, [[1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5], [0, 0, 1]])
    with pytest.raises(ValueError, match="undirected"):
        tp.from_adjacency(a)
    with pytest.raises(ValueError, match="weights must be one of"):
        tp.from_adjacency(a, weights="max_degree")
    with pytest.raises(ValueError, match="entries must be 0 or 1, got 2"):
        tp.from_adjacency([[0, 2], [2, 0]])
    with pytest.raises(ValueError, match="square"):
        tp.from_adjacency(np.ones((2, 3)))


@pytest.mark.parametrize("key", ["ring8", "exponential17", "star6", "erdos_renyi"])
def test_networkx_round_trip(key):
    topo = BUILDERS[key]()
    graph = tp.to_networkx(topo)
    assert isinstance(graph, nx.DiGraph)
    assert graph.number_of_nodes() == topo.n
    assert graph.number_of_edges() == int((topo.matrix > 0).sum())
    for j, k, data in graph.edges(data=True):
        assert data["weight"] == topo.matrix[k, j]
    back = tp.from_networkx(graph, weights="weight")
    np.testing.assert_array_equal(back.matrix, topo.matrix)
    assert back.name == topo.name


def test_from_networkx_schemes():
    graph = nx.path_graph(4)
    np.testing.assert_array_equal(
        tp.from_networkx(graph).matrix, tp.from_adjacency(nx.to_numpy_array(graph)).matrix
    )
    assert tp.from_networkx(nx.petersen_graph(), weights="uniform").is_doubly_stochastic
    # directed: edge j -> k means k receives from j
    dg = nx.DiGraph([(0, 1), (1, 2), (2, 0)])
    topo = tp.from_networkx(dg, weights="uniform")
    assert topo.matrix[1, 0] == 0.5 and topo.matrix[0, 1] == 0
    # labels other than 0..n-1 keep graph.nodes order
    labelled = nx.Graph([("a", "b"), ("b", "c")])
    np.testing.assert_allclose(tp.from_networkx(labelled).matrix, tp.grid(1, 3).matrix)
    with pytest.raises(ValueError, match="time-varying"):
        tp.to_networkx(tp.one_peer_exponential(4))
    with pytest.raises(ValueError, match="at least one node"):
        tp.from_networkx(nx.Graph())


def test_csv_round_trip(tmp_path):
    for topo in (tp.erdos_renyi(9, 0.5, seed=1), tp.one_peer_exponential(5), tp.ring(1)):
        path = tmp_path / "topo.csv"
        tp.save_csv(topo, path)
        back = tp.load_csv(path)
        np.testing.assert_array_equal(back.matrix, topo.matrix)
        assert back.name == topo.name
        assert back.period == topo.period
        assert [p.name for p in tmp_path.iterdir()] == ["topo.csv"]  # no temp files left
    (tmp_path / "bad.csv").write_text("0.5,0.5\n0.5,0.5\n1.0,0.0\n")
    with pytest.raises(ValueError, match="expected"):
        tp.load_csv(tmp_path / "bad.csv")
    (tmp_path / "neg.csv").write_text("1.5,-0.5\n0.5,0.5\n")
    with pytest.raises(ValueError, match="negative"):
        tp.load_csv(tmp_path / "neg.csv")
    with pytest.raises(FileNotFoundError):
        tp.load_csv(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="does not exist"):
        tp.save_csv(tp.ring(3), tmp_path / "no" / "dir.csv")


@pytest.mark.parametrize(
    ("name", "n", "kwargs", "expected"),
    [
        ("ring", 6, {}, lambda: tp.ring(6)),
        ("exponential", 16, {}, lambda: tp.exponential(16)),
        ("torus", 12, {}, lambda: tp.torus(3, 4)),
        ("torus", 16, {}, lambda: tp.torus(4, 4)),
        ("torus", 12, {"rows": 2}, lambda: tp.torus(2, 6)),
        ("grid", 10, {}, lambda: tp.grid(2, 5)),
        ("hypercube", 8, {}, lambda: tp.hypercube(3)),
        ("complete", 4, {}, lambda: tp.complete(4)),
        ("star", 5, {}, lambda: tp.star(5)),
        ("erdos_renyi", 10, {"p": 0.5, "seed": 2}, lambda: tp.erdos_renyi(10, 0.5, seed=2)),
        ("random_regular", 8, {"degree": 3}, lambda: tp.random_regular(8, 3)),
        ("one_peer_exponential", 8, {}, lambda: tp.one_peer_exponential(8)),
        ("random_matching", 6, {"steps": 4}, lambda: tp.random_matching(6, 4)),
    ],
)
def test_by_name(name, n, kwargs, expected):
    topo = tp.by_name(name, n, **kwargs)
    want = expected()
    assert topo.n == n
    np.testing.assert_array_equal(topo.matrix, want.matrix)
    assert topo.name == want.name


def test_by_name_errors():
    with pytest.raises(ValueError, match="unknown topology 'moebius'"):
        tp.by_name("moebius", 4)
    with pytest.raises(ValueError, match="power of 2"):
        tp.by_name("hypercube", 6)
    with pytest.raises(ValueError, match="bad keyword"):
        tp.by_name("ring", 6, degree=3)
    with pytest.raises(ValueError, match="bad keyword"):
        tp.by_name("erdos_renyi", 6)  # p is required
    with pytest.raises(ValueError, match="does not divide"):
        tp.by_name("torus", 12, rows=5)


def test_topology_is_hashable_by_identity():
    a, b = tp.ring(4), tp.ring(4)
    assert a != b and a == a
    assert len({a, b}) == 2
    with pytest.raises(AttributeError):
        a.name = "x"


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------


def _check_undirected_connected(topo: tp.Topology, n: int) -> None:
    assert topo.n == n
    tp.validate_mixing(topo.matrix, atol=1e-12)
    assert topo.is_strongly_connected
    np.testing.assert_array_equal(topo.support, topo.support.T)
    assert topo.is_doubly_stochastic


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    p=st.floats(0.3, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_erdos_renyi_property(n, p, seed):
    topo = tp.erdos_renyi(n, p, seed=seed)
    _check_undirected_connected(topo, n)
    np.testing.assert_array_equal(topo.matrix, tp.erdos_renyi(n, p, seed=seed).matrix)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_regular_property(data):
    n = data.draw(st.integers(3, 24), label="n")
    degree = data.draw(st.integers(2, n - 1).filter(lambda d: (n * d) % 2 == 0), label="degree")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    topo = tp.random_regular(n, degree, seed=seed)
    _check_undirected_connected(topo, n)
    np.testing.assert_array_equal(topo.in_degree, degree)
    np.testing.assert_allclose(topo.matrix[topo.matrix > 0], 1 / (degree + 1))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 64))
def test_ring_property(n):
    topo = tp.ring(n)
    _check_undirected_connected(topo, n)
    assert topo.is_symmetric
    np.testing.assert_array_equal(topo.in_degree, min(n - 1, 2))
