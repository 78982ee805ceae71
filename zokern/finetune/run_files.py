"""The files of a `zokern finetune` run in its --output-dir: metrics, the seed log's path, and crash-safe
checkpoints with their rotation and recovery."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from zokern.fileio import atomic_write
from zokern.seedlog import read as read_seedlog

class CheckpointError(ValueError):
    """An --output-dir that cannot be written, or resumed from as asked; reported before the model loads."""


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
KEPT_CHECKPOINTS = 2
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt")


class Run:
    """Files of one run in --output-dir: metrics.jsonl, seedlog.jsonl, summary.json, plots, and the checkpoints
    checkpoint-<step>/ with the link `checkpoint` to the newest.

    A checkpoint is written whole into checkpoint-<step>.tmp/, synced, and renamed into place; the link is
    replaced atomically; an old one is renamed to .del before it is removed. A run killed at any point
    leaves complete checkpoints under their own names, and leftovers that the next save or resume removes."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CheckpointError(f"--output-dir {directory}: it or a folder above it is a file") from None
        except OSError as exc:
            raise CheckpointError(f"--output-dir {directory}: {exc.strerror}") from None
        self.metrics_path = self.dir / "metrics.jsonl"
        self.seedlog_path = self.dir / "seedlog.jsonl"
        self.checkpoint = self.dir / "checkpoint"

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """The metrics so far; a last line cut short by a killed run is dropped."""
        if not self.metrics_path.exists():
            return []
        lines = [line for line in self.metrics_path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise CheckpointError(f"{self.metrics_path}:{number} is not a JSON record") from None
        return records

    def truncate_metrics(self, last_step: int) -> None:
        kept = [r for r in self.records() if r.get("step", 0) <= last_step]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint directories, newest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
        return [p for _, p in sorted(found, reverse=True)]

    def remove_leftovers(self) -> None:
        """What a killed save leaves: a half-written .tmp, a half-removed .del, a temporary link."""
        for p in self.dir.glob("checkpoint*"):
            if p.suffix in (".tmp", ".del"):
                _remove(p)

    def start_over(self) -> None:
        """A new run in this directory: another run's checkpoints and metrics go, so that a later --resume
        cannot pick them up."""
        self.remove_leftovers()
        for path in self.checkpoints():
            _discard(path)
        _remove(self.checkpoint)
        _remove(self.metrics_path)

    def save_checkpoint(self, trainable: list, optimizer, progress: dict, config: "FinetuneConfig") -> None:
        """The trained tensors (all weights, or the LoRA adapters), optimizer state, progress and configuration,
        with the sha256 of each file, as checkpoint-<step>/; keeps the newest KEPT_CHECKPOINTS."""
        from safetensors.torch import save_file

        self.remove_leftovers()
        name = f"checkpoint-{progress['step']}"
        tmp, final = self.dir / f"{name}.tmp", self.dir / name
        tmp.mkdir()
        # The optimizer's state first: taking it merges updates a method still holds apart from the weights
        # (SubZero's side path), so the weights saved next are the trained ones.
        optimizer_state = optimizer.state_dict()
        save_file({n: p.detach().contiguous() for n, p in trainable}, str(tmp / CHECKPOINT_FILES[0]))
        torch.save(optimizer_state, tmp / CHECKPOINT_FILES[1])
        digests = {f: _sha256(tmp / f) for f in CHECKPOINT_FILES}
        (tmp / "progress.json").write_text(json.dumps({"state": progress, "config": asdict(config),
                                                       "sha256": digests}))
        self._publish(tmp, final)

    def save_sharded_checkpoint(self, model, trainable: list, optimizer, progress: dict,
                                config: "FinetuneConfig") -> None:
        """save_checkpoint for a sharded (--fsdp) run, called by every rank: the model's and the optimizer's shards
        through torch.distributed.checkpoint (zokern.distributed.save_checkpoint), and the trained tensors gathered
        whole into model.safetensors, as an unsharded run saves them; rank 0 records every file's sha256."""
        from safetensors.torch import save_file

        from zokern import distributed

        main = distributed.rank() == 0
        name = f"checkpoint-{progress['step']}"
        tmp, final = self.dir / f"{name}.tmp", self.dir / name
        if main:
            self.remove_leftovers()
            tmp.mkdir()
        distributed.barrier()
        distributed.save_checkpoint(tmp, model, optimizer)
        # full_tensor() is a collective: every rank gathers, rank 0 writes.
        whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous() for n, p in trainable}
        if main:
            save_file(whole, str(tmp / CHECKPOINT_FILES[0]))
            digests = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / "progress.json").write_text(json.dumps({"state": progress, "config": asdict(config),
                                                           "sha256": digests}))
            self._publish(tmp, final)
        distributed.barrier()

    def _publish(self, tmp: Path, final: Path) -> None:
        """A complete checkpoint-<step>.tmp/ synced, renamed into place, linked, and the old ones rotated out."""
        for path in (*tmp.iterdir(), tmp):
            _fsync(path)
        if final.exists():  # the final save after restore_weights() rewrites the last step's checkpoint
            _discard(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        link = self.dir / "checkpoint.tmp"
        os.symlink(final.name, link)
        os.replace(link, self.checkpoint)
        _fsync(self.dir)
        for old in self.checkpoints()[KEPT_CHECKPOINTS:]:
            _discard(old)

    def resume_point(self, stream) -> "tuple[Path, dict] | None":
        """(newest checkpoint that reads back whole, its progress.json: state, config, sha256), skipping
        damaged ones and ones past the end of the seed log with a line on `stream`. None when the directory
        holds no run at all; a run without a complete checkpoint is a CheckpointError."""
        self.remove_leftovers()
        logged = len(read_seedlog(self.seedlog_path)[1]) if self.seedlog_path.exists() else None
        found = self.checkpoints()
        for path in found:
            try:
                progress = _verified_progress(path)
            except CheckpointError as exc:
                print(f"skipping {path.name}: {exc}", file=stream)
                continue
            if logged is not None and progress["state"]["step"] > logged:
                print(f"skipping {path.name}: the seed log ends at step {logged}", file=stream)
                continue
            self.records()  # metrics damaged before their last line fail here, not after the model loads
            return path, progress
        if found or self.seedlog_path.exists() or self.metrics_path.exists():
            raise CheckpointError(f"--resume: {self.dir} holds a run but no complete checkpoint; "
                                  "run without --resume to start it over")
        return None

    def load_checkpoint(self, path: Path, trainable: list, optimizer) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(str(path / CHECKPOINT_FILES[0]))
            # Tensors and plain data only: unpickling anything else could run code from the file.
            state = torch.load(path / CHECKPOINT_FILES[1], weights_only=True)
        except Exception as exc:  # safetensors' and the unpickler's errors share no narrower base
            first_line = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(f"{path.name}: cannot load {' or '.join(CHECKPOINT_FILES)} "
                                  f"({type(exc).__name__}: {first_line})") from None
        missing = [name for name, _ in trainable if name not in saved]
        if missing:
            raise CheckpointError(f"{path.name} lacks the trained tensor {missing[0]} ({len(missing)} missing)")
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(saved[name])
        try:
            optimizer.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: its optimizer state does not fit this optimizer ({exc})") from None

    def load_sharded_checkpoint(self, path: Path, model, optimizer) -> None:
        """Every rank loads its shards of save_sharded_checkpoint's checkpoint (the world size it was saved on)."""
        from zokern import distributed

        try:
            distributed.load_checkpoint(path, model, optimizer)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: cannot resume from it ({exc})") from None


def _verified_progress(path: Path) -> dict:
    """The progress.json of a checkpoint whose files all match their recorded sha256."""
    try:
        progress = json.loads((path / "progress.json").read_text())
        if not isinstance(progress["state"]["step"], int) or not isinstance(progress["config"], dict):
            raise ValueError("progress.json lacks the step or the configuration")
        recorded = progress["sha256"]
        # A sharded run's checkpoint holds torch.distributed.checkpoint's files (.metadata, one per rank) and the
        # optimizer's per rank: every file it recorded is checked.
        required = (CHECKPOINT_FILES[0], ".metadata") if progress["config"].get("fsdp") else CHECKPOINT_FILES
        absent = [name for name in required if name not in recorded]
        if absent:
            raise ValueError(f"progress.json records no sha256 of {absent[0]}")
        damaged = [name for name in recorded if _sha256(path / name) != recorded[name]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if damaged:
        raise CheckpointError(f"{damaged[0]} does not match its recorded sha256 (damaged or cut short)")
    return progress


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(path: Path) -> None:
    """Remove a checkpoint directory so that a kill midway never leaves a partial one under its own name."""
    doomed = path.with_name(path.name + ".del")
    _remove(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)
