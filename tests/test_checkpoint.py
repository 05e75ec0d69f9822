"""Checkpoint and resume: bit-identical to an uninterrupted run, robust to kills and damage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import dicejax as dj
from conftest import make_problem
from dicejax import checkpoint as ckpt

TESTS = Path(__file__).parent
# One loss, topology and optimizer objects for most tests: jit caches on them, so the tests
# share compilations of the chunk step (tanh MLP, n = 4, 2-step chunks, record=True).
TOPO = dj.topology.one_peer_exponential(4)
SGD, ADAM = optax.sgd(0.3), optax.adam(0.05)


class _Interrupt(Exception):
    """Stands in for a crash between two chunks."""


def assert_same(a, b):
    """Same pytree structure (static fields included) and bitwise equal leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def interrupt_after(chunks: int):
    seen = []

    def callback(state, step):
        seen.append(step)
        if len(seen) == chunks:
            raise _Interrupt(step)

    return callback


@pytest.mark.parametrize(("opt_name", "every", "evaluate"), [
    pytest.param("sgd", 1, True, marks=pytest.mark.slow), ("adam", 2, False)])
def test_resume_is_bit_identical_to_uninterrupted_simulate(tmp_path, opt_name, every, evaluate):
    loss, params, batches, probe = make_problem(n=4, steps=12, model="tanh")
    topo, opt = TOPO, {"sgd": SGD, "adam": ADAM}[opt_name]
    ev = dict(eval_batch=probe, eval_every=4) if evaluate else {}
    kw = dict(chunk_steps=2, every_chunks=every, record=True, **ev)
    whole = dj.simulate(loss, params, batches, topo, opt, record=True, **ev)
    with pytest.raises(_Interrupt):
        ckpt.run_checkpointed(loss, params, batches, topo, opt, directory=tmp_path,
                              callback=interrupt_after(3), **kw)
    committed = ckpt.latest_step(tmp_path)
    assert committed == (6 if every == 1 else 4)  # chunk 3 was committed only with every=1
    # the interrupted process is gone: a fresh call resumes, here with another chunk size
    steps = []
    kw["chunk_steps"] = 4
    traj = ckpt.resume(tmp_path, loss, params, batches, topo, opt,
                       callback=lambda s, t: steps.append(t), **kw)
    assert steps == [*range(committed + 4, 12, 4), 12]
    assert_same(traj, whole)  # recorded states, half-steps, optimizer states, batches, metrics
    # a finished run resumes to the same result without running anything
    again = ckpt.run_checkpointed(loss, params, batches, topo, opt, directory=tmp_path,
                                  callback=lambda s, t: pytest.fail("ran a chunk"), **kw)
    assert_same(again, whole)
    state = ckpt.restore_state(tmp_path, params, opt)
    assert int(state.step) == 12
    assert_same(state.params, whole.final_params)


def test_extend_a_finished_run_with_a_stream_source(tmp_path):
    ds = dj.data.load_digits()
    parts = dj.data.partition("iid", ds.y_train, 3, samples_per_node=40)
    source = ckpt.stream_source(ds.x_train, ds.y_train, parts, 8, seed=3)
    full = dj.data.node_batches(ds.x_train, ds.y_train, parts, 8, 8, seed=3)
    for a, b in [(0, 8), (3, 7), (7, 8)]:  # random access equals the public stream
        assert_same(source(a, b), jax.tree.map(lambda x, a=a, b=b: x[a:b], full))

    def loss(p, batch):
        logits = batch["x"].reshape(batch["x"].shape[0], -1) @ p["w"]
        logp = jax.nn.log_softmax(logits)
        return -np.take_along_axis(logp, batch["y"][:, None], axis=1).mean()

    params = {"w": np.zeros((3, 64, 10))}
    topo, opt = dj.topology.ring(3), optax.sgd(0.1)
    whole = dj.simulate(loss, params, full, topo, opt, record=False, chunk_steps=2)
    ckpt.run_checkpointed(loss, params, source, topo, opt, directory=tmp_path, steps=4,
                          chunk_steps=2)
    longer = ckpt.run_checkpointed(loss, params, source, topo, opt, directory=tmp_path,
                                   steps=8, chunk_steps=2)
    assert_same(longer, whole)
    with pytest.raises(ValueError, match="steps: 6 is less than the 8 steps"):
        ckpt.run_checkpointed(loss, params, source, topo, opt, directory=tmp_path, steps=6,
                              chunk_steps=2)


