# caddy-llm-gateway: Caddy with the LLM gateway module.
GO       ?= go
BIN      := bin/caddy
FUZZTIME ?= 10s
BENCH_FLAGS ?=

.PHONY: build run test test-unit fuzz bench lint clean agents

## build: Caddy with the gateway and the mock backends, as bin/caddy
build:
	$(GO) build -o $(BIN) ./cmd/caddy

## run: the gateway on http://localhost:8080 with the embedded store (./data) and mock backends
run: build
	$(BIN) run --config Caddyfile.example --adapter caddyfile

## test: everything CI runs: vet, formatting, the race-checked test suite, and a short fuzz of every parser
test: lint test-unit fuzz

# Test artefacts (the browser test's screenshots) are kept under test-artifacts/.
test-unit:
	@mkdir -p test-artifacts
	$(GO) test -race -count=1 -timeout 30m -artifacts -outputdir $(CURDIR)/test-artifacts ./...
	# Allocation counts are read without the race detector (its sync.Pool drops items at random).
	$(GO) test -count=1 -run '^TestAllocationBudget$$' ./caddymodule/

## fuzz: each fuzz target for FUZZTIME (seed corpora are also run by test-unit). Go's engine
## fails runs that found nothing: "context deadline exceeded" when the time ends while a worker
## minimises, and "fuzzing process hung or terminated unexpectedly" with an input written that
## does not fail (golang/go#56238, #52569). So a failed run is judged by its input: one written
## and failing again on its own, or taking more than the engine's 10 s an input, fails the
## target (it stays in testdata/fuzz for the seed corpus); none written, or one that passes on
## its own (deleted), and the target is fuzzed once more, whose failure fails.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$f"; \
	    if $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg > fuzz.out 2>&1; then \
	      tail -n 2 fuzz.out; continue; fi; \
	    cat fuzz.out; \
	    input=$$(sed -n 's|.*Failing input written to testdata/fuzz/[^/]*/\([0-9a-f]*\)$$|\1|p' fuzz.out | head -n 1); \
	    if [ -n "$$input" ]; then \
	      if $(GO) test -count=1 -timeout 10s -run "^$$f/$$input\$$" $$pkg; then \
	        echo "fuzz $$pkg $$f: input $$input passes on its own: the engine's report, not a finding"; \
	        rm -f "$$($(GO) list -f '{{.Dir}}' $$pkg)/testdata/fuzz/$$f/$$input"; \
	      else rm -f fuzz.out; exit 1; fi; \
	    fi; \
	    echo "fuzz $$pkg $$f: once more"; \
	    $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done; rm -f fuzz.out

## bench: the gateway beside plain Caddy reverse_proxy and the backend directly, in front of the mock and of the foreign fake (see README)
bench: build
	$(GO) run ./cmd/llmbench -caddy $(BIN) -rate-limits $(BENCH_FLAGS)

## agents: Claude Code and Codex CLI for the agent tests, at the versions .ci/agents pins, into $LLM_GATEWAY_AGENTS_DIR (default ~/.cache/llm-gateway-agents)
agents:
	@./.ci/agents

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin data test-artifacts
