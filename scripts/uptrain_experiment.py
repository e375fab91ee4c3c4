"""Issue 28, section 4: uptraining a pretrained dense Llama into RAT+ on CPU, against the same Llama
adapted to D16 without the recurrence and against the demo's RAT+ trained from scratch.

Every stage, per seed (results cached in OUT/seed<S>/stages/*.json, so a rerun resumes):

  data       ``ratplus data prepare --bundled shakespeare`` (the demo's 4096 BPE and shards, shared by seeds)
  llama      a ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads, SwiGLU 688, tied) pretrained with
             transformers' Trainer on the demo's shards and budget (320K tokens, batch 16 x 256, LR 3e-3
             cosine to 1e-6, 5% warmup, AdamW (0.9, 0.95) wd 0.1, clip 1.0), saved with its tokenizer
  convert    ``ratplus convert --from-hf``; HF and ratplus dense perplexity on the same tokens
  grad_probe the gradient on the closed forget gates at step 0 (gate inits -12, -6, -3, 0) vs Adam's eps
  a_<b>      (a) ``ratplus uptrain`` for the extra budget b (fraction of the 320K pretraining tokens),
             joint training with the D16 branch, at the default gate init (-12) and LR (2e-4);
             D16 and dense perplexity of that one model; the forget gates' mean opening
  b_<b>      (b) ``ratplus adapt`` of the imported Llama (no recurrence) to D16 for the same tokens
             (LR 3e-4 = 0.1x the pretraining peak, the demo's adaptation rule)
  c          (c) the demo's RAT+ (``ratplus.demo.pipeline`` stages pretrain_ratplus + adapt to D16)
  variants   (a) with other gate inits / LRs / branches / eps / gate LRs (``--variants``) and (b) at other
             LRs (``--b-lrs``), at ``--variant-budgets``; variants cached by earlier invocations join in

Perplexity: ``ratplus.eval.ppl`` on the first 40,000 tokens of the held-out Shakespeare plays, windows of
256 (the demo's ppl stage). Everything runs at one torch thread.

  OMP_NUM_THREADS=1 python scripts/uptrain_experiment.py --seeds 1337,0,1 --out /tmp/upx
  python scripts/uptrain_experiment.py --out /tmp/upx --plot-only      # table + plot from results.json

Results and analysis: docs/benchmarks/uptrain_cpu_20261207.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

torch.set_num_threads(1)

PRETRAIN_TOKENS = 320_000  # the demo's budget (DemoConfig.pretrain_tokens)
SEQ_LEN, BATCH = 256, 16  # DemoConfig.seq_len, batch_size
PRETRAIN_LR = 3e-3  # DemoConfig.pretrain_lr
ADAPT_LR = 0.1 * PRETRAIN_LR  # ratplus adapt's rule (0.1x the pretraining peak), as the demo's adapt stage
PPL_TOKENS = 40_000  # DemoConfig.ppl_tokens
D16 = "D16-W0-P0"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stages:
    """A stage's JSON result is its done marker."""

    def __init__(self, root: Path):
        self.root = root
        (root / "stages").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, fn):
        path = self.root / "stages" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())["result"]
        log(f"{self.root.name} {name} ...")
        t = time.perf_counter()
        result = fn()
        sec = time.perf_counter() - t
        path.write_text(json.dumps({"seconds": sec, "result": result}, indent=2))
        log(f"{self.root.name} {name}: {sec:.0f} s {json.dumps(result)[:300]}")
        return result

    def seconds(self, name: str) -> float | None:
        path = self.root / "stages" / f"{name}.json"
        return json.loads(path.read_text())["seconds"] if path.is_file() else None


def cli(*args: str, logfile: Path) -> None:
    """Run a ratplus CLI command (one thread), its output in ``logfile``; raise with its tail on failure."""
    cmd = [str(Path(sys.executable).parent / "ratplus"), *args]
    with open(logfile, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV).returncode
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{logfile.read_text()[-3000:]}")


# ---- evaluation ------------------------------------------------------------------------------------------


def val_texts() -> list[str]:
    from ratplus.io.corpus import corpus_documents

    return corpus_documents("shakespeare", "val")


