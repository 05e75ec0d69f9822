"""Tests for dicejax.models: shapes, parameter counts, losses, stacking, dtypes, FLOP counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicejax import models

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
MODEL_SPECS = [("mlp", {}), ("cnn", {}), ("resnet18", {"width": 8})]


def _model(name: str, num_classes: int = 10):
    kwargs = dict(MODEL_SPECS)[name]
    return models.get_model(name, num_classes, **kwargs)


def _batch(seed, shape, batch_size=4, num_classes=10, lead=()):
    # NumPy draws: eager jax.random on 4-D shapes compiles slowly on XLA:CPU.
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(*lead, batch_size, *shape)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, num_classes, size=(*lead, batch_size)), jnp.int32),
    }


@pytest.mark.parametrize("name", [n for n, _ in MODEL_SPECS])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes(name, shape):
    # Abstract evaluation checks every (model, shape) pair without compiling anything; the
    # loss, gradient and stacking tests run each model for real on 8x8x1 inputs.
    model = _model(name, num_classes=7)
    x = jnp.ones((3, *shape))
    params = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.key(0))
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (3, 7)


def test_model_classes_and_defaults():
    assert isinstance(models.get_model("MLP", 10), models.MLP)
    assert isinstance(models.get_model("cnn", 10), models.CNN)
    resnet = models.get_model("resnet18", 100)
    assert isinstance(resnet, models.ResNet18) and resnet.width == 64
    assert models.MLP().hidden == (128, 64)
    assert models.get_model("mlp", 10, hidden=[32]).hidden == (32,)


def test_mlp_param_count_matches_formula():
    d, h1, h2, c = 28 * 28, 128, 64, 10
    params = jax.eval_shape(
        lambda k: models.init_params(models.MLP(), k, (28, 28, 1)), jax.random.key(1)
    )
    expected = d * h1 + h1 + h1 * h2 + h2 + h2 * c + c
    assert models.num_params(params) == expected == 109_386
    concrete = models.init_params(
        models.MLP(hidden=(4,), num_classes=3), jax.random.key(1), (2, 2, 1)
    )
    assert models.num_params(concrete) == 4 * 4 + 4 + 4 * 3 + 3
    assert models.num_params(models.replicate(concrete, 3)) == 3 * (4 * 4 + 4 + 4 * 3 + 3)


def test_cnn_param_count_matches_formula():
    params = jax.eval_shape(
        lambda k: models.init_params(models.CNN(), k, (28, 28, 1)), jax.random.key(1)
    )
    expected = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    assert models.num_params(params) == expected


def test_resnet_uses_groupnorm_no_batch_stats():
    model = _model("resnet18")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert set(variables) == {"params"}
    assert any("GroupNorm" in k for k in variables["params"])


# ResNet-18 compiles for 15-18 s per test: its cases run in make test-slow
MODEL_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "resnet18" else n
               for n, _ in MODEL_SPECS]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_matches_hand_cross_entropy(name):
    model = _model(name)
    params = models.init_params(model, jax.random.key(2), (8, 8, 1))
    batch = _batch(3, (8, 8, 1), batch_size=5)

    @jax.jit  # one compilation for all four functions (eager ResNet ops compile one by one)
    def run(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return (
            logits,
            models.make_loss_fn(model)(params, batch),
            models.make_accuracy_fn(model)(params, batch),
            models.make_eval_fn(model)(params, batch),
        )

    logits, loss, acc, ev = run(params, batch)
    logits = np.asarray(logits, np.float64)
    y = np.asarray(batch["y"])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(len(y)), y].mean()
    assert loss.shape == () and acc.shape == ()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert 0.0 <= float(acc) <= 1.0
    np.testing.assert_allclose(float(acc), np.mean(logits.argmax(axis=1) == y), atol=1e-6)
    assert set(ev) == {"loss", "accuracy"}
    np.testing.assert_allclose(float(ev["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(ev["accuracy"]), float(acc), atol=1e-7)


def test_accuracy_exact_on_constructed_case():
    # MLP with no hidden layer on a 1x1x3 "image": logits = x @ W + b; with W = I, b = 0 the
    # prediction is the arg-max of the input.
    model = models.MLP(hidden=(), num_classes=3)
    params = {"Dense_0": {"kernel": np.eye(3, dtype=np.float32), "bias": np.zeros(3, np.float32)}}
    x = np.array([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], np.float32).reshape(4, 1, 1, 3)
    half = {"x": x, "y": np.array([0, 1, 0, 2])}  # first two right, last two wrong
    right = {"x": x, "y": np.array([0, 1, 2, 0])}

    @jax.jit
    def run(params, half, right):
        accuracy = models.make_accuracy_fn(model)
        return (
            accuracy(params, half),
            accuracy(params, right),
            models.make_loss_fn(model)(params, right),
        )

    acc_half, acc_right, loss_right = run(params, half, right)
    assert float(acc_half) == 0.5
    assert float(acc_right) == 1.0
    # Cross-entropy of logits (5, 0, 0) for the right class: log(1 + 2 e^-5).
    np.testing.assert_allclose(float(loss_right), np.log1p(2 * np.exp(-5.0)), rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, _ in MODEL_SPECS])
def test_init_params_stacking(name):
    model = _model(name)
    shape = (8, 8, 1)
    single = models.init_params(model, jax.random.key(4), shape)
    same = models.init_params(model, jax.random.key(4), shape, num_nodes=3)

    def indep_fn(key):
        return models.init_params(model, key, shape, num_nodes=3, same_init=False)

    # A vmapped ResNet initialiser compiles for seconds: check its shapes only.
    abstract = name == "resnet18"
    key = jax.random.key(4)
    indep = jax.eval_shape(indep_fn, key) if abstract else indep_fn(key)
    assert jax.tree.structure(same) == jax.tree.structure(single)
    assert jax.tree.structure(indep) == jax.tree.structure(single)
    for s, p, q in zip(jax.tree.leaves(single), jax.tree.leaves(same), jax.tree.leaves(indep)):
        assert p.shape == q.shape == (3, *s.shape)
        for k in range(3):
            np.testing.assert_array_equal(np.asarray(p)[k], s)
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(indep)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    assert kernels
    for leaf in [] if abstract else kernels:
        leaf = np.asarray(leaf)
        assert not np.allclose(leaf[0], leaf[1])
        assert not np.allclose(leaf[1], leaf[2])


def test_replicate():
    tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2)), 4.0)}
    rep = models.replicate(tree, 5)
    assert rep["a"].shape == (5, 3)
    assert rep["b"][0].shape == (5, 2, 2)
    assert rep["b"][1].shape == (5,)
    np.testing.assert_array_equal(rep["a"][4], tree["a"])
    with pytest.raises(ValueError, match="n"):
        models.replicate(tree, 0)


def test_float64_under_x64():
    with jax.enable_x64(True):
        model = models.MLP(hidden=(16,))
        params = models.init_params(model, jax.random.key(5), (8, 8, 1), dtype=jnp.float64)
        stacked = models.init_params(
            model, jax.random.key(5), (8, 8, 1), num_nodes=2, dtype=jnp.float64
        )
        for leaf in jax.tree.leaves(params) + jax.tree.leaves(stacked):
            assert leaf.dtype == jnp.float64
        batch = _batch(6, (8, 8, 1))
        batch["x"] = batch["x"].astype(jnp.float64)
        loss, grads = jax.jit(jax.value_and_grad(models.make_loss_fn(model)))(params, batch)
        assert loss.dtype == jnp.float64
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))


def test_float64_without_x64_is_an_error():
    with jax.enable_x64(False), pytest.raises(ValueError, match="dtype"):
        models.init_params(models.MLP(), jax.random.key(0), (8, 8, 1), dtype=jnp.float64)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grads_finite_and_jit(name):
    model = _model(name)
    params = models.init_params(model, jax.random.key(7), (8, 8, 1))
    batch = _batch(8, (8, 8, 1))
    loss, grads = jax.jit(jax.value_and_grad(models.make_loss_fn(model)))(params, batch)
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def test_vmap_over_stacked_nodes():
    model = models.MLP(hidden=(16,))
    params = models.init_params(model, jax.random.key(9), (8, 8, 1), num_nodes=4, same_init=False)
    batches = _batch(10, (8, 8, 1), lead=(4,))
    losses = jax.jit(jax.vmap(models.make_loss_fn(model)))(params, batches)
    assert losses.shape == (4,)
    one = jax.jit(models.make_loss_fn(model))(
        jax.tree.map(lambda p: np.asarray(p)[2], params),
        jax.tree.map(lambda b: np.asarray(b)[2], batches),
    )
    np.testing.assert_allclose(float(losses[2]), float(one), rtol=1e-5)


def test_functions_are_cached():
    model = _model("cnn")
    assert models.make_loss_fn(model) is models.make_loss_fn(model)
    assert models.make_loss_fn(model) is models.make_loss_fn(models.CNN(num_classes=10))
    assert models.make_accuracy_fn(model) is models.make_accuracy_fn(model)
    assert models.make_eval_fn(model) is models.make_eval_fn(model)
    assert models.make_loss_fn(model) is not models.make_loss_fn(models.CNN(num_classes=5))
    # Unhashable module (list field): still works, just not cached.
    unhashable = models.MLP(hidden=[8])
    params = jax.eval_shape(
        lambda k: models.init_params(unhashable, k, (8, 8, 1)), jax.random.key(0)
    )
    loss = jax.eval_shape(models.make_loss_fn(unhashable), params, _batch(1, (8, 8, 1)))
    assert loss.shape == ()


def test_flops_mlp_hand_count():
    expected = 2 * (784 * 128 + 128 * 64 + 64 * 10)
    assert models.flops_per_example(models.MLP(), (28, 28, 1)) == expected


def test_flops_cnn_hand_count():
    # 28x28x1 input, SAME 3x3 convs, 2x2 pools: 28 -> 14 -> 7.
    conv1 = 28 * 28 * 32 * (3 * 3 * 1)
    conv2 = 14 * 14 * 64 * (3 * 3 * 32)
    fc1 = (7 * 7 * 64) * 128
    fc2 = 128 * 10
    expected = 2 * (conv1 + conv2 + fc1 + fc2)
    assert expected == 8_482_304
    assert models.flops_per_example(models.CNN(), (28, 28, 1)) == expected
    # 32x32x3: 32 -> 16 -> 8.
    expected32 = 2 * (32 * 32 * 32 * 27 + 16 * 16 * 64 * 288 + 8 * 8 * 64 * 128 + 128 * 10)
    assert models.flops_per_example(models.CNN(), (32, 32, 3)) == expected32


def test_flops_resnet18_standard_size():
    # The CIFAR ResNet-18 is ~0.56 GMACs per 32x32x3 image.
    flops = models.flops_per_example(models.ResNet18(), (32, 32, 3))
    assert 1.0e9 < flops < 1.2e9


def test_validation_errors():
    with pytest.raises(ValueError, match="name"):
        models.get_model("vgg", 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("mlp", 0)
    with pytest.raises(ValueError, match="width"):
        models.get_model("resnet18", 10, width=0)
    with pytest.raises(ValueError, match="unknown keyword"):
        models.get_model("cnn", 10, width=8)
    with pytest.raises(ValueError, match="input_shape"):
        models.init_params(models.MLP(), jax.random.key(0), (28, 28))
    with pytest.raises(ValueError, match="num_nodes"):
        models.init_params(models.MLP(), jax.random.key(0), (8, 8, 1), num_nodes=0)
    with pytest.raises(ValueError, match="dtype"):
        models.init_params(models.MLP(), jax.random.key(0), (8, 8, 1), dtype=jnp.int32)
    with pytest.raises(ValueError, match="dtype"):
        models.init_params(models.MLP(), jax.random.key(0), (8, 8, 1), dtype="not-a-dtype")
    with pytest.raises(ValueError, match="key"):
        models.init_params(models.MLP(), 0, (8, 8, 1))
    with pytest.raises(ValueError, match="model"):
        models.make_loss_fn("mlp")
    with pytest.raises(ValueError, match="input_shape"):
        models.flops_per_example(models.CNN(), (28, 28, 0))
    with pytest.raises(ValueError, match="batch"):
        params = models.init_params(models.MLP(), jax.random.key(0), (8, 8, 1))
        models.make_loss_fn(models.MLP())(params, {"x": jnp.zeros((2, 8, 8, 1))})


# ------------------------------------------------------------------------------------------
# Convolutions as patches (the CPU default) against lax.conv_general_dilated, float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((1, 1), (2, 2), "SAME"),
    ((3, 3), (1, 1), "VALID"), ((2, 3), (1, 2), ((1, 0), (2, 1))), ((3, 3), (2, 1), "SAME"),
])
def test_conv_patches_equals_lax_conv_with_gradients(kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float64)
    k = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float64)
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(fn, x, k):
        return fn(x, k, strides, padding, dimension_numbers=dn)

    ref = conv(jax.lax.conv_general_dilated, x, k)
    out = conv(models.conv_patches, x, k)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    cot = jnp.asarray(rng.normal(size=ref.shape))
    g_ref = jax.grad(lambda x, k: jnp.sum(cot * conv(jax.lax.conv_general_dilated, x, k)),
                     (0, 1))(x, k)
    g_out = jax.grad(lambda x, k: jnp.sum(cot * conv(models.conv_patches, x, k)), (0, 1))(x, k)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_conv_patches_falls_back_for_groups_and_dilation():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float64)
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float64)
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    for kw in ({"feature_group_count": 2}, {"rhs_dilation": (2, 2), "feature_group_count": 2}):
        np.testing.assert_array_equal(
            models.conv_patches(x, k, (1, 1), "SAME", dimension_numbers=dn, **kw),
            jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, **kw))


@pytest.mark.parametrize("name,kwargs,shape", [
    ("cnn", {}, (12, 12, 1)),
    # ResNet-18's 20 convolutions take 80 s to compile in float64: make test-slow
    pytest.param("resnet18", {"width": 4}, (8, 8, 3), marks=pytest.mark.slow)])
def test_models_patches_equal_xla_convs_under_node_vmap(name, kwargs, shape):
    # The whole model, node-vmapped as the simulator runs it: loss and every gradient leaf.
    xla = models.get_model(name, 10, conv="xla", **kwargs)
    patches = models.get_model(name, 10, conv="patches", **kwargs)
    params = models.init_params(xla, jax.random.key(0), shape, num_nodes=2, dtype=jnp.float64)
    batch = _batch(2, shape, batch_size=3, lead=(2,))
    batch = {"x": batch["x"].astype(jnp.float64), "y": batch["y"]}
    vg = [jax.vmap(jax.value_and_grad(models.make_loss_fn(m))) for m in (xla, patches)]
    (l_ref, g_ref), (l_out, g_out) = (f(params, batch) for f in vg)
    np.testing.assert_allclose(l_out, l_ref, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_conv_choice_is_automatic_and_validated():
    assert models.resolve_conv("auto") == ("patches" if jax.default_backend() == "cpu"
                                           else "xla")
    assert models.resolve_conv("xla") == "xla"
    with pytest.raises(ValueError, match="conv must be one of"):
        models.resolve_conv("im2col")
    with pytest.raises(ValueError, match="conv must be one of"):
        models.get_model("cnn", 10, conv="fast")
    with pytest.raises(ValueError, match="conv must be one of"):
        models.init_params(models.CNN(conv="fast"), jax.random.key(0), (8, 8, 1))


def test_max_pool_2x2_reshape_equals_nn_max_pool_with_gradients():
    rng = np.random.default_rng(3)
    for shape in [(2, 6, 8, 3), (1, 7, 5, 2)]:  # even, and odd sizes (trailing row dropped)
        x = jnp.asarray(rng.normal(size=shape), jnp.float64)
        cot = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])))
        outs = [models.max_pool_2x2(x, impl) for impl in ("patches", "xla")]
        np.testing.assert_array_equal(outs[0], outs[1])
        grads = [jax.grad(lambda x, i=impl, c=cot: jnp.sum(c * models.max_pool_2x2(x, i)))(x)
                 for impl in ("patches", "xla")]
        np.testing.assert_array_equal(grads[0], grads[1])
    # Ties after a ReLU are all-zero windows: the ReLU zeroes their gradient either way.
    x = jnp.asarray(rng.normal(size=(1, 4, 4, 1)) * (rng.uniform(size=(1, 4, 4, 1)) < 0.5))
    grads = [jax.grad(lambda x, i=impl: jnp.sum(models.max_pool_2x2(jax.nn.relu(x), i)))(x)
             for impl in ("patches", "xla")]
    np.testing.assert_array_equal(grads[0], grads[1])
