# tarn's verbs. `make test` and `make demo` work on a fresh Debian machine as
# root with only cargo installed: they install the packages they need first.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO ?= cargo
TESTBED_DIR ?= .testbed
# The one place the built binaries are found: by the tests
# (integration/src/bins.rs), the test bed, the demo and the benchmark.
TARN_BIN_DIR ?= $(CURDIR)/target/release
export TARN_BIN_DIR

.PHONY: all setup deps build images test demo bench lint fuzz testbed-up testbed-down

all: build

setup: deps build

deps:
	scripts/install-deps.sh

build:
	$(CARGO) build --release --workspace

# Test images are built once into a cache kept between runs
# ($$TARN_IMAGE_CACHE, default /var/cache/tarn-images).
images: deps
	scripts/images.sh build

test: setup images
	$(CARGO) test --release --workspace --no-fail-fast

demo: setup images
	scripts/demo.sh

# PROFILES=loopback,rtt50,rtt100,rtt200 (default all); results in bench/.
bench: setup images
	scripts/install-deps.sh --bench
	scripts/bench.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if command -v shellcheck >/dev/null; then shellcheck scripts/*.sh .ci/run; \
	else echo "lint: shellcheck not installed (make deps)" >&2; exit 1; fi

# cargo-fuzz targets of the eStargz decoders (fuzz/), FUZZ_SECONDS each
# (default 60); needs the nightly toolchain, installs cargo-fuzz if missing.
fuzz:
	scripts/fuzz.sh

testbed-up: build
	scripts/testbed.sh up $(TESTBED_DIR) --all

testbed-down:
	scripts/testbed.sh down $(TESTBED_DIR)
	rm -rf $(TESTBED_DIR)