def ppl(ckpt: str | Path, patterns: list[str]) -> dict[str, float]:
    from ratplus.eval.common import open_checkpoint
    from ratplus.eval.ppl import evaluate_ppl

    em = open_checkpoint(ckpt)
    rows = evaluate_ppl(em, val_texts(), patterns, seq_len=SEQ_LEN, max_tokens=PPL_TOKENS, progress=False)
    return {("dense" if r["pattern"] == "dense" else r["pattern"]): r["ppl"] for r in rows} | {
        "tokens": rows[0]["tokens"]
    }


def hf_ppl(hf_dir: Path, rp_dir: Path) -> dict[str, float]:
    """The HF model's dense perplexity on exactly the tokens ``ppl`` scores (the stream of the converted
    folder's tokenizer and EOS, the same windows), through ratplus' own ``stream_nll``."""
    from transformers import LlamaForCausalLM

    from ratplus.eval.common import open_checkpoint
    from ratplus.eval.ppl import stream_nll, token_stream

    em = open_checkpoint(rp_dir)
    stream = token_stream(val_texts(), em.tokenizer, em.eos_id, PPL_TOKENS)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def check_length(self, n):
            pass

        def forward(self, x, pattern=None):
            return self.m(input_ids=x).logits

    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    r = stream_nll(Wrap(hf), stream, "dense", SEQ_LEN, 8, progress=False)
    return {"dense": math.exp(r["nll_sum"] / r["tokens"]), "tokens": r["tokens"]}


@torch.no_grad()
def gate_stats(ckpt: str | Path, data: Path, windows: int = 8) -> dict:
    """The forget gates of a RAT+ model: fgate_bias, the f rows of in_proj, and the mean gate
    g = sigmoid(W_f h + fgate_bias) over ``windows`` held-out windows (dense forward), per layer."""
    from ratplus.io.folder import load_pretrained
    from ratplus.train.data import TokenDataset

    model = load_pretrained(ckpt).eval()
    cfg = model.config
    if not cfg.apply_re:
        return {}
    ds = TokenDataset(data / "val")
    x, _ = ds.batch_at([i * SEQ_LEN for i in range(windows)], SEQ_LEN)
    kv = cfg.kv_dim
    layers = []
    captured = {}
    hooks = []
    for i, layer in enumerate(model.backbone.layers):
        sl = layer.seq_layer

        def hook(mod, inp, out, i=i, sl=sl):
            f = out[..., -kv:].float() + (sl.fgate_bias.float() if sl.fgate_bias is not None else 0)
            g = torch.sigmoid(f)
            captured[i] = {
                "g_mean": float(g.mean()),
                "g_max": float(g.max()),
                "g_p99": float(g.flatten().kthvalue(max(1, int(0.99 * g.numel()))).values),
                "f_mean": float(f.mean()),
                "f_max": float(f.max()),
            }

        hooks.append(sl.in_proj.register_forward_hook(hook))
    model(x, pattern="dense")
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.backbone.layers):
        sl = layer.seq_layer
        wf = sl.in_proj.weight[-kv:]
        b = sl.fgate_bias
        layers.append(
            {
                "layer": i,
                "bias_mean": float(b.mean()) if b is not None else None,
                "bias_min": float(b.min()) if b is not None else None,
                "bias_max": float(b.max()) if b is not None else None,
                "wf_rms": float(wf.pow(2).mean().sqrt()),
                "wf_absmax": float(wf.abs().max()),
                **captured[i],
            }
        )
    return {
        "g_mean": sum(r["g_mean"] for r in layers) / len(layers),
        "g_max": max(r["g_max"] for r in layers),
        "bias_mean": sum(r["bias_mean"] for r in layers) / len(layers) if layers[0]["bias_mean"] is not None else None,
        "layers": layers,
    }


