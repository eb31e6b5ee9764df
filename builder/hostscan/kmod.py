"""Resolve the kernel modules an initramfs needs, without calling depmod or modprobe.

Two sources give the same answers:

* ``depmod``: the tree has been through depmod (``modules.dep``, ``modules.alias``,
  ``modules.softdep``); only the modules actually included are opened, for their
  direct dependencies and firmware.
* ``modinfo``: an unpacked, never-installed kernel package has no ``modules.dep``;
  module file names answer name lookups, and every module's ``.modinfo`` is read
  (once, then cached as JSON) only when an alias has to be looked up.

Both read ``modules.builtin`` and ``modules.builtin.modinfo`` for built-in modules.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.modinfo import (
    ModInfo,
    is_module_file,
    module_name_from_path,
    normalise_name,
    parse_softdep,
    plain_ko_path,
    read_modinfo,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 1

# Which copy of a module wins when several directories provide the same name:
# depmod's default search order puts updates/ first, and distributions that use
# extra/ (RHEL, SUSE) rank it above the kernel's own modules.
_DIR_PRIORITY = {"updates": 0, "extra": 1, "kernel": 3, "weak-updates": 4}
_OTHER_DIR_PRIORITY = 2
# Debian points these at the kernel headers: never modules, possibly huge.
_NOT_MODULE_DIRS = frozenset({"build", "source"})
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ResolvedModule:
    name: str
    path: Path
    relpath: str
    depends: tuple[str, ...]
    firmware: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class ModuleClosure:
    modules: tuple[ResolvedModule, ...]
    builtin: tuple[str, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(module.name for module in self.modules)

    def modules_dep(self) -> str:
        """A ``modules.dep`` for exactly these modules, relative plain ``.ko`` paths.

        Each line lists the module's transitive hard dependencies latest-loaded
        first, because modprobe inserts that list back to front.
        """
        by_name = {module.name: module for module in self.modules}
        position = {module.name: index for index, module in enumerate(self.modules)}
        lines = []
        for module in self.modules:
            deps = sorted(_transitive_deps(module.name, by_name), key=position.__getitem__)
            paths = [by_name[dep].relpath for dep in reversed(deps)]
            lines.append(f"{module.relpath}:" + "".join(f" {path}" for path in paths))
        return "".join(line + "\n" for line in lines)


def _transitive_deps(name: str, by_name: Mapping[str, ResolvedModule]) -> set[str]:
    seen: set[str] = set()
    stack = list(by_name[name].depends)
    while stack:
        dep = stack.pop()
        if dep not in seen and dep in by_name:
            seen.add(dep)
            stack.extend(by_name[dep].depends)
    return seen


def normalise_alias(text: str) -> str:
    """'-' and '_' are equivalent in aliases too, except inside ``[...]`` ranges."""
    # Fast paths: this runs for each of ~26000 aliases when a tree has no modules.alias.
    if "-" not in text:
        return text
    if "[" not in text:
        return text.replace("-", "_")
    out: list[str] = []
    in_brackets = False
    for char in text:
        if char == "[":
            in_brackets = True
        elif char == "]":
            in_brackets = False
        out.append("_" if char == "-" and not in_brackets else char)
    return "".join(out)


class _AliasTable:
    """Alias patterns to module names; exact strings by dict, globs by fnmatchcase."""

    def __init__(self) -> None:
        self._exact: dict[str, set[str]] = {}
        # (literal prefix before the first wildcard, pattern, module): the prefix test
        # discards most of the ~20000 device-id globs before fnmatch has to run.
        self._globs: list[tuple[str, str, str]] = []

    def add(self, pattern: str, module: str) -> None:
        pattern = normalise_alias(pattern)
        wildcard = _GLOB_CHARS.search(pattern)
        if wildcard is None:
            self._exact.setdefault(pattern, set()).add(module)
        else:
            self._globs.append((pattern[: wildcard.start()], pattern, module))

    def match(self, text: str) -> tuple[str, ...]:
        key = normalise_alias(text)
        found = set(self._exact.get(key, ()))
        for prefix, pattern, module in self._globs:
            if key.startswith(prefix) and fnmatchcase(key, pattern):
                found.add(module)
        return tuple(sorted(found))


@dataclass(frozen=True)
class _ModuleMeta:
    """What the resolver needs from one module's ``.modinfo``."""

    depends: tuple[str, ...]
    aliases: tuple[str, ...]
    softdeps: tuple[str, ...]
    firmware: tuple[str, ...]

    @classmethod
    def from_modinfo(cls, info: ModInfo) -> _ModuleMeta:
        return cls(
            depends=tuple(dict.fromkeys(normalise_name(dep) for dep in info.depends)),
            aliases=info.aliases,
            softdeps=info.softdeps,
            firmware=tuple(dict.fromkeys(info.firmware)),
        )

    def to_json(self) -> dict[str, list[str]]:
        return {
            "depends": list(self.depends),
            "alias": list(self.aliases),
            "softdep": list(self.softdeps),
            "firmware": list(self.firmware),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> _ModuleMeta:
        return cls(
            depends=_str_tuple(obj["depends"]),
            aliases=_str_tuple(obj["alias"]),
            softdeps=_str_tuple(obj["softdep"]),
            firmware=_str_tuple(obj["firmware"]),
        )


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _read_meta(path: Path) -> _ModuleMeta:
    return _ModuleMeta.from_modinfo(read_modinfo(path))


def _read_meta_or_warn(path: Path) -> _ModuleMeta | None:
    try:
        return _read_meta(path)
    except KdumpError as exc:
        log.warning("skipping unreadable kernel module: %s", exc)
        return None


class _Backend(Protocol):
    source: str

    @property
    def relpaths(self) -> Mapping[str, str]: ...

    def meta(self, name: str) -> _ModuleMeta: ...

    def listed_deps(self, name: str) -> tuple[str, ...]: ...

    def softdeps(self, name: str) -> tuple[str, ...]: ...

    def aliases(self) -> _AliasTable: ...

    def finish(self) -> None: ...


class _DepmodBackend:
    """Answers from depmod's output; modules are opened only for firmware and direct deps."""

    source = "depmod"

    def __init__(self, kmoddir: Path) -> None:
        self._kmoddir = kmoddir
        self._relpaths: dict[str, str] = {}
        self._deps: dict[str, tuple[str, ...]] = {}
        self._softdeps: dict[str, list[str]] = {}
        self._alias_table: _AliasTable | None = None
        self._metas: dict[str, _ModuleMeta] = {}
        self._parse_dep(kmoddir / "modules.dep")
        self._parse_softdep(kmoddir / "modules.softdep")

    @property
    def relpaths(self) -> Mapping[str, str]:
        return self._relpaths

    def _parse_dep(self, path: Path) -> None:
        for line in _read_lines(path):
            target, sep, deps = line.partition(":")
            if not sep:
                continue
            name = module_name_from_path(target)
            self._relpaths[name] = target.strip()
            self._deps[name] = tuple(module_name_from_path(dep) for dep in deps.split())

    def _parse_softdep(self, path: Path) -> None:
        for line in _read_lines(path) if path.exists() else []:
            words = line.split(maxsplit=2)
            if len(words) == 3 and words[0] == "softdep":
                self._softdeps.setdefault(normalise_name(words[1]), []).append(words[2])

    def meta(self, name: str) -> _ModuleMeta:
        if name not in self._metas:
            self._metas[name] = _read_meta(_source_path(self._kmoddir, self._relpaths[name]))
        return self._metas[name]

    def listed_deps(self, name: str) -> tuple[str, ...]:
        return self._deps.get(name, ())

    def softdeps(self, name: str) -> tuple[str, ...]:
        return tuple(self._softdeps.get(name, ()))

    def aliases(self) -> _AliasTable:
        if self._alias_table is None:
            table = _AliasTable()
            path = self._kmoddir / "modules.alias"
            for line in _read_lines(path) if path.exists() else []:
                words = line.split()
                if len(words) == 3 and words[0] == "alias":
                    table.add(words[1], normalise_name(words[2]))
            self._alias_table = table
        return self._alias_table

    def finish(self) -> None:
        """Nothing to persist: depmod's files are the index."""


class _ScanCache:
    """Per-file ``.modinfo`` results of one tree, valid while (size, mtime_ns) match."""

    def __init__(self, path: Path, kver: str, tree: Path) -> None:
        self._path = path
        self._kver = kver
        self._tree = str(tree)
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        if not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            entries = self._validate(data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring unreadable module cache %s: %s", self._path, exc)
            self._dirty = True
            return
        self._entries = entries

    def _validate(self, data: Any) -> dict[str, dict[str, Any]]:
        if data.get("version") != CACHE_VERSION or data.get("tree") != self._tree:
            raise ValueError("written for another tree or cache version")
        entries = data["modules"]
        if not isinstance(entries, dict):
            raise ValueError("'modules' is not a mapping")
        for entry in entries.values():
            _ModuleMeta.from_json(entry)
            if not isinstance(entry["size"], int) or not isinstance(entry["mtime_ns"], int):
                raise ValueError("size/mtime_ns are not integers")
        return entries

    def get(self, relpath: str, stat: os.stat_result) -> _ModuleMeta | None:
        entry = self._entries.get(relpath)
        if entry is None or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            return None
        return _ModuleMeta.from_json(entry)

    def put(self, relpath: str, stat: os.stat_result, meta: _ModuleMeta) -> None:
        self._entries[relpath] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._entries[relpath].update(meta.to_json())
        self._dirty = True

    def keep_only(self, relpaths: Iterable[str]) -> None:
        wanted = set(relpaths)
        stale = [relpath for relpath in self._entries if relpath not in wanted]
        for relpath in stale:
            del self._entries[relpath]
        self._dirty = self._dirty or bool(stale)

    def save(self) -> None:
        if not self._dirty:
            return
        data: dict[str, Any] = {"version": CACHE_VERSION, "kver": self._kver, "tree": self._tree}
        data["modules"] = self._entries
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            # Readers never see half a file, and concurrent builders just overwrite.
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("cannot write module cache %s: %s", self._path, exc)
            tmp.unlink(missing_ok=True)
            return
        self._dirty = False


class _ModinfoBackend:
    """Answers from the module files themselves, for trees depmod never ran on."""

    source = "modinfo"

    def __init__(self, kver: str, kmoddir: Path, cache_dir: Path) -> None:
        self._kmoddir = kmoddir
        self._relpaths = _walk_modules(kmoddir)
        self._metas: dict[str, _ModuleMeta] = {}
        self._alias_table: _AliasTable | None = None
        self._cache_path = _cache_file(cache_dir, kver, kmoddir)
        self._kver = kver
        self._cache: _ScanCache | None = None

    @property
    def relpaths(self) -> Mapping[str, str]:
        return self._relpaths

    def _scan_cache(self) -> _ScanCache:
        # Opened on first use: name-only resolutions of cached trees stay cheap too.
        if self._cache is None:
            self._cache = _ScanCache(self._cache_path, self._kver, self._kmoddir.absolute())
        return self._cache

    def meta(self, name: str) -> _ModuleMeta:
        if name not in self._metas:
            relpath = self._relpaths[name]
            path = _source_path(self._kmoddir, relpath)
            stat = _stat(path)
            meta = self._scan_cache().get(relpath, stat)
            if meta is None:
                meta = _read_meta(path)
                self._scan_cache().put(relpath, stat, meta)
            self._metas[name] = meta
        return self._metas[name]

    def listed_deps(self, name: str) -> tuple[str, ...]:
        return ()

    def softdeps(self, name: str) -> tuple[str, ...]:
        return self.meta(name).softdeps

    def aliases(self) -> _AliasTable:
        if self._alias_table is None:
            self._scan_all()
            table = _AliasTable()
            for name in sorted(self._relpaths):
                meta = self._metas.get(name)
                for alias in meta.aliases if meta else ():
                    table.add(alias, name)
            self._alias_table = table
        return self._alias_table

    def _scan_all(self) -> None:
        cache = self._scan_cache()
        todo: list[tuple[str, str, os.stat_result]] = []
        for name, relpath in self._relpaths.items():
            if name in self._metas:
                continue
            try:
                stat = _stat(_source_path(self._kmoddir, relpath))
            except KdumpError as exc:
                # A dangling weak-updates link, say: fatal only if the module is needed.
                log.warning("skipping kernel module: %s", exc)
                continue
            cached = cache.get(relpath, stat)
            if cached is None:
                todo.append((name, relpath, stat))
            else:
                self._metas[name] = cached
        if todo:
            log.info("reading .modinfo of %d kernel modules in %s", len(todo), self._kmoddir)
        for (name, relpath, stat), meta in zip(todo, self._read_many(todo), strict=True):
            # An unreadable module is left out of the alias table and the cache; it
            # only becomes an error if something actually needs it.
            if meta is not None:
                self._metas[name] = meta
                cache.put(relpath, stat, meta)
        cache.keep_only(self._relpaths.values())
        cache.save()

    def _read_many(
        self, todo: list[tuple[str, str, os.stat_result]]
    ) -> Iterator[_ModuleMeta | None]:
        paths = [_source_path(self._kmoddir, relpath) for _, relpath, _ in todo]
        # xz/zstd release the GIL while inflating: threads nearly halve a .ko.xz scan.
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(_read_meta_or_warn, paths)

    def finish(self) -> None:
        if self._cache is not None:
            self._cache.save()


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KdumpError(f"cannot read {path}: {exc.strerror}") from exc
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise KdumpError(f"cannot read kernel module {path}: {exc.strerror}") from exc


def _source_path(kmoddir: Path, relpath: str) -> Path:
    # depmod writes absolute paths for modules outside its base directory.
    return Path(relpath) if os.path.isabs(relpath) else kmoddir / relpath


def _image_relpath(relpath: str) -> str:
    if os.path.isabs(relpath):
        # Outside the tree: keep it inside the image's tree under extra/.
        return "extra/" + plain_ko_path(os.path.basename(relpath))
    return plain_ko_path(relpath)


def _priority(relpath: str) -> tuple[int, str]:
    top = relpath.split("/", 1)[0]
    return (_DIR_PRIORITY.get(top, _OTHER_DIR_PRIORITY), relpath)


def _walk_modules(kmoddir: Path) -> dict[str, str]:
    """Module name -> relpath of every module file under the tree's subdirectories."""
    found: dict[str, str] = {}
    for top in sorted(os.listdir(kmoddir)):
        # Top-level symlinks are followed (kernel/ may point elsewhere); deeper ones not.
        if top in _NOT_MODULE_DIRS or not (kmoddir / top).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(kmoddir / top):
            dirnames.sort()
            reldir = Path(dirpath).relative_to(kmoddir).as_posix()
            for filename in filenames:
                if not is_module_file(filename):
                    continue
                relpath = f"{reldir}/{filename}"
                name = module_name_from_path(filename)
                if name not in found or _priority(relpath) < _priority(found[name]):
                    found[name] = relpath
    return found


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "kdump-mkinitrd"
    # Root's builds are the system's (the boot service, the kernel hooks): their cache belongs
    # in /var/cache, where the package's purge finds it, not in root's home.
    if os.geteuid() == 0:
        return Path("/var/cache/kdump-mkinitrd")
    return Path.home() / ".cache" / "kdump-mkinitrd"


def _cache_file(cache_dir: Path, kver: str, kmoddir: Path) -> Path:
    digest = hashlib.sha256(str(kmoddir.absolute()).encode()).hexdigest()[:16]
    safe_kver = re.sub(r"[^A-Za-z0-9.+_-]", "_", kver)
    return cache_dir / f"modinfo-{safe_kver}-{digest}.json"


@dataclass(frozen=True)
class _Builtins:
    names: frozenset[str]
    aliases: _AliasTable
    softdeps: Mapping[str, tuple[str, ...]]

    @classmethod
    def load(cls, kmoddir: Path) -> _Builtins:
        names: set[str] = set()
        path = kmoddir / "modules.builtin"
        for line in _read_lines(path) if path.exists() else []:
            names.add(module_name_from_path(line.strip()))
        aliases = _AliasTable()
        softdeps: dict[str, list[str]] = {}
        for module, key, value in _builtin_modinfo(kmoddir / "modules.builtin.modinfo"):
            if key == "file":
                names.add(module)
            elif key == "alias":
                aliases.add(value, module)
            elif key == "softdep":
                softdeps.setdefault(module, []).append(value)
        frozen = {module: tuple(values) for module, values in softdeps.items()}
        return cls(frozenset(names), aliases, frozen)


def _builtin_modinfo(path: Path) -> Iterator[tuple[str, str, str]]:
    """(module, key, value) from NUL-separated ``module.key=value`` records."""
    if not path.exists():
        return
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise KdumpError(f"cannot read {path}: {exc.strerror}") from exc
    for record in blob.decode("utf-8", "replace").split("\0"):
        qualified, sep, value = record.partition("=")
        module, dot, key = qualified.partition(".")
        if sep and dot:
            yield normalise_name(module), key, value


@dataclass(frozen=True)
class ModuleLookup:
    """What one name, alias or modalias stands for; false when it matches nothing."""

    modules: tuple[str, ...] = ()
    builtin: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.modules or self.builtin)


class ModuleIndex:
    """The modules of one kernel tree, and how they depend on each other."""

    def __init__(self, kver: str, kmoddir: Path, backend: _Backend, builtins: _Builtins) -> None:
        self.kver = kver
        self.kmoddir = kmoddir
        self.source = backend.source
        self._backend = backend
        self._builtins = builtins

    @classmethod
    def load(cls, kver: str, kmoddir: Path, cache_dir: Path | None = None) -> ModuleIndex:
        if not kmoddir.is_dir():
            raise KdumpError(f"kernel module directory {kmoddir} for kernel {kver} does not exist")
        backend: _Backend
        if (kmoddir / "modules.dep").is_file():
            backend = _DepmodBackend(kmoddir)
        else:
            backend = _ModinfoBackend(kver, kmoddir, cache_dir or default_cache_dir())
        return cls(kver, kmoddir, backend, _Builtins.load(kmoddir))

    def resolve(self, requests: Iterable[tuple[str, str]]) -> ModuleClosure:
        """Everything needed to load the requested modules, in load order.

        ``requests`` are (module name, alias or modalias; who asked) pairs.
        """
        builder = _ClosureBuilder(self, self._backend, self._builtins)
        for rank, (request, who) in enumerate(requests):
            builder.add_request(request, who, rank)
        closure = builder.build()
        self._backend.finish()
        return closure

    def lookup(self, text: str) -> ModuleLookup:
        """Modules and built-ins a name, alias or modalias stands for, modprobe's way.

        Names come first so that only a real alias forces the full modinfo scan, then
        module aliases, then built-in aliases (modprobe picks ``sha256_ssse3`` over the
        built-in ``sha256_generic`` for ``crypto-sha256``).
        """
        name = normalise_name(text)
        if name in self._backend.relpaths:
            return ModuleLookup(modules=(name,))
        if name in self._builtins.names:
            return ModuleLookup(builtin=(name,))
        modules = self._backend.aliases().match(text)
        if modules:
            return ModuleLookup(modules=modules)
        return ModuleLookup(builtin=self._builtins.aliases.match(text))


@dataclass
class _Node:
    why: str
    rank: int
    hard: tuple[str, ...] = ()
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)


