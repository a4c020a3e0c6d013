# Set-up and everyday commands. `make run` and `make test` each install what is missing
# (Debian packages through apt-get, Python packages into .venv) and then do their job.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/imageshare.ini
PYTEST_ARGS ?=
# Debian 12 packages: the OpenJPEG library and tools, the JPIP decoder/transcoder (used to
# validate streams), OpenJPEG's Java JPIP viewer (it pulls in a JRE with AWT) run headless
# under Xvfb, screenshot with xwd (x11-apps), in a namespace set up with ip (iproute2),
# dcmtk (storescu and friends), dicom3tools (dciodvfy), Orthanc (a PACS retrieving from us) and
# rsyslog with its TLS driver (a real audit record repository in tests/integration/test_audit_syslog.py).
APT_PACKAGES = python3-venv libopenjp2-7 libopenjp2-tools libopenjpip-dec-server libopenjpip-viewer xvfb x11-apps iproute2 dcmtk dicom3tools orthanc rsyslog rsyslog-gnutls
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP = $(VENV)/.installed

.PHONY: run test system-deps venv clean

run: system-deps $(STAMP)
	$(VENV)/bin/twistd -n imageshare --config $(CONFIG)

test: system-deps $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

system-deps:
	@if command -v dpkg-query >/dev/null 2>&1; then \
	  missing=""; \
	  for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	  fi; \
	else \
	  echo "not a Debian system: install the equivalents of $(APT_PACKAGES) yourself"; \
	fi

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(VENV)/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
