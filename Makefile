# Developer entry points. Everything real lives in scripts/; this file only names it.
PY ?= .venv/bin/python

.PHONY: setup demo test test-unit test-integration proto bench gpu-bundle

setup:            ## install system packages, containerd 1.7/2.1, runc, CRIU 4, the venv
	bash scripts/setup.sh

demo: setup       ## counter container under containerd with the kybernate runtime
	bash scripts/demo.sh

test:             ## the whole suite (what .ci/run calls)
	bash scripts/test.sh

test-unit:
	$(PY) -m pytest -q tests/unit

test-integration:
	$(PY) -m pytest -q tests/integration

proto:            ## regenerate proto/ modules with the pinned grpcio-tools
	bash scripts/gen-proto.sh

bench:           ## side-by-side benchmarks on this machine (GPU ones run on the GPU machine)
	$(PY) bench/ttrpc_bench.py
	$(PY) bench/shim_bench.py
	$(PY) bench/checkpoint_bench.py

gpu-bundle:       ## what the GPU machine lacks, compressed, for tests/gpu
	bash scripts/gpu-bundle.sh
