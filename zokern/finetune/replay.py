"""`zokern replay`: the fine-tuned weights of a `zokern finetune` run, rebuilt from the base model and the
run's seed log without a forward pass (docs/SEEDLOG.md)."""
from __future__ import annotations

import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path

from zokern import backends, seedlog
from zokern.finetune.config import ConfigError, FinetuneConfig, check_config
from zokern.finetune.model import resolve_model_path
from zokern.finetune.train import build_model, make_optimizer
from zokern.optim import METHODS
from zokern.random import step_seed
from zokern.seedlog import SeedLogError, weights_sha256


def replay_run(log_path: str, model: "str | None" = None, output: "str | None" = None, steps: "int | None" = None,
               stream=None) -> dict:
    """Replay the first `steps` (default: all) logged steps and save the trained tensors as safetensors
    with the names of the run's checkpoint/model.safetensors, and report on `stream` (default: sys.stdout at
    the time of the call). Returns a summary."""
    from safetensors.torch import save_file

    header, records = seedlog.read(log_path)
    if steps is not None:
        if not 0 <= steps <= len(records):
            raise SeedLogError(f"--steps {steps}: the log holds {len(records)} steps")
        records = records[:steps]
    config = _run_config(log_path, header, records)
    config = replace(config, model=model if model is not None else config.model)
    resolve_model_path(config.model)
    out = Path(output) if output else Path(log_path).with_name("replayed.safetensors")
    if not out.parent.is_dir():
        raise SeedLogError(f"--output {out}: folder {out.parent} does not exist")
    net, _, trainable = build_model(config)
    names = [name for name, _ in trainable]
    if names != header["trainable"]:
        raise SeedLogError(f"the model's trained tensors differ from the log's ({len(names)} vs "
                           f"{len(header['trainable'])} names): wrong --model or LoRA configuration")
    digest = weights_sha256(net.named_parameters())
    if digest != header["base_sha256"]:
        raise SeedLogError(f"the base weights differ from the run's (sha256 {digest[:12]} vs "
                           f"{header['base_sha256'][:12]}): wrong --model or dtype")
    device_type = trainable[0][1].device.type
    backend = header["backend"]
    if not backends.availability(backend, device_type)[0]:
        backend = backends.resolve(None, device_type)
        print(f"warning: the run used backend {header['backend']!r}, not available here; replaying on {backend!r} "
              "gives close, not bitwise equal, weights", file=sys.stderr)
    optimizer = make_optimizer(replace(config, backend=backend), trainable)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", seedlog.NotBitwiseWarning)
            seedlog.replay(optimizer, records, header["stream_version"])
    except ValueError as exc:  # a record that does not fit this optimizer: its base seed or parameter groups
        raise SeedLogError(f"{log_path}: {exc}") from None
    for warning in caught:  # replay's own as the CLI's other warnings; any other goes on as it was raised
        if issubclass(warning.category, seedlog.NotBitwiseWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    save_file({name: p.detach().contiguous() for name, p in trainable}, str(out))
    summary = {"method": config.method, "steps": len(records), "nonfinite_steps": optimizer.nonfinite_steps,
               "backend": backend, "output": str(out), "tensors": len(trainable),
               "log_bytes": Path(log_path).stat().st_size}
    print(f"replayed {len(records)} {config.method} steps ({optimizer.nonfinite_steps} skipped as non-finite) on "
          f"backend {backend}: {len(trainable)} tensors written to {out}", file=stream or sys.stdout)
    return summary


def _run_config(log_path: str, header: dict, records: list[dict]) -> FinetuneConfig:
    """The run's configuration from a `zokern finetune` log's header, with the header and the records checked
    against it: everything replay needs is there and well-formed before the model loads."""
    config = header.get("config")
    if not isinstance(config, dict):
        raise SeedLogError(f"{log_path}: the header has no 'config' (not a `zokern finetune` log)")
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SeedLogError(f"{log_path}: the header's config has unknown setting {unknown[0]!r} "
                           "(written by another zokern version?)")
    try:
        # A log written before rounding (or lr_schedule) was a setting was trained with round-to-nearest (at a
        # constant rate).
        run = FinetuneConfig(**{"rounding": "nearest", "lr_schedule": "constant", **config})
        check_config(run)
    except ConfigError as exc:
        raise SeedLogError(f"{log_path}: the header's config is invalid: {exc}") from None
    for key, ok in (("trainable", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v) and v),
                    ("base_sha256", lambda v: isinstance(v, str)),
                    ("backend", lambda v: v in backends.BACKENDS)):
        if not ok(header.get(key)):
            raise SeedLogError(f"{log_path}: the header's {key!r} is missing or malformed: {header.get(key)!r}")
    for r in records:
        if r["seed"] != step_seed(run.seed, r["step"]):
            raise SeedLogError(f"{log_path}: record {r['step']} has seed {r['seed']}, not the one of base seed "
                               f"{run.seed}")
        missing = [k for k in METHODS[run.method].measured if "skipped" not in r and k not in r]
        if missing:
            raise SeedLogError(f"{log_path}: record {r['step']} lacks {missing[0]!r}, which {run.method} replays")
    return run
