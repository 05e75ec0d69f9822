"""Sharded node axis (dicejax.parallel): sharded runs and influence equal single-device ones.

The multi-device checks run in a subprocess with 4 forced CPU devices (``XLA_FLAGS`` must be
set before JAX starts); the multi-host check starts two processes that meet on a loopback
port through ``jax.distributed``. Plans, layouts and the memory model are checked in process
against numpy brute force.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem
from dicejax import parallel
from dicejax.simulate import consensus_distance

TESTS = Path(__file__).resolve().parent
TOL = 1e-9


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------------------------
# 4 forced CPU devices, one subprocess for every case (one JAX start-up)
# --------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, optax
    import dicejax as dj
    from dicejax import parallel
    from conftest import make_problem

    assert len(jax.devices()) == 4, jax.devices()
    mesh = parallel.node_mesh()
    out = {}

    def diff(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(a) == len(b)
        return max([0.0] + [float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float))))
                            for x, y in zip(a, b)])

    def compare(name, n, topo, mixing, opt=optax.sgd(0.1), model="softmax", evaluate=False,
                **kw):
        loss, params, batches, probe = make_problem(n=n, steps=6, model=model, seed=n)
        if evaluate:  # periodic evaluation of every node on a shared batch
            kw.update(eval_batch=probe, eval_every=2)
        single = "dense" if mixing == "dense" else "sparse"
        ref = dj.simulate(loss, params, batches, topo, optimizer=opt, mixing=single, **kw)
        got = dj.simulate(loss, params, batches, topo, optimizer=opt, mixing=mixing,
                          mesh=mesh, **kw)
        jax.block_until_ready(got.params)
        fields = ("final_params", "final_opt_state", "metrics", "params", "half_params",
                  "opt_states", "batches")
        out[name] = {
            "diff": {f: diff(getattr(ref, f), getattr(got, f)) for f in fields},
            "shape_ok": all(jax.tree.map(lambda a, b: a.shape == b.shape,
                                          jax.tree.leaves(ref.params),
                                          jax.tree.leaves(got.params))),
            "node_sharded": [str(x.sharding.spec) for x in jax.tree.leaves(got.params)],
            "devices": len(jax.tree.leaves(got.params)[0].sharding.device_set),
        }
        return loss, probe, ref, got

    # dense W through GSPMD, n = 7 padded to 8, gated updates (a free-rider, a sign flip),
    # periodic evaluation
    compare("dense_uneven_gated", 7, dj.topology.ring(7), "dense", evaluate=True,
            update_scale=np.array([1.0, 0.0, -1.0, 1.0, 0.5, 1.0, 1.0]))
    # halo exchange over device shifts 1 and 2, in two chunks; influence of the sharded run
    # (dice_gt and gt_cascade share one compiled function, as do dice_e and e_cascade)
    loss, probe, ref, got = compare("exponential_ppermute", 16, dj.topology.exponential(16),
                                    "ppermute", chunk_steps=3)
    for f in ("dice_gt", "dice_e", "gt_cascade", "e_cascade"):
        a = getattr(dj.influence, f)(loss, ref, probe, step=1, hops=2)
        b = getattr(dj.influence, f)(loss, got, probe, step=1, hops=2)
        out[f"influence_{f}"] = diff(jax.block_until_ready(a), jax.block_until_ready(b))
    # a time-varying schedule (one exchange per phase), Adam, n = 10 padded to 12
    compare(
        "one_peer_ppermute_uneven_adam", 10, dj.topology.one_peer_exponential(10), "ppermute",
        opt=optax.adam(0.05), model="tanh")
    # an arbitrary sparse graph: all-gather and a local gather, n = 9 padded to 12
    compare("erdos_renyi_all_gather", 9, dj.topology.erdos_renyi(9, 0.3, seed=1), "all_gather")

    # which kernel each graph gets, and what a ring moves (nothing is compiled here)
    def plan(topo, method):
        mixer = dj.mixing.make_mixer(topo.stacked(), topo.neighbors.indices)
        m = parallel.shard_mixer(mixer, parallel.node_layout(mesh, topo.n), method)
        return {"method": m.method, "shifts": [list(map(list, p)) for p in m.shifts]}

    out["plans"] = {
        "ring16": plan(dj.topology.ring(16), "sparse"),
        "torus8x8": plan(dj.topology.torus(8, 8), "sparse"),
        "exponential64": plan(dj.topology.exponential(64), "sparse"),
        "one_peer16": plan(dj.topology.one_peer_exponential(16), "sparse"),
        "erdos_renyi64": plan(dj.topology.erdos_renyi(64, 0.3, seed=0), "sparse"),
    }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded():
    done = subprocess.run([sys.executable, "-c", WORKER], env=_env(4), capture_output=True,
                          text=True, timeout=240, cwd=TESTS)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


CASES = ["dense_uneven_gated", "exponential_ppermute", "one_peer_ppermute_uneven_adam",
         "erdos_renyi_all_gather"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_sharded_simulate_equals_single_device(sharded, case):
    res = sharded[case]
    assert res["shape_ok"]
    for field, d in res["diff"].items():
        assert d < TOL, (case, field, d)
    assert res["devices"] == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_divisible_runs_stay_sharded(sharded):
    # n a multiple of the device count: the recorded trajectory keeps the node axis sharded
    spec = str(jax.sharding.PartitionSpec(None, "nodes"))
    assert sharded["exponential_ppermute"]["node_sharded"] == [spec, spec]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["dice_gt", "dice_e", "e_cascade", "gt_cascade"])
def test_influence_of_sharded_trajectory(sharded, name):
    assert sharded[f"influence_{name}"] < TOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kernel_choice_and_halo_sizes(sharded):
    plans = sharded["plans"]
    # a ring moves one boundary row each way: device shifts +1 and -1 (= 3 of 4)
    assert plans["ring16"] == {"method": "ppermute", "shifts": [[[1, 1], [3, 1]]]}
    # torus 8x8 on 4 devices (2 grid rows each): one grid row (8 nodes) each way
    assert plans["torus8x8"] == {"method": "ppermute", "shifts": [[[1, 8], [3, 8]]]}
    assert plans["exponential64"]["method"] == "ppermute"
    # one-peer: one exchange per phase, each moving only the peer slice (16 nodes, b = 4)
    one_peer = plans["one_peer16"]
    assert one_peer["method"] == "ppermute"
    b = 4
    for p, shifts in enumerate(one_peer["shifts"]):
        offset = 2**p
        assert sum(m for _, m in shifts) == min(offset, b)
        assert {s for s, _ in shifts} <= {offset // b % 4, (offset // b + 1) % 4}
    # a random graph reaching every device: all-gather
    assert plans["erdos_renyi64"]["method"] == "all_gather"


# --------------------------------------------------------------------------------------------
# Two processes on loopback through jax.distributed
# --------------------------------------------------------------------------------------------

HOST = textwrap.dedent(
    """
    import sys
    pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import dicejax as dj
    from dicejax import parallel
    from conftest import make_problem

    assert jax.process_count() == 2 and len(jax.devices()) == 2
    loss, params, batches, _ = make_problem(n=5, steps=4, seed=3)
    params, batches = jax.tree.map(np.asarray, (params, batches))  # host inputs
    traj = dj.simulate(loss, params, batches, dj.topology.ring(5), mixing="ppermute",
                       mesh=parallel.node_mesh())
    final = jax.tree.map(parallel.to_host, traj.final_params)
    loss_curve = parallel.to_host(traj.metrics["loss"])
    np.savez(path, loss=loss_curve, **final)
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_run_one_sharded_simulation(tmp_path):
    port = _free_port()
    env = _env(1)
    paths = [tmp_path / f"host{i}.npz" for i in range(2)]
    logs = [open(tmp_path / f"host{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", HOST, str(i), str(port), str(paths[i])],
                              env=env, cwd=TESTS, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    assert codes == [0, 0], [(tmp_path / f"host{i}.log").read_text()[-3000:] for i in range(2)]

    loss, params, batches, _ = make_problem(n=5, steps=4, seed=3)
    ref = dj.simulate(loss, params, batches, dj.topology.ring(5), mixing="sparse")
    for path in paths:  # every process holds the whole result
        got = np.load(path)
        assert np.max(np.abs(got["loss"] - np.asarray(ref.metrics["loss"]))) < TOL
        for k, v in ref.final_params.items():
            assert got[k].shape == v.shape
            assert np.max(np.abs(got[k] - np.asarray(v))) < TOL


# --------------------------------------------------------------------------------------------
# In process: plans, layouts, consensus, validation, memory model
# --------------------------------------------------------------------------------------------


def _emulate(plan: parallel.HaloPlan, values: np.ndarray, d: int) -> np.ndarray:
    """What every device's pool gather yields, by explicit per-device loops."""
    n_pad = values.shape[0]
    b = n_pad // d
    out = np.zeros((*plan.gather.shape, values.shape[1]))
    for i in range(d):
        pool = [values[i * b:(i + 1) * b]]
        for (delta, _), table in zip(plan.shifts, plan.send, strict=True):
            s = (i - delta) % d
            pool.append(values[s * b:(s + 1) * b][table[s]])
        pool.append(np.zeros((1, values.shape[1])))
        pool = np.concatenate(pool)
        assert pool.shape[0] == plan.pool_size
        out[i * b:(i + 1) * b] = pool[plan.gather[i * b:(i + 1) * b]]
    return out


@pytest.mark.parametrize("n_pad,d,width", [(12, 4, 3), (16, 4, 5), (15, 3, 4), (8, 1, 3),
                                           (10, 5, 2)])
def test_halo_plan_delivers_every_neighbour(rng, n_pad, d, width):
    src = rng.integers(-1, n_pad, size=(n_pad, width))
    values = rng.normal(size=(n_pad, 3))
    plan = parallel.halo_plan(src, d)
    want = np.where(src[..., None] >= 0, values[np.maximum(src, 0)], 0.0)
    np.testing.assert_array_equal(_emulate(plan, values, d), want)
    # each shift sends no more rows than the receiver reads from that device
    b = n_pad // d
    for (delta, m), _ in zip(plan.shifts, plan.send, strict=True):
        dst = np.arange(n_pad) // b
        needed = [np.unique(src[(dst == i)[:, None] & (src >= 0) & (src // b == (i - delta) % d)])
                  for i in range(d)]
        assert m == max(len(r) for r in needed)


def test_ring_plan_moves_one_row_each_way():
    n, d = 12, 3
    idx = dj.topology.ring(n).neighbors.indices
    plan = parallel.halo_plan(np.where(idx < n, idx, -1), d)
    assert plan.shifts == ((1, 1), (2, 1))
    assert plan.rows_received == 2


def test_consensus_distance_ignores_padding(rng):
    params = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(5, 2, 2))}
    padded = jax.tree.map(lambda x: np.concatenate([x, 1e3 + rng.normal(size=(3, *x.shape[1:]))]),
                          params)
    want = consensus_distance(jax.tree.map(jnp.asarray, params))
    got = consensus_distance(jax.tree.map(jnp.asarray, padded), num_nodes=5)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_layout_without_padding_places_and_trims_nothing(rng):
    layout = parallel.node_layout(parallel.node_mesh(jax.devices()[:1]), 5)
    assert (layout.block, layout.padded_nodes, layout.padded) == (5, 5, False)
    x = rng.normal(size=(2, 5, 3))
    placed = layout.place({"x": x}, axis=1)
    np.testing.assert_array_equal(np.asarray(placed["x"]), x)
    assert layout.trim(placed, axis=1) is placed
    with pytest.raises(ValueError, match="nodes"):
        layout.place(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="num_nodes"):
        parallel.node_layout(layout.mesh, 0)


def test_validation():
    loss, params, batches, _ = make_problem(n=4, steps=2)
    topo = dj.topology.ring(4)
    with pytest.raises(ValueError, match="devices"):
        parallel.node_mesh([])
    with pytest.raises(ValueError, match="devices"):
        parallel.node_mesh(["cpu0"])
    with pytest.raises(ValueError, match="devices"):
        parallel.node_mesh(jax.devices()[:1] * 2)
    with pytest.raises(ValueError, match="mesh"):
        dj.simulate(loss, params, batches, topo, mesh="cpu")
    bad = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with pytest.raises(ValueError, match="mesh"):
        dj.simulate(loss, params, batches, topo, mesh=bad)
    with pytest.raises(ValueError, match="mixing"):
        dj.simulate(loss, params, batches, topo, mixing="ppermute")
    with pytest.raises(ValueError, match="mixing"):
        dj.simulate(loss, params, batches, topo, mixing="halo", mesh=parallel.node_mesh())


def test_one_device_mesh_equals_no_mesh():
    loss, params, batches, _ = make_problem(n=4, steps=3)
    topo = dj.topology.ring(4)
    mesh = parallel.node_mesh(jax.devices()[:1])
    ref = dj.simulate(loss, params, batches, topo, mixing="sparse")
    got = dj.simulate(loss, params, batches, topo, mixing="ppermute", mesh=mesh)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=TOL, rtol=0)


def test_memory_model_counts_params_and_optimizer_state():
    params = {"w": jnp.zeros((3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    # 8 float32 parameters = 32 bytes; SGD keeps nothing, momentum one trace, Adam two
    # moments and an int32 step count
    assert parallel.memory_model(params, optax.sgd(0.1)) == (32, 0, 0, 0, 0)
    assert parallel.memory_model(params, optax.sgd(0.1, momentum=0.9)).opt_state == 32
    assert parallel.memory_model(params, optax.adam(1e-3)).opt_state == 2 * 32 + 4
    shapes = {"w": jax.ShapeDtypeStruct((100, 10), jnp.float64)}
    assert parallel.memory_model(shapes).params == 100 * 10 * 8


def test_memory_model_activations_and_largest_n():
    def loss(p, z):
        h = jnp.tanh(z["x"] @ p["w1"])
        return jnp.mean((h @ p["w2"]) ** 2)

    params = {"w1": jnp.zeros((64, 128), jnp.float32), "w2": jnp.zeros((128, 10), jnp.float32)}
    small = parallel.memory_model(params, optax.adam(1e-3), loss,
                                  {"x": jnp.zeros((16, 64), jnp.float32)})
    big = parallel.memory_model(params, optax.adam(1e-3), loss,
                                {"x": jnp.zeros((64, 64), jnp.float32)})
    assert big.batch == 4 * small.batch == 64 * 64 * 4
    # the hidden layer [B, 128] is kept for the backward pass: activations grow with B
    assert big.activations - small.activations >= (64 - 16) * 128 * 4
    assert small.workspace == 0
    measured = parallel.memory_model(params, optax.adam(1e-3), loss,
                                     {"x": jnp.zeros((16, 64), jnp.float32)}, compiled=True)
    assert measured._replace(workspace=0) == small and measured.workspace >= 0
    with pytest.raises(ValueError, match="compiled"):
        parallel.memory_model(params, compiled=True)
    card = 80e9
    for mixing in ("dense", "ppermute", "all_gather"):
        for devices in (1, 8):
            kw = dict(mixing=mixing, steps=100, record=True)
            n = big.max_nodes(card, devices, **kw)
            assert n >= 1
            assert big.per_device(n, devices, **kw) <= 0.9 * card
            assert big.per_device(n + 1, devices, **kw) > 0.9 * card
    # the dense matrix makes memory quadratic in n: sparse gossip fits more nodes
    assert big.max_nodes(card, 8, mixing="dense") < big.max_nodes(card, 8, mixing="ppermute")
    assert big.max_nodes(card, 8) > big.max_nodes(card, 1)
    with pytest.raises(ValueError, match="mixing"):
        big.per_device(10, mixing="ring")
