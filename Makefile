# kdump-mkinitrd: set-up, tests and checks. `make test` and `make demo` work on a fresh
# Debian machine: they install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
# What the tests, qemu-test and the bench are slow to make (kernels, guest system images,
# downloaded packages): one folder per machine, so a fresh clone or a worktree reuses it.
KDUMP_TEST_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kdump-mkinitrd-test
export KDUMP_TEST_CACHE
KERNEL_CACHE := $(KDUMP_TEST_CACHE)/kernels
# Debian kernels the tests boot: 6.1 (plain .ko) and 6.12 (.ko.xz, some virtio built in).
KERNEL_61 := 6.1.0-56-amd64
KERNEL_612 := 6.12.117+deb12-amd64
KERNELS := $(KERNEL_61) $(KERNEL_612)
# Cross builds (`build --arch arm64 --sysroot DIR`, issue 17): Debian's arm64 kernel, and a root
# tree of arm64 packages the image's programs and libraries come from; its path is recorded in
# $(SYSROOTS)/arm64.path for the tests and qemu-test --arch arm64.
KERNEL_61_ARM64 := 6.1.0-56-arm64
SYSROOTS := $(KDUMP_TEST_CACHE)/sysroots
SYSROOT_ARM64_PACKAGES := busybox-static makedumpfile kexec-tools python3 python3-yaml \
	python3-jinja2 python3-pyelftools python3-construct python3-zstandard
# qemu-user-static runs another architecture's programs in a cross build; qemu-system-arm
# boots qemu-test's arm64 guests.
DEBS := python3-venv busybox-static kexec-tools makedumpfile qemu-system-x86 qemu-system-arm \
	cpio e2fsprogs xfsprogs btrfs-progs fdisk libarchive-tools zstd xz-utils kmod \
	openssh-client openssh-server dropbear-bin nfs-ganesha nfs-ganesha-vfs rpcbind crash \
	lvm2 mdadm cryptsetup-bin squashfs-tools qemu-user-static
# What only the tests need, so that none of them skips on a fresh machine: gcc and libc6-dev
# build the resolver's RPATH/RUNPATH/$ORIGIN fixtures and fake old-glibc roots, gdb reads the
# collector's ELF output, Debian's java is a real DT_RPATH $ORIGIN program for the resolver, groff
# renders the man pages, systemd brings kernel-install and systemd-analyze, iproute2 the network
# tests' `ip`, binutils' objcopy and systemd-boot-efi's stub a real UKI, thin-provisioning-tools
# the guests' thin pools; dpkg-dev, debhelper, dh-python and lintian build and check the .deb,
# mmdebstrap makes the Debian systems it is installed into (a chroot, a booted guest) and
# qemu-utils' qemu-img their overlays. lvm2, mdadm and cryptsetup-bin (in DEBS: images pack
# them for stacked targets) also build the stacks the tests capture onto.
TEST_DEBS := gcc libc6-dev gdb openjdk-17-jre-headless groff-base systemd iproute2 \
	binutils systemd-boot-efi thin-provisioning-tools dpkg-dev debhelper dh-python lintian \
	mmdebstrap qemu-utils

export KDUMP_TEST_KERNEL_CACHE := $(abspath $(KERNEL_CACHE))

DEMO_KVER := $(KERNEL_61)

.PHONY: setup debs venv kernels kernels-arm64 sysroot-arm64 test lint demo clean

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

kernels-arm64: debs
	@scripts/fetch-kernel $(KERNEL_61_ARM64) $(KERNEL_CACHE)

# make-sysroot prints the tree's content-keyed path; the record is replaced atomically.
sysroot-arm64: debs
	@mkdir -p $(SYSROOTS)
	@path=$$(scripts/make-sysroot arm64 $(SYSROOTS) $(SYSROOT_ARM64_PACKAGES)) && \
		echo "$$path" > $(SYSROOTS)/.arm64.path.$$$$ && \
		mv $(SYSROOTS)/.arm64.path.$$$$ $(SYSROOTS)/arm64.path && echo "$$path"

# -rs: every skipped test is listed with its reason; --durations: the slowest, which
# conftest.py's ordering starts first. -n: independent tests (most of them QEMU guests, one
# TCG thread each) run in parallel, one worker per core unless TEST_WORKERS says; worksteal:
# a worker that runs out of tests takes some from the other's queue (with plain load
# scheduling one core sat idle at the end of the run while the other worked through its
# queue of QEMU tests).
TEST_WORKERS ?= auto
test: setup kernels kernels-arm64 sysroot-arm64
	@scripts/install-debs $(TEST_DEBS)
	$(BIN)/pytest -q -rs -n $(TEST_WORKERS) --dist worksteal --durations=25

