"""``ratplus bench train``: training throughput of RAT+ against the attention baseline of equal size.

For each preset and length T, four steps are timed side by side, round-robin, each one full call
of the trainer's own ``optimizer_steps`` (forward, backward, clipping, AdamW):

  RAT+ dense        one step in dense causal attention
  RAT+ joint        D=64 sparse step, then dense step on the same batch (docs/DESIGN.md section 5)
  attention dense   the apply_re=False baseline, dense
  attention joint   baseline: local W=64 sparse step, then dense step

Times are medians over rounds; ratios are medians of the ratios *within* each round (the load of a
shared machine drifts between rounds, much less within one). Targets (issue 4): RAT+ dense at most
15% slower than attention dense at T=4096; a joint step at most 1.7x a dense step.
``breakdown`` also times the pieces RAT+ adds to a dense step (the gated scan over k and v, forward
+ backward, and the fifth in_proj block for the gate), so a gap can be attributed. Before timing,
each model's loss with the fast backends is checked against the reference backends at a small
length.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch

from ratplus.bench.timing import time_fn, time_rounds
from ratplus.config import ModelConfig
from ratplus.model.rat import RATPlusLM
from ratplus.ops.scan import gated_scan
from ratplus.runtime import emit_json, environment, print_table
from ratplus.train.config import BASELINE_SPARSE, RATPLUS_SPARSE
from ratplus.train.step import build_optimizer, optimizer_steps

DENSE_OVERHEAD_TARGET = 0.15
JOINT_RATIO_TARGET = 1.7


def check_parity(preset: str, device: torch.device) -> None:
    """Loss of both models, fast backends vs reference backends, dense and sparse, at T=96."""
    for apply_re, sparse in ((True, RATPLUS_SPARSE), (False, BASELINE_SPARSE)):
        torch.manual_seed(0)
        config = ModelConfig.from_preset(preset, apply_re=apply_re)
        model = RATPlusLM(config).to(device)
        x = torch.randint(0, config.vocab_size, (1, 97), device=device)
        with torch.no_grad():
            for pattern in ("dense", sparse.replace("64", "8")):  # small D / W so the pattern bites at T=96
                inp, labels = x[:, :-1], x[:, 1:]
                fast = model(inp, pattern=pattern, labels=labels).loss
                ref = model(inp, pattern=pattern, labels=labels, backend="reference", scan_backend="reference").loss
                if not torch.allclose(fast, ref, rtol=1e-4, atol=1e-4):
                    what = f"{preset} apply_re={apply_re} {pattern}"
                    raise RuntimeError(f"parity check failed for {what}: loss {fast} vs reference {ref}")


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) within the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def _profile_dense(rat: Callable[[], Any], attention: Callable[[], Any], top: int = 8) -> dict[str, Any]:
    """Self CPU time per op of one dense step of each model, and the ops where RAT+ spends more.

    CPU time summed by the profiler is far less sensitive to other processes than wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    per_op: dict[str, dict[str, float]] = {}
    for name, fn in (("RAT+", rat), ("attention", attention)):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        per_op[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}  # ms
    total = {name: sum(ops.values()) for name, ops in per_op.items()}
    keys = set(per_op["RAT+"]) | set(per_op["attention"])
    diff = sorted(((per_op["RAT+"].get(k, 0.0) - per_op["attention"].get(k, 0.0), k) for k in keys), reverse=True)
    return {
        "self_cpu_ms": total,
        "overhead": total["RAT+"] / total["attention"] - 1,
        "top_extra_ms": {k: d for d, k in diff[:top]},
        # the scan's own autograd nodes (Python-level work around its kernels, which show as addcmul / mul)
        "scan_node_ms": sum(per_op["RAT+"].get(k, 0.0) for k in ("_GatedScan", "_GatedScanBackward")),
    }