# Orbax's event loop reports the failed read of the damaged checkpoint a second time.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_and_half_written_checkpoints_are_ignored(tmp_path):
    loss, params, batches, _ = make_problem(n=4, steps=8, model="tanh")
    topo, opt = TOPO, ADAM
    kw = dict(chunk_steps=2, record=True, keep=3)
    whole = dj.simulate(loss, params, batches, topo, opt, chunk_steps=2)  # == one scan
    with pytest.raises(_Interrupt):
        ckpt.run_checkpointed(loss, params, batches, topo, opt, directory=tmp_path,
                              callback=interrupt_after(3), **kw)
    state, history = tmp_path / "state", tmp_path / "history"
    assert [p.name for p in sorted(state.iterdir())] == ["2", "4", "6"]
    # what a kill during a write leaves: Orbax temporaries, a half-written JSON file
    shutil.copytree(state / "6", state / "8.orbax-checkpoint-tmp-1234")
    shutil.copytree(history / "6", history / "8.orbax-checkpoint-tmp-99")
    (tmp_path / ".run.json.abc.tmp").write_text('{"format": ')
    # the newest committed checkpoint damaged after the fact: a flipped byte in its data
    data = [f for f in (state / "6" / "arrays").rglob("*") if f.is_file() and "/d/" in str(f)]
    for f in data:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    # and the one before it holds valid arrays of another step: only the digest can tell
    shutil.rmtree(state / "4" / "arrays")
    shutil.copytree(state / "2" / "arrays", state / "4" / "arrays")
    assert ckpt.latest_step(tmp_path) == 6  # reads the JSON item only
    with pytest.warns(RuntimeWarning, match="unreadable") as caught:
        traj = ckpt.resume(tmp_path, loss, params, batches, topo, opt, **kw)
    assert len([w for w in caught if "unreadable" in str(w.message)]) == 2
    assert any("SHA-256" in str(w.message) for w in caught)
    assert_same(traj.final_params, whole.final_params)
    assert_same(traj.metrics, whole.metrics)
    assert_same(traj.params, whole.params)
    assert sorted(p.name for p in (tmp_path / "ignored").iterdir()) == ["state-4", "state-6"]
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]
    assert [p.name for p in sorted(state.iterdir(), key=lambda p: int(p.name))] == ["4", "6", "8"]


def test_all_state_checkpoints_damaged_starts_over(tmp_path):
    loss, params, batches, _ = make_problem(n=4, steps=4, model="tanh")
    kw = dict(directory=tmp_path, chunk_steps=2, record=True)
    ckpt.run_checkpointed(loss, params, batches, TOPO, ADAM, **kw)
    for step in (2, 4):
        (tmp_path / "state" / str(step) / "meta" / "metadata").write_text("{")
    assert ckpt.latest_step(tmp_path) is None
    assert ckpt.restore_state(tmp_path, params, ADAM) is None
    with pytest.warns(RuntimeWarning, match="unreadable"), pytest.raises(FileNotFoundError):
        ckpt.resume(tmp_path, loss, params, batches, TOPO, ADAM, chunk_steps=2, record=True)
    traj = ckpt.run_checkpointed(loss, params, batches, TOPO, ADAM, **kw)
    whole = dj.simulate(loss, params, batches, TOPO, ADAM, chunk_steps=2)
    assert_same(traj.final_params, whole.final_params)