# The main job: build a capture image for a Debian kernel, crash a QEMU guest running that
# kernel, capture the dump, check it, print a summary. ARCH=arm64: the same on Debian's arm64
# kernel in qemu-system-aarch64, the image cross-built from an arm64 sysroot.
# (ARCH may come from the environment, as kernel developers set it: Debian's and the
# kernel's names are both taken.)
ARCH ?= amd64
ifneq ($(filter arm64 aarch64,$(ARCH)),)
DEMO_KVER := $(KERNEL_61_ARM64)
DEMO_NEEDS := kernels-arm64 sysroot-arm64
DEMO_ARCH = --arch arm64 --sysroot "$$(cat $(SYSROOTS)/arm64.path)"
else
DEMO_NEEDS := kernels
DEMO_ARCH =
endif
DEMO_ROOT = $(KERNEL_CACHE)/$(DEMO_KVER)

demo: setup $(DEMO_NEEDS)
	@case "$(ARCH)" in amd64|x86_64|x86|arm64|aarch64) ;; \
		*) echo "make demo: ARCH=$(ARCH): it runs on amd64 (default) or arm64" >&2; exit 2 ;; esac
	rm -rf $(CACHE)/demo
	$(BIN)/kdump-mkinitrd qemu-test -k $(DEMO_KVER) $(DEMO_ARCH) \
		--kmoddir $(DEMO_ROOT)/lib/modules/$(DEMO_KVER) \
		--kernel $(DEMO_ROOT)/boot/vmlinuz-$(DEMO_KVER) --keep $(CACHE)/demo

lint: venv
	$(BIN)/ruff check builder tests
	$(BIN)/ruff format --check builder tests
	mkdir -p $(CACHE)/typecheck && ln -sfn ../../builder $(CACHE)/typecheck/kdump_mkinitrd
	$(BIN)/mypy

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

# ---- make install [DESTDIR=/tmp/stage] [PREFIX=/usr] ----------------------------------------
# Lays out:
#   $(BINDIR)/kdump-mkinitrd            launcher: $(INSTALL_PYTHON) -I, runs kdump_mkinitrd from PKGLIBDIR
#   $(PKGLIBDIR)/kdump_mkinitrd          the package (builder/ without the QEMU test harness)
#   $(PKGLIBDIR)/{modules.d,templates}   feature modules and templates, beside the package
#   $(KERNELINSTALLDIR)/60-kdump-mkinitrd.install   kernel-install plugin (INSTALL_KERNEL_INSTALL)
#   $(SYSCONFDIR)/kernel/post{inst,rm}.d/kdump-mkinitrd   Debian kernel hooks (INSTALL_DEBIAN_HOOKS)
#   $(SYSTEMDUNITDIR)/kdump-mkinitrd.service    systemd unit (INSTALL_SYSTEMD)
#   $(SYSCONFDIR)/init.d/kdump-mkinitrd         OpenRC (INSTALL_OPENRC) or SysV (INSTALL_SYSVINIT)
#                                               script: one of the two at most, both default no
#   $(MANDIR)/man8/kdump-mkinitrd.8, $(MANDIR)/man5/kdump-mkinitrd.yaml.5
# @BINDIR@ in the unit and init scripts becomes $(BINDIR). Python dependencies are not
# installed: INSTALL_PYTHON must already have them (see pyproject.toml).
# kernel-install reads plugins only from /usr/lib and /etc, whatever PREFIX is.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
PKGLIBDIR ?= $(PREFIX)/lib/kdump-mkinitrd
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
KERNELINSTALLDIR ?= /usr/lib/kernel/install.d
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_KERNEL_INSTALL ?= yes
INSTALL_DEBIAN_HOOKS ?= yes
INSTALL_SYSTEMD ?= yes
INSTALL_OPENRC ?= no
INSTALL_SYSVINIT ?= no
SUBST = sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@PKGLIBDIR@|$(PKGLIBDIR)|g' \
	-e 's|@PYTHON@|$(INSTALL_PYTHON)|g'

.PHONY: install