def grad_probe(llama: Path, data: Path, seed: int, gate_inits=(-12.0, -6.0, -3.0, 0.0)) -> dict:
    """The issue's concern, measured: the gradient reaching the closed forget gates at step 0 (one
    training batch of 16 x 256, loss = mean token NLL as the trainer's), against AdamW's eps (1e-8)."""
    from ratplus.io.folder import load_config, load_into, load_state_dict_file
    from ratplus.model.rat import RATPlusLM
    from ratplus.model.uptrain import add_recurrence, recurrent_config
    from ratplus.train.data import TokenDataset
    from ratplus.train.step import loss_sum

    ds = TokenDataset(data / "train")
    gen = torch.Generator().manual_seed(seed)
    x, y = next(ds.random_windows(BATCH, SEQ_LEN, gen))
    dense_cfg = load_config(llama)
    state = load_state_dict_file(llama / "model.safetensors")
    out = {}
    for gate in gate_inits:
        model = RATPlusLM(recurrent_config(dense_cfg))
        load_into(model, add_recurrence(state, dense_cfg, gate))
        kv = dense_cfg.kv_dim
        for pattern in (D16, "dense"):
            model.zero_grad(set_to_none=True)
            loss = loss_sum(model, x, y, pattern) / int((y != -100).sum())
            loss.backward()
            rows = []
            for layer in model.backbone.layers:
                sl = layer.seq_layer
                gb = sl.fgate_bias.grad.abs()
                gw = sl.in_proj.weight.grad[-kv:].abs()
                rows.append(
                    {
                        "bias_grad_mean": float(gb.mean()),
                        "bias_grad_max": float(gb.max()),
                        "wf_grad_mean": float(gw.mean()),
                        "wf_grad_max": float(gw.max()),
                        "wf_frac_above_eps": float((gw > 1e-8).float().mean()),
                    }
                )
            out[f"gate{gate:g}_{'D16' if pattern == D16 else 'dense'}"] = {"loss": float(loss.detach()), "layers": rows}
    return out


# ---- the Llama -------------------------------------------------------------------------------------------


def pretrain_llama(data: Path, out: Path, seed: int) -> dict:
    from tokenizers import Tokenizer
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ratplus.train.data import TokenDataset

    set_seed(seed)
    ds = TokenDataset(data / "train")
    tok = Tokenizer.from_file(str(data / "train" / "tokenizer.json"))
    eos = ds.eos_id
    steps = math.ceil(PRETRAIN_TOKENS / (BATCH * SEQ_LEN))  # 79, as ratplus' trainer rounds
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ds.num_tokens - SEQ_LEN, (steps * BATCH,), generator=gen).tolist()

    class Windows(torch.utils.data.Dataset):
        """Random windows of the training stream, labels as ratplus makes them (no target after EOS)."""

        def __len__(self):
            return len(starts)

        def __getitem__(self, i):
            x, y = ds.batch_at([starts[i]], SEQ_LEN)
            return {"input_ids": x[0], "labels": y[0]}

    class NextTokenTrainer(Trainer):
        # labels are already the next tokens (ratplus' layout): no shift, mean over the batch's targets
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"])
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100
            )
            return (loss, out) if return_outputs else loss

    config = LlamaConfig(
        vocab_size=ds.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=PRETRAIN_LR,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-6},
        warmup_steps=round(0.05 * steps),
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = NextTokenTrainer(model=model, args=args, train_dataset=Windows())
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    hf_dir = out / "llama_hf"
    model.save_pretrained(hf_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tok.id_to_token(eos), bos_token=tok.id_to_token(eos))
    fast.save_pretrained(hf_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "hf_dir": str(hf_dir),
        "params": n_params,
        "steps": steps,
        "tokens": steps * BATCH * SEQ_LEN,
        "train_seconds": seconds,
        "loss_log": losses,
        "transformers": __import__("transformers").__version__,
    }


# ---- one seed --------------------------------------------------------------------------------------------


def common(seed: int) -> dict:
    return dict(
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=seed,
        device="cpu",
        progress=False,
        eval_interval=0,
        eval_batches=1,
        ckpt_interval=0,
        keep_last=1,
    )