def test_resume_refuses_a_different_run(tmp_path):
    loss, params, batches, probe = make_problem(n=4, steps=4, model="tanh")
    topo = TOPO
    kw = dict(directory=tmp_path, chunk_steps=2, config={"lr": 0.3})
    ckpt.run_checkpointed(loss, params, batches, topo, SGD, **kw)
    other = jax.tree.map(lambda x: x + 1.0, params)
    with pytest.raises(ValueError, match=r"different run.*initial_state"):
        ckpt.run_checkpointed(loss, other, batches, topo, SGD, **kw)
    with pytest.raises(ValueError, match=r"different run.*topology"):
        ckpt.run_checkpointed(loss, params, batches, dj.topology.complete(4), SGD, **kw)
    with pytest.raises(ValueError, match=r"different run.*data"):
        ckpt.run_checkpointed(loss, params, jax.tree.map(lambda x: x * 2, batches), topo, SGD,
                              **kw)
    with pytest.raises(ValueError, match=r"different run.*initial_state"):
        ckpt.run_checkpointed(loss, params, batches, topo, ADAM, **kw)
    with pytest.raises(ValueError, match=r"different run.*config"):
        ckpt.run_checkpointed(loss, params, batches, topo, SGD, **{**kw, "config": {"lr": 0.2}})
    with pytest.raises(ValueError, match=r"different run.*record"):
        ckpt.run_checkpointed(loss, params, batches, topo, SGD, record=True, **kw)
    with pytest.raises(ValueError, match=r"different run.*eval"):
        ckpt.run_checkpointed(loss, params, batches, topo, SGD, eval_batch=probe, eval_every=2,
                              **kw)
    with pytest.raises(FileNotFoundError, match="no checkpointed run"):
        ckpt.resume(tmp_path / "nothing", loss, params, batches, topo, chunk_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk_steps=0), "chunk_steps: must be a positive integer"),
        (dict(chunk_steps=2, every_chunks=0), "every_chunks"),
        (dict(chunk_steps=2, keep=0), "keep"),
        (dict(chunk_steps=2, steps=9), "steps: 9 exceeds the T = 4"),
        (dict(chunk_steps=2, config={"x": object()}), "config: must be JSON"),
        (dict(chunk_steps=2, record="yes"), "record: must be a bool"),
        (dict(chunk_steps=2, mixing="fast"), "mixing"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    loss, params, batches, _ = make_problem(n=4, steps=4)
    with pytest.raises(ValueError, match=match):
        ckpt.run_checkpointed(loss, params, batches, dj.topology.ring(4), directory=tmp_path,
                              **kwargs)


def test_bad_sources_and_directories(tmp_path):
    loss, params, batches, _ = make_problem(n=4, steps=4)
    topo = dj.topology.ring(4)
    with pytest.raises(ValueError, match="steps: required"):
        ckpt.run_checkpointed(loss, params, ckpt.array_source(batches).__call__, topo,
                              directory=tmp_path, chunk_steps=2)
    short = lambda a, b: jax.tree.map(lambda x: x[a : b - 1], batches)  # noqa: E731
    with pytest.raises(ValueError, match=r"batches: source\(0, 2\) returned leading axes"):
        ckpt.run_checkpointed(loss, params, short, topo, directory=tmp_path, chunk_steps=2,
                              steps=4)
    with pytest.raises(ValueError, match="batches: leaves disagree"):
        ckpt.array_source({"x": batches["x"], "y": batches["y"][:2]})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"directory: .* is not a directory"):
        ckpt.run_checkpointed(loss, params, batches, topo, directory=tmp_path / "file",
                              chunk_steps=2)
    with pytest.raises(ValueError, match="directory: must be"):
        ckpt.run_checkpointed(loss, params, batches, topo, directory=None, chunk_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        ckpt.stream_source(np.zeros((5, 2)), np.zeros(5, int), [np.arange(5)], 0)


def test_divergence_leaves_the_last_good_checkpoint(tmp_path):
    from test_reliability import clock_problem

    loss, params, batches = clock_problem(diverge_node=2, diverge_step=3)
    with pytest.raises(FloatingPointError, match=r"node 2 .* at step 3\b"):
        ckpt.run_checkpointed(loss, params, batches, np.eye(4), optax.sgd(1.0),
                              directory=tmp_path, chunk_steps=2)
    assert ckpt.latest_step(tmp_path) == 2
    state = ckpt.restore_state(tmp_path, params, optax.sgd(1.0))
    assert np.isfinite(np.asarray(state.params["w"])).all()


def test_run_setup_equals_train(tmp_path):
    from dicejax.experiments.common import RunConfig, build

    config = RunConfig(nodes=4, steps=6, batch=8, eval_every=3, test_size=40, probe_size=8,
                       samples_per_node=64)
    setup = build(config)
    whole = dj.simulate(setup.loss_fn, setup.params, setup.batches, setup.topology,
                        setup.optimizer, record=False, eval_batch=setup.test,
                        eval_fn=setup.eval_fn, eval_every=3, chunk_steps=2,  # == one scan
                        consensus=True)  # as the CLI's runs record it
    with pytest.raises(_Interrupt):
        ckpt.run_setup(setup, tmp_path, chunk_steps=2, callback=interrupt_after(2))
    assert_same(ckpt.run_setup(setup, tmp_path, chunk_steps=2), whole)
    other = build(RunConfig(nodes=4, steps=6, batch=8, eval_every=3, test_size=40,
                            probe_size=8, samples_per_node=64, lr=0.2))
    with pytest.raises(ValueError, match=r"different run.*config"):
        ckpt.run_setup(other, tmp_path, chunk_steps=2)


# --------------------------------------------------------------------------------------------
# Soak: a long run killed at random points, resumed, bit-identical at the end
# --------------------------------------------------------------------------------------------

SOAK = dict(n=4, steps=80, model="tanh")
SOAK_RUN = dict(chunk_steps=2, every_chunks=2, record=True)  # 40 chunks, 20 checkpoints

CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_compilation_cache_dir", {cache!r})  # shared by the children
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import optax
    import dicejax as dj
    from conftest import make_problem
    from dicejax import checkpoint as ckpt

    exit_after = int(sys.argv[1])
    loss, params, batches, _ = make_problem(**{soak!r})
    done = []

    def callback(state, step):
        print("step", step, flush=True)
        done.append(step)
        if len(done) == exit_after:
            os._exit(17)  # dies without cleanup, possibly with uncommitted chunks

    ckpt.run_checkpointed(loss, params, batches, dj.topology.one_peer_exponential(4),
                          optax.adam(0.05), directory={directory!r}, callback=callback,
                          **{run!r})
    print("finished", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_killed_at_random_points_ends_bit_identical(tmp_path):
    loss, params, batches, _ = make_problem(**SOAK)
    whole = dj.simulate(loss, params, batches, TOPO, ADAM, record=True)  # one scan of 80 steps
    run = tmp_path / "run"
    script = CHILD.format(tests=str(TESTS), soak=SOAK, directory=str(run), run=SOAK_RUN,
                          cache=str(tmp_path / "jax-cache"))
    rng = np.random.default_rng(2024)
    kills, progress = [], []
    for attempt in range(3):  # then the rest of the run in this process
        # alternately: SIGKILL at a random moment (mid-chunk or mid-write), or os._exit
        exit_after = int(rng.integers(2, 7)) if attempt % 2 else 10**6
        log = open(tmp_path / f"child-{attempt}.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", script, str(exit_after)],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        if attempt % 2 == 0:
            lines = int(rng.integers(1, 8))
            for _ in range(lines):
                if not proc.stdout.readline():
                    break
            time.sleep(float(rng.uniform(0.0, 0.2)))
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        log.close()
        kills.append(proc.returncode)
        progress.append(ckpt.latest_step(run) or 0)
        if proc.returncode not in (0, 17, -signal.SIGKILL):
            pytest.fail(f"child failed: {(tmp_path / f'child-{attempt}.log').read_text()}")
        if progress[-1] == SOAK["steps"]:
            break
    assert kills.count(-signal.SIGKILL) >= 1 and kills.count(17) >= 1, kills
    assert progress[-1] > 0 and progress == sorted(progress), progress  # no committed work lost
    traj = ckpt.resume(run, loss, params, batches, TOPO, ADAM, **SOAK_RUN)
    assert_same(traj, whole)
    assert not [p for p in run.rglob("*") if "tmp" in p.name]
    assert len(os.listdir(run / "state")) == 2  # keep=2
