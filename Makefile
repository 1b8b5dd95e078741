# pacsd: `make run` starts the daemon, `make test` runs the whole suite.
# Both set up what they need first (a .venv, and for tests DCMTK and dicom3tools).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite uses as real DICOM peers and validators.
TEST_DEBS := dcmtk dicom3tools
# Debian packages `make bench` runs pacsd against (Orthanc as the distribution ships it).
BENCH_DEBS := orthanc orthanc-dicomweb dcmtk
TEST_TOOLS := /usr/bin/echoscu /usr/bin/storescu /usr/bin/findscu /usr/bin/movescu \
              /usr/bin/getscu /usr/bin/storescp /usr/bin/dciodvfy

.PHONY: run test bench venv test-deps bench-deps system-deps clean help

help:
	@echo "make run    create .venv, install pacsd, start it on embedded defaults"
	@echo "            (AE PACSD, DICOM port 11112, DICOMweb on 127.0.0.1:8042, data in ./var)"
	@echo "make test   install test dependencies (Python extras, DCMTK, dicom3tools), run all tests"
	@echo "make bench  install Orthanc and DCMTK if missing, run pacsd side by side with them"
	@echo "            (5-12 min; see bench/README.md; BENCH_ARGS='--only small,huge' for a subset)"
	@echo "make clean  remove .venv and ./var"

run: $(BIN)/.installed
	$(BIN)/pacsd serve $(if $(CONFIG),--config $(CONFIG))

test: $(BIN)/.installed-test test-deps
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed-test bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

venv: $(BIN)/.installed

# python3 -m venv needs Debian's python3-venv; install it when it is missing.
system-deps:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pacsd needs Python >= 3.11"'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }

$(BIN)/.installed: pyproject.toml | system-deps
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

test-deps:
	@missing=""; for t in $(TEST_TOOLS); do [ -x $$t ] || missing=yes; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(TEST_DEBS) from Debian packages"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_DEBS) >/dev/null; \
	fi

bench-deps:
	@missing=""; for p in $(BENCH_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q ' installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing from Debian packages"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) var *.egg-info
