# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= results

.PHONY: demo test test-slow lint bench venv clean

$(BIN)/dicejax: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/dicejax

venv: $(BIN)/dicejax

demo: venv
	$(BIN)/dicejax train --dataset digits --nodes 16 --topology exponential --model mlp \
	    --lr 0.1 --batch 16 --steps 300 --out $(OUT)/train
	$(BIN)/dicejax align --dataset digits --nodes 16 --topology exponential --model mlp \
	    --lr 0.1 --batch 16 --steps 100 --hops 3 --num-steps 20 --out $(OUT)/align

# The test suite: ruff and every test not marked slow (the brute-force twins in at least
# their cheapest case; a few costly equivalences run only in test-slow, see README Tests).
test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# The end-to-end tier CI runs after `make test`: tests marked slow (CLI runs, soak and
# multi-process runs, the README's code blocks) and the six notebooks at the small scale.
test-slow: venv
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m slow
	DICEJAX_NOTEBOOK_SMALL=1 $(BIN)/python -m pytest -q -n 2 --nbmake notebooks

lint: venv
	$(BIN)/ruff check src tests benchmarks

# The CPU benchmark set (PyTorch baselines included); JSON under benchmarks/results/.
bench: venv
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/bench_simulate.py
	$(BIN)/python benchmarks/bench_influence.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
