"""Sharded, resumable HDF5 caches: storage, manifests, work splitting and locking (no detectors, no CLIP).

A cache is a folder:

    manifest.json        what made the cache: stage, full config, identity of the inputs, row fields, layout,
                         and a fingerprint (joblib.hash of all of these, less the names of inputs known by a
                         content hash: a copied input is the same input); written once, identical from every writer
    shard-00012.h5       images [12*images_per_shard, 13*images_per_shard) of the input, flat row arrays
    shard-00012.json     done-marker of shard 12: images, rows, bytes, skipped images, seconds
    shard-00012.lock     held while some process writes shard 12 (pid, host, start time)

A shard is complete when its .h5 AND its marker exist: the .h5 is written to a per-writer temp name
(`shard-00012.h5.<pid>@<host>.tmp`), fsynced and renamed, then the marker is written the same way. A killed
run loses only the shards in flight; rerunning the same command skips the complete ones.

Many processes may fill one folder at once (a Slurm array with `--shard i/n`, torchrun ranks, both) with no
communication: nothing is a single writer's state. The manifest is published once with an exclusive create
(a hard link of a finished temp file, so nobody reads half a manifest); each shard's stats live in its own
marker (img2dataset's per-shard stats files); `CacheFolder.finalize()` folds the markers into the manifest
once every shard is there, identically from whichever writer gets there. Per-shard locks keep overlapping
assignments from writing a shard twice; they are an efficiency measure, not a correctness one: temp names
are unique per writer and the rename is atomic, so two writers of one shard can never mix their bytes.

Stale state from killed runs is found without a daemon: a lock or temp file of this host whose pid is gone
(or is a different process with a reused pid) is stale; a lock of another host is stale when its holder
stopped touching it (a heartbeat thread refreshes its mtime every LOCK_HEARTBEAT_S) for FOREIGN_STALE_S;
a temp file of another host is stale after FOREIGN_STALE_S (temp files only exist during the final write).

Shard layout (readable with plain h5py; row k of every per-row dataset belongs to the same box):

    image_id   (n,)    int64   the images of the shard, in input order (images without rows included)
    row_start  (n+1,)  int64   rows of image k are row_start[k]:row_start[k+1]
    <field>    (R, *shape)     one dataset per row field of the manifest, e.g. boxes (R,4) float32

Chunks are at most 1 MiB along the row axis (a whole small dataset is one chunk); nothing is compressed:
fp16 features and embeddings barely shrink and gzip costs ~45x write throughput.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import h5py
import joblib
import numpy as np

from vild_pipe.errors import DataError, VildError, counted, describe_error, first_few, require_at_least, value_changes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
OVERWRITE_LOCK_NAME = "overwrite.lock"
MAX_CHUNK_BYTES = 1 << 20
LOCK_HEARTBEAT_S = 30.0
FOREIGN_STALE_S = 600.0
UNREADABLE_LOCK_STALE_S = 60.0
OVERWRITE_WAIT_S = 120.0

_RESERVED_NAMES = ("image_id", "row_start")


def _this_host() -> str:
    """The machine's name, qualified by the pid namespace where one is known ("node7~4026531836"): containers
    started with --net=host share the name but not the process ids, and a holder whose pid is checked in the
    wrong namespace would look dead and have its shard taken while it writes."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")   # "pid:[4026531836]"
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}~{namespace.strip('pid:[]')}"


_HOST = _this_host()
_SHARD_FILE_RE = re.compile(r"^shard-(\d{5,})\.(h5|json|lock)$")
# Temp files: "<final name>.<pid>@<host>.tmp", unique per writer so concurrent writers never share one.
_TMP_RE = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.tmp$")


# ---------------------------------------------------------------------------------------------- work split


