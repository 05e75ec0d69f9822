"""Options shared by the ``dicejax`` sub-commands: definitions, help, checks, flag names.

This module uses the standard library only, so that the command line is parsed and every
option checked (names, ranges, relations, the output folder) before jax, matplotlib or an
experiment is imported. The name lists below mirror the library's (a test keeps them equal).

Exit codes of ``dicejax`` (see :data:`EXIT_CODES`): 0 success; 2 a bad option or bad input
(unknown name, out of range, unreadable data, unwritable ``--out``); 3 training diverged;
4 an I/O error while running (disk full, a file vanished); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10")
NPZ_PREFIX = "npz:"
TOPOLOGIES = ("complete", "designed16", "erdos_renyi", "exponential", "grid", "hypercube",
              "one_peer_exponential", "random_matching", "random_regular", "ring", "star",
              "torus")
MODELS = ("mlp", "cnn", "resnet18")
OPTIMIZERS = ("sgd", "momentum", "adam")
PARTITIONS = ("iid", "dirichlet", "shards", "resample")
ATTACKS = ("label_permutation", "label_flip", "gaussian_noise", "sign_flip", "free_rider")
#: ``dicejax detect``'s attacks: :data:`ATTACKS` and partial label noise (mirrors
#: ``dicejax.experiments.anomaly.DETECTION_ATTACKS``).
DETECT_ATTACKS = (*ATTACKS, "label_noise")
ARMS = ("clean", "fixed", "influence", "random", "oracle")
ALL_ARMS = (*ARMS, "influence_t", *(f"{base}+{rule}" for base in ("fixed", "influence")
                                    for rule in ("trimmed_mean", "median", "clipped_gossip")))
OBJECTIVES = ("consensus", "fairness", "probe_loss", "spectral_gap")
PARAMETERIZATIONS = ("row_softmax", "sinkhorn")
BASELINES = ("uniform", "metropolis_hastings", "ring", "ring_lattice", "exponential")

#: RunConfig's defaults (a test keeps them equal to ``dicejax.experiments.RunConfig()``).
RUN_DEFAULTS = dict(dataset="digits", data_dir=None, nodes=16, topology="exponential",
                    model="mlp", optimizer="sgd", lr=0.1, batch=16, steps=300, partition="iid",
                    samples_per_node=None, alpha=0.5, seed=0, same_init=True, eval_every=50,
                    test_size=0, probe_size=128)

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_IO, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_USAGE: "bad option or input (the message names the flag)",
    EXIT_DIVERGED: "training diverged (the message names the step and node)",
    EXIT_IO: "I/O error while running",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); with --checkpoint-dir rerun the command to resume",
}


class UsageError(ValueError):
    """A bad option found before any work; the message starts with the flag."""


# --------------------------------------------------------------------------------------------
# Types (argparse ``type=``): each rejects a bad value with a message naming what it expects
# --------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of finite numbers > 0 (e.g. ``1,3,10``)."""
    parts = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in parts):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of positive "
                                         f"numbers, got {text!r}")
    return [positive_float(x) for x in parts]


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def dataset(text: str) -> str:
    """A data set name of :data:`DATASETS` (``-`` or ``_``, any case) or ``npz:PATH``."""
    if text.startswith(NPZ_PREFIX):
        path = Path(text[len(NPZ_PREFIX):]).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no such .npz file {str(path)!r}")
        return NPZ_PREFIX + str(path)
    key = text.strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose one of {', '.join(DATASETS)}, or npz:PATH for "
            "your own arrays")
    return key


def topology(text: str) -> str:
    """A builder name of :data:`TOPOLOGIES`, or the path of a CSV file (checked to exist)."""
    if text.endswith(".csv") or os.path.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no such CSV file {text!r}")
        if path.stat().st_size == 0 or not path.read_text().strip():
            raise argparse.ArgumentTypeError(
                f"{text!r} is empty; expected an [n, n] table of mixing weights")
        return text
    if text not in TOPOLOGIES:
        raise argparse.ArgumentTypeError(
            f"unknown topology {text!r}; choose one of {', '.join(TOPOLOGIES)}, or a CSV file")
    return text


def model(text: str) -> str:
    """A name of :data:`MODELS`, or ``module:callable`` / ``file.py:callable``."""
    if ":" in text:
        module, _, attr = text.rpartition(":")
        if not module or not attr.isidentifier():
            raise argparse.ArgumentTypeError(
                f"expected module:callable or file.py:callable, got {text!r}")
        if module.endswith(".py") and not Path(module).expanduser().is_file():
            raise argparse.ArgumentTypeError(f"no such file {module!r}")
        return text
    if text.lower() not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose one of {', '.join(MODELS)}, or module:callable")
    return text.lower()


