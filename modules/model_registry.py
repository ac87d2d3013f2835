"""The model registry: which checkpoints and VAEs are on disk, and their hashes.

This module knows files, not weights: it never imports torch and never loads a model. It lists
checkpoints (single files and diffusers folders) and VAEs, hashes them the way A1111 does, keeps the
sha256 values in a JSON cache so that a restart does not re-read gigabytes, and resolves every string
A1111 accepts to select a checkpoint (title, name, short hash, old hash, ...).

A1111 references: ``modules/sd_models.py`` (``CheckpointInfo``, ``model_hash``,
``get_closet_checkpoint_match``), ``modules/hashes.py`` (sha256 cache, ``addnet_hash_safetensors``),
``modules/sd_vae.py`` (the VAE list) and ``modules/modelloader.py`` (the folder walk).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

HASH_BLOCK_SIZE = 1024 * 1024
# A1111's "old" model hash looks at 64 KiB starting 1 MiB into the file.
OLD_HASH_OFFSET = 0x100000
OLD_HASH_LENGTH = 0x10000
OLD_HASH_MISSING = "NOFILE"
SHORTHASH_LENGTH = 10

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
# A1111 lists "<name>.vae.<ext>" files next to checkpoints as VAEs, never as checkpoints.
VAE_SUFFIXES_BESIDE_CHECKPOINTS = (".vae.safetensors", ".vae.pt", ".vae.ckpt")
PARTIAL_DOWNLOAD_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download")
DIFFUSERS_MARKER = "model_index.json"
VAE_FOLDER_CONFIG = "config.json"
VAE_FOLDER_CLASS = "AutoencoderKL"

HASH_KIND_CHECKPOINT = "checkpoint"
HASH_KIND_VAE = "vae"
HASH_KIND_ADDNET = "addnet"

CACHE_FORMAT_VERSION = 1

# A trailing " [abcdef0123]" on a checkpoint title; A1111 strips it when a pasted hash is stale.
_TRAILING_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")
_DIGIT_RUNS = re.compile(r"(\d+)")


# ---------------------------------------------------------------------------------------------
# Hash functions
# ---------------------------------------------------------------------------------------------

def calculate_sha256(path: PathLike) -> str:
    """Return the hex sha256 of a whole file, read in 1 MiB blocks (A1111's "new" model hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(HASH_BLOCK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash_old(path: PathLike) -> str:
    """Return A1111's legacy 8-hex model hash, or ``"NOFILE"`` when the file does not exist.

    It is the sha256 of the 64 KiB at offset 1 MiB only, so files smaller than 1 MiB all get the
    hash of empty input (``e3b0c442``), exactly as in A1111.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            file.seek(OLD_HASH_OFFSET)
            digest.update(file.read(OLD_HASH_LENGTH))
    except FileNotFoundError:
        return OLD_HASH_MISSING
    return digest.hexdigest()[:8]


def addnet_hash_safetensors(path: PathLike) -> str:
    """Return the kohya / A1111 "addnet" hash of a safetensors file.

    It is the sha256 of the tensor data only (everything after the 8-byte header length and the
    JSON header), so editing a LoRA's metadata does not change it. Raises ValueError when the
    file is not a safetensors file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        file_size = os.fstat(file.fileno()).st_size
        header_length = int.from_bytes(length_bytes, "little")
        if len(length_bytes) < 8 or header_length > file_size - 8:
            raise ValueError(f"{os.fspath(path)} is not a valid safetensors file: its header is truncated.")
        file.seek(8 + header_length)
        for block in iter(lambda: file.read(HASH_BLOCK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(path: PathLike) -> str:
    """Return a sha256 for a folder model (diffusers layout).

    A1111 has no folder models, so this is Athanor's own definition: the sha256 of one line
    ``"<relative/path>\\0<sha256 of that file>\\n"`` per file, sorted by path. It changes when any
    file's content, name or presence changes. Each file is hashed with ``calculate_sha256``.
    """
    digest = hashlib.sha256()
    for found in sorted(_walk(os.fspath(path), _never_a_model_folder), key=lambda f: f.rel_name):
        if found.is_dir:
            continue
        digest.update(f"{found.rel_name}\0{calculate_sha256(found.path)}\n".encode())
    return digest.hexdigest()


def folder_hash_old(path: PathLike) -> str:
    """Return an 8-hex quick hash for a folder model, built from the old hash of each of its files.

    Like :func:`model_hash_old` it reads only 64 KiB per file, so it is cheap to compute at every scan.
    """
    digest = hashlib.sha256()
    for found in sorted(_walk(os.fspath(path), _never_a_model_folder), key=lambda f: f.rel_name):
        if found.is_dir:
            continue
        digest.update(f"{found.rel_name}\0{model_hash_old(found.path)}\n".encode())
    return digest.hexdigest()[:8]


def path_signature(path: PathLike) -> tuple[int, int]:
    """Return ``(mtime_ns, size)`` for a file, or for a folder (newest file mtime, total bytes).

    A cached hash is valid only while this signature is unchanged. Raises OSError if the path is gone.
    """
    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_mtime_ns, st.st_size
    newest, total = st.st_mtime_ns, 0
    for found in _walk(path, _never_a_model_folder):
        if not found.is_dir:
            newest = max(newest, found.stat.st_mtime_ns)
            total += found.stat.st_size
    return newest, total


def natural_sort_key(text: str) -> list[int | str]:
    """Sort key A1111 uses for model lists: case-insensitive, digit runs compared as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGIT_RUNS.split(text)]


# ---------------------------------------------------------------------------------------------
# Hash cache
# ---------------------------------------------------------------------------------------------

class HashCache:
    """sha256 values kept in a JSON file, keyed by kind (``checkpoint``, ``vae``, ``addnet``, ...)
    and absolute path, each stored with the file's mtime and size.

    A value is reused only while the file's mtime and size are unchanged. Writes are atomic (a
    temporary file then ``os.replace``) and merged with what is on disk, so several instances,
    for example the checkpoint registry and the LoRA list, can share one file. All methods are
    thread-safe.
    """

    def __init__(self, path: PathLike) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, dict]] | None = None

    @property
    def path(self) -> Path:
        """Where the cache lives on disk."""
        return self._path

    def get(self, kind: str, filename: PathLike) -> str | None:
        """Return the cached sha256 of ``filename`` if it is still valid, else None."""
        key = os.path.abspath(filename)
        try:
            signature = path_signature(key)
        except OSError:
            return None
        with self._lock:
            value = self._lookup(kind, key, signature)
            if value is None:
                # Another instance may have hashed it since we last read the file.
                self._entries = self._read_disk()
                value = self._lookup(kind, key, signature)
        return value

    def put(self, kind: str, filename: PathLike, sha256: str,
            signature: tuple[int, int] | None = None) -> None:
        """Store ``sha256`` for ``filename`` with its current (or the given) mtime and size."""
        key = os.path.abspath(filename)
        mtime_ns, size = signature if signature is not None else path_signature(key)
        with self._lock:
            entries = self._read_disk()
            entries.setdefault(kind, {})[key] = {"sha256": sha256, "mtime_ns": mtime_ns, "size": size}
            self._write_disk(entries)
            self._entries = entries

    def sha256(self, kind: str, filename: PathLike,
               compute: Callable[[str], str] | None = None) -> str:
        """Return the sha256 of ``filename``, from the cache or computed (then cached).

        ``compute`` defaults to :func:`calculate_sha256` (a folder uses :func:`folder_sha256`);
        pass :func:`addnet_hash_safetensors` with kind ``addnet`` for LoRA hashes.
        """
        key = os.path.abspath(filename)
        cached = self.get(kind, key)
        if cached is not None:
            return cached
        # Take the signature before reading: if the file changes while we hash it, the stored
        # signature no longer matches and the next lookup recomputes.
        signature = path_signature(key)
        if compute is None:
            compute = folder_sha256 if os.path.isdir(key) else calculate_sha256
        log.info("Calculating sha256 for %s", key)
        value = compute(key)
        self.put(kind, key, value, signature)
        return value

    def _lookup(self, kind: str, key: str, signature: tuple[int, int]) -> str | None:
        if self._entries is None:
            self._entries = self._read_disk()
        entry = self._entries.get(kind, {}).get(key)
        if not isinstance(entry, dict):
            return None
        if (entry.get("mtime_ns"), entry.get("size")) != signature:
            return None
        value = entry.get("sha256")
        return value if isinstance(value, str) else None

    def _read_disk(self) -> dict[str, dict[str, dict]]:
        try:
            with open(self._path, encoding="utf-8") as file:
                data = json.load(file)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("Ignoring unreadable hash cache %s (%s); hashes will be recomputed.", self._path, error)
            return {}
        hashes = data.get("hashes") if isinstance(data, dict) else None
        if not isinstance(hashes, dict):
            return {}
        return {kind: dict(items) for kind, items in hashes.items() if isinstance(items, dict)}

    def _write_disk(self, entries: Mapping[str, Mapping[str, dict]]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_FORMAT_VERSION, "hashes": entries}
        fd, temp_name = tempfile.mkstemp(prefix=self._path.name + ".", suffix=".tmp", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(payload, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, self._path)
        except BaseException:
            try:
                os.unlink(temp_name)
            except OSError:
                pass
            raise


# ---------------------------------------------------------------------------------------------
# Model descriptions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk, with every name and hash A1111 shows for it.

    ``name`` is the path relative to the checkpoint folder with forward slashes
    (``sub/model.safetensors``); a checkpoint given with ``--ckpt`` outside that folder is named by
    its file name. ``sha256``/``shorthash`` are None when hashing is off.
    """

    filename: str
    name: str
    name_for_extra: str
    model_name: str
    title: str
    sha256: str | None
    shorthash: str | None
    hash_old: str
    is_diffusers_folder: bool
    size: int
    mtime: float

    @property
    def short_title(self) -> str:
        """``name_for_extra [shorthash]`` (A1111's short dropdown label), or ``name_for_extra``."""
        return f"{self.name_for_extra} [{self.shorthash}]" if self.shorthash else self.name_for_extra

    def aliases(self) -> list[str]:
        """Every string A1111 accepts to select this checkpoint, in A1111's order, without repeats."""
        ids = [self.hash_old, self.model_name, self.title, self.name, self.name_for_extra,
               f"{self.name} [{self.hash_old}]"]
        if self.shorthash and self.sha256:
            ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]", self.short_title]
        return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class VaeInfo:
    """One VAE on disk. ``name`` is its file (or folder) name, as A1111's ``/sd-vae`` shows it."""

    name: str
    filename: str
    sha256: str | None
    shorthash: str | None
    is_diffusers_folder: bool
    size: int
    mtime: float

    @property
    def model_name(self) -> str:
        """The name under which A1111's ``/sdapi/v1/sd-vae`` lists this VAE."""
        return self.name


@dataclass(frozen=True)
class _Snapshot:
    checkpoints: tuple[CheckpointInfo, ...]
    vaes: tuple[VaeInfo, ...]
    checkpoint_aliases: Mapping[str, CheckpointInfo]
    checkpoints_by_filename: Mapping[str, CheckpointInfo]
    vaes_by_name: Mapping[str, VaeInfo]
    vaes_by_filename: Mapping[str, VaeInfo]
    extra_checkpoint: CheckpointInfo | None


_EMPTY_SNAPSHOT = _Snapshot((), (), MappingProxyType({}), MappingProxyType({}), MappingProxyType({}),
                            MappingProxyType({}), None)


# ---------------------------------------------------------------------------------------------
# Folder walk
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Found:
    path: str       # absolute, through symlinks as found (not resolved), like A1111's abspath
    rel_name: str   # relative to the walk root, forward slashes
    is_dir: bool    # True only for a model folder (the walk does not enter it)
    stat: os.stat_result


def _never_a_model_folder(_path: str) -> bool:
    return False


def _is_ignored_name(name: str) -> bool:
    lowered = name.lower()
    return name.startswith(".") or lowered.endswith(PARTIAL_DOWNLOAD_SUFFIXES)


def _walk(root: str, is_model_folder: Callable[[str], bool]) -> Iterator[_Found]:
    """Yield the files under ``root`` and the model folders (not entered), skipping hidden names.

    Symlinks are followed, files and folders alike, except a folder link that leads back to one of
    its own ancestors: that would loop forever.
    """
    root = os.path.abspath(root)
    try:
        root_stat = os.stat(root)
    except OSError:
        return
    if not stat.S_ISDIR(root_stat.st_mode):
        return
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (root, "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        folder, rel_folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as iterator:
                entries = sorted(iterator, key=lambda e: e.name)
        except OSError as error:
            log.warning("Cannot list %s: %s", folder, error)
            continue
        subfolders = []
        for entry in entries:
            if _is_ignored_name(entry.name):
                continue
            rel_name = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            try:
                entry_stat = os.stat(entry.path)  # follows symlinks
            except OSError:
                log.debug("Skipping broken link %s", entry.path)
                continue
            if stat.S_ISDIR(entry_stat.st_mode):
                if is_model_folder(entry.path):
                    yield _Found(entry.path, rel_name, True, entry_stat)
                    continue
                identity = (entry_stat.st_dev, entry_stat.st_ino)
                if identity in ancestors:
                    log.debug("Not following %s: it loops back to a parent folder", entry.path)
                    continue
                subfolders.append((entry.path, rel_name, ancestors | {identity}))
            elif stat.S_ISREG(entry_stat.st_mode):
                yield _Found(entry.path, rel_name, False, entry_stat)
        stack.extend(reversed(subfolders))


def _is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DIFFUSERS_MARKER))