install:
	@if [ "$(INSTALL_OPENRC)" = yes ] && [ "$(INSTALL_SYSVINIT)" = yes ]; then \
		echo "install: INSTALL_OPENRC and INSTALL_SYSVINIT both install /etc/init.d/kdump-mkinitrd: pick one" >&2; \
		exit 1; \
	fi
	rm -rf '$(DESTDIR)$(PKGLIBDIR)/builder' '$(DESTDIR)$(PKGLIBDIR)/kdump_mkinitrd' \
		'$(DESTDIR)$(PKGLIBDIR)/modules.d' '$(DESTDIR)$(PKGLIBDIR)/templates'
	set -e; for f in $$(find builder modules.d templates -path builder/qemutest -prune \
			-o -name __pycache__ -prune -o -type f ! -name '*.pyc' -print | LC_ALL=C sort); do \
		case "$$f" in builder/*) to="kdump_mkinitrd/$${f#builder/}" ;; *) to="$$f" ;; esac; \
		install -D -m 0644 "$$f" '$(DESTDIR)$(PKGLIBDIR)'/"$$to"; \
	done
	install -d '$(DESTDIR)$(BINDIR)'
	$(SUBST) system/kdump-mkinitrd.in > '$(DESTDIR)$(BINDIR)/kdump-mkinitrd'
	chmod 0755 '$(DESTDIR)$(BINDIR)/kdump-mkinitrd'
	install -D -m 0644 system/man/kdump-mkinitrd.8 '$(DESTDIR)$(MANDIR)/man8/kdump-mkinitrd.8'
	install -D -m 0644 system/man/kdump-mkinitrd.yaml.5 \
		'$(DESTDIR)$(MANDIR)/man5/kdump-mkinitrd.yaml.5'
ifeq ($(INSTALL_KERNEL_INSTALL),yes)
	install -D -m 0755 system/kernel-install/60-kdump-mkinitrd.install \
		'$(DESTDIR)$(KERNELINSTALLDIR)/60-kdump-mkinitrd.install'
endif
ifeq ($(INSTALL_DEBIAN_HOOKS),yes)
	install -D -m 0755 system/debian/postinst.d/kdump-mkinitrd \
		'$(DESTDIR)$(SYSCONFDIR)/kernel/postinst.d/kdump-mkinitrd'
	install -D -m 0755 system/debian/postrm.d/kdump-mkinitrd \
		'$(DESTDIR)$(SYSCONFDIR)/kernel/postrm.d/kdump-mkinitrd'
endif
ifeq ($(INSTALL_SYSTEMD),yes)
	install -d '$(DESTDIR)$(SYSTEMDUNITDIR)'
	$(SUBST) system/systemd/kdump-mkinitrd.service \
		> '$(DESTDIR)$(SYSTEMDUNITDIR)/kdump-mkinitrd.service'
	chmod 0644 '$(DESTDIR)$(SYSTEMDUNITDIR)/kdump-mkinitrd.service'
endif
ifeq ($(INSTALL_OPENRC),yes)
	install -d '$(DESTDIR)$(SYSCONFDIR)/init.d'
	$(SUBST) system/openrc/kdump-mkinitrd > '$(DESTDIR)$(SYSCONFDIR)/init.d/kdump-mkinitrd'
	chmod 0755 '$(DESTDIR)$(SYSCONFDIR)/init.d/kdump-mkinitrd'
endif
ifeq ($(INSTALL_SYSVINIT),yes)
	install -d '$(DESTDIR)$(SYSCONFDIR)/init.d'
	$(SUBST) system/sysvinit/kdump-mkinitrd > '$(DESTDIR)$(SYSCONFDIR)/init.d/kdump-mkinitrd'
	chmod 0755 '$(DESTDIR)$(SYSCONFDIR)/init.d/kdump-mkinitrd'
endif

# ---- make deb: build/deb/kdump-mkinitrd_VERSION_all.deb ------------------------------------
# Built with Debian's own tools from debian/ (which runs `make install` above), in a temporary
# copy of the tree. tests/test_deb.py also needs lintian and mmdebstrap.
DEB_DEBS := dpkg-dev debhelper dh-python python3
.PHONY: deb
deb:
	@scripts/install-debs $(DEB_DEBS)
	scripts/build-deb build/deb

# Benchmarks against dracut and makedumpfile (issue 7): writes bench/results.json and
# bench/results.md and prints the table. BENCH_QUICK=1 skips the QEMU parts (crash-memory
# bisection, capture timing); the full run takes a while. BENCH_ONLY=storage runs only the
# stacked-storage part (qemu-test --storage layouts) and merges it into the last results;
# BENCH_ONLY=peer and BENCH_ONLY=curve (crash memory on 1/4/16 GiB guests, about 45 minutes;
# BENCH_CURVE_SIZES, BENCH_CURVE_MINUTES, BENCH_CURVE_LANES bound it), BENCH_ONLY=capture and
# BENCH_ONLY=build (build, size and profile) do the same.
BENCH_DEBS := dracut-core zstd busybox-static makedumpfile kexec-tools openssh-client \
	mmdebstrap qemu-utils dpkg-dev debhelper dh-python
.PHONY: bench
bench: setup kernels kernels-arm64 sysroot-arm64
	@scripts/install-debs $(BENCH_DEBS)
	BENCH_QUICK="$(BENCH_QUICK)" BENCH_ONLY="$(BENCH_ONLY)" $(BIN)/python bench/run.py
