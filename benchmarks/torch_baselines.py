"""PyTorch baselines for the benchmarks: the same ATC D-SGD and DICE-E as dicejax, in torch.

Everything here computes exactly what :func:`dicejax.simulate` and
:func:`dicejax.influence.dice_e` compute for plain SGD (DESIGN §2.1, §2.3) on the paper's
MLP, CNN and GroupNorm ResNet-18 (:mod:`dicejax.models`), from the same initial weights,
batches and mixing matrix, so that the benchmarks compare like with like:

* :class:`ReferenceSim` — the style of the DICE authors' reference code: a Python list of
  per-node ``nn.Module``s, each with its own ``torch.optim.SGD``; every step loops over the
  nodes (forward, backward, ``optimizer.step()``), then gossips with Python loops over nodes,
  parameters and in-neighbours (``θ_k ← Σ_j W[k, j] θ_j^{t+½}``). Only in-neighbours with
  ``W[k, j] > 0`` are visited (the reference visits every node; skipping zeros makes this a
  slightly *stronger* baseline).
* :class:`FuncSim` — the stacked formulation dicejax uses, in ``torch.func``: parameters
  stacked ``[n, ...]``, the local step is ``vmap(grad(loss))`` over nodes
  (``functional_call`` of one module), gossip is one contraction of a flat ``[n, P]``
  parameter buffer with ``W`` (dense) or a padded neighbour-list gather (sparse), like
  :mod:`dicejax.mixing`. Eager, or the whole step under ``torch.compile``
  (``compile=True``).
* :func:`dice_e_one_hop` — one-hop DICE-E (the paper's Proposition 1) one source at a time,
  as the reference computes it: the source's training gradient, probe gradients at the
  source and at each out-neighbour after gossip, dot products.
* :func:`dice_e_walks` — r-hop DICE-E (Theorem 1) by walk enumeration: for every source
  ``j`` and every walk ``j → k_1 → … → k_s`` that ends in the shell ``S_s(j)``, the
  perturbation ``δ = W^t[k_1, j] v_j`` is pushed along the walk from scratch,
  ``δ ← W^{t+m}[k_{m+1}, k_m] (δ − η H_{k_m}^{t+m} δ)``, each Hessian-vector product a
  double backward (``autograd.grad`` of ``∇L · δ``) on node ``k_m``'s own batch, one
  (node, batch) at a time; then ``q_k g_k^{t+s} · δ``. Network-level reading at horizon
  ``h``: the same over every walk of length ``h`` (every end node).

Layout conversions: flax keeps images ``[B, H, W, C]`` and dense kernels ``[in, out]``;
torch uses ``[B, C, H, W]`` and ``weight [out, in]``. :func:`to_torch_params` and
:func:`to_flax_params` map one set of weights exactly (the first dense layer after a
flatten has its input rows permuted from ``(h, w, c)`` to ``(c, h, w)`` order; GroupNorm's
``scale`` is torch's ``weight``), so both frameworks compute the same function.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks.common import flax_layers as _layers
from benchmarks.common import train_flops_per_example

PyTree = Any
TorchParams = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------- models


class TorchMLP(nn.Module):
    """``flatten → Linear(h_1) → ReLU → … → Linear(C)``, as :class:`dicejax.models.MLP`.

    Args:
      sizes: ``(in, h_1, …, C)``; ``in = H·W·C`` of the flattened image.
    """

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W] → logits [B, C_out]``."""
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


class TorchCNN(nn.Module):
    """The DICE paper's CNN, as :class:`dicejax.models.CNN`.

    ``conv3x3(32) → ReLU → maxpool 2 → conv3x3(64) → ReLU → maxpool 2 → flatten →
    Linear(128) → ReLU → Linear(C)``, ``padding=1`` (flax's ``SAME`` for 3x3, stride 1).

    Args:
      input_shape: ``(H, W, C)`` of one image.
      num_classes: ``C_out``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        h, w, c = input_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W] → logits [B, C_out]``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


class _SameConv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with flax's ``'SAME'`` padding (``lax.padtype_to_pads``).

    Output size ``ceil(size / stride)``; the total padding ``max((out − 1)·s + k − size, 0)``
    is split with the extra row/column at the *end* — for a 3x3 stride-2 conv on an even
    input that is ``(0, 1)``, not torch's symmetric ``padding=1`` (which would shift every
    window by one pixel). Symmetric cases (every stride-1 conv) pass the padding to the
    convolution itself; asymmetric ones ``F.pad`` first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W] → [B, F, ceil(H / s), ceil(W / s)]``."""
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        if all(lo == hi for lo, hi in pads):
            return F.conv2d(x, self.weight, None, self.stride, tuple(lo for lo, _ in pads))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride)


