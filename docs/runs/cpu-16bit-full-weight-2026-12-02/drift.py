"""Run from the repository root: `.venv/bin/python docs/runs/cpu-16bit-full-weight-2026-12-02/drift.py DTYPE
{module|in-place} {default|nearest|stochastic} STEPS` (the files here: bfloat16 module default 10, bfloat16
in-place nearest 50, float32 in-place default 10), one thread.

Drift of the trained weights in a lr = 0 run of `zokern finetune --lora-rank 0` (MeZO, eps 1e-3):
fraction of elements changed, RMS of the change relative to the weights' RMS, after each checkpoint step."""
import json
import sys
import time
from dataclasses import asdict
import torch
from zokern.finetune.config import FinetuneConfig, uses_probes
from zokern.finetune.train import build_model, make_optimizer, load_task, sample
from zokern.finetune.prompts import PromptClassifier

dtype, mode, rounding, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = FinetuneConfig(dtype=dtype, probe_mode=mode, rounding=None if rounding == "default" else rounding,
                     lora_rank=0, lr=0.0, eps=1e-3)
task = load_task(cfg); model, tok, trainable = build_model(cfg); clf = PromptClassifier(task, tok)
opt = make_optimizer(cfg, trainable)
if uses_probes(asdict(cfg)):
    opt.attach(model)
start = [p.detach().clone() for _, p in trainable]
t0 = time.perf_counter()
for step in range(steps):
    batch = clf.batch(sample(task.train, 16, 0, step), "cpu")
    opt.step(lambda: clf.loss(model, batch))
    if step + 1 in (1, 10, 50, 100, 200, steps):
        opt.restore_weights()
        changed = sum(int((p.detach() != s).sum()) for (_, p), s in zip(trainable, start))
        total = sum(s.numel() for s in start)
        d2 = sum(float(((p.detach().double() - s.double()) ** 2).sum()) for (_, p), s in zip(trainable, start))
        w2 = sum(float((s.double() ** 2).sum()) for s in start)
        norms = [(p.detach().double() - s.double()).mean().item() for (n, p), s in zip(trainable, start) if n.endswith("norm.weight")]
        point = {"step": step + 1, "fraction_changed": changed / total, "relative_rms_change": (d2 / w2) ** 0.5,
                 "mean_norm_weight_change": sum(norms) / max(1, len(norms)), "seconds": time.perf_counter() - t0}
        print(json.dumps(point), flush=True)
