# The README's two commands: `make figures` (install + run every notebook) and `make test` (install + all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip installs without compiling the environment's 20k files (a third of a fresh install); Python writes the bytecode
# of what is imported when it first is, also where the machine sets PYTHONDONTWRITEBYTECODE (every later process, test
# worker and kernel then reads it instead of compiling again).
unexport PYTHONDONTWRITEBYTECODE
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: install figures test test-oldest lint docs browser bench lab clean FORCE

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[notebooks,test,docs,data,models,lrfree,sweep,tensorboard,lightning,hf]"
	touch $@

# Executed copies go to build/notebooks/, figures to figures/ and the runs' records to results/ (run alone, a
# notebook writes to build/figures and build/results). The notebooks' own defaults are quick runs (what `make test`
# executes under nbval); the committed figures come from the bigger runs below. 00_explore, which reads results/,
# runs last.
FIGURES := -p figures_dir ../figures
RECORDS := -p records_dir ../results
# Ten seeds per configuration, spread over two worker processes (alphalib.runs(..., workers=2)).
SEEDS := -p runs 10 -p workers 2
PARAMS_01_adam_alpha_star := $(FIGURES) $(RECORDS) $(SEEDS) -p epochs 100
PARAMS_02_optimizers := $(FIGURES) $(RECORDS) $(SEEDS)
PARAMS_03_lr_sweep := $(FIGURES) $(RECORDS) $(SEEDS)
# 04: the transformer probed on every step of 3 passes over its text (the others every step of 8 epochs)
PARAMS_04_models_and_data := $(FIGURES) $(RECORDS) $(SEEDS) -p epochs 8 -p transformer_epochs 3 -p transformer_every 1
PARAMS_05_mini_vs_epoch := $(FIGURES) $(SEEDS)
PARAMS_06_objective_vs_batch := $(FIGURES) $(RECORDS) $(SEEDS) -p epochs 30
PARAMS_07_edge_of_stability := $(FIGURES) $(SEEDS) -p steps 1500 -p sharpness_every 25
# 08 sweeps 01 over four lrs x 10 seeds on a Dask LocalCluster (its runs land in build/sweeps/08_figures; a second
# make figures reuses the runs done)
PARAMS_08_sweep_summary := $(FIGURES) -y "axes: {lr: [0.0003, 0.001, 0.003, 0.01]}" -p seeds 10 \
	-y "fixed: {runs: 1, epochs: 20}" -p sweep_dir ../build/sweeps/08_figures -p workers 2
# 09 chooses on 5 tune seeds (10 fixed lrs, 4 kappas x 4 sources, SGD) and reports the winners on 10 test seeds
PARAMS_09_closing_the_loop := $(FIGURES) $(RECORDS) -p epochs 8 -p tune_seeds 5 -p test_seeds 10 -p workers 2 \
	-y "fixed_lrs: [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]" -y "kappas: [0.1, 0.25, 0.5, 1.0]"
# 10 runs on 09's test seeds, with 09's choices (it reads results/09_closing_the_loop.csv.gz)
PARAMS_10_lr_free := $(FIGURES) $(RECORDS) -p epochs 8 -p runs 10 -p workers 2
# 11: a 1.04 M-parameter GPT, 2000 AdamW steps (warm-up 200, cosine decay), probed every 50th, 3 seeds on 2 workers
PARAMS_11_gpt_at_scale := $(FIGURES) $(RECORDS) -p steps 2000 -p d_model 144 -p layers 4 -p block 64 -p batch 32 \
	-p seeds 3 -p workers 2 -p every 50 -p warmup 200 -p heldout_windows 1024

figures: install $(filter-out %/00_explore.ipynb,$(NOTEBOOKS:notebooks/%=build/notebooks/%)) build/notebooks/00_explore.ipynb
	$(BIN)/python -m alphalib.lab.findings results > figures/findings.md  # the numbers the README quotes