def _group_norm(channels: int) -> nn.GroupNorm:
    """``gcd(channels, 32)`` groups and ``eps = 1e-6``, as flax's ``nn.GroupNorm`` there."""
    return nn.GroupNorm(math.gcd(channels, 32), channels, eps=1e-6)


class TorchBasicBlock(nn.Module):
    """ResNet basic block, as ``dicejax.models``' (GroupNorm, 1x1-projection shortcut).

    ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``; ``shortcut`` is the
    identity, or ``norm3(conv3(x))`` (1x1, stride ``stride``) when the stride or the width
    changes. ``conv{i+1}`` / ``norm{i+1}`` are flax's ``Conv_i`` / ``GroupNorm_i``.

    Args:
      in_channels: channels of the input.
      features: channels of the output.
      stride: stride of ``conv1`` and the projection.
    """

    def __init__(self, in_channels: int, features: int, stride: int = 1):
        super().__init__()
        self.conv1 = _SameConv2d(in_channels, features, 3, stride)
        self.norm1 = _group_norm(features)
        self.conv2 = _SameConv2d(features, features, 3)
        self.norm2 = _group_norm(features)
        self.projection = stride != 1 or in_channels != features
        if self.projection:
            self.conv3 = _SameConv2d(in_channels, features, 1, stride)
            self.norm3 = _group_norm(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W] → [B, features, ceil(H / s), ceil(W / s)]``."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.projection:
            x = self.norm3(self.conv3(x))
        return F.relu(x + y)