def node_ids(text: str) -> list[int]:
    """Node indices like ``3`` or ``3,17`` (may be empty: ``""``)."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node ids like 3,17, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"node ids must be >= 0, got {text!r}")
    return ids


def attackers(text: str) -> int | list[int]:
    """``"3"`` or ``"3,17"`` (node ids) or ``"random:K"`` (K random attackers per seed)."""
    text = text.strip()
    if text.startswith("random:"):
        try:
            count = int(text.split(":", 1)[1])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected node ids like 3,17 or random:K, got {text!r}") from None
        if count < 1:
            raise argparse.ArgumentTypeError(f"random:K needs K >= 1, got {text!r}")
        return count
    try:
        ids = node_ids(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected node ids like 3,17 or random:K, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one node id, or random:K")
    return ids


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A ``type=`` for comma-separated distinct names from ``choices``."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"names repeat in {text!r}")
        return names

    return parse


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help, except where there is no default
    value to show (None, a flag's False) or the help states it itself ``(default: ...)``."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_run_args(p: argparse.ArgumentParser, steps: int = 300) -> Any:
    """Adds the options that define a training run (``RunConfig``) and ``--out``.

    Args:
      p: a sub-command's parser.
      steps: the command's default ``--steps``.

    Returns:
      The "output" argument group (for ``--checkpoint-dir`` and the like).
    """
    d = RUN_DEFAULTS
    g = p.add_argument_group("the training run")
    g.add_argument("--dataset", type=dataset, default=d["dataset"], metavar="NAME",
                   help="digits (bundled with scikit-learn), fashion_mnist (Debian package "
                        "dataset-fashion-mnist, or --data-dir), mnist or cifar10 (--data-dir), "
                        "or npz:PATH (your own arrays x, y [, x_test, y_test] in a .npz file)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder of the data set's files (mnist, cifar10, or another "
                        "fashion_mnist copy)")
    g.add_argument("--nodes", type=positive_int, default=d["nodes"], metavar="N",
                   help="number of nodes n (at least 2)")
    g.add_argument("--topology", type=topology, default=d["topology"], metavar="NAME|CSV",
                   help=f"communication graph: {', '.join(TOPOLOGIES)}, or a CSV file of an "
                        "[n, n] row-stochastic matrix (row k: the weights node k receives)")
    g.add_argument("--model", type=model, default=d["model"], metavar="NAME",
                   help="mlp (in-128-64-C, ReLU), cnn (the paper's), resnet18, or your own as "
                        "module:callable or file.py:callable (called with the number of "
                        "classes, returns a flax Module)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                   help="local optimizer of every node: plain SGD, SGD with momentum 0.9, Adam")
    g.add_argument("--lr", type=positive_float, default=d["lr"],
                   help="learning rate of the local optimizer")
    g.add_argument("--batch", type=positive_int, default=d["batch"], metavar="B",
                   help="mini-batch size per node and step")
    g.add_argument("--steps", type=positive_int, default=steps, metavar="T",
                   help="training steps (each: every node's local update, then gossip)")
    g.add_argument("--partition", choices=PARTITIONS, default=d["partition"],
                   help="how the train split is divided among the nodes: iid, dirichlet "
                        "(label skew, see --alpha), shards (by label), or resample (the DICE "
                        "reference code's mode: every epoch each node redraws its samples "
                        "with replacement)")
    g.add_argument("--samples-per-node", type=positive_int, default=None, metavar="M",
                   help="local data set size per node (default: the train split divided by "
                        "the nodes; the paper uses 512)")
    g.add_argument("--alpha", type=positive_float, default=d["alpha"],
                   help="Dirichlet concentration of --partition dirichlet (smaller: more skew)")
    g.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the partition, the batch order and the initialisation")
    g.add_argument("--independent-init", action="store_true",
                   help="initialise every node independently (default: every node starts from "
                        "the same parameters, as in the paper)")
    g.add_argument("--eval-every", type=non_negative_int, default=d["eval_every"], metavar="K",
                   help="evaluate every node on the test split every K steps (0: only at the "
                        "end)")
    g.add_argument("--test-size", type=non_negative_int, default=d["test_size"], metavar="M",
                   help="test examples used for evaluation (0: the whole test split)")
    g.add_argument("--probe-size", type=positive_int, default=d["probe_size"], metavar="P",
                   help="size of the fixed probe batch z' (drawn from the test split) on which "
                        "influence is measured")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results", metavar="DIR",
                   help="output folder for the JSON and the figures (created, and checked "
                        "writable before any work)")
    return o


def add_checkpoint_arg(group: Any, what: str = "after every chunk") -> None:
    """Adds ``--checkpoint-dir`` to a parser or argument group."""
    group.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                       help=f"save progress there ({what}); rerun the same command to resume "
                            "from it (default: no checkpoints)")


def add_adaptive_args(group: Any) -> None:
    """Adds the adaptive attacker's ``--fraction`` (``label_noise``) and ``--on`` / ``--off``
    (intermittent attacks) to a parser or argument group."""
    group.add_argument("--fraction", type=positive_float, default=0.5, metavar="F",
                       help="share of each attacked batch that --attack label_noise "
                            "mislabels, in (0, 1]: round(F·B) labels, each set to a uniformly "
                            "random wrong class; at least one label (F·B > 0.5)")
    group.add_argument("--on", type=positive_int, default=1, metavar="K",
                       help="an intermittent attacker (any --attack): attacks K steps, then "
                            "is honest for --off steps, repeating from step 0")
    group.add_argument("--off", type=non_negative_int, default=0, metavar="K",
                       help="honest steps after every --on attacked steps (0: attacks every "
                            "step); duty cycle = on/(on+off)")


def run_config(a: argparse.Namespace):
    """The :class:`~dicejax.experiments.common.RunConfig` of parsed options."""
    from dicejax.experiments.common import RunConfig

    return RunConfig(dataset=a.dataset, data_dir=a.data_dir, nodes=a.nodes,
                     topology=a.topology, model=a.model, optimizer=a.optimizer, lr=a.lr,
                     batch=a.batch, steps=a.steps, partition=a.partition,
                     samples_per_node=a.samples_per_node, alpha=a.alpha, seed=a.seed,
                     same_init=not a.independent_init, eval_every=a.eval_every,
                     test_size=a.test_size, probe_size=a.probe_size)


# --------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------


def check_run(a: argparse.Namespace) -> None:
    """Ranges and relations of the run options (raises :class:`UsageError`)."""
    if getattr(a, "nodes", 2) < 2:
        raise UsageError(f"--nodes: a decentralized run needs at least 2 nodes, got {a.nodes}")
    spn = getattr(a, "samples_per_node", None)
    if spn is not None and spn < a.batch:
        raise UsageError(f"--samples-per-node: {spn} is fewer than --batch {a.batch}")
    if getattr(a, "data_dir", None) is not None and not Path(a.data_dir).expanduser().is_dir():
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    if a.dataset in ("mnist", "cifar10") and getattr(a, "data_dir", None) is None:
        raise UsageError(f"--data-dir: --dataset {a.dataset} needs the folder holding its files"
                         " (nothing is downloaded)")


def check_nodes(ids: Sequence[int], n: int, flag: str) -> None:
    """Node ids in ``[0, n)``."""
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise UsageError(f"{flag}: node ids must lie in [0, {n}) for --nodes {n}, got {bad}")


def prepare_folder(path: str | os.PathLike, flag: str) -> Path:
    """Creates ``path`` (and parents) and checks that a file can be written in it.

    Raises:
      UsageError: ``"<flag>: cannot write to ..."`` when it cannot be created or written.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dicejax-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag}: cannot write to {str(folder)!r} "
                         f"({err.strerror or type(err).__name__}); choose another folder") \
            from None
    return folder


