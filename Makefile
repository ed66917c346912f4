# The README's commands. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3

.PHONY: install test test-go test-python demo

install:  ## build the Go engine and install the package with its test extras (editable)
	$(PYTHON) -m pip install -e '.[test]'

test: test-go test-python  ## the whole suite: Go (with -race) then Python

test-go:
	go vet ./...
	go test -race ./...

test-python:
	$(PYTHON) -m pytest -q tests

demo:  ## the main job on its built-in default (all-MiniLM-L6-v2, offline)
	peft-loraone