class _ClosureBuilder:
    """Depth-first walk from the requests; the first path to reach a module names its why."""

    def __init__(self, index: ModuleIndex, backend: _Backend, builtins: _Builtins) -> None:
        self._index = index
        self._backend = backend
        self._builtins = builtins
        self._nodes: dict[str, _Node] = {}
        self._builtin_seen: set[str] = set()

    def add_request(self, request: str, who: str, rank: int) -> None:
        found = self._index.lookup(request)
        if not found:
            raise KdumpError(
                f"kernel module {request!r} not found for kernel {self._index.kver} "
                f"in {self._index.kmoddir} (not by name, alias or built-in module)"
            )
        for name in found.builtin:
            self._visit_builtin(name, rank)
        for name in found.modules:
            self._visit(name, f"requested as {request!r} by {who}", rank)

    def _visit(self, name: str, why: str, rank: int) -> None:
        if name in self._nodes:
            return
        node = self._nodes[name] = _Node(why, rank)
        node.hard = self._hard_deps(name, rank)
        pre, post = self._softdeps(name, self._backend.softdeps(name), rank)
        node.pre, node.post = pre, post

    def _hard_deps(self, name: str, rank: int) -> tuple[str, ...]:
        modules: list[str] = []
        meta = self._backend.meta(name)
        # modules.dep's (transitive) list only adds anything when the tree is
        # inconsistent: visiting it after depends= keeps both sources' whys equal.
        for dep in dict.fromkeys(meta.depends + self._backend.listed_deps(name)):
            if dep in self._backend.relpaths:
                self._visit(dep, f"dependency of {name}", rank)
                modules.append(dep)
            elif dep in self._builtins.names:
                self._visit_builtin(dep, rank)
            else:
                raise KdumpError(
                    f"kernel module {name!r} depends on {dep!r}, which is not found "
                    f"for kernel {self._index.kver} in {self._index.kmoddir}"
                )
        return tuple(modules)

    def _visit_builtin(self, name: str, rank: int) -> None:
        if name in self._builtin_seen:
            return
        self._builtin_seen.add(name)
        # A built-in's softdeps (crypto_algapi's "pre: cryptomgr") can name modules.
        self._softdeps(name, self._builtins.softdeps.get(name, ()), rank)

    def _softdeps(
        self, owner: str, values: Iterable[str], rank: int
    ) -> tuple[list[str], list[str]]:
        # All softdep entries count, although kmod 30 honours only a module's first
        # one (kmod issue #33): the module asked for every one of them.
        pre: list[str] = []
        post: list[str] = []
        for value in values:
            targets_pre, targets_post = parse_softdep(value)
            for kind, targets, into in (("pre", targets_pre, pre), ("post", targets_post, post)):
                for target in targets:
                    into.extend(self._visit_softdep(owner, kind, target, rank))
        return list(dict.fromkeys(pre)), list(dict.fromkeys(post))

    def _visit_softdep(self, owner: str, kind: str, target: str, rank: int) -> tuple[str, ...]:
        found = self._index.lookup(target)
        if not found:
            # modprobe skips these too; they are optional by definition.
            log.warning(
                "softdep %s %r of module %s not found for kernel %s; skipped",
                kind,
                target,
                owner,
                self._index.kver,
            )
        for name in found.builtin:
            self._visit_builtin(name, rank)
        for name in found.modules:
            self._visit(name, f"softdep {kind} of {owner}", rank)
        return found.modules

    def build(self) -> ModuleClosure:
        order = _load_order(self._nodes)
        modules = tuple(self._resolved(name) for name in order)
        return ModuleClosure(modules=modules, builtin=tuple(sorted(self._builtin_seen)))

    def _resolved(self, name: str) -> ResolvedModule:
        relpath = self._backend.relpaths[name]
        return ResolvedModule(
            name=name,
            path=_source_path(self._index.kmoddir, relpath).absolute(),
            relpath=_image_relpath(relpath),
            depends=self._direct_deps(name),
            firmware=self._backend.meta(name).firmware,
            why=self._nodes[name].why,
        )

    def _direct_deps(self, name: str) -> tuple[str, ...]:
        """depends= of the module, plus any modules.dep entry it does not already imply.

        modules.dep lists transitive dependencies; only the ones not reachable through
        depends= are direct (and then only in an inconsistent tree).
        """
        declared = [dep for dep in self._backend.meta(name).depends if dep in self._nodes]
        implied = set(declared)
        stack = list(declared)
        while stack:
            for dep in self._backend.meta(stack.pop()).depends:
                if dep in self._nodes and dep not in implied:
                    implied.add(dep)
                    stack.append(dep)
        extra = [dep for dep in self._nodes[name].hard if dep not in implied]
        return tuple(declared + extra)


