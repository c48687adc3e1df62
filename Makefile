# The README's two commands: `make run` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUBS  := internvl/serving/v1/serving_pb2.py
MODEL  ?=
DEVICE ?= cpu
PORT   ?= 8000
GRPC_PORT ?= 50050

.PHONY: run test proto tiny-model clean images

$(VENV)/.installed: pyproject.toml setup.py services/gateway/_resample.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

# gRPC stubs from the contract (generated, not committed).
$(STUBS): proto/internvl/serving/v1/serving.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $<

proto: $(STUBS)

# The whole stack on localhost: Redis, vision encoder, LLM decoder, gateway (tiny model unless MODEL= is set).
run: $(STUBS)
	$(PY) -m tools.run_local --device $(DEVICE) --port $(PORT) --grpc-port $(GRPC_PORT) $(if $(MODEL),--model $(MODEL))

# Two processes, a test file each at a time (its module fixtures, the stacks, start once): most tests wait on
# service processes, so two share two cores well (300 s instead of 430 s on a 2-core VM). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STUBS)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

tiny-model: $(VENV)/.installed
	$(PY) -m tools.make_tiny_checkpoint --out .cache/tiny-internvl2_5

clean:
	rm -rf internvl .cache .pytest_cache

# Container images, one per service (deploy/docker/<name>.Dockerfile; the build context is the repository root).
IMAGE_PREFIX ?= internvl-serving-
IMAGE_TAG    ?= dev
IMAGES       := gateway vision_encoder llm_decoder

images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: docker is not on PATH; install Docker (BuildKit) to build deploy/docker/*.Dockerfile" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make images: the docker daemon is not reachable (docker info failed)" >&2; exit 1; }
	@set -e; for name in $(IMAGES); do \
		echo "building $(IMAGE_PREFIX)$$name:$(IMAGE_TAG)"; \
		DOCKER_BUILDKIT=1 docker build --file deploy/docker/$$name.Dockerfile --tag $(IMAGE_PREFIX)$$name:$(IMAGE_TAG) \
			--build-arg VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
			--build-arg VCS_REF=$$(git rev-parse HEAD 2>/dev/null || echo unknown) . ; \
	done
