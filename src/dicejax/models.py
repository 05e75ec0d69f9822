"""Flax models used by the experiments, and pure loss / metric functions for one node.

The three architectures are the ones of the DICE paper (Zhu et al., ICLR 2025):

- :class:`MLP` — flatten, ``in -> 128 -> 64 -> num_classes`` with ReLU;
- :class:`CNN` — ``conv3x3 32 -> pool -> conv3x3 64 -> pool -> fc 128 -> fc num_classes``;
- :class:`ResNet18` — ResNet-18 for small images, with GroupNorm instead of BatchNorm.

Every model maps a batch of images ``x: float [B, H, W, C]`` to logits ``[B, num_classes]``.
Parameters are always passed explicitly as the ``'params'`` collection, so a node's loss is a
pure function ``loss_fn(params, batch) -> scalar`` of its parameters and its batch
``{'x': float [B, H, W, C], 'y': int [B]}``. :func:`init_params` builds either one parameter
pytree or the stacked pytree of ``n`` nodes (every leaf ``[n, ...]``) that
``dicejax.simulate`` expects.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dicejax.simulator import replicate

__all__ = [
    "CNN",
    "CONV_IMPLS",
    "MLP",
    "ResNet18",
    "conv_patches",
    "flops_per_example",
    "get_model",
    "init_params",
    "load_model_factory",
    "make_accuracy_fn",
    "make_eval_fn",
    "make_loss_fn",
    "max_pool_2x2",
    "num_params",
    "replicate",
    "resolve_conv",
]

PyTree = Any
Batch = Mapping[str, jax.Array]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _lecun_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Flax's default kernel initialiser (``lecun_normal``), sampled as a flat vector.

    Returns the values of ``nn.initializers.lecun_normal()(key, shape, dtype)`` up to float
    rounding (truncated normal on [-2, 2], std ``1 / sqrt(fan_in)``, ``fan_in =
    prod(shape[:-1])``), but draws the random bits for a 1-D shape and reshapes: with
    partitionable threefry, XLA:CPU takes seconds to compile the bit generator for each 4-D
    conv-kernel shape, which made initialising a ResNet take ~20 s; the flat draw compiles in
    a fraction of that.
    """
    fan_in = max(1, math.prod(shape[:-1]))
    stddev = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
    return (flat * stddev).reshape(shape)


def _dense(features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=_lecun_normal)


CONV_IMPLS = ("auto", "xla", "patches")