def run_uptrain(
    st: Stages,
    root: Path,
    data: Path,
    llama: Path,
    seed: int,
    budget: float,
    name: str,
    gate_init: float = -12.0,
    lr: float | None = None,
    sparse: str = D16,
    eps: float = 1e-8,
    gate_lr: float = 0.0,
) -> dict:
    from ratplus.train.trainer import UPTRAIN_LR, uptrain

    def go():
        # Adam's eps, pinned (the trainer gained ``adam_eps`` during this study; before that it was
        # torch's 1e-8, which the first runs used)
        if has_adam_eps():
            extra = {"adam_eps": eps}
        elif eps != 1e-8:
            raise RuntimeError("this ratplus has no adam_eps setting (TrainConfig.adam_eps)")
        else:
            extra = {}
        tokens = round(budget * PRETRAIN_TOKENS)
        out = root / name
        t = time.perf_counter()
        with gate_lr_group(gate_lr):
            final = uptrain(
                llama,
                out_dir=str(out),
                gate_init=gate_init,
                data=str(data),
                tokens=tokens,
                lr=lr or UPTRAIN_LR,
                sparse_pattern=sparse,
                **extra,
                **common(seed),
            )
        sec = time.perf_counter() - t
        return {
            "ckpt": str(final),
            "tokens": tokens,
            "gate_init": gate_init,
            "lr": lr or UPTRAIN_LR,
            "sparse_pattern": sparse,
            "adam_eps": eps,
            "gate_lr": gate_lr or None,
            "train_seconds": sec,
            "ppl": ppl(final, ["dense", D16]),
            "gates": gate_stats(final, data),
        }

    return st(name, go)


def run_adapt(
    st: Stages, root: Path, data: Path, ckpt: Path, seed: int, tokens: int, name: str, lr: float = ADAPT_LR
) -> dict:
    from ratplus.train.trainer import adapt

    def go():
        t = time.perf_counter()
        final = adapt(
            ckpt, D16, out_dir=str(root / name), data=str(data / "train"), tokens=tokens, lr=lr, **common(seed)
        )
        sec = time.perf_counter() - t
        return {
            "ckpt": str(final),
            "tokens": tokens,
            "lr": lr,
            "train_seconds": sec,
            "ppl": ppl(final, ["dense", D16]),
        }

    return st(name, go)


@contextlib.contextmanager
def gate_lr_group(gate_lr: float):
    """Within: the trainer's AdamW puts every ``fgate_bias`` in its own group at peak LR ``gate_lr``
    (the LR schedule scales it like the others). An experiment of this script only: ratplus has no such
    setting (the trainer's ``build_optimizer`` is wrapped, nothing in ratplus is changed)."""
    if not gate_lr:
        yield
        return
    import ratplus.train.trainer as trainer_mod

    original = trainer_mod.build_optimizer

    def build(model, *args, **kwargs):
        opt = original(model, *args, **kwargs)
        gates = {id(p) for n, p in model.named_parameters() if n.endswith("fgate_bias")}
        moved = []
        for group in opt.param_groups:
            keep = [p for p in group["params"] if id(p) not in gates]
            moved += [p for p in group["params"] if id(p) in gates]
            group["params"] = keep
        opt.add_param_group({"params": moved, "lr": gate_lr, "weight_decay": 0.0})
        return opt

    trainer_mod.build_optimizer = build
    try:
        yield
    finally:
        trainer_mod.build_optimizer = original


def has_adam_eps() -> bool:
    import dataclasses

    from ratplus.train.config import TrainConfig

    return any(f.name == "adam_eps" for f in dataclasses.fields(TrainConfig))


def variant_name(budget: float, gate: float, lr: float, sparse: str, eps: float = 1e-8, gate_lr: float = 0) -> str:
    return (
        f"a_{budget}_gate{gate:g}_lr{lr:g}"
        + ("" if sparse == D16 else f"_{sparse.split('-')[0]}")
        + ("" if eps == 1e-8 else f"_eps{eps:g}")
        + (f"_gatelr{gate_lr:g}" if gate_lr else "")
    )


def parse_variant(spec: str) -> tuple[float, float, str, float, float]:
    """GATE:LR[:SPARSE[:EPS[:GATELR]]], e.g. -6:7.5e-4, -12:2e-4:D64 (SPARSE: the joint-training branch,
    default D16), -12:2e-4:D16:1e-12 (Adam's eps, default 1e-8) or -6:7.5e-4:D16:1e-8:0.3 (GATELR: the
    peak LR of the fgate_bias parameters alone, in their own AdamW group; 0 = the model's LR)."""
    parts = spec.split(":")
    sparse = parts[2] if len(parts) > 2 else "D16"
    sparse = {"D16": D16, "D64": "D64-W0-P0"}.get(sparse, sparse)
    eps = float(parts[3]) if len(parts) > 3 else 1e-8
    gate_lr = float(parts[4]) if len(parts) > 4 else 0.0
    return float(parts[0]), float(parts[1]), sparse, eps, gate_lr


