"""Own data (``--dataset npz:PATH``) and own models (``--model module:callable``)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from dicejax import data, models
from dicejax.cli import main

TINY = ["--nodes", "2", "--batch", "4", "--steps", "3", "--eval-every", "0", "--probe-size", "4",
        "--test-size", "8", "--topology", "ring"]


def write_npz(path, n=40, shape=(5, 5), classes=3, test=True, **extra):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(n, *shape)).astype(np.float32),
              "y": rng.integers(0, classes, n)}
    if test:
        arrays.update(x_test=rng.normal(size=(12, *shape)), y_test=rng.integers(0, classes, 12))
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_load_npz_layouts(tmp_path):
    ds = data.load_dataset(f"npz:{write_npz(tmp_path / 'a.npz')}")
    assert ds.x_train.shape == (40, 5, 5, 1) and ds.x_test.shape == (12, 5, 5, 1)
    assert ds.num_classes == 3 and ds.name == "npz:a.npz"
    np.testing.assert_allclose(ds.x_train.mean(), 0, atol=1e-5)  # normalised like the others
    ds = data.load_npz(write_npz(tmp_path / "b.npz", shape=(7,), test=False,
                                 num_classes=np.int64(5)))
    assert ds.x_train.shape[1:] == (1, 1, 7) and ds.num_classes == 5
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 40  # a held-out split was cut


@pytest.mark.parametrize(("arrays", "match"), [
    (dict(y=np.zeros(4, int)), "no array 'x'"),
    (dict(x=np.zeros((4, 3))), "no array 'y'"),
    (dict(x=np.zeros((4, 3)), y=np.zeros(5, int)), "4 rows but y has 5"),
    (dict(x=np.zeros((4, 3)), y=np.zeros(4)), "integer labels"),
    (dict(x=np.zeros((4, 3)), y=np.zeros(4, int), x_test=np.zeros((2, 3))),
     "both x_test and y_test"),
    (dict(x=np.zeros((4, 2, 2, 2, 2)), y=np.zeros(4, int)), r"\[N, D\], \[N, H, W\]"),
    (dict(x=np.zeros((4, 3)), y=-np.ones(4, int)), "negative labels"),
])
def test_load_npz_errors_name_the_array(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        data.load_npz(path)


def test_load_npz_unreadable_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_npz(path)


MODULE = textwrap.dedent("""
    import flax.linen as nn

    class Tiny(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))

    def tiny(num_classes):
        return Tiny(num_classes)

    def not_a_model(num_classes):
        return "nope"
""")


def test_get_model_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(models.get_model("my_models:tiny", 4)).__name__ == "Tiny"
    assert models.get_model(f"{tmp_path / 'my_models.py'}:tiny", 3).num_classes == 3
    with pytest.raises(ValueError, match="must return a flax Module"):
        models.get_model("my_models:not_a_model", 3)
    with pytest.raises(ValueError, match="no callable 'missing'"):
        models.get_model("my_models:missing", 3)
    with pytest.raises(ValueError, match="cannot import"):
        models.get_model("no_such_module_xyz:tiny", 3)


def test_cli_trains_own_data_with_own_model(tmp_path, capsys):
    npz = write_npz(tmp_path / "mine.npz")
    (tmp_path / "my_models.py").write_text(MODULE)
    out = tmp_path / "out"
    argv = ["train", *TINY, "--dataset", f"npz:{npz}", "--model",
            f"{tmp_path / 'my_models.py'}:tiny", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "train.json").read_text())
    assert result["config"]["dataset"] == f"npz:{npz}"
    assert len(result["per_node_accuracy"]) == 2
    assert result["meta"]["command"].endswith(str(out))


def test_cli_errors_for_own_data_and_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", f"npz:{tmp_path / 'absent.npz'}", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((8, 3)))
    assert main(["train", *TINY, "--dataset", f"npz:{bad}", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--dataset" in err and "no array 'y'" in err
    npz = write_npz(tmp_path / "ok.npz")
    (tmp_path / "m.py").write_text(MODULE)
    assert main(["train", *TINY, "--dataset", f"npz:{npz}", "--model",
                 f"{tmp_path / 'm.py'}:not_a_model", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--model" in err and "flax Module" in err