# --------------------------------------------------------------------------------------------
# Library messages in the user's terms
# --------------------------------------------------------------------------------------------

#: Leading names of library error messages that correspond to a flag of another name.
ALIASES = {"path": "--data-dir", "data_dir": "--data-dir", "num_nodes": "--nodes",
           "batch_size": "--batch", "load_csv": "--topology", "by_name": "--topology",
           "designed16": "--matrix", "npz": "--dataset", "directory": "--checkpoint-dir",
           "checkpoint_dir": "--checkpoint-dir", "same_init": "--independent-init",
           "opt_steps": "--opt-steps", "num_steps": "--num-steps"}

_LEAD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\([^)]*\))?: ")


def flag_message(message: str, parser: argparse.ArgumentParser | None,
                 default_name: str | None = None) -> str:
    """Replaces a library message's leading parameter name by the matching flag.

    ``"nodes: must be ..."`` becomes ``"--nodes: must be ..."`` when the parser has
    ``--nodes``; names in :data:`ALIASES` map to their flag (``name`` to ``default_name``).
    """
    match = _LEAD.match(message)
    if not match:
        return message
    name = match.group(1)
    flag = default_name if name == "name" else ALIASES.get(name, f"--{name.replace('_', '-')}")
    known = set() if parser is None else set(parser._option_string_actions)
    if flag is None or (parser is not None and flag not in known):
        return message
    return f"{flag}: {message[match.end():]}"


def described(values: Any, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    count = values if isinstance(values, int) else len(values)
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