class TorchResNet18(nn.Module):
    """ResNet-18 for small images with GroupNorm, as :class:`dicejax.models.ResNet18`.

    Stem ``conv3x3(width, stride 1) → GroupNorm → ReLU`` (no max-pool); four stages of two
    :class:`TorchBasicBlock` with ``width·(1, 2, 4, 8)`` channels and strides
    ``(1, 2, 2, 2)``; global average pooling; ``Linear(C)``. Convolutions have no bias and
    flax's ``'SAME'`` padding (:class:`_SameConv2d`); GroupNorm has ``gcd(channels, 32)``
    groups and ``eps = 1e-6``.

    Args:
      in_channels: ``C`` of the images.
      num_classes: ``C_out``.
      width: channels of the stem and first stage (64 in the standard network).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = _SameConv2d(in_channels, width, 3)
        self.norm1 = _group_norm(width)
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            features = width * 2**stage
            blocks += [TorchBasicBlock(channels, features, stride),
                       TorchBasicBlock(features, features)]
            channels = features
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W] → logits [B, C_out]``."""
        x = F.relu(self.norm1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def _flat_shape(params: Mapping, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(H, W, C)`` of the feature map flattened into the first dense layer."""
    h, w, c = input_shape
    convs = [k for k, kind in _layers(params) if kind == "conv"]
    if not convs:
        return h, w, c
    channels = np.shape(params[convs[-1]]["kernel"])[-1]
    return h // 2 ** len(convs), w // 2 ** len(convs), channels


_BLOCK = "_BasicBlock_"


def _is_resnet(params: Mapping) -> bool:
    return any(str(k).startswith(_BLOCK) for k in params)


def _numbered(tree: Mapping, prefix: str) -> list[str]:
    """Keys ``prefix0, prefix1, …`` of ``tree``, in index order."""
    return sorted((k for k in tree if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))


def _resnet_layers(params: Mapping) -> list[tuple[tuple[str, ...], str, str]]:
    """``(flax path, torch name, kind)`` of every ResNet-18 layer, ``kind`` conv/norm/dense.

    Flax's ``Conv_i`` / ``GroupNorm_i`` (stem, and inside each ``_BasicBlock_b``) are torch's
    ``conv{i+1}`` / ``norm{i+1}`` (``blocks.{b}.`` inside a block); ``Dense_0`` is ``fc``.
    """
    blocks = _numbered(params, _BLOCK)
    if set(params) != {"Conv_0", "GroupNorm_0", "Dense_0", *blocks}:
        raise ValueError(f"params: expected the layers of dicejax.models.ResNet18, got "
                         f"{sorted(params)}")

    def unit(tree: Mapping, path: tuple[str, ...], prefix: str) -> list:
        out = []
        for flax_kind, kind in (("Conv_", "conv"), ("GroupNorm_", "norm")):
            out += [((*path, k), f"{prefix}{kind}{int(k[len(flax_kind):]) + 1}", kind)
                    for k in _numbered(tree, flax_kind)]
        return out

    layers = unit(params, (), "")
    for b, block in enumerate(blocks):
        layers += unit(params[block], (block,), f"blocks.{b}.")
    return [*layers, (("Dense_0",), "fc", "dense")]


def _conv_to_torch(k: np.ndarray, lead: int) -> np.ndarray:
    """Conv kernel ``[.., kh, kw, in, out]`` (HWIO) → torch weight ``[.., out, in, kh, kw]``."""
    return np.moveaxis(k, (lead, lead + 1, lead + 2, lead + 3),
                       (lead + 2, lead + 3, lead + 1, lead))


def _conv_to_flax(w: np.ndarray, lead: int) -> np.ndarray:
    """Inverse of :func:`_conv_to_torch`."""
    return np.moveaxis(w, (lead + 2, lead + 3, lead + 1, lead),
                       (lead, lead + 1, lead + 2, lead + 3))


def make_torch_model(params: Mapping, input_shape: Sequence[int]) -> nn.Module:
    """The torch module matching one node's flax parameters (an MLP, the CNN or ResNet-18).

    Args:
      params: one node's flax ``'params'`` pytree (leaves may carry a leading node axis).
      input_shape: ``(H, W, C)`` of one image.

    Returns:
      A :class:`TorchMLP`, :class:`TorchCNN` or :class:`TorchResNet18` (randomly
      initialised; load weights with :func:`to_torch_params`).

    Raises:
      ValueError: for parameters of another architecture.
    """
    if _is_resnet(params):
        _resnet_layers(params)  # checks the structure
        kernel = np.shape(params["Conv_0"]["kernel"])
        if kernel[-2] != input_shape[-1]:
            raise ValueError(f"input_shape {tuple(input_shape)}: the stem takes {kernel[-2]} "
                             "channels")
        classes = int(np.shape(params["Dense_0"]["kernel"])[-1])
        return TorchResNet18(int(kernel[-2]), classes, width=int(kernel[-1]))
    layers = _layers(params)
    kinds = [kind for _, kind in layers]
    dense = [k for k, kind in layers if kind == "dense"]
    classes = int(np.shape(params[dense[-1]]["kernel"])[-1])
    if kinds == ["dense"] * len(kinds):
        sizes = [int(np.shape(params[k]["kernel"])[-2]) for k in dense] + [classes]
        return TorchMLP(sizes)
    if kinds == ["conv", "conv", "dense", "dense"]:
        return TorchCNN(input_shape, classes)
    raise ValueError(f"params: no torch twin for layers {[k for k, _ in layers]}")


def _torch_names(model: nn.Module) -> list[str]:
    if isinstance(model, TorchMLP):
        return [f"layers.{i}" for i in range(len(model.layers))]
    return ["conv1", "conv2", "fc1", "fc2"]


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _resnet_to_torch(params: Mapping, model: nn.Module, dtype: torch.dtype) -> TorchParams:
    lead = np.ndim(params["Dense_0"]["bias"]) - 1
    out: TorchParams = {}
    for path, tname, kind in _resnet_layers(params):
        leaf = _get(params, path)
        if kind == "conv":
            arrays = {"weight": _conv_to_torch(np.asarray(leaf["kernel"]), lead)}
        elif kind == "norm":
            arrays = {"weight": np.asarray(leaf["scale"]), "bias": np.asarray(leaf["bias"])}
        else:
            arrays = {"weight": np.swapaxes(np.asarray(leaf["kernel"]), -1, -2),
                      "bias": np.asarray(leaf["bias"])}
        for suffix, a in arrays.items():
            out[f"{tname}.{suffix}"] = torch.tensor(np.ascontiguousarray(a), dtype=dtype)
    names = {name for name, _ in model.named_parameters()}
    if set(out) != names:
        raise ValueError(f"model: parameters {sorted(names ^ set(out))} do not match params")
    return out


def _resnet_to_flax(tparams: Mapping[str, torch.Tensor], template: Mapping) -> dict:
    lead = tparams["fc.bias"].ndim - 1
    out: dict = {}
    for path, tname, kind in _resnet_layers(template):
        w = tparams[f"{tname}.weight"].detach().cpu().numpy()
        if kind == "conv":
            leaf = {"kernel": np.ascontiguousarray(_conv_to_flax(w, lead))}
        else:
            b = tparams[f"{tname}.bias"].detach().cpu().numpy()
            leaf = ({"scale": w, "bias": b} if kind == "norm"
                    else {"kernel": np.ascontiguousarray(np.swapaxes(w, -1, -2)), "bias": b})
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def to_torch_params(params: Mapping, input_shape: Sequence[int], model: nn.Module,
                    dtype: torch.dtype = torch.float32) -> TorchParams:
    """Flax parameters → the torch module's parameter dict (same function).

    Args:
      params: flax ``'params'`` pytree, leaves ``[...]`` or stacked ``[n, ...]``.
      input_shape: ``(H, W, C)``.
      model: from :func:`make_torch_model`.
      dtype: torch dtype of the result.

    Returns:
      ``{name: tensor}`` in ``model.named_parameters()`` names, leaves ``[...]`` or
      ``[n, ...]`` like the input.
    """
    if _is_resnet(params):
        return _resnet_to_torch(params, model, dtype)
    layers = _layers(params)
    lead = np.ndim(params[layers[0][0]]["bias"]) - 1  # 0 (one node) or 1 (stacked)
    fh, fw, fc = _flat_shape(params, input_shape)
    out: TorchParams = {}
    first_dense = True
    for (name, kind), tname in zip(layers, _torch_names(model), strict=True):
        k = np.asarray(params[name]["kernel"])
        b = np.asarray(params[name]["bias"])
        pre = k.shape[:lead]
        if kind == "conv":  # [.., kh, kw, in, out] -> [.., out, in, kh, kw]
            w = _conv_to_torch(k, lead)
        else:
            if first_dense:  # rows (h, w, c) -> (c, h, w)
                k = k.reshape(*pre, fh, fw, fc, k.shape[-1])
                k = np.moveaxis(k, lead + 2, lead).reshape(*pre, fh * fw * fc, -1)
                first_dense = False
            w = np.swapaxes(k, -1, -2)  # [.., in, out] -> [.., out, in]
        out[f"{tname}.weight"] = torch.tensor(np.ascontiguousarray(w), dtype=dtype)
        out[f"{tname}.bias"] = torch.tensor(np.ascontiguousarray(b), dtype=dtype)
    return out


def to_flax_params(tparams: Mapping[str, torch.Tensor], template: Mapping,
                   input_shape: Sequence[int], model: nn.Module) -> dict:
    """Inverse of :func:`to_torch_params`: torch parameters → a flax-layout numpy pytree.

    Args:
      tparams: ``{name: tensor}``, leaves ``[...]`` or ``[n, ...]``.
      template: flax pytree with the same layers (for names and shapes).
      input_shape: ``(H, W, C)``.
      model: the torch module.

    Returns:
      ``{layer: {'kernel', 'bias'}}`` numpy arrays (for ResNet-18 the nested flax tree:
      ``kernel`` only for convolutions, ``scale`` and ``bias`` for GroupNorm).
    """
    if _is_resnet(template):
        return _resnet_to_flax(tparams, template)
    layers = _layers(template)
    fh, fw, fc = _flat_shape(template, input_shape)
    out: dict = {}
    first_dense = True
    for (name, kind), tname in zip(layers, _torch_names(model), strict=True):
        w = tparams[f"{tname}.weight"].detach().cpu().numpy()
        b = tparams[f"{tname}.bias"].detach().cpu().numpy()
        lead = b.ndim - 1
        pre = w.shape[:lead]
        if kind == "conv":  # [.., out, in, kh, kw] -> [.., kh, kw, in, out]
            k = _conv_to_flax(w, lead)
        else:
            k = np.swapaxes(w, -1, -2)
            if first_dense:  # rows (c, h, w) -> (h, w, c)
                k = k.reshape(*pre, fc, fh, fw, k.shape[-1])
                k = np.moveaxis(k, lead, lead + 2).reshape(*pre, fh * fw * fc, -1)
                first_dense = False
        out[name] = {"kernel": np.ascontiguousarray(k), "bias": b}
    return out


def to_torch_images(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images ``[..., H, W, C]`` (flax layout) → ``[..., C, H, W]`` torch tensor."""
    x = np.asarray(x)
    return torch.tensor(np.ascontiguousarray(np.moveaxis(x, -1, -3)), dtype=dtype)


def to_torch_labels(y: Any) -> torch.Tensor:
    """Integer labels → int64 tensor (what ``F.cross_entropy`` wants)."""
    return torch.tensor(np.asarray(y), dtype=torch.int64)


def node_params(stacked: TorchParams, k: int) -> TorchParams:
    """Node ``k``'s parameters from a stacked dict (views)."""
    return {name: p[k] for name, p in stacked.items()}


# ------------------------------------------------------------------ (a) reference style


class ReferenceSim:
    """ATC D-SGD in the reference code's style: per-node modules and optimizers, Python loops.

    Args:
      model: a module with the right architecture (copied once per node).
      params: stacked initial parameters ``{name: [n, ...]}`` (:func:`to_torch_params`).
      matrix: ``W`` ``[n, n]``, row ``k`` = weights node ``k`` receives.
      lr: SGD learning rate ``η``.
      record: keep every node's ``θ^t`` and ``θ^{t+½}`` (for the influence baselines).
    """

    def __init__(self, model: nn.Module, params: TorchParams, matrix: Any, lr: float,
                 record: bool = False):
        w = np.asarray(matrix, np.float64)
        n = w.shape[0]
        first = next(iter(params.values()))
        self.models = []
        for k in range(n):
            m = _clone_module(model).to(device=first.device, dtype=first.dtype)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    p.copy_(params[name][k])
            self.models.append(m)
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in self.models]
        self.in_nbrs = [[(j, float(w[k, j])) for j in np.flatnonzero(w[k] > 0)] for k in range(n)]
        self.record = record
        self.params: list[list[TorchParams]] = []  # [t][k] θ_k^t
        self.half_params: list[list[TorchParams]] = []  # [t][k] θ_k^{t+½}
        if record:
            self.params.append(self._snapshot())

    def _snapshot(self) -> list[TorchParams]:
        return [{name: p.detach().clone() for name, p in m.named_parameters()}
                for m in self.models]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One ATC step: every node's SGD step on its batch, then gossip.

        Args:
          x: ``[n, B, C, H, W]``; y: ``[n, B]`` int64.
        """
        for k, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[k]), y[k])
            loss.backward()
            opt.step()
        if self.record:
            self.half_params.append(self._snapshot())
        half = [[p.data for p in m.parameters()] for m in self.models]  # θ^{t+½}, not copied
        for k, model in enumerate(self.models):
            for i, p in enumerate(model.parameters()):
                mixed = torch.zeros_like(half[k][i])
                for j, wkj in self.in_nbrs[k]:
                    mixed.add_(half[j][i], alpha=wkj)
                p.data = mixed  # rebinds; half[j][i] still holds θ_j^{t+½}
        if self.record:
            self.params.append(self._snapshot())

    def run(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """``T`` steps: ``xs [T, n, B, C, H, W]``, ``ys [T, n, B]``."""
        for t in range(xs.shape[0]):
            self.step(xs[t], ys[t])

    def stacked_params(self) -> TorchParams:
        """Current parameters, stacked ``{name: [n, ...]}``."""
        names = [name for name, _ in self.models[0].named_parameters()]
        return {name: torch.stack([dict(m.named_parameters())[name].detach()
                                   for m in self.models]) for name in names}


def _clone_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ------------------------------------------------------------------ (b, c) torch.func


def make_mixer(matrix: Any, method: str = "dense", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Gossip of a flat ``[n, P]`` buffer, as :mod:`dicejax.mixing` does.

    Args:
      matrix: ``W`` ``[n, n]``.
      method: ``"dense"`` (``W @ buf``) or ``"sparse"`` (padded in-neighbour gather,
        ``Σ_d w[k, d] buf[idx[k, d]]``).
      dtype: dtype of the weights.
      device: torch device of the weights.

    Returns:
      ``mix(buf [n, P]) -> [n, P]``.
    """
    w = np.asarray(matrix, np.float64)
    if method == "dense":
        wt = torch.tensor(w, dtype=dtype, device=device)
        return lambda buf: wt @ buf
    if method != "sparse":
        raise ValueError(f"method: must be 'dense' or 'sparse', got {method!r}")
    n = w.shape[0]
    nbrs = [np.flatnonzero(w[k] > 0) for k in range(n)]
    d = max(len(x) for x in nbrs)
    idx = np.zeros((n, d), np.int64)
    wts = np.zeros((n, d))
    for k, x in enumerate(nbrs):
        idx[k, : len(x)] = x
        wts[k, : len(x)] = w[k, x]
    idx_t = torch.tensor(idx, device=device)
    wts_t = torch.tensor(wts, dtype=dtype, device=device)
    return lambda buf: torch.einsum("kd,kdp->kp", wts_t, buf[idx_t])


class FuncSim:
    """ATC D-SGD with stacked parameters in ``torch.func`` (eager or ``torch.compile``).

    Args:
      model: the module (its parameters are replaced by the stacked ones).
      matrix: ``W`` ``[n, n]``.
      lr: SGD learning rate.
      mixing: ``"dense"`` or ``"sparse"`` (see :func:`make_mixer`).
      compile: run :meth:`step` under ``torch.compile`` (compiled on first call); ``True``
        uses the default backend (inductor), a string names another (e.g. ``"aot_eager"``).
      dtype: parameter dtype (for the mixing weights).
      device: torch device.
    """

    def __init__(self, model: nn.Module, matrix: Any, lr: float, mixing: str = "dense",
                 compile: bool | str = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.model = model
        mix = make_mixer(matrix, mixing, dtype, device)

        def loss_one(p: TorchParams, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, p, (x,)), y)

        grads = vmap(grad(loss_one))

        def step(params: TorchParams, x: torch.Tensor, y: torch.Tensor) -> TorchParams:
            g = grads(params, x, y)
            names = list(params)
            n = params[names[0]].shape[0]
            half = [params[k] - lr * g[k] for k in names]
            flat = torch.cat([h.reshape(n, -1) for h in half], dim=1)
            mixed = mix(flat)
            sizes = [h[0].numel() for h in half]
            parts = torch.split(mixed, sizes, dim=1)
            return {k: p.reshape(h.shape) for k, p, h in zip(names, parts, half, strict=True)}

        if compile:
            # every FuncSim defines a new `step`, but dynamo counts recompilations per code
            # object and falls back to eager after `recompile_limit` (8): start afresh
            torch._dynamo.reset()
            step = torch.compile(step) if compile is True else torch.compile(step,
                                                                              backend=compile)
        self.step = step

    def run(self, params: TorchParams, xs: torch.Tensor, ys: torch.Tensor) -> TorchParams:
        """``T`` steps from stacked ``params``; ``xs [T, n, B, C, H, W]``, ``ys [T, n, B]``."""
        with torch.no_grad():
            for t in range(xs.shape[0]):
                params = self.step(params, xs[t], ys[t])
        return params


# ----------------------------------------------------------------- influence baselines


def _loss(model: nn.Module, p: TorchParams, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, p, (x,)), y)