def _load_order(nodes: Mapping[str, _Node]) -> list[str]:
    """A topological order depending only on the dependency relation, never on how it
    was discovered: among the modules whose prerequisites are loaded, take the one
    from the earliest request, then by name (Kahn's algorithm on a heap).

    Softdep edges (pre before the module, module before post) yield when they would
    close a cycle; hard edges never do unless the tree itself is cyclic.
    """
    hard_after: dict[str, set[str]] = {name: set(node.hard) for name, node in nodes.items()}
    soft_after: dict[str, set[str]] = {name: set(node.pre) for name, node in nodes.items()}
    for name, node in nodes.items():
        for target in node.post:
            soft_after[target].add(name)
    for name in nodes:
        soft_after[name] -= hard_after[name] | {name}

    waiting = {name: len(hard_after[name]) + len(soft_after[name]) for name in nodes}
    unlocks: dict[str, list[str]] = {name: [] for name in nodes}
    for name in nodes:
        for before in hard_after[name] | soft_after[name]:
            unlocks[before].append(name)

    def key(name: str) -> tuple[int, str]:
        return (nodes[name].rank, name)

    heap = [key(name) for name in nodes if waiting[name] == 0]
    heapq.heapify(heap)
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(nodes):
        if not heap:
            heapq.heappush(heap, key(_break_cycle(nodes, done, hard_after, key)))
        _, name = heapq.heappop(heap)
        if name in done:
            continue
        done.add(name)
        order.append(name)
        for later in unlocks[name]:
            waiting[later] -= 1
            if waiting[later] == 0 and later not in done:
                heapq.heappush(heap, key(later))
    return order


def _break_cycle(
    nodes: Mapping[str, _Node],
    done: set[str],
    hard_after: Mapping[str, set[str]],
    key: Callable[[str], tuple[int, str]],
) -> str:
    remaining = [name for name in nodes if name not in done]
    soft_ok = [name for name in remaining if hard_after[name] <= done]
    pick: str = min(soft_ok or remaining, key=key)
    if soft_ok:
        log.warning("softdeps of kernel modules form a cycle; loading %s early", pick)
    else:
        log.warning("kernel module dependencies form a cycle; loading %s early", pick)
    return pick
