"""Probe mode on FSDP2 shards: where the probe is made. MeZO steps on 2 gloo processes (one thread each) of a stack
of LAYERS float32 Linear layers (WIDTH × WIDTH, each its own fully_shard, and the root), batch BATCH, timed three
ways:

- shard: zokern's probe mode, the probe copy of each rank's shard made before FSDP2's all-gather (each rank
  perturbs 1/2 of every tensor);
- gathered: the alternative, the gathered weight perturbed per module after the all-gather (offset 0, whole
  tensor: each rank perturbs all of it), written here as hooks for this comparison (MeZO only: HiZOO's D, Sparse
  MeZO's masks and DiZO's anchors are sharded, and would have to be gathered too);
- in-place: the shards perturbed and restored in place (no probe copies).

Both probe ways see the same weights, so their ρ are checked equal, bitwise. Prints a JSON line per way: median
seconds per step over ROUNDS rounds of STEPS steps after a warm-up step. docs/DISTRIBUTED.md quotes the results.

    python benchmarks/fsdp_probes.py [--layers 8 --width 1024 --batch 16 --rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp


def model_of(layers: int, width: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.set_reshard_after_forward(True)
    return model


def gathered_probes(model, opt, state):
    """Hooks that perturb each Linear's gathered weight and bias after FSDP's all-gather, while state["probe"] holds
    (seed, scale); the stored unsharded parameter goes back before FSDP reshards."""
    from zokern.optim.probe import stream_copy

    streams = {name: k for b in opt.buckets for name, k in zip(b.names, b.stream_ids)}
    for index, layer in enumerate(model):
        def pre(module, args, index=index):
            if state["probe"] is None:
                return
            seed, scale = state["probe"]
            saved = {}
            for attr in ("weight", "bias"):
                stored = module._parameters[attr]
                saved[attr] = stored
                module._parameters[attr] = stream_copy(stored, seed, streams[f"{index}.{attr}"], scale, None,
                                                       dist=opt.dist, backend=opt.backend)
            state["saved"].append(saved)

        def post(module, args, output):
            if state["probe"] is not None:
                module._parameters.update(state["saved"].pop())

        layer.register_forward_pre_hook(pre)  # after FSDP's pre-forward: the module holds the gathered weight
        layer.register_forward_hook(post, prepend=True)  # before FSDP's post-forward reshards


def _worker(rank, world, init, args, out):
    torch.set_num_threads(1)
    import torch.distributed as dist

    from zokern import distributed
    from zokern.optim import MeZO
    from zokern.random import step_seed

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=g)
    rows = distributed.share(list(range(args.batch)), world, rank)
    results = {}
    for way in ("shard", "gathered", "in-place"):
        model = model_of(args.layers, args.width)
        opt = MeZO(model.named_parameters(), lr=1e-4, eps=1e-3, seed=0)
        state = {"probe": None, "saved": []}
        if way == "shard":
            opt.attach(model)
        elif way == "gathered":
            gathered_probes(model, opt, state)
        records = []
        opt.record_hook = records.append

        def loss():
            return model(x[rows]).double().square().mean(), len(rows)

        def step():
            if way != "gathered":
                opt.step(loss)
                return
            # The probe-mode step with the gathered weights perturbed: the same losses, then the same update.
            seed = step_seed(opt.seed, opt.step_count)
            values = {}
            for key, scale in (("plus", opt.eps), ("minus", -opt.eps)):
                state["probe"] = (seed, scale)
                values[key] = loss()
                state["probe"] = None
            means, _ = opt.loss_reduction.reduce(values, ("plus", "minus"), False)
            grad = (means["plus"] - means["minus"]) / (2 * opt.eps)
            opt._update(seed, grad, None, {}, restore=0.0)
            opt.step_count += 1
            records.append({"grad": grad})

        step()  # warm-up
        times = []
        for _ in range(args.rounds):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.append((time.perf_counter() - start) / args.steps)
        results[way] = {"seconds_per_step": statistics.median(times), "grads": [r["grad"] for r in records]}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2)
        results = torch.load(out)
    assert results["shard"]["grads"] == results["gathered"]["grads"], "the two probe ways saw different weights"
    load = os.getloadavg()[0]
    for way, r in results.items():
        print(json.dumps({"way": way, "seconds_per_step": round(r["seconds_per_step"], 5), "layers": args.layers,
                          "width": args.width, "batch": args.batch, "processes": 2, "load_average": load}))


if __name__ == "__main__":
    main()
