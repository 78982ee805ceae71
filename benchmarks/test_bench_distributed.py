"""Data-parallel ZO on the embedded task: MeZO steps of `zokern finetune` (SmolLM2-135M, float32, BBC News
prompts, global batch BATCH) on 1 and on 2 CPU processes (gloo, one thread each), and the bytes each
process hands to collectives per step, counted beside what first-order DDP all-reduces for one backward of
the same model (its gradient buckets, counted by a DDP communication hook).

Each benchmark round runs STEPS steps in every process of a pool started once (model loading is not timed);
`extra_info` carries steps/s, the world size and the bytes. docs/DISTRIBUTED.md quotes the results.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

BATCH, STEPS, ROUNDS = 16, 2, 3

pytest.importorskip("transformers")


def _worker(rank, world, init, commands, replies):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from zokern import distributed
    from zokern.finetune.data import bbc_news
    from zokern.finetune.model import load_model
    from zokern.finetune.prompts import PromptClassifier
    from zokern.finetune.train import sample
    from zokern.optim import MeZO

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    sent = [0]
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    task = bbc_news()
    model, tokenizer = load_model(None, torch.float32)
    classifier = PromptClassifier(task, tokenizer)
    opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
    step = 0
    replies.put(("ready", rank))
    while True:
        command = commands.get()
        if command == "stop":
            break
        if command == "steps":
            sent[0] = 0
            for _ in range(STEPS):
                mine = distributed.share(sample(task.train, BATCH, 0, step), world, rank)
                batch = classifier.batch(mine, "cpu")
                opt.step(lambda: (classifier.loss(model, batch), len(mine)))
                step += 1
            replies.put(("steps", sent[0] / STEPS))
        elif command == "ddp":
            sent[0] = 0
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            ddp = torch.nn.parallel.DistributedDataParallel(model)
            bucket_bytes = [0]

            def counting_hook(state, bucket):
                bucket_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            mine = distributed.share(sample(task.train, BATCH, 0, 0), world, rank)
            batch = classifier.batch(mine, "cpu")
            out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], logits_to_keep=1)
            out.logits.float().sum().backward()
            replies.put(("ddp", bucket_bytes[0]))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.dir = tempfile.mkdtemp()
        self.commands = [ctx.Queue() for _ in range(world)]
        self.replies = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(self.dir, "init"), self.commands[r],
                                                        self.replies)) for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            assert self.replies.get(timeout=600)[0] == "ready"

    def ask(self, command: str) -> list:
        for q in self.commands:
            q.put(command)
        return [self.replies.get(timeout=600)[1] for _ in self.procs]

    def close(self):
        for q in self.commands:
            q.put("stop")
        for p in self.procs:
            p.join(60)


@pytest.mark.parametrize("world", [1, 2])
def test_data_parallel_steps(benchmark, world):
    pool = Pool(world)
    try:
        sent = []
        benchmark.pedantic(lambda: sent.append(pool.ask("steps")), rounds=ROUNDS, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: the smoke run checks that it runs, times nothing
            return
        benchmark.extra_info.update(world_size=world, global_batch=BATCH, steps_per_round=STEPS,
                                    steps_per_second=STEPS / benchmark.stats.stats.median,
                                    zo_bytes_per_step_per_rank=max(max(s) for s in sent))
        if world > 1:
            benchmark.extra_info["ddp_gradient_bytes_per_step_per_rank"] = max(pool.ask("ddp"))
    finally:
        pool.close()
