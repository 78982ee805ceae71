"""`zokern replay`: the fine-tuned weights of a `zokern finetune` run, rebuilt from the base model and the
run's seed log without a forward pass (docs/SEEDLOG.md)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from zokern import backends, seedlog
from zokern.finetune.train import FinetuneConfig, build_model, make_optimizer
from zokern.seedlog import SeedLogError, weights_sha256


def replay_run(log_path: str, model: "str | None" = None, output: "str | None" = None, steps: "int | None" = None,
               stream=sys.stdout) -> dict:
    """Replay the first `steps` (default: all) logged steps and save the trained tensors as safetensors
    with the names of the run's checkpoint/model.safetensors. Returns a summary."""
    from safetensors.torch import save_file

    header, records = seedlog.read(log_path)
    if steps is not None:
        if not 0 <= steps <= len(records):
            raise SeedLogError(f"--steps {steps}: the log holds {len(records)} steps")
        records = records[:steps]
    config = FinetuneConfig(**header["config"])
    config = replace(config, model=model if model is not None else config.model)
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
    seedlog.replay(optimizer, records)
    out = Path(output) if output else Path(log_path).with_name("replayed.safetensors")
    save_file({name: p.detach().contiguous() for name, p in trainable}, str(out))
    summary = {"method": config.method, "steps": len(records), "nonfinite_steps": optimizer.nonfinite_steps,
               "backend": backend, "output": str(out), "tensors": len(trainable),
               "log_bytes": Path(log_path).stat().st_size}
    print(f"replayed {len(records)} {config.method} steps ({optimizer.nonfinite_steps} skipped as non-finite) on "
          f"backend {backend}: {len(trainable)} tensors written to {out}", file=stream)
    return summary
