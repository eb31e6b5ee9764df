# kdump-mkinitrd: set-up, tests and checks. `make test` and `make demo` work on a fresh
# Debian machine: they install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
KERNEL_CACHE := $(CACHE)/kernels
# Debian kernels the tests boot: 6.1 (plain .ko) and 6.12 (.ko.xz, some virtio built in).
KERNEL_61 := 6.1.0-56-amd64
KERNEL_612 := 6.12.117+deb12-amd64
KERNELS := $(KERNEL_61) $(KERNEL_612)
DEBS := python3-venv busybox-static kexec-tools makedumpfile qemu-system-x86 cpio \
	e2fsprogs xfsprogs btrfs-progs fdisk libarchive-tools zstd xz-utils kmod

export KDUMP_TEST_KERNEL_CACHE := $(abspath $(KERNEL_CACHE))

DEMO_KVER := $(KERNEL_61)
DEMO_ROOT := $(KERNEL_CACHE)/$(DEMO_KVER)

.PHONY: setup debs venv kernels test lint demo clean

setup: debs venv

debs:
	@scripts/install-debs $(DEBS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

kernels: debs
	@for k in $(KERNELS); do scripts/fetch-kernel "$$k" $(KERNEL_CACHE) || exit 1; done

test: setup kernels
	$(BIN)/pytest -q

# The main job: build a capture image for a Debian kernel, crash a QEMU guest running that
# kernel, capture the dump, check it, print a summary.
demo: setup kernels
	rm -rf $(CACHE)/demo
	$(BIN)/kdump-mkinitrd qemu-test -k $(DEMO_KVER) \
		--kmoddir $(DEMO_ROOT)/lib/modules/$(DEMO_KVER) \
		--kernel $(DEMO_ROOT)/boot/vmlinuz-$(DEMO_KVER) --keep $(CACHE)/demo

lint: venv
	$(BIN)/ruff check builder tests
	$(BIN)/ruff format --check builder tests
	$(BIN)/mypy

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
