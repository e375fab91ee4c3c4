"""The memory plan against measured peak RSS on CPU, activation checkpointing's memory and time, and
the compiled step's time (issue 21). Each configuration runs in a fresh process: the trainer's own
setup (``_Run``: data, model, optimizer, the plan), then training steps; the peak RSS after the
steps (``ru_maxrss``, before any checkpoint is written) is compared with the plan's total.

    OMP_NUM_THREADS=1 python scripts/scale_memory.py --data /tmp/i21/tinydata > memory.jsonl

``--data``: any token shards whose vocabulary is at most 4096 (``ratplus data prepare --out DIR``
makes the bundled ones); the model's vocabulary is set with ``vocab_size`` overrides (token ids do
not change memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> TrainConfig fields
CONFIGS = {
    "demo-T512-B8": dict(model="demo", seq_len=512, batch_size=8),
    "125m-T512-B4": dict(model="125m", seq_len=512, batch_size=4, model_overrides={"vocab_size": 32000}),
    "125m-T512-B4-ckpt": dict(
        model="125m", seq_len=512, batch_size=4, activation_checkpointing=1, model_overrides={"vocab_size": 32000}
    ),
    "125m-T1024-B2-ckpt2": dict(
        model="125m", seq_len=1024, batch_size=2, activation_checkpointing=2, model_overrides={"vocab_size": 32000}
    ),
    "125m-T2048-B4": dict(model="125m", seq_len=2048, batch_size=4, model_overrides={"vocab_size": 32000}),
    "125m-T2048-B4-ckpt": dict(
        model="125m", seq_len=2048, batch_size=4, activation_checkpointing=1, model_overrides={"vocab_size": 32000}
    ),
    "demo-T256-B8-eager": dict(model="demo", seq_len=256, batch_size=8, model_overrides={"vocab_size": 4096}),
    "demo-T256-B8-compiled": dict(
        model="demo", seq_len=256, batch_size=8, compile=True, model_overrides={"vocab_size": 4096}
    ),
}


def child(name: str, data: str, steps: int) -> dict:
    import torch

    from ratplus.train import distributed as D
    from ratplus.train.config import TrainConfig
    from ratplus.train.trainer import _Run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        fields = {**CONFIGS[name], "data": data, "out_dir": out, "steps": steps, "progress": False}
        cfg = TrainConfig(**{"model_overrides": {"vocab_size": 4096}, **fields})
        run = _Run(cfg, D.SINGLE, torch.device("cpu"))
        batches = run._batches()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            run.train_step(next(batches))
            run.step += 1
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plan = run.plan
    return {
        "config": name,
        "params": plan.params,
        "vocab": run.config.vocab_size,
        "plan_gib": plan.total / 2**30,
        "plan_parts_gib": {
            k: getattr(plan, k) / 2**30 for k in ("weights", "gradients", "optimizer", "activations", "head", "runtime")
        },
        "peak_rss_gib": peak / 2**30,
        "plan_over_measured": plan.total / peak,
        "step_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.steps)))
        return
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--data", args.data, "--steps", str(args.steps), "--child", name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(json.dumps({"config": name, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
