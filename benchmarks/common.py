"""Shared pieces of the benchmark scripts: machine description, matmul peak, timing, memory.

Every benchmark reports its numbers next to the machine's own matrix-multiply rate measured
in the same process (float32, one large square product in XLA and in PyTorch), the load
average at start and end, versions and the git state, and writes JSON atomically.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dicejax.experiments.common import save_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds to run ``fn()`` and wait for its JAX results (``block_until_ready``)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def median_ms(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each blocked call, the calls interleaved per repeat.

    Each function is called twice first (compilation and caches), then ``repeats`` rounds
    call every function once, in order, so drift of the machine hits all of them alike.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_info() -> dict:
    """Platform, CPU, versions, JAX backend and the 1-minute load averages."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device": str(dev),
        "device_kind": getattr(dev, "device_kind", None),
        "x64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def git_state() -> dict:
    """HEAD commit and locally modified files of the checkout (results depend on both)."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                                 timeout=10, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "src", "benchmarks")
    return {"head": git("rev-parse", "HEAD"),
            "modified": None if status is None else status.splitlines()}


def jax_matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Float32 ``size``² matrix product in XLA (default device), GFLOP/s (median)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    times = [timed(lambda: mm(a))[0] for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e9


def torch_matmul_gflops(size: int = 2048, repeats: int = 10, device: str = "cpu") -> float | None:
    """Float32 ``size``² ``torch.mm``, GFLOP/s (median); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, a)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, a)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def matmul_peak(size: int = 2048, torch_device: str | None = "cpu") -> dict:
    """The machine's float32 matmul rate in both frameworks and the larger of the two."""
    out = {"size": size, "jax_gflops": jax_matmul_gflops(size)}
    out["torch_gflops"] = (torch_matmul_gflops(size, device=torch_device)
                           if torch_device else None)
    out["peak_gflops"] = max(v for v in (out["jax_gflops"], out["torch_gflops"]) if v)
    return out


class PeakRSS:
    """Peak resident memory of this process while a block runs, sampled by a thread.

    ``with PeakRSS() as m: ...`` then ``m.peak_mb`` (the largest RSS seen, MiB) and
    ``m.delta_mb`` (that minus the RSS on entry: memory the block added at its peak).
    Sampling every ``interval`` seconds can miss short spikes; use it on untimed runs.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


def write_json(path: Path, obj: Any) -> Path:
    """Writes JSON atomically (:func:`dicejax.experiments.common.save_json`)."""
    return save_json(path, obj)


def finish(path: Path, result: dict, failures: Sequence[str],
           echo: Callable[[str], Any] = print) -> int:
    """Writes the result JSON, reports any numerical disagreement; the exit status."""
    echo(f"wrote {write_json(path, result)}")
    if failures:
        print("NUMERICAL DISAGREEMENT:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def bandwidth_gbs(mib: int = 256, repeats: int = 10) -> float:
    """Memory bandwidth of a jitted ``2x + 1`` over ``mib`` MiB (read + write), GB/s."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: 2 * a + 1)
    jax.block_until_ready(f(x))
    t = statistics.median(timed(lambda: f(x))[0] for _ in range(repeats))
    return 2 * x.nbytes / t / 1e9


def flax_layers(params: Mapping) -> list[tuple[str, str]]:
    """``(flax name, kind)`` of every layer in forward order: ``Conv_0, …, Dense_0, …``."""
    convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:]))
    dense = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    if not dense or len(convs) + len(dense) != len(params):
        raise ValueError(f"params: expected flax Conv_i / Dense_i layers, got {sorted(params)}")
    return [(k, "conv") for k in convs] + [(k, "dense") for k in dense]


def train_flops_per_example(params: Mapping, input_shape: Sequence[int]) -> int:
    """Matmul/conv FLOPs of one example's SGD step: forward, weight gradients, and input
    gradients of every layer but the first (the data needs none).

    Counts ``2·MACs`` per product; biases, activations, pooling and the loss are not counted.
    """
    h, w, _ = input_shape
    fwd = []
    for name, kind in flax_layers(params):
        k = np.shape(params[name]["kernel"])[-4:] if kind == "conv" else None
        if kind == "conv":
            kh, kw, cin, cout = k
            fwd.append(2 * h * w * kh * kw * cin * cout)
            h, w = h // 2, w // 2
        else:
            kin, kout = np.shape(params[name]["kernel"])[-2:]
            fwd.append(2 * kin * kout)
    return int(3 * sum(fwd) - fwd[0])