def run_seed(
    out: Path,
    data: Path,
    seed: int,
    budgets: list[float],
    variants: list[tuple[float, float, str, float, float]],
    skip_c: bool,
    variant_budgets: list[float],
    b_lrs: list[float],
) -> dict:
    root = out / f"seed{seed}"
    st = Stages(root)
    res: dict = {"seed": seed}
    res["llama"] = st("llama", lambda: pretrain_llama(data, root, seed))
    hf_dir = Path(res["llama"]["hf_dir"])
    rp = root / "llama_rp"

    def conv():
        t = time.perf_counter()
        cli("convert", "--from-hf", str(hf_dir), str(rp), logfile=root / "convert.log")
        sec = time.perf_counter() - t
        return {"ckpt": str(rp), "convert_seconds": sec, "hf_ppl": hf_ppl(hf_dir, rp), "ppl": ppl(rp, ["dense", D16])}

    res["convert"] = st("convert", conv)
    res["grad_probe"] = st("grad_probe", lambda: grad_probe(rp, data, seed))
    res["a"], res["b"] = {}, {}
    for b in budgets:
        res["a"][str(b)] = run_uptrain(st, root, data, rp, seed, b, f"a_{b}")
        res["b"][str(b)] = run_adapt(st, root, data, rp, seed, round(b * PRETRAIN_TOKENS), f"b_{b}")
    res["variants"] = {}
    for gate, lr, sparse, eps, gate_lr in variants:
        for b in variant_budgets:
            name = variant_name(b, gate, lr, sparse, eps, gate_lr)
            res["variants"][name] = run_uptrain(
                st, root, data, rp, seed, b, name, gate_init=gate, lr=lr, sparse=sparse, eps=eps, gate_lr=gate_lr
            )
    res["b_variants"] = {}
    for lr in b_lrs:
        for b in variant_budgets:
            name = f"b_{b}_lr{lr:g}"
            res["b_variants"][name] = run_adapt(st, root, data, rp, seed, round(b * PRETRAIN_TOKENS), name, lr=lr)
    # variants run by earlier invocations (other --variants / --variant-budgets) join the results
    for f in sorted((root / "stages").glob("a_*_gate*.json")):
        res["variants"].setdefault(f.stem, json.loads(f.read_text())["result"])
    for f in sorted((root / "stages").glob("b_*_lr*.json")):
        res["b_variants"].setdefault(f.stem, json.loads(f.read_text())["result"])
    if not skip_c:
        res["c"] = st("c", lambda: run_demo(root, seed))
    return res


def run_demo(root: Path, seed: int) -> dict:
    """(c): the demo's own stages (data, pretrain_ratplus, adapt_ratplus_D16), then the same ppl."""
    from ratplus.demo.pipeline import Demo, DemoConfig

    d = Demo(DemoConfig(out_dir=str(root / "demo"), seed=seed, progress=False))
    t = time.perf_counter()
    d._stage("data", d.data)
    dense = d._stage("pretrain_ratplus", lambda: d.pretrain("ratplus"))["ckpt"]
    t_pre = time.perf_counter() - t
    adapted = d._stage(f"adapt_ratplus_{D16}", lambda: d.adapt("ratplus", D16, dense))["ckpt"]
    sec = time.perf_counter() - t
    p_dense, p_d16 = ppl(dense, ["dense", D16]), ppl(adapted, ["dense", D16])
    return {
        "dense_ckpt": dense,
        "d16_ckpt": adapted,
        "train_seconds": sec,
        "pretrain_seconds": t_pre,
        "ppl_pretrained": p_dense,
        "ppl_adapted": p_d16,
        "dense": p_dense["dense"],
        "D16": p_d16[D16],
        "gates": gate_stats(dense, root.parent / "data"),
    }


# ---- summary and plot ------------------------------------------------------------------------------------