def parse_shard_option(text: str) -> tuple[int, int]:
    """Parse `--shard i/n` (0-based like torchrun ranks and img2dataset: i in [0, n)) into (i, n)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise VildError(f"--shard {text}: expected i/n with 0 <= i < n (0-based, e.g. 0/4 ... 3/4 for four jobs)")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class Worker:
    """Torchrun rank `rank` of `world_size` inside job `job` of `num_jobs` (`--shard i/n`; 0/1 without it)."""

    job: int = 0
    num_jobs: int = 1
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not (0 <= self.job < self.num_jobs and 0 <= self.rank < self.world_size):
            raise ValueError(f"{self} is outside its jobs or ranks")

    @classmethod
    def of(cls, shard_option: tuple[int, int] | None, rank: int = 0, world_size: int = 1) -> Worker:
        job, num_jobs = shard_option if shard_option is not None else (0, 1)
        return cls(job, num_jobs, rank, world_size)

    def shards(self, num_shards: int) -> list[int]:
        """The shards this worker writes. Job i of n takes shards i, i+n, i+2n, ...; rank r of W every W-th of
        those from the r-th. Every shard is written exactly once over all jobs and ranks, whatever number of
        ranks each job runs with (a rule of i*W + r of n*W would leave shards to nobody when jobs differ in W)."""
        return list(range(self.job, num_shards, self.num_jobs))[self.rank::self.world_size]

    def __str__(self) -> str:
        parts = ([f"job {self.job} of {self.num_jobs}"] if self.num_jobs > 1 else []) + (
            [f"rank {self.rank} of {self.world_size}"] if self.world_size > 1 else [])
        return ", ".join(parts) or "the only worker"


def shard_image_ranges(num_images: int, images_per_shard: int) -> list[range]:
    """Image index ranges of the shards: fixed runs of `images_per_shard`, the last one possibly shorter."""
    require_at_least("--images-per-shard", images_per_shard)
    starts = range(0, num_images, images_per_shard)
    return [range(start, min(start + images_per_shard, num_images)) for start in starts]


# ---------------------------------------------------------------------------------------------- fields, cost


@dataclass(frozen=True)
class RowField:
    """One per-row dataset of a cache: numpy dtype name, shape of one row, and what it holds."""

    dtype: str
    shape: tuple[int, ...] = ()
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)


def _as_row_field(spec: RowField | tuple) -> RowField:
    return spec if isinstance(spec, RowField) else RowField(*spec)


def bytes_per_row(fields: Mapping[str, RowField | tuple]) -> int:
    """Bytes one row takes over all fields; `fields` maps names to RowField or (dtype, shape) tuples."""
    return sum(_as_row_field(spec).row_bytes for spec in fields.values())


SHARD_OVERHEAD_BYTES = 24 << 10
"""What an HDF5 shard file holds besides its arrays (headers, chunk indexes): 21-24 KiB measured on the demo's
proposal and embedding shards; it counts for small caches (12 KiB an image at 2 images a shard)."""


def estimate_cache_bytes(fields: Mapping[str, RowField | tuple], num_rows: int, num_images: int,
                         num_shards: int = 0) -> int:
    """Bytes a cache of `num_rows` rows over `num_images` images in `num_shards` shards will take."""
    return (num_rows * bytes_per_row(fields) + num_images * 2 * np.dtype(np.int64).itemsize
            + num_shards * SHARD_OVERHEAD_BYTES)


def format_bytes(num_bytes: float) -> str:
    """Human-readable binary size: 512 B, 24.5 KiB, 7.2 MiB, 28.6 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(num_bytes), 0
    while abs(value) >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.1f} {units[unit]}"


_SHA256_SEEN: dict[tuple, str] = {}
SHA256_SETTLED_S = 2.0
"""A file modified this recently is hashed again at each call: file times tick coarsely (a clock tick on Linux
before 6.13, 1 or 2 s on some file systems), so a rewrite within the tick would leave the remembered key as it was
(git's "racy" files)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (e.g. model weights), for the `inputs` identity of a cache.

    Remembered for the process by the file's inode, size and times once it is SHA256_SETTLED_S old: a stage
    checks one CLIP or detector file in several places, and hashing 340 MB of ViT-B/32 takes half a second.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            seen = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
            if seen in _SHA256_SEEN:
                return _SHA256_SEEN[seen]
            settled = time.time() - status.st_mtime_ns / 1e9 > SHA256_SETTLED_S
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as err:
        raise VildError(f"{path}: cannot read ({describe_error(err)})") from err
    if settled:
        _SHA256_SEEN[seen] = digest.hexdigest()
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- files, processes


def shard_name(index: int) -> str:
    """Base name of shard `index`: shard-00012."""
    return f"shard-{index:05d}"


def temp_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place; `remove_stale_temps_in` knows the name."""
    return path.with_name(f"{path.name}.{os.getpid()}@{_HOST}.tmp")


def remove_stale_temps_in(folder: Path) -> None:
    """Remove the temp files (`temp_path`) that killed runs left in `folder`: one listing, one log line each."""
    for temp in sorted(folder.glob("*.tmp")):
        _remove_tmp_if_stale(temp)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its closing ")" don't.
    fields_after_name = stat[stat.rfind(")") + 2:].split()
    return int(fields_after_name[19]) if len(fields_after_name) > 19 else None


