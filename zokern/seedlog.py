"""The seed log: a ZO run stored as its base weights' hash plus a few numbers per step (docs/SEEDLOG.md).

A JSON Lines file: a header line, then one line per optimizer step as `ZOOptimizer.record_hook` gives it.
Each line is flushed as it is written, so a killed run leaves a valid prefix; `replay` feeds the records
to `ZOOptimizer.replay_step`.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch

from zokern import backends
from zokern.fileio import atomic_write
from zokern.random import STREAM_VERSION, check_stream_version, replay_changes

FORMAT = "zokern-seedlog"
VERSION = 1


class SeedLogError(ValueError):
    pass


def weights_sha256(named) -> str:
    """sha256 over the (name, dtype, shape, bytes) of each (name, tensor) pair, in the given order."""
    h = hashlib.sha256()
    for name, p in named:
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dumps(obj: dict) -> str:
    # repr-exact floats: every logged float reads back bit for bit.
    return json.dumps(obj, separators=(",", ":")) + "\n"


class SeedLogWriter:
    """Writes a new log (header first) and appends records to it, one flushed line each."""

    def __init__(self, path: "str | Path", header: dict, records: "list[dict] | None" = None):
        self.path = Path(path)
        header = {"format": FORMAT, "version": VERSION, "stream_version": STREAM_VERSION, **header}
        atomic_write(self.path, (_dumps(header)
                                 + "".join(_dumps(r) for r in records or [])).encode())
        self._file = self.path.open("a")

    @classmethod
    def resume(cls, path: "str | Path", steps: int) -> "SeedLogWriter":
        """Continue an existing log after cutting it back to its first `steps` records (a resumed run's
        checkpoint step, as metrics.jsonl)."""
        header, records = read(path)
        if len(records) < steps:
            raise SeedLogError(f"{path} has {len(records)} steps, fewer than the checkpoint's {steps}")
        return cls(path, header, records[:steps])

    def write(self, record: dict) -> None:
        self._file.write(_dumps(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read(path: "str | Path") -> tuple[dict, list[dict]]:
    """(header, records), every record checked against the format (docs/SEEDLOG.md). A last line cut short by
    a killed run is dropped; anything else malformed, or a gap in the steps, is a SeedLogError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise SeedLogError(f"seed log {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SeedLogError(f"{path} is not a seed log: not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # unterminated: the run was killed while writing it
    parsed = []
    for number, line in enumerate(lines, 1):
        if line:
            try:
                parsed.append((number, json.loads(line)))
            except ValueError as exc:
                raise SeedLogError(f"{path}:{number} is not a JSON line ({exc})") from None
    if not parsed or not isinstance(parsed[0][1], dict) or parsed[0][1].get("format") != FORMAT:
        raise SeedLogError(f"{path} is not a seed log (no '{FORMAT}' header)")
    (_, header), *numbered = parsed
    if header.get("version") != VERSION:
        raise SeedLogError(f"{path} has seed log version {header.get('version')}; this zokern reads {VERSION}")
    # Logs from before the field drew from stream version 1, whose values version 2 keeps.
    header.setdefault("stream_version", 1)
    try:
        check_stream_version(header["stream_version"])
    except ValueError as exc:
        raise SeedLogError(f"{path}: {exc}") from None
    for i, (number, r) in enumerate(numbered):
        problem = _record_problem(r)
        if problem:
            raise SeedLogError(f"{path}:{number}: {problem}")
        if r["step"] != i:
            raise SeedLogError(f"{path}: record {i} is of step {r['step']}; steps must run 0, 1, 2, ...")
    return header, [r for _, r in numbered]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record_problem(r) -> "str | None":
    """What makes `r` no step record of the format, or None."""
    if not isinstance(r, dict):
        return "a record must be a JSON object"
    for key, ok, what in (("step", _is_integer, "an integer >= 0"), ("seed", _is_integer, "an integer >= 0"),
                          ("lr", _is_number_list, "a list of finite numbers"),
                          ("weight_decay", _is_number_list, "a list of finite numbers")):
        if key not in r:
            return f"the record lacks {key!r}"
        if not ok(r[key]):
            return f"{key!r} must be {what}, got {r[key]!r}"
    if "skipped" in r:
        if r["skipped"] is not True:
            return f"'skipped' must be true, got {r['skipped']!r}"
    elif not _is_number(r.get("grad")):
        return f"'grad' must be a finite number, got {r.get('grad', '(nothing)')!r}"
    if "hess_scale" in r and not _is_number(r["hess_scale"]):
        return f"'hess_scale' must be a finite number, got {r['hess_scale']!r}"
    if "pending" in r and not isinstance(r["pending"], bool):
        return f"'pending' must be true or false, got {r['pending']!r}"
    # merged: a count of merges (a log from before merges were counted: true)
    if "merged" in r and not (r["merged"] is True or (_is_integer(r["merged"]) and r["merged"] > 0)):
        return f"'merged' must be a positive integer (or true), got {r['merged']!r}"
    if "rescale" in r and not (isinstance(r["rescale"], list) and all(_is_number_list(b) for b in r["rescale"])):
        return f"'rescale' must be a list of lists of finite numbers, got {r['rescale']!r}"
    return None


def _is_number_list(value) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


class NotBitwiseWarning(UserWarning):
    """A replay's weights may be close to the trained ones, not bitwise equal (seedlog.replay)."""


def replay(optimizer, records: list[dict], stream_version: int = STREAM_VERSION) -> None:
    """Redo the logged steps on `optimizer`, built as in training over the same starting weights, then
    take out two-pass mode's pending perturbation: the weights are the trained ones. stream_version: the log
    header's; the optimizer's distribution must exist in it (a ValueError before any weight moves). A
    NotBitwiseWarning for each change since that version that the run may meet (zokern.random.replay_changes: its
    backends, its stochastic rounding of 16-bit tensors, its low-rank updates of bfloat16 matrices): the replayed
    weights are then close to the trained ones, maybe not bitwise equal."""
    check_stream_version(stream_version, optimizer.dist)
    # The ops resolve the backend per device, as here.
    on = {backends.resolve(optimizer.backend, b.params[0].device.type) for b in optimizer.buckets}
    rounds_16_bit = optimizer.rounding == "stochastic" and any(
        p.dtype in (torch.bfloat16, torch.float16) for b in optimizer.buckets for p in b.params)
    bfloat16_low_rank = optimizer.updates_low_rank and any(
        p.dtype == torch.bfloat16 for b in optimizer.buckets for p in b.params)
    for change in replay_changes(stream_version, on, rounds_16_bit, bfloat16_low_rank):
        warnings.warn(f"the run drew from random stream version {stream_version}; {change} (docs/RANDOM.md), so "
                      "the weights replayed may be close, not bitwise equal", NotBitwiseWarning, stacklevel=2)
    for record in records:
        optimizer.replay_step(record)
    optimizer.restore_weights()
