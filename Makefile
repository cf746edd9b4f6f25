# Two environments, never one: the backend venv (.venv: torch, open_clip, rasterio, numpy 2) and
# QGIS's own Python (Debian /usr/bin/python3) with a test venv (.venv-qgis: pytest, pytest-qgis).
PYTHON ?= python3
VENV := .venv
QVENV := .venv-qgis
BACKEND := $(VENV)/.installed
QGIS := $(QVENV)/.installed
DEMO_OUT := demo-output
DEMO_MODEL ?= farslip2-vit-b-16

.PHONY: setup demo test test-backend test-backend-1 test-backend-2 test-plugin screenshot bench plugin install-backend lint clean

setup: $(BACKEND) $(QGIS)

# backend/__init__.py holds the version the installed package reports.
$(BACKEND): pyproject.toml backend/__init__.py
	scripts/ensure_venv.sh $(PYTHON)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-compile -e '.[dev,sam,cpu-runtimes,ray,benchmarks]'
	@# pip byte-compiles its 18,000 files on one core (75 s); compileall uses every core (40 s on two). Like pip,
	@# it passes over the few files of the packages that are not Python 3 (templates, old tests): exit 1 then.
	$(VENV)/bin/python -m compileall -qq -j 0 "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	touch $@

$(QGIS): scripts/setup_qgis.sh Makefile
	scripts/setup_qgis.sh
	test -x $(QVENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(QVENV)
	$(QVENV)/bin/pip install -q pytest pytest-qgis pytest-timeout
	touch $@

demo: $(BACKEND)
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/farslip segment resources/sample/naip_2020_5m_crop.tif --preset landcover --model $(DEMO_MODEL) \
		--out $(DEMO_OUT)/landcover.gpkg --class-raster $(DEMO_OUT)/landcover.tif --overwrite

# The lint (so CI, .ci/run -> make test, fails on a type or style error too), the backend suite in two halves
# and the plugin suite, side by side: each suite mostly waits on the programs, servers and Ray it starts (one
# pytest keeps 0.6 of two cores busy). Each one's output is printed whole when it ends (-O); any failure fails
# make test, after the others have ended.
test: $(BACKEND)
	$(MAKE) --no-print-directory -j3 -O lint test-backend-1 test-backend-2 test-plugin

# The halves, of about equal time side by side (2 cores): the engine, training, command-line and HTTP server
# tests; the runs on Ray (which slow most when they share the cores) and the server's start and stop.
E2E_TESTS := $(sort $(wildcard tests/e2e/test_*.py))
E2E_TESTS_2 := $(filter tests/e2e/test_ray% tests/e2e/test_server_ray.py tests/e2e/test_server_lifecycle.py \
	tests/e2e/test_cli_bad_text_and_crs.py,$(E2E_TESTS))
BACKEND_TESTS_1 := tests/architecture tests/backend tests/training $(filter-out $(E2E_TESTS_2),$(E2E_TESTS))
BACKEND_TESTS_2 := tests/scale $(E2E_TESTS_2)

test-backend: test-backend-1 test-backend-2

test-backend-1: $(BACKEND)
	$(VENV)/bin/python -m pytest --durations=15 $(BACKEND_TESTS_1)

test-backend-2: $(BACKEND)
	$(VENV)/bin/python -m pytest --durations=15 $(BACKEND_TESTS_2)

test-plugin: $(BACKEND) $(QGIS)
	QT_QPA_PLATFORM=offscreen $(QVENV)/bin/python -m pytest --durations=15 tests/plugin

# The README picture: the plugin test renders it into build/ (test runs never touch docs/); this copies it.
screenshot: $(BACKEND) $(QGIS)
	QT_QPA_PLATFORM=offscreen $(QVENV)/bin/python -m pytest tests/plugin/test_end_to_end.py -k screenshot
	cp build/screenshot.png docs/screenshot.png

bench: $(BACKEND)
	$(VENV)/bin/farslip bench

# The plugin zip with the backend wheel inside, for the plugin's "Install backend..." dialog.
plugin: $(BACKEND)
	rm -rf build/wheel
	$(VENV)/bin/python -m pip wheel -q --no-deps --no-build-isolation -w build/wheel .
	/usr/bin/env python3 scripts/build_plugin.py --wheel "$$(ls build/wheel/farslip_qgis-*.whl)"

# The backend where the QGIS plugin looks for it by default (~/.farslip/venv/bin/farslip).
BACKEND_HOME ?= $(HOME)/.farslip/venv
install-backend:
	scripts/ensure_venv.sh $(PYTHON)
	test -x $(BACKEND_HOME)/bin/python || $(PYTHON) -m venv $(BACKEND_HOME)
	$(BACKEND_HOME)/bin/pip install -q .
	$(BACKEND_HOME)/bin/farslip version

lint: $(BACKEND)
	$(VENV)/bin/ruff check backend training tests qgis_farslip scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(DEMO_OUT) dist