def _pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` of this host still runs (and, when known, is the same process that started)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is not None:
        now_ticks = _process_start_ticks(pid)
        return now_ticks is None or now_ticks == start_ticks
    return True


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _write_file(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Create `path` (which must not exist), write `data` (bytes, or pieces of them) and fsync it; the caller
    publishes it by rename or link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_report(path: str | os.PathLike, what: str, remedy: str) -> dict:
    """The JSON object of a result file a stage wrote (`what`: "a recall report"); DataError naming the file and
    `remedy` when it is something else, so a user's file of that name is neither taken for one nor replaced."""
    try:
        value = _read_json(Path(path), attempts=1)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not {what} ({describe_error(err)}); {remedy}") from err
    if value is None:
        raise DataError(f"{path}: no such file")
    return value


def write_json_atomically(path: str | os.PathLike, record: Any, **dump_options: Any) -> None:
    """Publish `record` as JSON at `path` (temp file, fsync, rename): a JSON file that exists is complete.

    Every stage writes its small result files (manifests aside) through this; a failed write (read-only
    folder, disk full) is a VildError naming the file."""
    write_text_atomically(path, json.dumps(record, **dump_options))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Publish a text file (a table, a report) as `write_json_atomically` publishes JSON; VildError on failure."""
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    """Publish a file (a picture, a table; a large one as an iterable of pieces) whole or not at all;
    VildError naming it on failure.

    Temp files of the same file that a killed run left behind are removed first (one log line each)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps_of(path)
        _publish_atomically(path, data)
    except OSError as err:
        raise VildError(f"{path}: cannot write ({describe_error(err)})") from err


def _remove_stale_temps_of(path: Path) -> None:
    for temp in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        match = _TMP_RE.match(temp.name)
        if match is not None and match.group("target") == path.name:
            _remove_tmp_if_stale(temp)


def make_output_folder(path: str | os.PathLike) -> Path:
    """Create a stage's output folder (and its parents); VildError naming it if that fails (read-only...)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VildError(f"{path}: cannot create the output folder ({describe_error(err)})") from err
    return path


def _publish_atomically(path: Path, data: bytes | Iterable[bytes], *, exclusive: bool = False) -> bool:
    """Write `path` so that readers see the old file or the whole new one; raises OSError.

    exclusive=True (for `data` as bytes) publishes only if `path` does not exist yet (a hard link fails on an
    existing name) and returns False if another writer got there first; otherwise the file is replaced and
    True returned.
    """
    tmp = temp_path(path)
    try:
        _write_file(tmp, data)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: an exclusive create, then the content (rarely, a reader
            # may see it empty for an instant; `_read_json` retries that).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return True
    finally:
        _remove_quietly(tmp)


def _read_json(path: Path, attempts: int = 3) -> dict | None:
    """The JSON object in `path`, None if there is no such file; ValueError if it stays unparsable."""
    for attempt in range(attempts):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
            break
        except ValueError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.05)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable; pass plain values in config/inputs")


def _plain(value: Any) -> Any:
    """`value` as JSON types (tuples become lists), so a fingerprint is the same before and after a round trip."""
    return json.loads(json.dumps(value, default=_json_default))


def _remove_tmp_if_stale(path: Path) -> None:
    """Remove a temp file left by a killed run (one log line); a temp file being written is left alone."""
    if _tmp_is_stale(path):
        path.unlink(missing_ok=True)
        log.info("removed stale %s from a killed run", path.name)


def _tmp_is_stale(path: Path) -> bool:
    match = _TMP_RE.match(path.name)
    if match is None:
        return False
    if match.group("host") == _HOST:
        return not _pid_alive(int(match.group("pid")))
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_STALE_S
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- locks


def _read_lock(path: Path) -> tuple[dict, float] | None:
    """(holder, mtime) of a lock file, None if it is gone; an unreadable holder (mid-write) is {}."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), mtime


def _stale_reason(holder: dict, mtime: float) -> str | None:
    """Why a lock is stale ("pid 123 on node7 is no longer running"), or None if its holder may be alive."""
    age = time.time() - mtime
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        return f"unreadable for {age:.0f} s" if age > UNREADABLE_LOCK_STALE_S else None
    if host == _HOST:
        return None if _pid_alive(pid, holder.get("pid_start")) else f"pid {pid} on {host} is no longer running"
    if age > FOREIGN_STALE_S:
        return f"pid {pid} on {host} stopped refreshing it {age / 60:.0f} min ago"
    return None


def live_lock_holder(path: Path) -> dict | None:
    """The holder of the lock at `path` while it may be alive ({} while its file is being written); None when
    there is no lock or it is stale."""
    current = _read_lock(path)
    return current[0] if current is not None and _stale_reason(*current) is None else None


def describe_lock_holder(holder: dict) -> str:
    """"pid 123 on node7 since <time>": who holds a lock, for messages."""
    if not holder:
        return "a process that is still writing the lock"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def _remove_stale_lock(path: Path, holder: dict, reason: str) -> None:
    """Remove a lock judged stale, without removing a live lock that replaced it since it was read.

    The lock is first renamed to a name of our own (atomic: only one remover wins) and checked again; if
    it turns out to be a newer, live lock, it is linked back under its name.
    """
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}@{_HOST}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = _read_lock(aside)
        if moved is not None and moved[0].get("token") != holder.get("token"):
            try:
                os.link(aside, path)
            except OSError:
                pass
            return
        log.info("removed stale lock %s (%s)", path.name, reason)
    finally:
        _remove_quietly(aside)


class ShardLock:
    """An exclusive claim on one lock file, held by this process until `release()` (or the `with` block ends).

    While held, a daemon thread touches the file every LOCK_HEARTBEAT_S so that processes on other hosts,
    which cannot check our pid, can tell a live holder from a killed one.
    """

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat {path.name}", daemon=True)
        self._heartbeat.start()

    @classmethod
    def acquire(cls, path: Path) -> tuple[ShardLock | None, dict]:
        """(lock, {}) if this process now holds `path`; (None, holder) if a live process holds it. Raises OSError."""
        for _ in range(5):
            holder = {
                "pid": os.getpid(),
                "host": _HOST,
                "since": _now_iso(),
                "pid_start": _process_start_ticks(os.getpid()),
                "token": os.urandom(8).hex(),
            }
            # Published whole (temp file + hard link), so a run killed while taking the lock never leaves an
            # empty lock that the next run would have to wait out as "still being written".
            if _publish_atomically(path, json.dumps(holder).encode(), exclusive=True):
                return cls(path, holder), {}
            current = _read_lock(path)
            if current is None:
                continue
            reason = _stale_reason(*current)
            if reason is None:
                return None, current[0]
            _remove_stale_lock(path, current[0], reason)
        current = _read_lock(path)
        return None, current[0] if current else {}

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("lock %s disappeared while held; another run may now write what it guards", self.path)
                return
            except OSError as err:
                log.warning("cannot refresh lock %s (%s)", self.path, describe_error(err))

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        current = _read_lock(self.path)
        if current is not None and current[0].get("token") == self.holder["token"]:
            _remove_quietly(self.path)

    def __enter__(self) -> ShardLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def claim_shard(folder: CacheFolder, index: int) -> tuple[ShardLock | None, dict | None]:
    """Claim shard `index` for writing: (lock, None) when claimed; (None, holder), with one log line, when another
    live run holds it (a shard the caller must not call done); (None, None) when it is complete.

    Also removes temp files of this shard left by killed runs. Use the lock as `with lock, ShardWriter(...)`.
    """
    if folder.is_complete(index):
        return None, None
    try:
        lock, holder = ShardLock.acquire(folder.lock_path(index))
    except OSError as err:
        raise VildError(f"{folder.lock_path(index)}: cannot create lock ({describe_error(err)})") from err
    if lock is None:
        if folder.is_complete(index):  # its writer published it and let go between our two looks
            return None, None
        log.info("skipping %s: another run is writing it (%s)", shard_name(index), describe_lock_holder(holder))
        return None, holder
    if folder.is_complete(index):  # finished by another run between the caller's listing and our lock
        log.debug("skipping %s: already complete", shard_name(index))
        lock.release()
        return None, None
    folder.remove_stale_temp_files(index)
    return lock, None


# ---------------------------------------------------------------------------------------------- cache folder


class CacheFolder:
    """A cache folder and its manifest. Make one with `open_or_create` (writers) or `open` (readers)."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.stage: str = manifest["stage"]
        self.config: dict = manifest["config"]
        self.inputs: dict = manifest["inputs"]
        self.fingerprint: str = manifest["fingerprint"]
        self.num_shards: int = manifest["num_shards"]
        self.images_per_shard: int = manifest["images_per_shard"]
        descriptions = manifest.get("field_descriptions", {})
        self.fields: dict[str, RowField] = {
            name: RowField(spec["dtype"], tuple(spec["shape"]), descriptions.get(name, ""))
            for name, spec in manifest["fields"].items()
        }
        self._temp_files_by_shard: dict[str, list[str]] | None = None
        self.made_otherwise: list[str] = []
        """"key: first run's -> this run's" for each `made_with` setting a resuming run changed (open_or_create)."""

    # -- creation

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        *,
        stage: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, Any],
        fields: Mapping[str, RowField | tuple],
        num_shards: int,
        images_per_shard: int,
        overwrite: bool = False,
        sources: Mapping[str, str] | None = None,
        made_with: Mapping[str, Any] | None = None,
    ) -> CacheFolder:
        """The cache in `path` for these settings: created if new, resumed if its fingerprint matches.

        A cache made with other settings is refused (VildError naming the keys that differ) unless
        `overwrite`, which replaces it. Overwrite never discards a matching cache, so every worker of an
        array job may pass it; it refuses while another run is writing a shard of the old cache, and it
        never replaces a cache of another stage (that is almost always a wrong path, not a stale cache).
        `sources` (input name -> where it was read) is kept in the manifest for messages, outside the
        fingerprint: a copied or moved input is the same input. `made_with` (settings that can move values in
        their last bits but leave them the same quantity, such as a batch size) is kept there too, as the
        creating run had it; a run that resumes with others finds them in `made_otherwise` (the writer that
        claims a shard warns of them: `shard_work.ClaimingSampler`).
        """
        path = Path(path)
        made_with = _plain(dict(made_with or {}))
        row_fields = {name: _as_row_field(spec) for name, spec in fields.items()}
        identity = _plain(
            {
                "stage": stage,
                "config": dict(config),
                "inputs": dict(inputs),
                "fields": {name: {"dtype": f.dtype, "shape": list(f.shape)} for name, f in row_fields.items()},
                "num_shards": int(num_shards),
                "images_per_shard": int(images_per_shard),
            }
        )
        clash = [name for name in identity["fields"] if name in _RESERVED_NAMES]
        if clash:
            raise ValueError(f"row field names {clash} are reserved for the shard index datasets")
        fingerprint = joblib.hash(_content(identity))
        manifest = {
            "format": "vild-pipe cache",
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fingerprint,
            **identity,
            # Documentation only, outside the fingerprint: rewording a description must not void a cache.
            "field_descriptions": {name: f.description for name, f in row_fields.items()},
            "sources": dict(sources or {}),
            "made_with": made_with,
            "created": _now_iso(),
            "complete": False,
            "shards": [],
        }
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise VildError(f"{path}: cannot create the cache folder ({describe_error(err)})") from err

        deadline = time.monotonic() + OVERWRITE_WAIT_S
        while True:
            existing, unreadable = cls._peek_manifest(path)
            old_identity = {key: existing.get(key) for key in identity} if existing is not None else None
            newer = existing is not None and existing.get("schema_version", 0) > SCHEMA_VERSION
            if existing is not None and not newer and (existing.get("fingerprint") == fingerprint
                                                       or _content(old_identity) == _content(identity)):
                manifest = existing   # (a cache made before fingerprints left names out matches by content)
                break
            if existing is not None and existing.get("stage") != stage:
                raise VildError(
                    f"{path}: holds a {existing.get('stage')} cache, not a {stage} one; use another folder"
                    " (or delete that cache yourself if it is really not needed)"
                )
            orphans = [n for n in _cache_files(path) if n.endswith((".h5", ".json"))]
            if _live_overwrite_lock(path):
                pass  # another run is replacing the cache right now: wait for its manifest
            elif existing is not None or unreadable or orphans:
                if newer:
                    problem = (f"made by a newer vild-pipe (cache schema {existing['schema_version']}; this one"
                               f" reads {SCHEMA_VERSION}): upgrade vild-pipe to resume it")
                elif existing is not None:
                    changes = value_changes(_content(old_identity), _content(identity))
                    shown = first_few(changes, 4, "; ") or f"fingerprint {existing.get('fingerprint')}"
                    problem = f"made with a different config or inputs ({shown})"
                elif unreadable:
                    problem = f"left with an unreadable {MANIFEST_NAME} ({unreadable})"
                else:
                    problem = f"left without its {MANIFEST_NAME} ({orphans[0]} ...)"
                if not overwrite:
                    raise VildError(f"{path}: cache was {problem}; use another folder or --overwrite")
                if cls._replace(path, manifest, problem):
                    break
            else:
                try:
                    created = _publish_atomically(path / MANIFEST_NAME, _manifest_bytes(manifest), exclusive=True)
                except OSError as err:
                    raise VildError(f"{path / MANIFEST_NAME}: cannot write ({describe_error(err)})") from err
                if created:
                    log.info("created cache %s (%s, %s, fingerprint %s)", path, stage, counted(num_shards, "shard"),
                             fingerprint)
                    break
                continue
            if time.monotonic() > deadline:
                raise VildError(
                    f"{path / OVERWRITE_LOCK_NAME}: another run has been replacing this cache for"
                    f" {OVERWRITE_WAIT_S:.0f} s; delete the lock file if that run is dead"
                )
            time.sleep(0.2)

        folder = cls(path, manifest)
        folder.remove_stale_files()
        done = len(folder.complete_shards())
        if done:
            log.info("resuming cache %s: %d of %s complete", path, done, counted(num_shards, "shard"))
        begun_with = manifest.get("made_with") or {}
        unrecorded = [key for key in made_with if key not in begun_with]   # (kept since: the first run's is unknown)
        folder.made_otherwise = value_changes(begun_with, made_with, skip=unrecorded) if begun_with else []
        return folder

    @classmethod
    def open(cls, path: str | os.PathLike, stage: str | None = None) -> CacheFolder:
        """An existing cache for reading; DataError if there is none (or it is of another stage than `stage`)."""
        path = Path(path)
        manifest, unreadable = cls._peek_manifest(path)
        if unreadable:
            raise DataError(f"{path / MANIFEST_NAME}: unreadable cache manifest ({unreadable})")
        if manifest is None:
            expected = f"; run {stage} first" if stage else ""
            raise DataError(f"{path}: not a vild-pipe cache (no {MANIFEST_NAME}){expected}")
        if manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise DataError(
                f"{path / MANIFEST_NAME}: cache schema version {manifest['schema_version']} is newer than this"
                f" vild-pipe reads ({SCHEMA_VERSION}); upgrade vild-pipe"
            )
        if stage is not None and manifest.get("stage") != stage:
            raise DataError(f"{path}: holds a {manifest.get('stage')} cache, expected a {stage} cache")
        return cls(path, manifest)

    @staticmethod
    def _peek_manifest(path: Path) -> tuple[dict | None, str | None]:
        """(manifest, None), (None, None) if absent, or (None, reason) if unreadable."""
        try:
            manifest = _read_json(path / MANIFEST_NAME)
        except ValueError as err:
            return None, f"not JSON: {err}"
        except OSError as err:
            raise VildError(f"{path / MANIFEST_NAME}: cannot read ({describe_error(err)})") from err
        if manifest is not None and not {"fingerprint", "stage", "num_shards", "fields"} <= set(manifest):
            return None, "not a vild-pipe cache manifest"
        return manifest, None

    @classmethod
    def _replace(cls, path: Path, manifest: dict, problem: str) -> bool:
        """Wipe the old cache files and publish `manifest`, under overwrite.lock; False if another run holds it."""
        try:
            lock, _ = ShardLock.acquire(path / OVERWRITE_LOCK_NAME)
        except OSError as err:
            raise VildError(f"{path / OVERWRITE_LOCK_NAME}: cannot create ({describe_error(err)})") from err
        if lock is None:
            return False
        with lock:
            existing, _ = cls._peek_manifest(path)
            if existing is not None and existing.get("fingerprint") == manifest["fingerprint"]:
                return True
            names = _cache_files(path)
            for name in names:
                if name.endswith(".lock"):
                    holder = live_lock_holder(path / name)
                    if holder is not None:
                        raise VildError(
                            f"{path / name}: {describe_lock_holder(holder)} is writing this shard of the old"
                            " cache; stop that run before --overwrite"
                        )
            try:
                _remove_quietly(path / MANIFEST_NAME)
                for name in names:
                    (path / name).unlink(missing_ok=True)
                _publish_atomically(path / MANIFEST_NAME, _manifest_bytes(manifest))
            except OSError as err:
                raise VildError(f"{path}: cannot replace the old cache ({describe_error(err)})") from err
            log.info("replaced the cache in %s: it was %s", path, problem)
            return True

    # -- files

    def shard_path(self, index: int) -> Path:
        return self.path / f"{shard_name(index)}.h5"

    def marker_path(self, index: int) -> Path:
        return self.path / f"{shard_name(index)}.json"

    def lock_path(self, index: int) -> Path:
        return self.path / f"{shard_name(index)}.lock"

    def _names(self) -> set[str]:
        try:
            return set(os.listdir(self.path))
        except OSError as err:
            raise VildError(f"{self.path}: cannot list the cache folder ({describe_error(err)})") from err

    def is_complete(self, index: int) -> bool:
        return self.shard_path(index).exists() and self.marker_path(index).exists()

    def complete_shards(self) -> list[int]:
        """Indices of the shards whose .h5 and done-marker both exist."""
        names = self._names()
        return [
            i for i in range(self.num_shards) if f"{shard_name(i)}.h5" in names and f"{shard_name(i)}.json" in names
        ]

    def missing_shards(self) -> list[int]:
        complete = set(self.complete_shards())
        return [i for i in range(self.num_shards) if i not in complete]

    def require_complete(self) -> None:
        """DataError naming the missing shards unless every shard is complete."""
        missing = self.missing_shards()
        if missing:
            names = first_few([shard_name(i) for i in missing], 8)
            raise DataError(
                f"{self.path}: incomplete {self.stage} cache, {len(missing)} of {self.num_shards} shards missing"
                f" ({names}); rerun {self.stage} with the same options to finish it"
            )

    def shard_locks(self) -> list[tuple[int, dict, str | None]]:
        """(shard index, holder, why it is stale or None) for every shard lock now in the folder: the shards
        being written, and those a killed run left (which the next run of the stage removes)."""
        locks, names = [], self._names()
        for index in range(self.num_shards):
            current = _read_lock(self.lock_path(index)) if f"{shard_name(index)}.lock" in names else None
            if current is not None:
                locks.append((index, current[0], _stale_reason(*current)))
        return locks

    def read_marker(self, index: int) -> dict:
        try:
            marker = _read_json(self.marker_path(index))
        except (ValueError, OSError) as err:
            raise DataError(
                f"{self.marker_path(index)}: unreadable shard marker ({describe_error(err)});"
                f" delete it and rerun {self.stage}"
            ) from err
        if marker is None:
            raise DataError(f"{self.marker_path(index)}: missing; {shard_name(index)} is not complete")
        return marker

    def remove_stale_temp_files(self, index: int) -> None:
        """Remove the temp files of shard `index` that killed runs left (one log line each), as the folder's
        listing at the first call found them: one listing a run, not one a claim (with 16,000 shards a claim
        took 27.5 ms, on a local disk). A temp file left after that listing waits for the next run."""
        if self._temp_files_by_shard is None:
            self._temp_files_by_shard = {}
            for name in self._names():
                match = _TMP_RE.match(name)
                if match is not None and name.startswith("shard-"):
                    self._temp_files_by_shard.setdefault(match.group("target").split(".")[0], []).append(name)
        for name in sorted(self._temp_files_by_shard.pop(shard_name(index), [])):
            try:
                _remove_tmp_if_stale(self.path / name)
            except OSError as err:
                log.warning("cannot remove stale %s (%s)", self.path / name, describe_error(err))

    def remove_stale_files(self) -> None:
        """Remove locks and temp files left by killed runs (one log line each)."""
        prefixes = ("shard-", MANIFEST_NAME, OVERWRITE_LOCK_NAME)
        for name in sorted(self._names()):
            if not name.startswith(prefixes):
                continue
            file = self.path / name
            try:
                if name.endswith(".lock"):
                    current = _read_lock(file)
                    reason = _stale_reason(*current) if current is not None else None
                    if reason is not None:
                        _remove_stale_lock(file, current[0], reason)
                else:
                    _remove_tmp_if_stale(file)
            except OSError as err:
                log.warning("cannot remove stale %s (%s)", file, describe_error(err))

    def _check_still_current(self, what: str) -> dict:
        """The manifest on disk; VildError if it was replaced (--overwrite from another run) while we made `what`."""
        manifest, _ = self._peek_manifest(self.path)
        if manifest is None or manifest.get("fingerprint") != self.fingerprint:
            raise VildError(
                f"{self.path}: the cache was replaced by another run (--overwrite with other options?) while"
                f" {what} was being written; its result was discarded"
            )
        return manifest

    # -- reading, summary

    def read_shard(self, index: int) -> ShardReader:
        """A validated reader of complete shard `index` (DataError if it is missing or corrupt)."""
        if not self.marker_path(index).exists():
            raise DataError(
                f"{self.shard_path(index)}: shard is not complete; rerun {self.stage} to finish the cache"
            )
        return ShardReader(self.shard_path(index), fields=self.fields)

    def manifest_summary(self) -> dict:
        """Totals over the complete shards' markers: shards, images, rows, bytes, seconds, skipped images."""
        complete = self.complete_shards()
        markers = [self.read_marker(i) for i in complete]
        return {
            "num_shards": self.num_shards,
            "complete_shards": len(complete),
            "missing_shards": self.num_shards - len(complete),
            "images": sum(m["images"] for m in markers),
            "rows": sum(m["rows"] for m in markers),
            "bytes": sum(m["bytes"] for m in markers),
            "seconds": sum(m["seconds"] for m in markers),
            "skipped_images": [skip for m in markers for skip in m["skipped_images"]],
        }

    def finalize(self) -> bool:
        """Write the list of shards into the manifest once every shard is complete; True if the cache is complete.

        Any writer may call it, any number of times: the content only depends on the markers, and the
        manifest is replaced atomically.
        """
        complete = self.complete_shards()
        if len(complete) < self.num_shards:
            return False
        shards = [self.read_marker(i) for i in complete]
        current = self._check_still_current("the final manifest")
        if current.get("complete") and current.get("shards") == shards:
            self.manifest = current
            return True
        finalized = {**current, "complete": True, "shards": shards}
        try:
            _publish_atomically(self.path / MANIFEST_NAME, _manifest_bytes(finalized))
        except OSError as err:
            raise VildError(f"{self.path / MANIFEST_NAME}: cannot write ({describe_error(err)})") from err
        self.manifest = finalized
        log.info("cache %s is complete: %s", self.path, counted(self.num_shards, "shard"))
        return True


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


INPUT_NAME_KEYS = ("file", "checkpoint", "model", "path")
"""Keys of an input's identity that say where it was read, not what it holds: left out of the comparison and the
fingerprint wherever the input also has a content hash, so a copied, renamed or linked input (a node's local copy
on a cluster) is the same input."""


def _content(identity: dict) -> dict:
    """`identity` without the input names that a content hash makes redundant (INPUT_NAME_KEYS)."""
    inputs = {name: {key: value for key, value in entry.items() if key not in INPUT_NAME_KEYS}
              if isinstance(entry, dict) and (entry.get("sha256") or entry.get("fingerprint")) else entry
              for name, entry in (identity.get("inputs") or {}).items()}
    return {**identity, "inputs": inputs}


def _cache_files(path: Path) -> list[str]:
    """Names in `path` that belong to a cache (never touches other files: --overwrite removes only these)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if _SHARD_FILE_RE.match(n) or (_TMP_RE.match(n) and n.startswith(("shard-", MANIFEST_NAME)))
    )


def _live_overwrite_lock(path: Path) -> bool:
    return live_lock_holder(path / OVERWRITE_LOCK_NAME) is not None


# ---------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Collects the rows of one shard image by image, then publishes the shard atomically.

    `with ShardWriter(folder, i) as shard: shard.add_image(image_id, boxes=..., scores=...)`. A clean exit
    writes the temp file, fsyncs it, renames it to shard-0000i.h5 and writes the done-marker; an exception
    discards everything (nothing half-written is ever visible) and propagates. Rows are buffered in memory:
    a shard is a fixed, modest run of images. `close()` may also be called from a background thread.
    """

    def __init__(self, folder: CacheFolder, shard_index: int):
        if not 0 <= shard_index < folder.num_shards:
            raise ValueError(f"shard {shard_index} is outside the cache's {folder.num_shards} shards")
        self.folder = folder
        self.shard_index = shard_index
        self.path = folder.shard_path(shard_index)
        self._image_ids: list[int] = []
        self._row_counts: list[int] = []
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in folder.fields}
        self._skipped: list[dict] = []
        self._seen: set[int] = set()
        self._started = time.monotonic()
        self._finished = False

    def add_image(self, image_id: int, **rows: Any) -> None:
        """Append one image and its rows: one array per row field, all with the same number of rows (may be 0)."""
        image_id = int(image_id)
        if set(rows) != set(self.folder.fields):
            raise ValueError(f"add_image got fields {sorted(rows)}, the cache has {sorted(self.folder.fields)}")
        if image_id in self._seen:
            raise ValueError(f"image {image_id} was already added to {self.path.name}")
        arrays = {}
        for name, field in self.folder.fields.items():
            array = np.asarray(rows[name])
            if array.ndim != 1 + len(field.shape) or array.shape[1:] != field.shape:
                raise ValueError(f"{name}: rows of shape {array.shape[1:]}, the cache stores {field.shape}")
            arrays[name] = array.astype(field.dtype, casting="same_kind", copy=True)
        counts = {len(a) for a in arrays.values()}
        if len(counts) > 1:
            row_counts = {name: len(array) for name, array in arrays.items()}
            raise ValueError(f"image {image_id}: fields have different row counts {row_counts}")
        for name, array in arrays.items():
            self._columns[name].append(array)
        self._image_ids.append(image_id)
        self._row_counts.append(counts.pop() if counts else 0)
        self._seen.add(image_id)

    def skip_image(self, image_id: int, reason: str) -> None:
        """Record an input image that could not be processed (recorded in the marker, not in the shard)."""
        self._skipped.append({"image_id": int(image_id), "reason": str(reason)})

    @property
    def num_images(self) -> int:
        return len(self._image_ids)

    @property
    def num_rows(self) -> int:
        return sum(self._row_counts)

    def close(self) -> dict:
        """Publish the shard and its marker; returns the marker. VildError on a failed write (disk full...)."""
        if self._finished:
            raise RuntimeError(f"{self.path.name} was already closed")
        self._finished = True
        tmp = temp_path(self.path)
        try:
            self._write_h5(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.folder._check_still_current(self.path.name)
            os.replace(tmp, self.path)
        except OSError as err:
            raise VildError(f"{self.path}: cannot write cache shard ({describe_error(err)})") from err
        finally:
            _remove_quietly(tmp)
        marker = {
            "shard": self.shard_index,
            "file": self.path.name,
            "images": self.num_images,
            "rows": self.num_rows,
            "bytes": self.path.stat().st_size,
            "skipped_images": self._skipped,
            "seconds": round(time.monotonic() - self._started, 3),
        }
        try:
            _publish_atomically(self.folder.marker_path(self.shard_index), (json.dumps(marker) + "\n").encode())
        except OSError as err:
            marker_path = self.folder.marker_path(self.shard_index)
            raise VildError(f"{marker_path}: cannot write ({describe_error(err)})") from err
        log.debug(
            "wrote %s: %d images, %d rows, %s in %.1f s",
            self.path.name, marker["images"], marker["rows"], format_bytes(marker["bytes"]), marker["seconds"],
        )
        return marker

    def abort(self) -> None:
        """Drop the buffered rows; nothing is written."""
        self._finished = True
        self._columns = {name: [] for name in self._columns}

    def _write_h5(self, tmp: Path) -> None:
        row_start = np.zeros(len(self._row_counts) + 1, dtype=np.int64)
        np.cumsum(self._row_counts, out=row_start[1:])
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = "vild-pipe cache shard"
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["stage"] = self.folder.stage
            h5.attrs["cache_fingerprint"] = self.folder.fingerprint
            h5.attrs["shard_index"] = self.shard_index
            h5.attrs["num_shards"] = self.folder.num_shards
            h5.attrs["layout"] = "rows of image k are row_start[k]:row_start[k+1] of every per-row dataset"
            image_ids = np.asarray(self._image_ids, dtype=np.int64)
            _create_dataset(h5, "image_id", image_ids, "image id of each image, in input order")
            _create_dataset(h5, "row_start", row_start, "rows of image k are row_start[k]:row_start[k+1]")
            for name, field in self.folder.fields.items():
                parts, self._columns[name] = self._columns[name], []  # free each field's buffer once written
                data = np.concatenate(parts) if parts else np.empty((0, *field.shape), dtype=field.dtype)
                del parts
                _create_dataset(h5, name, data, field.description)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _create_dataset(h5: h5py.File, name: str, data: np.ndarray, description: str) -> None:
    """A dataset chunked along rows, at most MAX_CHUNK_BYTES a chunk, uncompressed (empty ones unchunked)."""
    chunks = None
    if len(data):
        row_bytes = max(1, data.dtype.itemsize * math.prod(data.shape[1:]))
        chunks = (min(len(data), max(1, MAX_CHUNK_BYTES // row_bytes)), *data.shape[1:])
    dataset = h5.create_dataset(name, data=data, chunks=chunks)
    dataset.attrs["description"] = description


# ---------------------------------------------------------------------------------------------- reading


class ShardReader:
    """A validated, read-only view of one shard file: whole arrays for fast loaders, or rows per image.

    Any h5py/OS error on a truncated or corrupt file becomes a one-line DataError. Open one reader per
    process (h5py handles do not survive fork): e.g. in each DataLoader worker, or load `arrays()` up front.
    """

    def __init__(self, path: str | os.PathLike, fields: Mapping[str, RowField | tuple] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: shard file missing; rerun the stage to build it")
        self._h5 = None
        try:
            self._h5 = h5py.File(self.path, "r")
            self._validate({n: _as_row_field(f) for n, f in (fields or {}).items()})
        except (OSError, KeyError, ValueError, TypeError) as err:
            self.close()
            raise self._corrupt(err) from err
        self._positions: dict[int, int] | None = None

    def _corrupt(self, err: BaseException | str) -> DataError:
        reason = " ".join(str(err).split()) or type(err).__name__
        return DataError(
            f"{self.path}: truncated or corrupt HDF5 shard ({reason}); delete it and rerun the stage to rebuild it"
        )

    def _validate(self, fields: dict[str, RowField]) -> None:
        for name in (*_RESERVED_NAMES, *fields):
            if name not in self._h5:
                raise ValueError(f"dataset {name} missing")
        self.image_ids: np.ndarray = self._h5["image_id"][()]
        self.row_start: np.ndarray = self._h5["row_start"][()]
        if self.image_ids.ndim != 1 or self.row_start.shape != (len(self.image_ids) + 1,):
            raise ValueError(f"row_start has shape {self.row_start.shape} for {len(self.image_ids)} images")
        if self.row_start[0] != 0 or np.any(np.diff(self.row_start) < 0):
            raise ValueError("row_start does not rise monotonically from 0")
        self.field_names = [name for name in self._h5 if name not in _RESERVED_NAMES]
        for name in self.field_names:
            dataset = self._h5[name]
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim == 0 or len(dataset) != self.row_start[-1]:
                rows = len(dataset) if isinstance(dataset, h5py.Dataset) and dataset.ndim else "no"
                raise ValueError(f"dataset {name} has {rows} rows, row_start ends at {self.row_start[-1]}")
            expected = fields.get(name)
            if expected is None:
                continue
            if dataset.dtype != np.dtype(expected.dtype) or dataset.shape[1:] != expected.shape:
                raise ValueError(
                    f"dataset {name} is {dataset.dtype} rows of {dataset.shape[1:]}, the manifest says"
                    f" {expected.dtype} rows of {expected.shape}"
                )

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_rows(self) -> int:
        return int(self.row_start[-1])

    @property
    def attrs(self) -> dict:
        return dict(self._h5.attrs)

    def _read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        try:
            return self._h5[name][rows]
        except (OSError, KeyError) as err:
            raise self._corrupt(err) from err

    def arrays(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole per-row arrays (all fields, or `names`), read in one go each."""
        return {name: self._read(name) for name in (names or self.field_names)}

    def image_rows(self, position: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows of the image at `position` (0 .. num_images-1) in this shard."""
        rows = slice(int(self.row_start[position]), int(self.row_start[position + 1]))
        return {name: self._read(name, rows) for name in (names or self.field_names)}

    def rows_for(self, image_id: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Rows of image `image_id`; KeyError if it is not in this shard."""
        if self._positions is None:
            self._positions = {int(i): k for k, i in enumerate(self.image_ids)}
        if int(image_id) not in self._positions:
            raise KeyError(f"image {image_id} is not in {self.path}")
        return self.image_rows(self._positions[int(image_id)], names)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(image_id, rows) for every image in order; reads each array once, yields views of it."""
        arrays = self.arrays()
        for k, image_id in enumerate(self.image_ids):
            start, stop = self.row_start[k], self.row_start[k + 1]
            yield int(image_id), {name: array[start:stop] for name, array in arrays.items()}

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