def summarize(results: list[dict], budgets: list[float]) -> dict:
    """One row per (model, budget): D16/dense and dense per seed, mean and range."""
    rows = []

    def add(model, budget, per_seed):
        if not per_seed:
            return
        ratios = [p["ratio"] for p in per_seed]
        dense = [p["dense"] for p in per_seed]
        d16 = [p["D16"] for p in per_seed]
        rows.append(
            {
                "model": model,
                "budget": budget,
                "seeds": [p["seed"] for p in per_seed],
                "ratio": ratios,
                "dense": dense,
                "D16": d16,
                "ratio_mean": sum(ratios) / len(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "dense_mean": sum(dense) / len(dense),
                "dense_min": min(dense),
                "dense_max": max(dense),
                "D16_mean": sum(d16) / len(d16),
                "gate": [p.get("gate", float("nan")) for p in per_seed],
            }
        )

    add(
        "llama HF",
        0.0,
        [
            {"seed": r["seed"], "dense": r["convert"]["hf_ppl"]["dense"], "D16": float("nan"), "ratio": float("nan")}
            for r in results
        ],
    )
    add(
        "llama ratplus (no adaptation)",
        0.0,
        [
            {
                "seed": r["seed"],
                "dense": r["convert"]["ppl"]["dense"],
                "D16": r["convert"]["ppl"][D16],
                "ratio": r["convert"]["ppl"][D16] / r["convert"]["ppl"]["dense"],
            }
            for r in results
        ],
    )
    for b in budgets:
        a = [r["a"][str(b)] for r in results if str(b) in r.get("a", {})]
        add(
            "(a) uptrain",
            b,
            [
                {
                    "seed": r["seed"],
                    "dense": x["ppl"]["dense"],
                    "D16": x["ppl"][D16],
                    "ratio": x["ppl"][D16] / x["ppl"]["dense"],
                    "gate": x["gates"]["g_mean"],
                }
                for r, x in zip(results, a)
            ],
        )
        bb = [(r, r["b"][str(b)]) for r in results if str(b) in r.get("b", {})]
        # (b)'s own dense: the Llama's (the adapted model is specialised to D16, as in the demo)
        add(
            "(b) adapt D16, no recurrence",
            b,
            [
                {
                    "seed": r["seed"],
                    "dense": r["convert"]["ppl"]["dense"],
                    "D16": x["ppl"][D16],
                    "ratio": x["ppl"][D16] / r["convert"]["ppl"]["dense"],
                }
                for r, x in bb
            ],
        )
    names = sorted({n for r in results for n in r.get("variants", {})})
    for n in names:
        budget = float(n.split("_")[1])
        label = "(a') " + n.split("_", 2)[2]
        add(
            label,
            budget,
            [
                {
                    "seed": r["seed"],
                    "dense": r["variants"][n]["ppl"]["dense"],
                    "D16": r["variants"][n]["ppl"][D16],
                    "ratio": r["variants"][n]["ppl"][D16] / r["variants"][n]["ppl"]["dense"],
                    "gate": r["variants"][n]["gates"]["g_mean"],
                }
                for r in results
                if n in r.get("variants", {})
            ],
        )
    for n in sorted({n for r in results for n in r.get("b_variants", {})}):
        budget = float(n.split("_")[1])
        label = "(b') adapt D16, " + n.split("_", 2)[2]
        add(
            label,
            budget,
            [
                {
                    "seed": r["seed"],
                    "dense": r["convert"]["ppl"]["dense"],
                    "D16": r["b_variants"][n]["ppl"][D16],
                    "ratio": r["b_variants"][n]["ppl"][D16] / r["convert"]["ppl"]["dense"],
                }
                for r in results
                if n in r.get("b_variants", {})
            ],
        )
    add(
        "(c) demo RAT+ from scratch",
        0.075,
        [
            {
                "seed": r["seed"],
                "dense": r["c"]["dense"],
                "D16": r["c"]["D16"],
                "ratio": r["c"]["D16"] / r["c"]["dense"],
                "gate": r["c"]["gates"]["g_mean"],
            }
            for r in results
            if "c" in r
        ],
    )
    return {"rows": rows}


#: Lines of the plot: summary label -> (legend text, color, line style, marker). Rows at one budget only
#: (the 30% variants) are drawn as unlabelled-style points in gray shades.
LINES = {
    "(a) uptrain": ("(a) uptrain, defaults: gate init -12, LR 2e-4", "tab:blue", "-", "o"),
    "(b) adapt D16, no recurrence": ("(b) adapt to D16, no recurrence, LR 3e-4", "tab:red", "-", "s"),
    "(a') gate-12_lr0.00075": ("(a) gate init -12, LR 7.5e-4", "tab:blue", "--", "o"),
    "(b') adapt D16, lr0.00075": ("(b) adapt to D16, LR 7.5e-4", "tab:red", "--", "s"),
    "(a') gate0_lr0.00075": ("(a) gate init 0 (open), LR 7.5e-4", "tab:purple", "--", "D"),
}


def variant_label(label: str) -> str:
    """ "(a') gate-12_lr0.0002_D64_eps1e-12_gatelr0.3" -> "(a) gate init -12, LR 0.0002, D64 branch, ..."."""
    head, _, rest = label.partition(" ")
    if not head.startswith("(a"):
        return label.replace("lr", "LR ")
    words = []
    for part in rest.split("_"):
        if part.startswith("gatelr"):
            words.append(f"gate-bias LR {part[6:]}")
        elif part.startswith("gate"):
            words.append(f"gate init {part[4:]}")
        elif part.startswith("lr"):
            words.append(f"LR {part[2:]}")
        elif part.startswith("eps"):
            words.append(f"Adam eps {part[3:]}")
        else:
            words.append(f"{part} branch")
    return "(a) " + ", ".join(words)


def plot(summary: dict, budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    rows_by = {}
    for r in summary["rows"]:
        rows_by.setdefault(r["model"], []).append(r)
    zero = rows_by.get("llama ratplus (no adaptation)", [])
    c = rows_by.get("(c) demo RAT+ from scratch", [])
    others = iter(["^", "P", "X", "*", "h", "<", ">", "p", "8"] * 3)
    for ax, key, ylabel in (
        (axes[0], "ratio", "D16 perplexity / own dense perplexity"),
        (axes[1], "D16", "D16 perplexity (held-out Shakespeare)"),
    ):
        for label, rows in rows_by.items():
            if not (label.startswith("(a") or label.startswith("(b")):
                continue
            rows = sorted(rows, key=lambda r: r["budget"])
            x = [100 * r["budget"] for r in rows]
            y = [sum(r[key]) / len(r[key]) for r in rows]
            err = [[yy - min(r[key]) for yy, r in zip(y, rows)], [max(r[key]) - yy for yy, r in zip(y, rows)]]
            n = max(len(r["seeds"]) for r in rows)
            if label in LINES:
                text, color, ls, marker = LINES[label]
                ax.errorbar(x, y, yerr=err, color=color, ls=ls, marker=marker, capsize=4, label=f"{text}, n={n}")
            else:
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    color="0.45",
                    ls="none",
                    marker=next(others),
                    ms=7,
                    capsize=3,
                    label=f"{variant_label(label)}, n={n}",
                )
        if key == "ratio":
            ax.axhline(1.05, color="gray", ls=":", lw=1, label="target for (a): 1.05x (1.10x at 5%)")
            ax.axhline(1.10, color="gray", ls=":", lw=1)
        if zero:
            z = sum(zero[0][key]) / len(zero[0][key])
            ax.scatter(
                [0], [z], color="black", marker="x", s=60, zorder=5, label=f"the Llama at D16, no training: {z:.3g}"
            )
        if c:
            cv = sum(c[0][key]) / len(c[0][key])
            ax.axhline(cv, color="tab:green", ls="--", label=f"(c) demo RAT+ from scratch, adapted to D16: {cv:.3g}")
        ax.set_xlabel("extra training tokens, % of the Llama's 320K pretraining tokens")
        ax.set_ylabel(ylabel)
        ax.set_xticks([0, *[100 * b for b in budgets]])
        ax.grid(alpha=0.3)
    seeds = list(dict.fromkeys(s for r in summary["rows"] for s in r["seeds"]))
    fig.suptitle(
        "Uptraining a 4.2M-parameter Llama into RAT+ vs adapting it to D16 without the recurrence "
        f"(Shakespeare, CPU; mean and range over seeds {', '.join(map(str, seeds))})"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(0.99, 0.93))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1337,0,1", help="comma-separated; each seed runs every stage")
    ap.add_argument("--budgets", default="0.05,0.1,0.3", help="extra budgets, fractions of the pretraining tokens")
    ap.add_argument(
        "--variants",
        default="-12:7.5e-4,0:7.5e-4",
        help="(a) with other settings, GATE:LR[:SPARSE[:EPS[:GATELR]]] comma-separated (SPARSE: the joint-training "
        "branch, D16 by default; D64 is uptrain's own default; GATELR: the gate biases' own LR); '' for none",
    )
    ap.add_argument("--variant-budgets", default="0.05,0.1,0.3", help="budgets the variants run at")
    ap.add_argument("--b-lrs", default="7.5e-4", help="(b) again at these adaptation LRs (at --variant-budgets)")
    ap.add_argument("--variant-seeds", default="all", help="'first' or 'all'")
    ap.add_argument("--skip-c", action="store_true", help="leave out the demo's RAT+ (c)")
    ap.add_argument("--out", default="uptrain_out")
    ap.add_argument("--plot", default=None, help="PNG path (default OUT/uptrain.png)")
    ap.add_argument("--json", default=None, help="results JSON path (default OUT/results.json)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the results JSON, run nothing")
    a = ap.parse_args()
    if a.plot_only:
        doc = json.loads(Path(a.json or Path(a.out) / "results.json").read_text())
        plot(doc["summary"], doc["budgets"], Path(a.plot or Path(a.out) / "uptrain.png"))
        print(markdown_table(doc["summary"]))
        return
    seeds = [int(s) for s in a.seeds.split(",") if s]
    budgets = [float(b) for b in a.budgets.split(",") if b]
    variants = [parse_variant(p) for p in a.variants.split(",") if p]
    variant_budgets = [float(b) for b in a.variant_budgets.split(",") if b]
    b_lrs = [float(x) for x in a.b_lrs.split(",") if x]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "val" / "meta.json").is_file():
        cli("data", "prepare", "--bundled", "shakespeare", "--out", str(data), logfile=out / "prepare.log")
    results = []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        v = variants if (i == 0 or a.variant_seeds == "all") else []
        results.append(run_seed(out, data, seed, budgets, v, a.skip_c, variant_budgets, b_lrs if v else []))
        st = Stages(out / f"seed{seed}")
        names = sorted(f.stem for f in (st.root / "stages").glob("*.json"))
        results[-1]["stage_seconds"] = {n: st.seconds(n) for n in names}
        summary = summarize(results, budgets)
        doc = {
            "budgets": budgets,
            "pretrain_tokens": PRETRAIN_TOKENS,
            "ppl_tokens": PPL_TOKENS,
            "seeds": seeds,
            "summary": summary,
            "runs": results,
            "wall_s_this_invocation": time.perf_counter() - t0,
        }
        Path(a.json or out / "results.json").write_text(json.dumps(doc, indent=2))
        plot(summary, budgets, Path(a.plot or out / "uptrain.png"))
        log(f"seed {seed} done; results in {a.json or out / 'results.json'}")
    print(markdown_table(summarize(results, budgets)))


def markdown_table(summary: dict) -> str:
    """The summary as a markdown table: mean and [min, max] over seeds."""

    def cell(vals: list[float], fmt: str) -> str:
        vals = [v for v in vals if v == v]  # drop nan
        if not vals:
            return "-"
        mean = sum(vals) / len(vals)
        return f"{mean:{fmt}}" if len(vals) == 1 else f"{mean:{fmt}} [{min(vals):{fmt}}, {max(vals):{fmt}}]"

    lines = [
        "| model | extra tokens | seeds | D16 / own dense | dense PPL | D16 PPL | mean forget gate g |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['model']} | {100 * r['budget']:g}% | {len(r['seeds'])} | {cell(r['ratio'], '.3f')} | "
            f"{cell(r['dense'], '.1f')} | {cell(r['D16'], '.1f')} | {cell(r.get('gate', []), '.2g')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
