# pilotys-whisper: `make demo` provisions a local disposable host and transcribes a sample over HTTPS;
# `make test` runs every test. Both install what they need (Debian packages, a virtualenv, the model).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

export PILOTYS_WHISPER_CACHE ?= $(HOME)/.cache/pilotys-whisper
PYTHON ?= python3
# The virtualenv lives in the cache, keyed by its requirements, so a fresh clone reuses it.
REQ_HASH := $(shell cat requirements/dev.txt service/constraints.txt | sha256sum | cut -c1-12)
VENV := $(PILOTYS_WHISPER_CACHE)/venv-$(REQ_HASH)
BIN := $(VENV)/bin
ASSETS := $(PILOTYS_WHISPER_CACHE)/assets
export PILOTYS_WHISPER_ASSETS := $(ASSETS)
export PATH := $(BIN):$(PATH)
# Ansible reads ./ansible.cfg; keep its runtime files out of the home directory and the tree.
export ANSIBLE_HOME := $(PILOTYS_WHISPER_CACHE)/ansible-home

.PHONY: help deps venv assets lint unit test-service test-ansible molecule test demo demo-down bench clean

help:
	@echo "make demo       provision a local disposable host and transcribe a sample over HTTPS"
	@echo "make demo-down  remove the demo host"
	@echo "make test       every test: lint, unit and service tests, Molecule on a disposable host"
	@echo "make bench      speed and memory benchmark against the original openai-whisper server"

deps:
	@scripts/install-host-deps

$(BIN)/.ready: requirements/dev.txt service/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

venv: deps $(BIN)/.ready
	@ln -sfn $(VENV) .venv

assets: deps
	@$(PYTHON) scripts/fetch-assets >/dev/null

lint: venv
	yamllint --strict .
	ansible-lint
	ruff check service scripts/fetch-assets bench tests
	shellcheck scripts/install-host-deps rig/rig tests/rig/*.sh

unit: test-service test-ansible

test-service: venv assets
	cd service && python -m pytest -q

test-ansible: venv
	python -m pytest -q tests/ansible

molecule: venv assets
	molecule test --scenario-name default

test: lint unit molecule

demo: venv assets
	scripts/demo up

demo-down:
	scripts/demo down

bench: venv assets
	bench/run

clean:
	rm -f .venv
