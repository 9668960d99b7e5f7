# The two commands a new user needs (see README.md):
#   make run    install everything, start a local dev cluster in ./devcluster and print how to use it
#   make test   install everything, then lint, type-check and run the default test suite
VENV := .venv/bin
DEVDIR ?= devcluster
CHUNKS ?= 3

.PHONY: setup run down test lint unit kernel compose-test soak bench clean csi-proto

setup:
	@./scripts/setup.sh

run: setup
	$(VENV)/lunastor dev up --chunks $(CHUNKS) --dir $(DEVDIR) --demo

down:
	$(VENV)/lunastor dev down --dir $(DEVDIR)

lint: setup
	$(VENV)/ruff check lunastor tests bench
	$(VENV)/ruff format --check lunastor tests bench
	$(VENV)/mypy
	$(VENV)/mypy bench

test: lint
	$(VENV)/pytest -q --ignore=tests/kernel --ignore=tests/compose

# The Linux kernel initiator (open-iscsi) in QEMU guests: one line per scenario with timings,
# then the harness's own tests. Needs root (network namespaces, tap devices).
kernel: setup
	PYTHONPATH=. $(VENV)/python -m tests.kernel
	$(VENV)/pytest -q tests/kernel -k "not test_scenario"

# docker-compose.yml run for real (tests/compose): images built from nothing where they are
# absent, the containers as hosts, kills, a network partition, a restart; one line per scenario.
# Needs a Docker engine with Compose (`docker compose` or `docker-compose`).
compose-test: setup
	timeout -s INT -k 60 1800 $(VENV)/pytest -q -p no:cacheprovider tests/compose

unit: setup
	$(VENV)/pytest -q tests/unit

soak: setup
	$(VENV)/pytest -q -m soak -p no:cacheprovider --override-ini addopts=

# lunastor against tgt and GlusterFS replica 3, one client, one run (docs/benchmarks.md);
# scripts/bench-setup.sh installs what only the bench needs (GlusterFS)
bench: setup
	./scripts/bench-setup.sh
	$(VENV)/python -m bench

# Regenerate the committed protobuf code of the CSI driver after editing its .proto
# (tests/unit/test_csi_requests.py fails while it is stale).
csi-proto: setup
	cd lunastor/csi && ../../$(VENV)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. csi.proto

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build *.egg-info
