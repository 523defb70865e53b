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

.PHONY: all setup deps build images test upgrade-bin go-tools demo bench lint fuzz testbed-up testbed-down

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

test: setup images upgrade-bin go-tools
	$(CARGO) test --release --workspace --no-fail-fast

# The test bed's Go tools (integration/go/), built offline with Debian's Go
# into $(TARN_BIN_DIR): estargz-verify, the reference reader's check of the
# eStargz blobs `tarn convert` writes.
go-tools: deps
	scripts/go-tools.sh $(TARN_BIN_DIR)

# A second build of the daemon, told apart by its version (TARN_BUILD_TAG),
# in $(TARN_BIN_DIR)/upgrade: integration/tests/survive.rs upgrades a running
# daemon to it. Only the crate reading the tag (the daemon's binary) is
# rebuilt, twice: tagged, then untagged again (`cargo test` would not
# rebuild it). The whole workspace is named so that dependencies keep their
# features.
upgrade-bin: build
	TARN_BUILD_TAG=$$($(CARGO) pkgid -p tarn-snapshotter | sed 's/.*[#@]//')+upgrade-test \
	  $(CARGO) build --release --workspace
	mkdir -p $(TARN_BIN_DIR)/upgrade
	cp $(TARN_BIN_DIR)/tarn-snapshotter $(TARN_BIN_DIR)/upgrade/tarn-snapshotter
	$(CARGO) build --release --workspace

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