def _breakdown(config: ModelConfig, batch: int, T: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds per dense step spent in what RAT+ adds: the scans (2 per layer: k and v) and the
    gate's in_proj block (a C x C matmul per layer), forward + backward."""
    H, K, C, L = config.num_heads, config.head_dim, config.d_model, config.num_layers
    g = torch.rand(batch, H, T, K, device=device)
    kv = torch.randn(batch, H, T, K, device=device, requires_grad=True)
    g.requires_grad_(True)

    def scans() -> None:
        (gated_scan(g, kv) + gated_scan(g, kv)).sum().backward()

    w = torch.randn(C, C, device=device, requires_grad=True)
    h = torch.randn(batch, T, C, device=device, requires_grad=True)

    def gate_proj() -> None:
        torch.sigmoid(h @ w).sum().backward()

    return {"scan_s": L * time_fn(scans, device, repeats), "gate_proj_s": L * time_fn(gate_proj, device, repeats)}


def run(
    presets: list[str],
    seq_lens: list[int],
    batch: int = 1,
    repeats: int = 3,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    breakdown: bool = True,
    json_path: str | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Time the four training steps per preset and length (see module docstring); print a table,
    the target verdicts, and one JSON line. ``profile``: also run ``torch.profiler`` on one dense
    step of each model and report where RAT+'s extra CPU time goes, op by op."""
    device = device or torch.device("cpu")
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    results, rows = [], []
    for preset in presets:
        check_parity(preset, device)
        for T in seq_lens:
            contenders: dict[str, Any] = {}
            for apply_re, sparse, name in ((True, RATPLUS_SPARSE, "RAT+"), (False, BASELINE_SPARSE, "attention")):
                torch.manual_seed(0)
                base = ModelConfig.from_preset(preset)
                config = ModelConfig.from_preset(preset, apply_re=apply_re, max_seq_len=max(T, base.max_seq_len))
                model = RATPlusLM(config).to(device)
                opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
                ids = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)
                step_batch = [(ids[:, :-1], ids[:, 1:])]
                for mode, patterns in (("dense", ["dense"]), ("joint", [sparse, "dense"])):
                    contenders[f"{name} {mode}"] = lambda m=model, o=opt, b=step_batch, p=patterns: optimizer_steps(
                        m, o, b, p, autocast=autocast
                    )
                if apply_re:
                    rat_config = config
            rounds = time_rounds(contenders, device, repeats)
            times = {name: statistics.median(ts) for name, ts in rounds.items()}
            tokens = batch * T
            entry: dict[str, Any] = {
                "preset": preset,
                "T": T,
                "batch": batch,
                "step_s": times,
                "tokens_per_s": {k: tokens / v for k, v in times.items()},
                "step_s_rounds": rounds,
                "dense_overhead": paired_ratio(rounds, "RAT+ dense", "attention dense") - 1,
                "joint_ratio_ratplus": paired_ratio(rounds, "RAT+ joint", "RAT+ dense"),
                "joint_ratio_attention": paired_ratio(rounds, "attention joint", "attention dense"),
            }
            if breakdown:
                entry["breakdown"] = _breakdown(rat_config, batch, T, device, repeats)
            if profile:
                entry["profile"] = _profile_dense(contenders["RAT+ dense"], contenders["attention dense"])
            for name, t in times.items():
                model_name, mode = name.rsplit(" ", 1)
                vs_attention = paired_ratio(rounds, name, f"attention {mode}")
                rows.append(
                    [
                        preset,
                        T,
                        name,
                        t * 1e3,
                        tokens / t,
                        vs_attention,
                        paired_ratio(rounds, name, f"{model_name} dense"),
                    ]
                )
            results.append(entry)
            del contenders
    env = environment(device, dtype)
    print(f"training step (forward + backward + AdamW), batch {batch}, {env['dtype']}, {env['device']}")
    print_table(["preset", "T", "step", "ms", "tokens/s", "/ attention same mode", "/ own dense"], rows)
    print()
    for e in results:
        over, jr = e["dense_overhead"], e["joint_ratio_ratplus"]
        line = (
            f"{e['preset']} T={e['T']}: RAT+ dense step {over:+.1%} vs attention (target <= +15%: "
            f"{'met' if over <= DENSE_OVERHEAD_TARGET else 'MISSED'}); joint/dense {jr:.2f}x RAT+, "
            f"{e['joint_ratio_attention']:.2f}x attention (target <= 1.7x: "
            f"{'met' if max(jr, e['joint_ratio_attention']) <= JOINT_RATIO_TARGET else 'MISSED'})"
        )
        if "breakdown" in e:
            gap = e["step_s"]["RAT+ dense"] - e["step_s"]["attention dense"]
            b = e["breakdown"]
            line += (
                f"\n    gap {gap * 1e3:.0f} ms per step; gated scans {b['scan_s'] * 1e3:.0f} ms, "
                f"gate projection {b['gate_proj_s'] * 1e3:.0f} ms (fwd + bwd over all layers, timed alone)"
            )
        if "profile" in e:
            p = e["profile"]
            ops = ", ".join(f"{k} {v:+.0f}" for k, v in list(p["top_extra_ms"].items())[:5])
            line += (
                f"\n    profiler, one dense step: self CPU RAT+ {p['self_cpu_ms']['RAT+']:.0f} ms vs attention "
                f"{p['self_cpu_ms']['attention']:.0f} ms ({p['overhead']:+.1%}); most extra ms in: {ops}"
            )
        print(line)
    record = {
        "bench": "train",
        **env,
        "presets": presets,
        "seq_lens": seq_lens,
        "batch": batch,
        "repeats": repeats,
        "sparse_patterns": {"RAT+": RATPLUS_SPARSE, "attention": BASELINE_SPARSE},
        "results": results,
    }
    emit_json(record, json_path)
    return record
