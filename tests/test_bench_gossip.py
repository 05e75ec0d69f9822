"""``benchmarks/bench_gossip.py``: both kernels timed on each graph, checked to agree."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_gossip

from dicejax import mixing


def test_rows_per_graph_with_the_auto_choice(tmp_path):
    out = tmp_path / "g.json"
    assert bench_gossip.main(["--topologies", "ring,torus,exponential", "--nodes", "8,9,16",
                              "--widths", "6,3", "--repeats", "2", "--calls", "2",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # the torus takes only the square counts (9 and 16): 3 ring + 2 torus + 3 exponential
    assert [(r["topology"].split("(")[0], r["n"]) for r in rows] == [
        ("ring", 8), ("ring", 9), ("ring", 16), ("torus", 9), ("torus", 16),
        ("exponential", 8), ("exponential", 9), ("exponential", 16)]
    for r in rows:
        assert len(r["dense_ms"]) == len(r["sparse_ms"]) == 2
        assert r["max_abs_diff"] <= 1e-4
        assert r["auto"] == mixing.choose_method(r["n"], r["D"])
        assert r["dense_over_sparse"] == pytest.approx(min(r["dense_ms"]) / min(r["sparse_ms"]))


@pytest.mark.parametrize("argv", [["--topologies", "star"], ["--nodes", "8,x"],
                                  ["--nodes", "1"], ["--repeats", "0"]])
def test_bad_flags_stop_with_a_usage_error(argv, tmp_path):
    with pytest.raises(SystemExit) as err:
        bench_gossip.main([*argv, "--out", str(tmp_path / "g.json")])
    assert err.value.code == 2