def _grad_at(model: nn.Module, p: TorchParams, x: torch.Tensor, y: torch.Tensor
             ) -> list[torch.Tensor]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
    return list(torch.autograd.grad(_loss(model, leaves, x, y), list(leaves.values())))


def _hvp(model: nn.Module, p: TorchParams, x: torch.Tensor, y: torch.Tensor,
         vec: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H(θ; z) vec`` by double backward (the reference's way)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
    gs = torch.autograd.grad(_loss(model, leaves, x, y), list(leaves.values()),
                             create_graph=True)
    dot = sum(torch.sum(g * v) for g, v in zip(gs, vec, strict=True))
    return list(torch.autograd.grad(dot, list(leaves.values())))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(torch.sum(x * y) for x, y in zip(a, b, strict=True))


def shells(matrices: np.ndarray) -> np.ndarray:
    """Time-respecting shells: ``out[s-1, k, j]`` iff ``k`` first reached from ``j`` at hop s.

    Args:
      matrices: ``[r, n, n]`` (``W^t .. W^{t+r-1}``).

    Returns:
      ``[r, n, n]`` bool.
    """
    n = matrices.shape[-1]
    reach = np.eye(n, dtype=bool)
    out = []
    for w in matrices:
        new = reach | ((w > 0).astype(np.int64) @ reach.astype(np.int64) > 0)
        out.append(new & ~reach)
        reach = new
    return np.stack(out)


def walks_from(j: int, length: int, matrices: np.ndarray) -> list[tuple[int, ...]]:
    """Every walk ``j → k_1 → … → k_length`` with ``W^{t+m}[k_{m+1}, k_m] > 0``."""
    walks = [(j,)]
    for m in range(length):
        walks = [(*w, k) for w in walks for k in np.flatnonzero(matrices[m][:, w[-1]] > 0)]
    return walks


class Recorded:
    """What the influence baselines read from a recorded torch run (see :class:`ReferenceSim`).

    Args:
      sim: a :class:`ReferenceSim` run with ``record=True``.
      xs, ys: the training batches ``[T, n, B, C, H, W]``, ``[T, n, B]``.
      probe_x, probe_y: the probe batch ``z'`` ``[M, C, H, W]``, ``[M]``.
      matrix: ``W`` ``[n, n]`` (static graph) or ``[T, n, n]``.
      lr: SGD learning rate ``η``.
      node_weights: ``q`` ``[n]`` (default ``1/n``).
    """

    def __init__(self, sim: ReferenceSim, xs, ys, probe_x, probe_y, matrix, lr: float,
                 node_weights: Any = None):
        self.model = sim.models[0]
        self.params, self.half_params = sim.params, sim.half_params
        self.xs, self.ys, self.probe_x, self.probe_y = xs, ys, probe_x, probe_y
        w = np.asarray(matrix, np.float64)
        self.n = w.shape[-1]
        self.matrices = w if w.ndim == 3 else np.broadcast_to(w, (xs.shape[0], *w.shape))
        self.lr = lr
        self.q = (np.full(self.n, 1.0 / self.n) if node_weights is None
                  else np.asarray(node_weights, np.float64))
        self._probe_grads: dict[tuple[int, int], list[torch.Tensor]] = {}

    def names(self) -> list[str]:
        return list(self.params[0][0])

    def probe_grad(self, u: int, k: int) -> list[torch.Tensor]:
        """``g_k^u = ∇L(θ_k^u; z')``, computed once per (step, node) and cached."""
        if (u, k) not in self._probe_grads:
            self._probe_grads[u, k] = _grad_at(self.model, self.params[u][k], self.probe_x,
                                               self.probe_y)
        return self._probe_grads[u, k]

    def update(self, t: int, j: int) -> list[torch.Tensor]:
        """``v_j^t = θ_j^{t+½} − θ_j^t``."""
        return [self.half_params[t][j][k] - self.params[t][j][k] for k in self.names()]

    def clear(self) -> None:
        """Forgets cached probe gradients (so that timed runs recompute them)."""
        self._probe_grads.clear()


def dice_e_one_hop(rec: Recorded, t: int, sources: Sequence[int] | None = None) -> np.ndarray:
    """One-hop DICE-E (Proposition 1) per source, as the reference computes it.

    ``−η [q_j g_j^t · ∇L(θ_j^t; z_j^t) + Σ_{k ∈ S_1(j)} q_k W^t[k, j] g_k^{t+1} · ∇L(θ_j^t;
    z_j^t)]``: the source's training gradient and probe gradient, then the probe gradient
    of each out-neighbour after gossip.

    Returns:
      ``[len(sources)]`` float64 scores (default: every node).
    """
    sources = range(rec.n) if sources is None else sources
    sh = shells(rec.matrices[t : t + 1])[0]
    out = []
    for j in sources:
        g_train = _grad_at(rec.model, rec.params[t][j], rec.xs[t, j], rec.ys[t, j])
        total = float(rec.q[j]) * _dot(rec.probe_grad(t, j), g_train)
        for k in np.flatnonzero(sh[:, j]):
            w = float(rec.q[k] * rec.matrices[t][k, j])
            total = total + w * _dot(rec.probe_grad(t + 1, int(k)), g_train)
        out.append(float(-rec.lr * total))
    return np.asarray(out)


def dice_e_walks(rec: Recorded, t: int, hops: int, sources: Sequence[int] | None = None,
                 network: bool = False) -> tuple[np.ndarray, dict]:
    """r-hop DICE-E by walk enumeration, each walk from scratch (the reference's algorithm).

    Args:
      rec: the recorded run.
      t: source step.
      hops: ``r`` (or the horizon ``h`` when ``network``).
      sources: source nodes (default all).
      network: the network-level reading at horizon ``h = hops``: every walk of length
        ``h`` (any end node), no direct term.

    Returns:
      ``(scores [len(sources)], {"walks": int, "hvps": int})``.
    """
    sources = range(rec.n) if sources is None else sources
    mats = rec.matrices[t : t + hops]
    sh = shells(mats)
    count = {"walks": 0, "hvps": 0}
    out = []
    for j in sources:
        v = rec.update(t, j)
        total = torch.zeros((), dtype=v[0].dtype, device=v[0].device)
        if not network:
            total = total + float(rec.q[j]) * _dot(rec.probe_grad(t, j), v)
        lengths = [hops] if network else range(1, hops + 1)
        for s in lengths:
            for walk in walks_from(j, s, mats):
                k = walk[-1]
                if not network and not sh[s - 1][k, j]:
                    continue
                count["walks"] += 1
                delta = [float(mats[0][walk[1], j]) * x for x in v]
                for m in range(1, s):
                    node = walk[m]
                    hv = _hvp(rec.model, rec.params[t + m][node], rec.xs[t + m, node],
                              rec.ys[t + m, node], delta)
                    count["hvps"] += 1
                    w = float(mats[m][walk[m + 1], node])
                    delta = [w * (d - rec.lr * h) for d, h in zip(delta, hv, strict=True)]
                total = total + float(rec.q[k]) * _dot(rec.probe_grad(t + s, k), delta)
        out.append(float(total))
    return np.asarray(out), count


# ---------------------------------------------------------------------------- utilities


def max_rel_diff(a: Any, b: Any) -> float:
    """``max |a − b| / max |b|`` over all leaves (normwise; robust to near-zero entries)."""
    la = [np.asarray(x, np.float64) for x in _leaves(a)]
    lb = [np.asarray(x, np.float64) for x in _leaves(b)]
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(np.max(np.abs(y))) for y in lb)
    return num / max(den, np.finfo(np.float64).tiny)


def _leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, list | tuple):
        return [x for v in tree for x in _leaves(v)]
    if isinstance(tree, torch.Tensor):
        return [tree.detach().cpu().numpy()]
    return [np.asarray(tree)]


__all__ = [
    "FuncSim",
    "Recorded",
    "ReferenceSim",
    "TorchBasicBlock",
    "TorchCNN",
    "TorchMLP",
    "TorchResNet18",
    "dice_e_one_hop",
    "dice_e_walks",
    "make_mixer",
    "make_torch_model",
    "max_rel_diff",
    "node_params",
    "shells",
    "to_flax_params",
    "to_torch_images",
    "to_torch_labels",
    "to_torch_params",
    "train_flops_per_example",
    "walks_from",
]
