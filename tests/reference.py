"""Slow, obviously-correct twins of the influence formulas (explicit loops, Hessians, walks).

Everything here works on Python lists of per-node pytrees and plain loops; nothing is
vmapped or scanned. Used only by the tests, on tiny float64 problems.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


@functools.cache
def _grad(loss_fn):
    return jax.jit(jax.grad(loss_fn))


@functools.cache
def _update(optimizer):
    return jax.jit(optimizer.update)


def node(tree, *idx):
    return jax.tree.map(lambda x: x[idx], tree)


def explicit_steps(loss_fn, optimizer, params, opt_states, batches, matrices, drop=None,
                   scales=None, combine=None):
    """Runs len(matrices) ATC steps with explicit loops; node ``drop`` skips its first update.

    Args:
      params, opt_states: lists of per-node pytrees at step t.
      batches: pytree with leaves [r, n, B, ...].
      matrices: [r, n, n].
      drop: source whose update at the first step is removed (keeps θ_j^t and its state).
      scales: optional [r, n] factors on each node's update (0: no update, state kept).
      combine: optional ``combine(half, W) -> params`` on lists of per-node pytrees (a
        robust rule); default the weighted sum over ``W``'s non-zero entries.

    Returns:
      List over s = 1..r of lists of per-node params.
    """
    n = len(params)
    out = []
    for s, W in enumerate(np.asarray(matrices)):
        half, new_opt = [], []
        for k in range(n):
            g = _grad(loss_fn)(params[k], node(batches, s, k))
            upd, st = _update(optimizer)(g, opt_states[k], params[k])
            sigma = 1.0 if scales is None else float(scales[s][k])
            if (s == 0 and k == drop) or sigma == 0.0:
                half.append(params[k])
                new_opt.append(opt_states[k])
            else:
                half.append(jax.tree.map(lambda p, u, c=sigma: p + c * u, params[k], upd))
                new_opt.append(st)  # a scaled sender still trains normally
        if combine is not None:
            params = combine(half, W)
            opt_states = new_opt
            out.append(params)
            continue
        params = []
        for k in range(n):
            acc = jax.tree.map(jnp.zeros_like, half[k])
            for j in range(n):
                if W[k, j] != 0:
                    acc = jax.tree.map(lambda a, h, w=W[k, j]: a + w * h, acc, half[j])
            params.append(acc)
        opt_states = new_opt
        out.append(params)
    return out


def shells_bfs(matrices):
    """Explicit time-respecting shells: list over s of list over j of sets of nodes."""
    matrices = np.asarray(matrices)
    n = matrices.shape[-1]
    result = []
    reached = [{j} for j in range(n)]
    for W in matrices:
        layer = []
        for j in range(n):
            new = {k for k in range(n) for i in reached[j] if W[k, i] > 0} - reached[j]
            layer.append(new)
        for j in range(n):
            reached[j] = reached[j] | layer[j]
        result.append(layer)
    return result


def traj_nodes(traj, t):
    n = traj.num_nodes
    params = [node(traj.params, t, k) for k in range(n)]
    opts = [node(traj.opt_states, t, k) for k in range(n)]
    return params, opts


def probe_loss(loss_fn, probe):
    return lambda p: loss_fn(p, probe)


def gt_brute(loss_fn, traj, probe, t, hops, q, combine=None):
    """DICE-GT^(r) of every source by explicit counterfactual re-runs and BFS shells
    (``combine``: see :func:`explicit_steps`)."""
    n = traj.num_nodes
    params, opts = traj_nodes(traj, t)
    mats = np.asarray(traj.matrices(t, t + hops))
    batches = jax.tree.map(lambda x: x[t : t + hops], traj.batches)
    scales = None if traj.update_scale is None else np.asarray(traj.update_scale[t : t + hops])
    actual = explicit_steps(loss_fn, traj.optimizer, params, opts, batches, mats, scales=scales,
                            combine=combine)
    sh = shells_bfs(mats)
    L = probe_loss(loss_fn, probe)
    scores, network = [], []
    for j in range(n):
        cf = explicit_steps(loss_fn, traj.optimizer, params, opts, batches, mats, drop=j,
                            scales=scales, combine=combine)
        half_j = node(traj.half_params, t, j)
        total = q[j] * (float(L(half_j)) - float(L(params[j])))
        for s in range(hops):
            for k in sh[s][j]:
                total += q[k] * (float(L(actual[s][k])) - float(L(cf[s][k])))
        scores.append(total)
        network.append(
            sum(q[k] * (float(L(actual[-1][k])) - float(L(cf[-1][k]))) for k in range(n))
        )
    return np.array(scores), np.array(network)


def e_brute_sgd_walks(loss_fn, traj, probe, t, hops, q, lr, order=1, direct="taylor",
                      updates=None):
    """DICE-E^(r) for plain SGD by Theorem 1: explicit walk enumeration and dense Hessians.

    δ_k^{t+s}(j) = Σ_walks W^t[k1, j] Π_{m=1}^{s-1} W^{t+m}[k_{m+1}, k_m] (I − η H_{k_m}^{t+m}) v_j

    ``updates``: optional {j: pytree} replacing the source's update v_j (e.g. one sample's).
    """
    n = traj.num_nodes
    mats = np.asarray(traj.matrices(t, t + hops))
    sh = shells_bfs(mats)
    flat0, unravel = ravel_pytree(node(traj.params, 0, 0))
    dim = flat0.size

    def flat(tree):
        return np.asarray(ravel_pytree(tree)[0])

    hess = jax.jit(jax.hessian(lambda x, b: loss_fn(unravel(x), b)))
    grad = jax.jit(jax.grad(lambda x, b: loss_fn(unravel(x), b)))

    def train_hessian(u, k):
        p = flat(node(traj.params, u, k))
        return np.asarray(hess(jnp.asarray(p), node(traj.batches, u, k)))

    def probe_grad_hess(u, k):
        p = jnp.asarray(flat(node(traj.params, u, k)))
        return np.asarray(grad(p, probe)), np.asarray(hess(p, probe))

    prop = {
        (m, k): np.eye(dim) - lr * train_hessian(t + m, k) for m in range(1, hops) for k in range(n)
    }
    gh = {(s, k): probe_grad_hess(t + s, k) for s in range(1, hops + 1) for k in range(n)}
    scores = []
    for j in range(n):
        v = flat(node(traj.half_params, t, j)) - flat(node(traj.params, t, j))
        if updates is not None:
            v = flat(updates[j])
        g0, h0 = probe_grad_hess(t, j)
        if direct == "exact":
            own = float(
                loss_fn(node(traj.half_params, t, j), probe)
                - loss_fn(node(traj.params, t, j), probe)
            )
        else:
            own = g0 @ v + (0.5 * v @ h0 @ v if order == 2 else 0.0)
        total = q[j] * own
        for s in range(1, hops + 1):
            for k in sh[s - 1][j]:
                delta = np.zeros(dim)
                for mid in itertools.product(range(n), repeat=s - 1):
                    walk = (j, *mid, k)
                    vec = mats[0][walk[1], j] * v
                    for m in range(1, s):
                        vec = mats[m][walk[m + 1], walk[m]] * (prop[(m, walk[m])] @ vec)
                    delta += vec
                g, h = gh[(s, k)]
                term = g @ delta - (0.5 * delta @ h @ delta if order == 2 else 0.0)
                total += q[k] * term
        scores.append(total)
    return np.array(scores)


def _is_float(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if _is_float(x)]


def _with_floats(template, floats):
    leaves, treedef = jax.tree.flatten(template)
    it = iter(floats)
    return jax.tree.unflatten(treedef, [next(it) if _is_float(x) else x for x in leaves])


def e_brute_jacobians(loss_fn, traj, probe, t, hops, q):
    """First-order cascade matrix [r, k, j] from dense Jacobians of an explicit network step.

    The network state (every node's params and float optimizer-state leaves) is one flat
    vector; each step's Jacobian is jax.jacfwd of an explicit per-node loop; source j's
    initial tangent is the derivative of the gated first step in α_j at α = 1.
    """
    n, opt = traj.num_nodes, traj.optimizer
    mats = np.asarray(traj.matrices(t, t + hops))

    def state(u):
        return (
            [node(traj.params, t + u, k) for k in range(n)],
            [_floats(node(traj.opt_states, t + u, k)) for k in range(n)],
        )

    x_t, unravel = ravel_pytree(state(0))

    def step_fn(u, alpha=None):
        templates = [node(traj.opt_states, t + u, k) for k in range(n)]

        def f(x):
            ps, ofs = unravel(x)
            half, new = [], []
            for k in range(n):
                g = jax.grad(loss_fn)(ps[k], node(traj.batches, t + u, k))
                upd, st = opt.update(g, _with_floats(templates[k], ofs[k]), ps[k])
                h, sf = optax.apply_updates(ps[k], upd), _floats(st)
                if alpha is not None:
                    h = jax.tree.map(lambda a, b, k=k: b + (alpha[k] - 1) * (b - a), ps[k], h)
                    sf = [b + (alpha[k] - 1) * (b - a) for a, b in zip(ofs[k], sf)]
                half.append(h)
                new.append(sf)
            mixed = [
                jax.tree.map(lambda *hs, k=k: sum(mats[u][k, j] * hs[j] for j in range(n)), *half)
                for k in range(n)
            ]
            return ravel_pytree((mixed, new))[0]

        return f

    tangent = jax.jit(jax.jacfwd(lambda a: step_fn(0, a)(x_t)))(jnp.ones(n))  # [D, n]
    out = np.zeros((hops, n, n))
    for s in range(hops):
        if s > 0:
            tangent = jax.jit(jax.jacfwd(step_fn(s)))(ravel_pytree(state(s))[0]) @ tangent
        for k in range(n):
            g = _grad(loss_fn)(node(traj.params, t + s + 1, k), probe)
            for j in range(n):
                d = unravel(tangent[:, j])[0][k]
                out[s, k, j] = q[k] * float(
                    sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
                )
    return out


def proximal_brute(loss_fn, traj, probe, t, q, weighted=True):
    n = traj.num_nodes
    W = np.asarray(traj.matrix_at(t)) if weighted else np.ones((n, n))
    out = np.zeros((n, n))
    for k in range(n):
        g = _grad(loss_fn)(node(traj.params, t + 1, k), probe)
        for j in range(n):
            v = jax.tree.map(jnp.subtract, node(traj.half_params, t, j), node(traj.params, t, j))
            out[k, j] = (
                q[k]
                * W[k, j]
                * float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v))))
            )
    return out