build/notebooks/%.ipynb: notebooks/%.ipynb FORCE
	@mkdir -p build/notebooks
	$(BIN)/papermill --cwd notebooks --no-progress-bar $< $@ $(PARAMS_$*)

FORCE:

# Unit tests and doctests (with the end-to-end test in JupyterLab, driven by headless Chromium: Debian's package,
# installed here where it is missing and the machine allows), then every notebook under nbval, which compares each
# notebook's summary cell with its stored output (its rows, labels and counts; notebooks/nbval-sanitize.cfg says why
# not the digits). nbval runs on a scratch copy of notebooks/ so that the quick runs
# it makes never overwrite the committed figures and records. Both spread their files over one process per core
# (pytest-xdist), each with one torch thread.
TEST_PROCESSES ?= auto
test: install browser
	$(MAKE) --no-print-directory -j2 lint docs  # side by side: mypy and Sphinx each keep one core busy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --durations=10 tests alphalib
	rm -rf build/nbval && mkdir -p build/nbval && cp -r notebooks results build/nbval/
	cd build/nbval && OMP_NUM_THREADS=1 ../../$(BIN)/python -m pytest --nbval-lax -n $(TEST_PROCESSES) --dist loadfile \
		--nbval-sanitize-with notebooks/nbval-sanitize.cfg notebooks

# The lint, format and type checks .pre-commit-config.yaml runs on each commit, and the two layers' import contract
# (all configured in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The docs site, warning-free, into build/docs/html: the pages in docs/, the docstrings, and the notebooks as
# `make figures` executed them (as stored where it has not run; the docs build executes nothing).
docs: install
	$(BIN)/sphinx-build -W --keep-going -q -b html docs build/docs/html

# The core's tests against the oldest torch pyproject.toml claims (torch>=...), in a virtual environment of their
# own, build/oldest. The index has CPU-only builds of the pinned torch alone, so this installs the index's default
# build (it carries CUDA libraries: about 5 GB and a few minutes; it runs on the CPU). Not part of `make test`.
OLDEST_TORCH = $(shell sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
CORE_TESTS = $(filter-out tests/test_notebooks.py tests/test_jupyterlab.py tests/test_examples.py \
	tests/test_integrations.py tests/test_readme.py,$(wildcard tests/test_*.py))
test-oldest:
	$(PYTHON) -m venv build/oldest
	build/oldest/bin/python -m pip install --quiet "torch==$(OLDEST_TORCH)" -e ".[test,lrfree,sweep]"
	build/oldest/bin/python -c "import torch; print('torch', torch.__version__)"
	OMP_NUM_THREADS=1 build/oldest/bin/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(CORE_TESTS)

browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no chromium and no way to install it here: the JupyterLab test will be skipped"; }

# The probe's cost, side by side with plain training steps (about 40 minutes; run it on an idle machine): the
# package's workloads with every backend, then, on one torch thread, models as other libraries build them with exact
# curvature and GGN next to the two Hessian-vector products users write by hand (external/summary.md).
# Cockpit, the peer row, is installed when it can be; without it the table just lacks that row.
bench: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]" || echo "cockpit-for-pytorch not installed: no peer row"
	@# BackPACK lists torchvision, whose only wheel at torch's pin is a CUDA build: it fails to import on the CPU build
	@# and then breaks transformers' import. BackPACK runs without it.
	$(BIN)/python -m pip uninstall --quiet -y torchvision
	$(BIN)/python benchmarks/overhead.py --out benchmarks/results
	$(BIN)/python benchmarks/overhead.py --out benchmarks/results/external --repeats 5 --no-peer --threads 1 \
		--curvatures hessian,ggn --optimizers adam --workloads gelu_mlp,cnn,resnet,resnet18,vit,gpt2,nanogpt,encoder,lstm,gru

# JupyterLab in the project's environment, on notebooks/, opening 00_explore (as root it needs --allow-root).
lab: install
	$(BIN)/jupyter lab notebooks/00_explore.ipynb $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

clean:
	rm -rf $(VENV) build
