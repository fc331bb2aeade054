"""The disk tier: one file per chunk under a directory, written atomically.

Layout: ``<root>/<hex[0:2]>/<hex[2:4]>/<hex>`` where ``hex`` is the 64-character key. A write
goes to a temporary file in the destination directory (``.<hex>.<random>.tmp``), is fsynced,
renamed over the final name and the directory is fsynced, so a reader (in any process) sees
either no file or the whole blob. When anything fails the temporary file is removed and the
error is raised as :class:`~kvaas.store.errors.StorageFull` (ENOSPC, EDQUOT, EFBIG) or
:class:`~kvaas.store.errors.StoreError`.

Size accounting is per process: the index (key → size) is rebuilt on :meth:`DiskTier.open` by a
scan, files another process wrote are adopted when this process first meets them, and
:meth:`DiskTier.rescan` (run by the store's housekeeping) adopts and forgets what other processes
wrote and deleted, so processes sharing a directory share its budget. Presence
(``exists_many``, ``get_many``, ``put_many``) is always decided by the filesystem, so several
processes can share one directory; only ``sizes_many`` and the byte accounting trust the index.
All file I/O runs in worker threads (``asyncio.to_thread``): one thread hop per batch.

Permissions: chunk files are created 0600 and directories 0700 (the root is tightened to 0700
when the tier opens), so only the user the processes run as can read them; every process that
shares the directory runs as that user. The chunks are sealed anyway (:mod:`kvaas.store.crypto`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from kvaas.store.errors import StorageFull, StoreError
from kvaas.store.keys import KEY_BYTES, ChunkKey
from kvaas.store.tier import Blob, Tier, TierHealth

_NAME = re.compile(rf"^[0-9a-f]{{{2 * KEY_BYTES}}}$")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_SPLIT_MIN = 16
"""A batched read is split over several threads only with at least this many keys per thread."""
STALE_TEMP_SECONDS = 3600.0
"""Temporary files older than this are leftovers of a crashed writer; ``open`` removes them."""
FILE_MODE = 0o600
DIR_MODE = 0o700


class DiskTier(Tier):
    """Chunks as files under ``root``, up to ``capacity`` bytes.

    ``durable=False`` skips the fsyncs (the rename stays atomic, but a power loss may lose recent
    writes); only for scratch data and benchmarks. A batched read of many keys is split over up
    to ``read_threads`` worker threads.
    """

    def __init__(
        self,
        root: Path,
        capacity: int,
        *,
        name: str = "disk",
        durable: bool = True,
        read_threads: int = 4,
    ) -> None:
        super().__init__(name, capacity, shared=True)
        self.root = Path(root)
        self.durable = durable
        self.read_threads = max(1, read_threads)
        self._index: dict[ChunkKey, int] = {}
        self._used = 0
        self._reserved = 0
        self._opened = False
        self._open_lock: asyncio.Lock | None = None

    # -- paths -------------------------------------------------------------------------------
    def path_of(self, key: ChunkKey) -> Path:
        """Where the blob of ``key`` lives (whether or not it exists)."""
        h = key.hex()
        return self.root / h[:2] / h[2:4] / h

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> list[tuple[ChunkKey, int]]:
        """Scan the directory (creating it if needed), rebuild the size index and remove
        temporary files left by crashed writers; return the chunks found, least recently
        used first (by access or modification time)."""
        entries = await asyncio.to_thread(self._scan)
        self._index = {k: size for k, size, _ in entries}
        self._used = sum(self._index.values())
        self._opened = True
        entries.sort(key=lambda e: e[2])
        return [(k, size) for k, size, _ in entries]

    async def _ensure_open(self) -> None:
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                await self.open()

    def _scan(self) -> list[tuple[ChunkKey, int, float]]:
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        with contextlib.suppress(OSError):  # a root made before (or by mkdir -p): tighten it
            if self.root.stat().st_mode & 0o777 != DIR_MODE:
                os.chmod(self.root, DIR_MODE)
        now = time.time()
        out: list[tuple[ChunkKey, int, float]] = []
        for d1 in os.scandir(self.root):
            if not (d1.is_dir(follow_symlinks=False) and len(d1.name) == 2):
                continue
            for d2 in os.scandir(d1.path):
                if not (d2.is_dir(follow_symlinks=False) and len(d2.name) == 2):
                    continue
                for f in os.scandir(d2.path):
                    if f.name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            if now - f.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                                os.unlink(f.path)
                        continue
                    if not _NAME.match(f.name) or not f.is_file(follow_symlinks=False):
                        continue
                    st = f.stat(follow_symlinks=False)
                    out.append(
                        (ChunkKey(bytes.fromhex(f.name)), st.st_size, max(st.st_atime, st.st_mtime))
                    )
        return out

    async def rescan(self) -> tuple[list[tuple[ChunkKey, int]], list[ChunkKey]]:
        """Bring the size index in line with the directory, which other processes share: adopt
        the chunks they wrote, forget those they deleted. Returns ``(adopted, forgotten)``.

        The byte budget is checked against this index, so a periodic rescan (the store's
        housekeeping) makes every process sharing the directory count every process's chunks:
        together they stay within the budget, up to what was written since the last rescan."""
        await self._ensure_open()
        entries = await asyncio.to_thread(self._scan)
        found = {k: size for k, size, _ in entries}
        maybe_gone = [k for k in self._index if k not in found]
        # written by this process after the scan passed its directory: still there
        sizes = await asyncio.to_thread(self._stat_many, maybe_gone) if maybe_gone else []
        gone = [k for k, size in zip(maybe_gone, sizes, strict=True) if size is None]
        adopted = [(k, size) for k, size in found.items() if k not in self._index]
        for k in gone:
            self._forget(k)
        for k, size in adopted:
            self._adopt(k, size)
        return adopted, gone

    # -- reads -------------------------------------------------------------------------------
    async def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        if not keys:
            return []
        await self._ensure_open()
        keys = list(keys)
        parts = min(self.read_threads, len(keys) // READ_SPLIT_MIN)
        if parts <= 1:
            blobs = await asyncio.to_thread(self._read_many, keys)
        else:  # a long prefix: read slices concurrently (device queue depth, memcpy on 2+ cores)
            step = -(-len(keys) // parts)
            slices = await asyncio.gather(
                *(asyncio.to_thread(self._read_many, keys[i : i + step])
                  for i in range(0, len(keys), step))
            )  # fmt: skip
            blobs = [b for part in slices for b in part]
        for k, b in zip(keys, blobs, strict=True):
            if b is None:
                self._forget(k)
            elif k not in self._index:
                self._adopt(k, len(b))
        return blobs

    def _read_many(self, keys: list[ChunkKey]) -> list[Blob | None]:
        out: list[Blob | None] = []
        for k in keys:
            try:
                with open(self.path_of(k), "rb", buffering=0) as f:
                    out.append(f.readall())
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                out.append(None)
            except OSError as e:
                raise StoreError(f"disk tier {self.name!r}: cannot read chunk: {e}") from e
        return out

    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence as the filesystem says (one ``stat`` per key, one thread hop per batch), so
        chunks another process wrote or deleted are seen as they are; the index follows."""
        if not keys:
            return []
        await self._ensure_open()
        sizes = await asyncio.to_thread(self._stat_many, list(keys))
        for k, size in zip(keys, sizes, strict=True):
            if size is None:
                self._forget(k)
            elif k not in self._index:
                self._adopt(k, size)
        return [size is not None for size in sizes]

    async def sizes_many(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        await self._ensure_open()
        index = self._index
        sizes: list[int | None] = [index.get(k) for k in keys]
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if unknown:  # written by another process since our scan?
            found = await asyncio.to_thread(self._stat_many, [keys[i] for i in unknown])
            for i, size in zip(unknown, found, strict=True):
                if size is not None:
                    self._adopt(keys[i], size)
                    sizes[i] = size
        return sizes

    def _stat_many(self, keys: list[ChunkKey]) -> list[int | None]:
        out: list[int | None] = []
        for k in keys:
            try:
                out.append(os.stat(self.path_of(k)).st_size)
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
        return out

    # -- writes ------------------------------------------------------------------------------
    async def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        """Write the blobs whose files do not exist. Existence is checked on the filesystem, not
        in this process's index, so a chunk another process deleted (garbage collection) is
        written again even if the index still lists it."""
        await self._ensure_open()
        todo: dict[ChunkKey, Blob] = {}
        for key, blob in items:
            self.check_blob_size(len(blob))
            todo.setdefault(key, blob)
        if not todo:
            return 0
        need = sum(len(b) for k, b in todo.items() if k not in self._index)
        assert self.capacity is not None
        if need and self._used + self._reserved + need > self.capacity:
            raise StorageFull(
                self.name,
                f"disk tier {self.name!r}: {need} more bytes exceed the budget "
                f"({self._used}/{self.capacity} used)",
            )
        self._reserved += need  # concurrent batches cannot overshoot the budget together
        try:
            written, error = await asyncio.to_thread(self._write_many, list(todo.items()))
        finally:
            self._reserved -= need
        added = 0
        for key, size, new in written:  # complete files stay valid even if a later one failed
            if new:
                added += size
                self._forget(key)  # a stale entry (file deleted elsewhere) is replaced
            self._adopt(key, size)
        if error is not None:
            raise error
        return added

    def _write_many(
        self, items: list[tuple[ChunkKey, Blob]]
    ) -> tuple[list[tuple[ChunkKey, int, bool]], StoreError | None]:
        done: list[tuple[ChunkKey, int, bool]] = []
        dirs: set[Path] = set()
        error: StoreError | None = None
        for key, blob in items:
            path = self.path_of(key)
            try:
                if path.is_file():  # another process wrote it: content addressed, keep it
                    done.append((key, path.stat().st_size, False))
                    continue
                self._write_one(path, blob)
            except StoreError as e:
                error = e
                break
            except OSError as e:
                error = _map_os_error(self.name, e)
                break
            dirs.add(path.parent)
            done.append((key, len(blob), True))
        if self.durable:  # make the renames that did happen durable, even after a failure
            for d in dirs:
                _fsync_dir(d)
        return done, error

    def _write_one(self, path: Path, blob: Blob) -> None:
        try:
            _mkdirs(path.parent)
        except OSError as e:
            raise _map_os_error(self.name, e) from e
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                view = memoryview(blob).cast("B")
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _map_os_error(self.name, e) from e

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        await self._ensure_open()
        removed = await asyncio.to_thread(self._unlink_many, list(keys))
        for k in keys:
            self._forget(k)
        return removed

    def _unlink_many(self, keys: list[ChunkKey]) -> int:
        n = 0
        dirs: set[Path] = set()
        for k in keys:
            path = self.path_of(k)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise StoreError(f"disk tier {self.name!r}: cannot delete chunk: {e}") from e
            dirs.add(path.parent)
            n += 1
        if self.durable:
            for d in dirs:
                _fsync_dir(d)
        return n

    # -- accounting --------------------------------------------------------------------------
    def _adopt(self, key: ChunkKey, size: int) -> None:
        if key not in self._index:
            self._index[key] = size
            self._used += size

    def _forget(self, key: ChunkKey) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    async def bytes_used(self) -> int:
        await self._ensure_open()
        return self._used

    async def health(self) -> TierHealth:
        def probe() -> TierHealth:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
                if not os.access(self.root, os.W_OK | os.X_OK):
                    return TierHealth("down", f"{self.root} is not writable")
                free = shutil.disk_usage(self.root).free
            except OSError as e:
                return TierHealth("down", f"{self.root}: {e}")
            return TierHealth(
                "ok",
                f"{len(self._index)} chunks, {self._used}/{self.capacity} bytes, "
                f"{free} bytes free on the filesystem",
            )

        return await asyncio.to_thread(probe)

    def __len__(self) -> int:
        return len(self._index)


def _mkdirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each with :data:`DIR_MODE` (``mkdir(parents=
    True)`` would give the parents the default mode)."""
    try:
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    except FileNotFoundError:
        _mkdirs(path.parent)
        path.mkdir(mode=DIR_MODE, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _map_os_error(tier: str, e: OSError) -> StoreError:
    if e.errno in _FULL_ERRNOS:
        return StorageFull(tier, f"disk tier {tier!r}: {os.strerror(e.errno or 0)}")
    return StoreError(f"disk tier {tier!r}: cannot write chunk: {e}")
