"""The seed log: a ZO run stored as its base weights' hash plus a few numbers per step (docs/SEEDLOG.md).

A JSON Lines file: a header line, then one line per optimizer step as `ZOOptimizer.record_hook` gives it.
Each line is flushed as it is written, so a killed run leaves a valid prefix; `replay` feeds the records
to `ZOOptimizer.replay_step`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

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
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(_dumps({"format": FORMAT, "version": VERSION, **header})
                       + "".join(_dumps(r) for r in records or []))
        tmp.replace(self.path)
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
    """(header, records). A last line cut short by a killed run is dropped; anything else malformed, or a
    gap in the steps, is an error."""
    path = Path(path)
    if not path.is_file():
        raise SeedLogError(f"seed log {path} does not exist")
    text = path.read_text()
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # unterminated: the run was killed while writing it
    try:
        header, *records = [json.loads(line) for line in lines if line]
    except ValueError as exc:  # also an empty file
        raise SeedLogError(f"{path} is not a seed log: {exc}") from None
    if header.get("format") != FORMAT:
        raise SeedLogError(f"{path} is not a seed log (no '{FORMAT}' header)")
    if header.get("version") != VERSION:
        raise SeedLogError(f"{path} has seed log version {header.get('version')}; this zokern reads {VERSION}")
    for i, r in enumerate(records):
        if r.get("step") != i:
            raise SeedLogError(f"{path}: record {i} is of step {r.get('step')}; steps must run 0, 1, 2, ...")
    return header, records


def replay(optimizer, records: list[dict]) -> None:
    """Redo the logged steps on `optimizer`, built as in training over the same starting weights, then
    take out two-pass mode's pending perturbation: the weights are the trained ones."""
    for record in records:
        optimizer.replay_step(record)
    optimizer.restore_weights()
