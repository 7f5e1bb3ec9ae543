# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh) setup.py
DEMO_DATA ?= data/synthetic
DEMO_RUN ?= runs/demo

.PHONY: install demo demo-aream test bench clean gpu-check

$(VENV)/.deps: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

# The C++/CUDA extension is compiled against the torch already in the venv.
$(VENV)/.ext: $(VENV)/.deps $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.ext

demo: install
	$(PY) -m wsss.data.synthetic --out $(DEMO_DATA)
	$(PY) -m wsss.train --cfg configs/demo.yaml data.root=$(DEMO_DATA) run_dir=$(DEMO_RUN)
	$(PY) -m wsss.eval --cfg configs/demo.yaml --ckpt $(DEMO_RUN)/checkpoint.pt data.root=$(DEMO_DATA) run_dir=$(DEMO_RUN)

# AReAM on the same data: three trainings (no affinity loss / no entropy weights / full AReAM),
# their pseudo-label table, the layer-wise plot and the affinity statistics in runs/demo_aream/ablation/
demo-aream: install
	$(PY) -m wsss.data.synthetic --out $(DEMO_DATA)
	$(PY) -m wsss.tools.ablation --cfg configs/demo_aream.yaml data.root=$(DEMO_DATA) run_dir=runs/demo_aream

test: install
	$(PY) -m pytest -q tests

# The prepared check for a lent GPU (README "GPU check"): at most 8 minutes, results in
# benchmarks/results/gpu-check.md; it builds wsss._C in place when it is missing. The GPU image has
# torch but no venv, so without .venv it runs under $(PYTHON). GPU_CHECK_ARGS="--out FILE", "--dry-run", ...
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build wsss/_C*.so $(VENV)/.ext
