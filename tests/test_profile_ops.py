"""``benchmarks/profile_step.op_profile``: per-operation times from a ``jax.profiler`` trace."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.profile_step import op_profile


def test_op_profile_finds_the_product_and_leaves_out_the_loop():
    x = jnp.ones((256, 256), jnp.float32)

    @jax.jit
    def f(x):  # a loop of 3 products: the loop itself is not counted, its body is
        return jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y @ x), x).sum()

    prof = op_profile(f, (x,), steps=3, repeats=2)
    ops = prof["ops"]
    assert ops, "no operation of the call's module was found in the trace"
    assert sum(o["share"] for o in ops) == pytest.approx(1.0)
    assert all(o["s_per_step"] >= 0 for o in ops)
    assert not any(o["op"].startswith("while") for o in ops)
    assert any("dot_general" in o["source"] for o in ops)
    assert prof["ops_s_per_step"] == pytest.approx(sum(o["s_per_step"] for o in ops))
    assert prof["wall_s_per_step"] > 0