def conv_patches(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """A 2-D convolution as patch extraction and one matrix product (im2col).

    A drop-in for ``lax.conv_general_dilated`` (flax's ``nn.Conv(conv_general_dilated=...)``)
    for the layout flax uses, ``lhs [B, H, W, C]`` and ``rhs [kh, kw, C, F]`` (NHWC / HWIO),
    without dilation or feature groups: the ``kh * kw`` shifted (strided) windows of the
    padded input are concatenated along the channel axis into ``[B, H_out, W_out, kh*kw*C]``
    and multiplied by the kernel reshaped to ``[kh*kw*C, F]``. It computes the same sums as
    the convolution (in another order: equal to rounding), and its derivatives are slices,
    pads and products. Under ``vmap`` over nodes the product is one batched matrix multiply,
    which XLA:CPU runs at matmul speed, where the node-batched (grouped) convolution it
    replaces runs several times slower. Anything else (another layout, dilation, groups)
    falls back to ``lax.conv_general_dilated``.

    Args:
        lhs: the input, ``[B, H, W, C]``.
        rhs: the kernel, ``[kh, kw, C, F]``.
        window_strides: ``(s_h, s_w)``.
        padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
        lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision,
            **kwargs: as for ``lax.conv_general_dilated``.

    Returns:
        ``[B, H_out, W_out, F]``, as ``lax.conv_general_dilated``.
    """
    nhwc = (isinstance(dimension_numbers, lax.ConvDimensionNumbers)
            and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
    plain = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (lhs.ndim != 4 or rhs.ndim != 4 or not nhwc or not plain or feature_group_count != 1
            or kwargs.get("batch_group_count", 1) != 1):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    kh, kw, c, f = rhs.shape
    sh, sw = window_strides
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    b, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    cols = [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.matmul(patches, rhs.reshape(kh * kw * c, f), precision=precision)


def resolve_conv(impl: str) -> str:
    """The convolution a model uses: ``'patches'`` on the CPU for ``'auto'``, else ``'xla'``.

    Args:
        impl: ``'auto'`` (patches on XLA:CPU, whose node-batched convolutions are slow;
            ``lax.conv_general_dilated``, i.e. cuDNN, on GPUs and TPUs), ``'xla'`` or
            ``'patches'`` (:func:`conv_patches`).

    Raises:
        ValueError: for another value.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv must be one of {list(CONV_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "patches" if jax.default_backend() == "cpu" else "xla"
    return impl


def max_pool_2x2(x: jax.Array, impl: str = "auto") -> jax.Array:
    """Max-pooling with window 2, stride 2, no padding (odd trailing rows/columns dropped).

    With ``impl`` resolving to ``'patches'`` (:func:`resolve_conv`) it is a reshape to
    ``[B, H/2, 2, W/2, 2, C]`` and a max over the two window axes, whose gradient XLA:CPU
    runs faster under the node ``vmap`` than the ``select_and_scatter`` of
    ``nn.max_pool``; otherwise ``nn.max_pool``. The values are equal; the gradients are
    equal except where a window holds several equal maxima (``nn.max_pool`` sends the
    cotangent to one of them, the reshape splits it between them; after a ReLU such ties
    are all-zero windows, whose gradient the ReLU zeroes either way).

    Args:
        x: ``[B, H, W, C]``.
        impl: as for :func:`resolve_conv`.

    Returns:
        ``[B, H // 2, W // 2, C]``.
    """
    if resolve_conv(impl) != "patches":
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _conv(features: int, kernel: int, strides: int = 1, use_bias: bool = True,
          impl: str = "auto") -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        (strides, strides),
        padding="SAME",
        use_bias=use_bias,
        kernel_init=_lecun_normal,
        conv_general_dilated=conv_patches if resolve_conv(impl) == "patches" else None,
    )


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs (the DICE paper's 3-layer MLP).

    ``x [B, ...] -> flatten [B, D] -> Dense(hidden[0]) -> ReLU -> ... -> Dense(num_classes)``.

    Attributes:
        hidden: widths of the hidden layers; default ``(128, 64)``. Use a tuple (lists make the
            module unhashable, which disables the function caching of :func:`make_loss_fn`).
        num_classes: number of output logits.
    """

    hidden: Sequence[int] = (128, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
            x: float ``[B, H, W, C]`` (any trailing shape; it is flattened per example).

        Returns:
            Logits ``[B, num_classes]``.
        """
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(_dense(width)(x))
        return _dense(self.num_classes)(x)


class CNN(nn.Module):
    """The DICE paper's small CNN.

    ``conv3x3(32, SAME) -> ReLU -> maxpool 2 -> conv3x3(64, SAME) -> ReLU -> maxpool 2
    -> flatten -> Dense(128) -> ReLU -> Dense(num_classes)``. Pooling uses window 2, stride 2,
    no padding, so a 28x28 input gives a 7x7x64 feature map and a 32x32 input 8x8x64.

    Attributes:
        num_classes: number of output logits.
        conv: how the convolutions run: ``'auto'`` (default: :func:`conv_patches` on the CPU,
            ``lax.conv_general_dilated`` elsewhere), ``'xla'`` or ``'patches'``; the
            pooling follows it (:func:`max_pool_2x2`). The parameters are the same either
            way (``nn.Conv``'s ``kernel`` and ``bias``).
    """

    num_classes: int = 10
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
            x: float ``[B, H, W, C]`` with ``H, W >= 4``.

        Returns:
            Logits ``[B, num_classes]``.
        """
        x = nn.relu(_conv(32, 3, impl=self.conv)(x))
        x = max_pool_2x2(x, self.conv)
        x = nn.relu(_conv(64, 3, impl=self.conv)(x))
        x = max_pool_2x2(x, self.conv)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(128)(x))
        return _dense(self.num_classes)(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(channels, 32)`` groups (32 groups for the full-width network)."""
    return nn.GroupNorm(num_groups=math.gcd(channels, 32))


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with GroupNorm, identity or 1x1-projection shortcut."""

    features: int
    stride: int = 1
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(self.features, 3, self.stride, use_bias=False, impl=self.conv)(x)
        y = nn.relu(_group_norm(self.features)(y))
        y = _conv(self.features, 3, use_bias=False, impl=self.conv)(y)
        y = _group_norm(self.features)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, use_bias=False, impl=self.conv)(x)
            x = _group_norm(self.features)(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for small images (28x28 or 32x32, any number of channels).

    Stem: 3x3 conv with ``width`` channels, stride 1, no max-pool (the CIFAR variant). Then
    four stages of two basic blocks with ``width * (1, 2, 4, 8)`` channels and strides
    ``(1, 2, 2, 2)``, global average pooling and a dense classifier.

    Normalisation is GroupNorm (``gcd(channels, 32)`` groups), not BatchNorm: in a
    decentralized simulation a node's loss must be a pure function of its parameters and its
    batch, ``loss_fn(params, batch)``. BatchNorm keeps mutable running statistics (a second
    variable collection updated as a side effect of training) and, in training mode, couples
    the examples of a batch through the batch statistics; both break the pure-function
    contract that gossip averaging, ``jax.vmap`` over nodes and the influence derivatives
    (JVPs, VJPs, Hessian-vector products of the step) rely on. GroupNorm normalises each
    example on its own and has only ordinary parameters.

    Attributes:
        num_classes: number of output logits.
        width: channels of the stem and first stage (64 in the standard network); scale it
            down (e.g. 8) for fast tests.
        conv: how the convolutions run, as for :class:`CNN`.
    """

    num_classes: int = 10
    width: int = 64
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
            x: float ``[B, H, W, C]``.

        Returns:
            Logits ``[B, num_classes]``.
        """
        x = _conv(self.width, 3, use_bias=False, impl=self.conv)(x)
        x = nn.relu(_group_norm(self.width)(x))
        for stage, stride in enumerate((1, 2, 2, 2)):
            features = self.width * 2**stage
            x = _BasicBlock(features, stride, self.conv)(x)
            x = _BasicBlock(features, 1, self.conv)(x)
        x = jnp.mean(x, axis=(1, 2))
        return _dense(self.num_classes)(x)


_MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet18": ResNet18}


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model by name.

    Args:
        name: ``'mlp'``, ``'cnn'`` or ``'resnet18'`` (case-insensitive), or your own model
            as ``'module:callable'`` (see :func:`load_model_factory`).
        num_classes: number of output logits.
        **kwargs: further fields of the model class, e.g. ``hidden=(256, 128)`` for the MLP,
            ``width=8`` for ResNet-18, ``conv='xla'`` for the CNN or ResNet-18 (not for
            ``'module:callable'``).

    Returns:
        An unbound flax module mapping ``[B, H, W, C]`` to logits ``[B, num_classes]``.

    Raises:
        ValueError: if ``name`` is unknown, ``num_classes`` is not a positive integer, or a
            keyword is not a field of the model.
    """
    if isinstance(name, str) and ":" in name:
        _check_positive_int(num_classes, "num_classes")
        if kwargs:
            raise ValueError(f"keywords {sorted(kwargs)} are not passed to a model {name!r}")
        factory = load_model_factory(name)
        try:
            model = factory(int(num_classes))
        except Exception as err:
            raise ValueError(f"name: {name}({int(num_classes)}) raised "
                             f"{type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise ValueError(f"name: {name}({int(num_classes)}) must return a flax Module, got "
                             f"{type(model).__name__}")
        return model
    if not isinstance(name, str) or name.lower() not in _MODELS:
        raise ValueError(f"name must be one of {sorted(_MODELS)} or 'module:callable', "
                         f"got {name!r}")
    _check_positive_int(num_classes, "num_classes")
    cls = _MODELS[name.lower()]
    fields = {"hidden", "width", "conv"} & {f for f in cls.__dataclass_fields__}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"unknown keyword(s) {sorted(unknown)} for model {name!r}")
    if "hidden" in kwargs:
        hidden = kwargs["hidden"]
        if isinstance(hidden, int) or not all(
            isinstance(h, int | np.integer) and h > 0 for h in hidden
        ):
            raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
        kwargs["hidden"] = tuple(int(h) for h in hidden)
    if "width" in kwargs:
        _check_positive_int(kwargs["width"], "width")
    if "conv" in kwargs:
        resolve_conv(kwargs["conv"])
    return cls(num_classes=int(num_classes), **kwargs)


def load_model_factory(spec: str) -> Callable[[int], nn.Module]:
    """The callable named by ``'module:callable'`` or ``'path/to/file.py:callable'``.

    The callable takes the number of classes and returns an unbound flax module mapping
    ``[B, H, W, C]`` to logits ``[B, num_classes]``, e.g. ``def wide_mlp(num_classes):
    return MLP(num_classes, hidden=(512, 256))``. A dotted module is imported as usual
    (it must be on ``sys.path``, e.g. via ``PYTHONPATH``); a ``.py`` path is loaded from
    that file.

    Raises:
        ValueError: if ``spec`` is malformed, the module cannot be imported, or it has no such
            callable.
    """
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, _, attr = str(spec).rpartition(":")
    if not module_name or not attr.isidentifier():
        raise ValueError(f"name: expected 'module:callable' or 'file.py:callable', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ValueError(f"name: no such file {str(path)!r} (from {spec!r})")
            loader_spec = importlib.util.spec_from_file_location(f"_dicejax_user_{path.stem}",
                                                                 path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"name: cannot import {module_name!r} (from {spec!r}): "
                         f"{type(err).__name__}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"name: {module_name!r} has no callable {attr!r}")
    return factory


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    if (
        not isinstance(input_shape, tuple | list)
        or len(input_shape) != 3
        or not all(
            not isinstance(d, bool) and isinstance(d, int | np.integer) and d > 0
            for d in input_shape
        )
    ):
        raise ValueError(
            f"input_shape must be a tuple (H, W, C) of positive integers, got {input_shape!r}"
        )
    return tuple(int(d) for d in input_shape)  # type: ignore[return-value]


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a flax.linen.Module, got {type(model).__name__}")


def _build_initializer(
    model: nn.Module, shape: tuple[int, int, int], num_keys: int | None, dtype: np.dtype | None
) -> Callable[[jax.Array], PyTree]:
    """Jitted ``key -> params``; with ``num_keys = n``, ``key -> params [n, ...]`` initialised
    independently from ``jax.random.split(key, n)`` (``vmap`` of the initialiser)."""

    def init_one(key: jax.Array) -> PyTree:
        params = model.init(key, jnp.zeros((1, *shape), jnp.float32))["params"]
        if dtype is None:
            return params
        return jax.tree.map(
            lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )

    if num_keys is None:
        return jax.jit(init_one)
    return jax.jit(lambda key: jax.vmap(init_one)(jax.random.split(key, num_keys)))


_cached_initializer = functools.lru_cache(maxsize=64)(_build_initializer)


def _initializer(
    model: nn.Module, shape: tuple[int, int, int], num_keys: int | None, dtype: np.dtype | None
) -> Callable[[jax.Array], PyTree]:
    """Cached :func:`_build_initializer`: compiling a ResNet initialiser takes seconds on CPU,
    so repeated ``init_params`` calls with the same model and shape reuse the compiled one."""
    try:
        hash(model)
    except TypeError:
        return _build_initializer(model, shape, num_keys, dtype)
    return _cached_initializer(model, shape, num_keys, dtype)


def init_params(
    model: nn.Module,
    key: jax.Array,
    input_shape: tuple[int, int, int],
    num_nodes: int | None = None,
    same_init: bool = True,
    dtype: Any = None,
) -> PyTree:
    """Initialises the ``'params'`` collection of a model, for one node or stacked for ``n``.

    Args:
        model: an unbound flax module (e.g. from :func:`get_model`).
        key: a PRNG key.
        input_shape: shape of one example, ``(H, W, C)``.
        num_nodes: ``None`` for a single parameter pytree; an integer ``n`` for stacked
            parameters with every leaf ``[n, ...]``.
        same_init: with ``num_nodes``: ``True`` replicates one initialisation to every node
            (the nodes start in consensus); ``False`` initialises each node independently
            from ``jax.random.split(key, n)`` (``jax.vmap`` of the initialiser) — what the
            DICE authors' reference code does (every node's PyTorch module gets its own
            default initialisation).
        dtype: optional floating dtype to cast the float leaves to, e.g. ``jnp.float64``
            (requires ``jax_enable_x64``).

    Returns:
        The ``'params'`` pytree: leaves ``[...]`` or ``[n, ...]``.

    Raises:
        ValueError: for a non-module ``model``, a ``key`` that is not an array, a malformed
            ``input_shape``, a non-positive ``num_nodes``, or a ``dtype`` that is not
            floating or is not available (64-bit without ``jax_enable_x64``).
    """
    _check_module(model)
    if not isinstance(key, jax.Array):
        raise ValueError(f"key must be a PRNG key (jax.random.key(seed)), got {key!r}")
    shape = _check_input_shape(input_shape)
    if num_nodes is not None:
        _check_positive_int(num_nodes, "num_nodes")
    if dtype is not None:
        try:
            floating = jnp.issubdtype(dtype, jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
        if jax.dtypes.canonicalize_dtype(dtype) != jnp.dtype(dtype):
            raise ValueError(
                f"dtype {jnp.dtype(dtype).name} is not available; enable jax_enable_x64 "
                "(e.g. `with jax.enable_x64(True):`)"
            )

    dtype = None if dtype is None else jnp.dtype(dtype)
    if num_nodes is not None and not same_init:
        return _initializer(model, shape, int(num_nodes), dtype)(key)
    params = _initializer(model, shape, None, dtype)(key)
    return params if num_nodes is None else replicate(params, num_nodes)


def num_params(params: PyTree) -> int:
    """Total number of scalar parameters (stacked params count every node's copy).

    Args:
        params: pytree of arrays, or of ``jax.ShapeDtypeStruct`` (e.g. from
            ``jax.eval_shape(lambda k: init_params(model, k, shape), key)``, which counts
            parameters without allocating them).

    Returns:
        Sum of the sizes of all leaves.
    """
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------------
# Loss and metrics for one node
# --------------------------------------------------------------------------------------------


def _check_batch(batch: Any) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a mapping with keys 'x' [B, H, W, C] and 'y' [B]")
    x, y = batch["x"], batch["y"]
    if jnp.ndim(y) != 1 or jnp.shape(x)[:1] != jnp.shape(y):
        raise ValueError(
            f"batch['y'] must have shape [B] matching batch['x'] [B, ...]; got x "
            f"{jnp.shape(x)}, y {jnp.shape(y)}"
        )
    return x, y


def _cached(builder: Callable[[nn.Module], Callable]) -> Callable[[nn.Module], Callable]:
    """Caches ``builder(model)`` on the (hashable, dataclass-equal) model.

    Returning the same function object for equal models lets a simulator that is jitted with
    the loss function as a static argument reuse its compiled code. Unhashable models (e.g. an
    MLP with a list of widths) get a fresh function each call.
    """
    cached = functools.lru_cache(maxsize=256)(builder)

    @functools.wraps(builder)
    def wrapper(model: nn.Module) -> Callable:
        _check_module(model)
        try:
            hash(model)
        except TypeError:
            return builder(model)
        return cached(model)

    return wrapper


@_cached
def make_loss_fn(model: nn.Module) -> Callable[[PyTree, Batch], jax.Array]:
    """Mean softmax cross-entropy of one node.

    Repeated calls with the same (or an equal) model return the same function object.

    Args:
        model: a flax module mapping ``[B, H, W, C]`` to logits ``[B, C_out]``.

    Returns:
        ``loss_fn(params, batch) -> scalar``: ``params`` is the model's ``'params'`` pytree
        (one node, no node axis); ``batch = {'x': float [B, H, W, C], 'y': int [B]}``; the
        result is ``mean_b -log softmax(logits_b)[y_b]``, a scalar in the logits' dtype.
    """

    def loss_fn(params: PyTree, batch: Batch) -> jax.Array:
        x, y = _check_batch(batch)
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


@_cached
def make_accuracy_fn(model: nn.Module) -> Callable[[PyTree, Batch], jax.Array]:
    """Mean top-1 accuracy of one node.

    Repeated calls with the same (or an equal) model return the same function object.

    Args:
        model: a flax module mapping ``[B, H, W, C]`` to logits ``[B, C_out]``.

    Returns:
        ``accuracy_fn(params, batch) -> scalar`` in ``[0, 1]``: the fraction of examples whose
        arg-max logit equals ``batch['y']`` (ties go to the lowest class index).
    """

    def accuracy_fn(params: PyTree, batch: Batch) -> jax.Array:
        x, y = _check_batch(batch)
        logits = model.apply({"params": params}, x)
        return jnp.mean(jnp.argmax(logits, axis=-1) == y, dtype=logits.dtype)

    return accuracy_fn


@_cached
def make_eval_fn(model: nn.Module) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
    """Loss and accuracy of one node from a single forward pass.

    Repeated calls with the same (or an equal) model return the same function object.

    Args:
        model: a flax module mapping ``[B, H, W, C]`` to logits ``[B, C_out]``.

    Returns:
        ``eval_fn(params, batch) -> {'loss': scalar, 'accuracy': scalar}``, equal to
        :func:`make_loss_fn` and :func:`make_accuracy_fn` of the same model.
    """

    def eval_fn(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        x, y = _check_batch(batch)
        logits = model.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y, dtype=logits.dtype)
        return {"loss": loss, "accuracy": accuracy}

    return eval_fn


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def flops_per_example(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward-pass FLOPs of one example, counting the ``nn.Dense`` and ``nn.Conv`` layers.

    Each layer contributes ``2 * MACs`` with ``MACs = (number of outputs) * (inputs per
    output)``: ``out_features * in_features`` for a dense layer,
    ``H_out * W_out * C_out * k_h * k_w * C_in / groups`` for a convolution. Biases,
    normalisation, activations and pooling are not counted. Shapes are traced abstractly
    (``jax.eval_shape``); nothing is computed.

    Args:
        model: an unbound flax module.
        input_shape: shape of one example, ``(H, W, C)``.

    Returns:
        FLOPs per example of the forward pass (the backward pass costs about twice as much).

    Raises:
        ValueError: for a non-module ``model`` or a malformed ``input_shape``.
    """
    _check_module(model)
    shape = _check_input_shape(input_shape)
    macs: list[int] = []

    def count(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.method_name == "__call__" and context.module
        if isinstance(module, nn.Dense):
            macs.append(math.prod(out.shape) * args[0].shape[-1])
        elif isinstance(module, nn.Conv):
            kernel = module.kernel_size
            kernel_size = math.prod((kernel,) if isinstance(kernel, int) else kernel)
            per_output = kernel_size * args[0].shape[-1] // module.feature_group_count
            macs.append(math.prod(out.shape) * per_output)
        return out

    dummy = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    with nn.intercept_methods(count):
        jax.eval_shape(model.init, jax.random.key(0), dummy)
    return 2 * int(sum(macs))
