"""The one exception type a user should see: the CLI prints it as a single line and exits non-zero; the
wording helpers of those lines; and the log lines on stderr."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.error import HTTPError, URLError


class VildError(Exception):
    """A problem with the user's input or environment, stated in one line naming the file and the problem."""


class DataError(VildError):
    """Bad input data: an annotation file, an image, a cache."""


_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
}


def describe_error(err: BaseException) -> str:
    """The reason part of "PATH: cannot read (REASON)": one line, without the path the caller already names.

    str(OSError) repeats the path and the errno ("[Errno 28] No space left on device: '/x/y'"); the errno's
    text alone is what the user needs next to the path.
    """
    if isinstance(err, URLError) and not isinstance(err, HTTPError):
        # "<urlopen error [Errno -2] Name or service not known>": the socket error inside is the reason
        reason = err.reason
        if isinstance(reason, OSError) and reason.strerror:
            return f"network error: {reason.strerror[:1].lower()}{reason.strerror[1:]}"
        return f"network error: {reason}"
    if isinstance(err, OSError) and err.errno:
        return _OS_REASONS.get(err.errno) or os.strerror(err.errno).lower()
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text, {err.reason} at byte {err.start}"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (line {err.lineno} column {err.colno}: {err.msg})"
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


_HASH_RE = re.compile(r"[0-9a-f]{32,}")


def short_value(value: Any, limit: int = 40) -> str:
    """A config or identity value in a one-line message ("top_n: 20 -> 30"): JSON, a hash cut to 12 digits,
    anything longer than `limit` characters cut, between the items of a list or dict where it can be."""
    if isinstance(value, str) and _HASH_RE.fullmatch(value):
        return value[:12]
    text = json.dumps(value, sort_keys=True)
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    return cut[:cut.rfind(", ")] + ", ..." if ", " in cut else cut + "..."


def first_few(items: Iterable[Any], limit: int, separator: str = ", ") -> str:
    """The first `limit` items joined, and how many more there are: a message stays one readable line."""
    items = [str(item) for item in items]
    return separator.join(items[:limit]) + (f"{separator}and {len(items) - limit} more" if len(items) > limit else "")


def require_at_least(option: str, value: float | None, floor: int = 1) -> None:
    """VildError "OPTION must be at least FLOOR, got VALUE" when `value` is below `floor` (None: not given)."""
    if value is not None and value < floor:
        raise VildError(f"{option} must be at least {floor}, got {value}")


def require_between(option: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """VildError "OPTION must be in [LOW, HIGH], got VALUE" ("(LOW" where `low_open`) outside it (None: not given)."""
    if value is None:
        return
    if not ((low < value) if low_open else (low <= value)) or value > high:
        raise VildError(f"{option} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value}")


def counted(number: int, noun: str) -> str:
    """"1 shard", "1,200 shards": a count and its noun, plural by adding s."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def value_changes(old: Mapping[str, Any], new: Mapping[str, Any], skip: Iterable[str] = ()) -> list[str]:
    """"key: old -> new" for every dotted key of two nested mappings whose values differ, "(absent)" where one
    lacks it, values as `short_value` writes them; keys in `skip` (dotted) and those below them left out."""
    skipped = set(skip)
    old_flat, new_flat = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key in skipped or any(key.startswith(prefix + ".") for prefix in skipped):
            continue
        if key not in old_flat or key not in new_flat or old_flat[key] != new_flat[key]:
            before = short_value(old_flat[key]) if key in old_flat else "(absent)"
            after = short_value(new_flat[key]) if key in new_flat else "(absent)"
            changes.append(f"{key}: {before} -> {after}")
    return changes


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested mapping's leaves (an empty mapping is a leaf)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_to_stderr(level: int = logging.INFO) -> None:
    """Log lines on stderr as every command writes them: time, level, logger, message; vild-pipe's own lines
    and other libraries' warnings only (`ours_or_a_warning`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ours_or_a_warning)
    logging.basicConfig(level=level, handlers=[handler])


def ours_or_a_warning(record: logging.LogRecord) -> bool:
    """vild-pipe's log lines, and other libraries' warnings: their info lines (torch's FakeTensor cache stats at
    exit) are not the user's business."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "vild_pipe"