def _is_vae_folder(path: str) -> bool:
    config_path = os.path.join(path, VAE_FOLDER_CONFIG)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == VAE_FOLDER_CLASS


def _has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.lower().endswith(suffixes)


def _is_checkpoint_file(name: str) -> bool:
    return _has_suffix(name, CHECKPOINT_EXTENSIONS) and not _has_suffix(name, VAE_SUFFIXES_BESIDE_CHECKPOINTS)


def _strip_extension(name: str) -> str:
    return os.path.splitext(name)[0]


def _relative_name(path: str, folder: str | None) -> str | None:
    """``path`` relative to ``folder`` with forward slashes, or None when it lies outside."""
    if folder is None:
        return None
    try:
        rel = os.path.relpath(path, folder)
    except ValueError:  # another drive on Windows
        return None
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel.replace(os.sep, "/")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

class ModelRegistry:
    """The checkpoints and VAEs on disk, rescanned by :meth:`refresh`.

    ``ckpt_dir`` and ``vae_dir`` are scanned recursively (``--ckpt-dir``, ``--vae-dir``);
    ``extra_checkpoint`` is the ``--ckpt`` file or folder, listed even outside ``ckpt_dir``;
    ``hashing=False`` (or no ``hash_cache``) is ``--no-hashing``: no sha256 is computed, read from
    the cache or shown, so titles are bare names; the cheap old hash is still computed, as in A1111.
    The first read scans if
    :meth:`refresh` was never called. Reads and refreshes are thread-safe: a refresh builds a new
    immutable snapshot and swaps it in.
    """

    def __init__(self, ckpt_dir: PathLike | None, vae_dir: PathLike | None, hash_cache: HashCache | None, *,
                 extra_checkpoint: PathLike | None = None, hashing: bool = True) -> None:
        self._ckpt_dir = os.path.abspath(ckpt_dir) if ckpt_dir is not None else None
        self._vae_dir = os.path.abspath(vae_dir) if vae_dir is not None else None
        self._extra_checkpoint = os.path.abspath(extra_checkpoint) if extra_checkpoint is not None else None
        self._hash_cache = hash_cache
        self._hashing = hashing and hash_cache is not None
        self._lock = threading.Lock()          # guards the snapshot reference
        self._refresh_lock = threading.Lock()  # one scan at a time, so no file is hashed twice
        self._snapshot: _Snapshot | None = None

    @property
    def ckpt_dir(self) -> str | None:
        """The checkpoints folder being scanned (absolute)."""
        return self._ckpt_dir

    @property
    def vae_dir(self) -> str | None:
        """The VAE folder being scanned (absolute)."""
        return self._vae_dir

    @property
    def hashing(self) -> bool:
        """Whether sha256 values are computed (False under ``--no-hashing``)."""
        return self._hashing

    def refresh(self) -> None:
        """Rescan both folders, hash new or changed files, and publish the new lists."""
        with self._refresh_lock:
            snapshot = self._scan()
            with self._lock:
                self._snapshot = snapshot

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """All checkpoints, sorted by name like A1111 (case-insensitive, numbers in order)."""
        return list(self._current().checkpoints)

    @property
    def vaes(self) -> list[VaeInfo]:
        """All VAEs, sorted by name like A1111."""
        return list(self._current().vaes)

    @property
    def extra_checkpoint(self) -> CheckpointInfo | None:
        """The ``--ckpt`` checkpoint when it exists (A1111 selects it at start), else None."""
        return self._current().extra_checkpoint

    def find_checkpoint(self, query: str | None) -> CheckpointInfo | None:
        """Find a checkpoint the way A1111's ``get_closet_checkpoint_match`` does.

        First an exact alias (see :meth:`CheckpointInfo.aliases`) or absolute filename; then the
        shortest title containing ``query``; then the same with a trailing ``[hash]`` removed from
        ``query``, so a pasted title whose hash went stale still finds the file.
        """
        if not query:
            return None
        snapshot = self._current()
        found = snapshot.checkpoint_aliases.get(query) or snapshot.checkpoints_by_filename.get(query)
        if found is not None:
            return found
        found = _shortest_title_containing(snapshot.checkpoints, query)
        if found is not None:
            return found
        without_checksum = _TRAILING_CHECKSUM.sub("", query)
        if without_checksum and without_checksum != query:
            return _shortest_title_containing(snapshot.checkpoints, without_checksum)
        return None

    def find_vae(self, query: str | None) -> VaeInfo | None:
        """Find a VAE by its name (``file.safetensors``, as in A1111's sd_vae option), its
        absolute filename, its name without extension, its short hash or its sha256."""
        if not query:
            return None
        snapshot = self._current()
        found = snapshot.vaes_by_name.get(query) or snapshot.vaes_by_filename.get(query)
        if found is not None:
            return found
        for vae in snapshot.vaes:
            if query in (_strip_extension(vae.name), vae.shorthash, vae.sha256):
                return vae
        return None

    # -- internals ---------------------------------------------------------------------------

    def _current(self) -> _Snapshot:
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None:
            self.refresh()
            with self._lock:
                snapshot = self._snapshot
        return snapshot or _EMPTY_SNAPSHOT

    def _hash(self, kind: str, path: str) -> str | None:
        if not self._hashing or self._hash_cache is None:
            return None
        try:
            return self._hash_cache.sha256(kind, path)
        except OSError as error:
            log.warning("Cannot hash %s: %s", path, error)
            return None

    def _scan(self) -> _Snapshot:
        checkpoints: dict[str, CheckpointInfo] = {}
        vaes_beside_checkpoints: list[_Found] = []

        if self._ckpt_dir is not None:
            for found in _walk(self._ckpt_dir, _is_diffusers_folder):
                leaf = found.rel_name.rsplit("/", 1)[-1]
                if found.is_dir or _is_checkpoint_file(leaf):
                    checkpoints[found.path] = self._checkpoint_info(found.path, found.rel_name, found.is_dir)
                elif _has_suffix(leaf, VAE_SUFFIXES_BESIDE_CHECKPOINTS):
                    vaes_beside_checkpoints.append(found)

        extra = self._extra_checkpoint_info(checkpoints)
        if extra is not None:
            checkpoints.setdefault(extra.filename, extra)

        ordered = tuple(sorted(checkpoints.values(), key=lambda c: natural_sort_key(c.name)))
        aliases: dict[str, CheckpointInfo] = {}
        for info in ordered:  # like A1111, on a clash the model registered last wins
            for alias in info.aliases():
                aliases[alias] = info
        for info in ordered:  # but a title always means its own model
            aliases[info.title] = info

        vaes = self._scan_vaes(vaes_beside_checkpoints)
        return _Snapshot(
            checkpoints=ordered,
            vaes=vaes,
            checkpoint_aliases=MappingProxyType(aliases),
            checkpoints_by_filename=MappingProxyType({c.filename: c for c in ordered}),
            vaes_by_name=MappingProxyType({v.name: v for v in vaes}),
            vaes_by_filename=MappingProxyType({v.filename: v for v in vaes}),
            extra_checkpoint=extra,
        )

    def _extra_checkpoint_info(self, listed: Mapping[str, CheckpointInfo]) -> CheckpointInfo | None:
        path = self._extra_checkpoint
        if path is None:
            return None
        # The same file may be reached through a link inside the folder: list it once.
        real = os.path.realpath(path)
        for info in listed.values():
            if info.filename == path or os.path.realpath(info.filename) == real:
                return info
        if not os.path.exists(path):
            log.warning("Checkpoint given with --ckpt was not found: %s", path)
            return None
        is_folder = os.path.isdir(path)
        if is_folder and not _is_diffusers_folder(path):
            log.warning("--ckpt %s is a folder without %s, so it is not a diffusers model.", path, DIFFUSERS_MARKER)
            return None
        rel = _relative_name(path, self._ckpt_dir)
        return self._checkpoint_info(path, rel or os.path.basename(path), is_folder)

    def _checkpoint_info(self, path: str, name: str, is_folder: bool) -> CheckpointInfo:
        mtime_ns, size = path_signature(path)
        base = name.rsplit("/", 1)[-1]
        flat = name.replace("/", "_").replace("\\", "_")
        sha256 = self._hash(HASH_KIND_CHECKPOINT, path)
        shorthash = sha256[:SHORTHASH_LENGTH] if sha256 else None
        return CheckpointInfo(
            filename=path,
            name=name,
            # A folder has no extension to strip ("sd-v1.5" stays "sd-v1.5").
            name_for_extra=base if is_folder else _strip_extension(base),
            model_name=flat if is_folder else _strip_extension(flat),
            title=f"{name} [{shorthash}]" if shorthash else name,
            sha256=sha256,
            shorthash=shorthash,
            hash_old=folder_hash_old(path) if is_folder else model_hash_old(path),
            is_diffusers_folder=is_folder,
            size=size,
            mtime=mtime_ns / 1e9,
        )

    def _scan_vaes(self, beside_checkpoints: list[_Found]) -> tuple[VaeInfo, ...]:
        found_in_vae_dir: list[_Found] = []
        if self._vae_dir is not None:
            for found in _walk(self._vae_dir, _is_vae_folder):
                if found.is_dir or _has_suffix(found.rel_name, VAE_EXTENSIONS):
                    found_in_vae_dir.append(found)

        # A1111 keys VAEs by file name. On a clash the VAE folder beats a file next to the
        # checkpoints, and within one folder the file nearer the top wins.
        def depth_then_name(found: _Found) -> tuple[int, list[int | str]]:
            return found.rel_name.count("/"), natural_sort_key(found.rel_name)

        by_name: dict[str, _Found] = {}
        for group in (sorted(found_in_vae_dir, key=depth_then_name),
                      sorted(beside_checkpoints, key=depth_then_name)):
            for found in group:
                by_name.setdefault(os.path.basename(found.path), found)

        vaes = []
        for name, found in by_name.items():
            mtime_ns, size = path_signature(found.path)
            sha256 = self._hash(HASH_KIND_VAE, found.path)
            vaes.append(VaeInfo(
                name=name,
                filename=found.path,
                sha256=sha256,
                shorthash=sha256[:SHORTHASH_LENGTH] if sha256 else None,
                is_diffusers_folder=found.is_dir,
                size=size,
                mtime=mtime_ns / 1e9,
            ))
        return tuple(sorted(vaes, key=lambda v: natural_sort_key(v.name)))


def _shortest_title_containing(checkpoints: tuple[CheckpointInfo, ...], text: str) -> CheckpointInfo | None:
    # sorted() is stable, so equal-length titles keep the list order, as in A1111.
    matches = sorted((c for c in checkpoints if text in c.title), key=lambda c: len(c.title))
    return matches[0] if matches else None
