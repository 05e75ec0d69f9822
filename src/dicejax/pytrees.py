"""Pytree helpers shared by the core: frozen dataclasses with static fields, stacking.

:func:`dataclass` makes a frozen dataclass a pytree with JAX's own registry
(``jax.tree_util.register_dataclass``): fields made with :func:`static_field` are static
configuration (hashable, part of the ``jit`` cache key), every other field is data. Its
instances get a ``replace(**changes)`` method. (flax's ``struct.dataclass`` does the same,
but importing flax loads flax.linen and rich, which the core does not need.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")
PyTree = Any


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static (not a pytree leaf) in a :func:`dataclass`."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _replace(self, **changes: Any):
    """A copy with some fields replaced."""
    return dataclasses.replace(self, **changes)


def dataclass(cls: type[T]) -> type[T]:
    """A frozen dataclass registered as a pytree (see the module docstring)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.replace = _replace
    return jax.tree_util.register_dataclass(cls)


def stack(items: Sequence[PyTree]) -> PyTree:
    """Stacks a list of equally shaped pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def concat(parts: Sequence[PyTree]) -> PyTree:
    """Concatenates pytrees along their leading axis (one part is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every array (or shape struct) leaf of ``tree``."""
    return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def shape_key(tree: PyTree) -> tuple:
    """A hashable description of a pytree's structure and leaf shapes and dtypes (a cache
    key for work that depends on shapes only; :func:`shape_structs` inverts it).

    Raises:
      TypeError: for a leaf without a shape and dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), np.dtype(jnp.result_type(x)).name)
                          for x in leaves)


def shape_structs(key: tuple) -> PyTree:
    """The pytree of ``jax.ShapeDtypeStruct`` leaves that :func:`shape_key` describes."""
    treedef, leaves = key
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, t) for s, t in leaves])


__all__ = ["concat", "dataclass", "shape_key", "shape_structs", "stack", "static_field",
           "tree_bytes"]
