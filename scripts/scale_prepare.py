"""Measurements of the streaming ``ratplus data prepare`` (issue 21) on a large JSONL corpus.

    OMP_NUM_THREADS=1 python scripts/scale_prepare.py --dir /tmp/i21 --build   # big.jsonl (>= 2 GiB), small.jsonl (1/8)
    OMP_NUM_THREADS=1 python scripts/scale_prepare.py --dir /tmp/i21          # the measurements, JSON lines

The corpus repeats and shuffles the bundled Wikipedia articles and Shakespeare plays (cut into
paragraph groups of 20). Measured, each printed as one JSON line as soon as it is known:
  ratio     tokens/s of prepare (read JSON, tokenize, write shards) vs the raw ``encode_batch`` of the
            same tokenizer over the same documents already in memory, interleaved rounds, one process
  workers   shards of --workers 1 and 2 byte-identical
  rss       peak RSS of ``ratplus data prepare`` (a child process, ru_maxrss) on small and big
  kill      SIGKILL at about 50% of small's documents, rerun, shards identical to the uninterrupted run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "gpt2"


def build(d: Path) -> None:
    from ratplus.io.corpus import corpus_documents

    docs = [x for c in ("wikipedia", "shakespeare") for s in ("train", "val") for x in corpus_documents(c, s)]
    pieces = []
    for doc in docs:
        paras = doc.split("\n\n")
        pieces += ["\n\n".join(paras[i : i + 20]) for i in range(0, len(paras), 20)]
    lines = [json.dumps({"text": p}) + "\n" for p in pieces if p.strip()]
    target, written, rng = 2 * 2**30 + 2**20, 0, random.Random(0)
    with open(d / "big.jsonl", "w") as big, open(d / "small.jsonl", "w") as small:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                big.write(line)
                if written < target // 8:
                    small.write(line)
                written += len(line.encode())


def emit(record: dict, path: Path) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def prepare_cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ratplus", "data", "prepare", "--input", str(inp), "--out", str(out),
            "--tokenizer", TOKENIZER, *extra]  # fmt: skip


def run_child(cmd: list[str], timeout: float) -> tuple[int, float, float, str]:
    """(return code, peak RSS in MiB, seconds, stdout) of a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, _ = proc.communicate(timeout=timeout)
    dt = time.perf_counter() - t0
    # communicate() reaped the child: its peak is in RUSAGE_CHILDREN (the maximum over children so far)
    import resource

    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return proc.returncode, rss, dt, out


def shard_bytes(folder: Path) -> list[bytes]:
    meta = json.loads((folder / "meta.json").read_text())
    return [(folder / s["file"]).read_bytes() for s in meta["shards"]]


def same(a: Path, b: Path) -> bool:
    import hashlib

    digest = lambda f: [hashlib.sha256(x).hexdigest() for x in shard_bytes(f)]  # noqa: E731
    return all(digest(a / s) == digest(b / s) for s in ("train", "val"))


def ratio(d: Path, results: Path, sample_mb: int, rounds: int) -> None:
    import numpy as np

    from ratplus.io.corpus import iter_documents
    from ratplus.io.tokenizer import get_tokenizer
    from ratplus.train import data as D

    sample = d / "sample.jsonl"
    with open(d / "small.jsonl") as src, open(sample, "w") as dst:
        n = 0
        for line in src:
            dst.write(line)
            n += len(line)
            if n >= sample_mb * 2**20:
                break
    docs = list(iter_documents(sample))
    tok = get_tokenizer(TOKENIZER)
    chunks, chunk, chars = [], [], 0
    for x in docs:  # the chunks prepare makes
        chunk.append(x)
        chars += len(x)
        if chars >= D.CHUNK_CHARS or len(chunk) >= D.CHUNK_DOCS:
            chunks.append(chunk)
            chunk, chars = [], 0
    chunks.append(chunk)
    raw, prep = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        n_tok = 0
        for c in chunks:
            n_tok += sum(len(e.ids) for e in tok.encode_batch_fast(c, add_special_tokens=False))
        raw.append(n_tok / (time.perf_counter() - t0))
        out = d / "ratio_out"
        shutil.rmtree(out, ignore_errors=True)
        s = D.prepare_splits(iter_documents(sample), tok, {"train": out / "train"}, show_progress=False)
        prep.append(s.total_tokens / s.seconds)
        emit({"what": "ratio_round", "round": r, "raw_tok_s": raw[-1], "prepare_tok_s": prep[-1]}, results)
    assert s.total_tokens == n_tok + len(docs)  # prepare adds one EOS per document
    emit(
        {
            "what": "ratio",
            "sample_bytes": sample.stat().st_size,
            "documents": len(docs),
            "raw_tok_s": statistics.median(raw),
            "prepare_tok_s": statistics.median(prep),
            "ratio": statistics.median(prep) / statistics.median(raw),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
        },
        results,
    )


def workers(d: Path, results: Path) -> None:
    outs = []
    for w in (1, 2):
        out = d / f"w{w}"
        shutil.rmtree(out, ignore_errors=True)
        rc, _peak, dt, _ = run_child(prepare_cmd(d / "sample.jsonl", out, "--workers", str(w)), 3600)
        outs.append(out)
        emit({"what": "workers_run", "workers": w, "rc": rc, "seconds": dt}, results)
    emit({"what": "workers", "identical": same(*outs)}, results)


def rss(d: Path, results: Path, name: str) -> None:
    out = d / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    inp = d / f"{name}.jsonl"
    cmd = prepare_cmd(inp, out)
    # a fresh interpreter per measurement, so RUSAGE_CHILDREN holds this child's peak only
    probe = [sys.executable, __file__, "--dir", str(d), "--child", json.dumps(cmd)]
    res = subprocess.run(probe, capture_output=True, text=True, check=True)
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    emit({"what": "rss", "corpus": name, "bytes": inp.stat().st_size, **rec}, results)


def kill(d: Path, results: Path) -> None:
    out = d / "out_killed"
    shutil.rmtree(out, ignore_errors=True)
    with open(d / "small.jsonl") as f:
        total = sum(1 for _ in f)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(prepare_cmd(d / "small.jsonl", out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    progress = out / "train.partial" / "progress.json"
    read = 0
    while proc.poll() is None:
        if progress.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):  # being replaced right now
                read = json.loads(progress.read_text())["documents_read"]
            if read >= total // 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, _, dt, out_text = run_child(prepare_cmd(d / "small.jsonl", out), 7200)
    resumed = [line for line in out_text.splitlines() if "resumed after" in line]
    emit(
        {
            "what": "kill",
            "killed_after_documents": read,
            "documents": total,
            "rerun_rc": rc,
            "rerun_seconds": dt,
            "resumed_line": resumed[-1] if resumed else None,
            "identical": same(out, d / "out_small"),
        },
        results,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="ratio,workers,rss_small,kill,rss_big")
    ap.add_argument("--sample-mb", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d = Path(args.dir)
    if args.child:
        rc, peak, dt, out = run_child(json.loads(args.child), 7200)
        summary = [line for line in out.splitlines() if line.startswith("read:")]
        print(json.dumps({"rc": rc, "peak_rss_mib": peak, "seconds": dt, "summary": summary}))
        return
    if args.build:
        build(d)
        return
    results = d / "prepare_results.jsonl"
    steps = {
        "ratio": lambda: ratio(d, results, args.sample_mb, args.rounds),
        "workers": lambda: workers(d, results),
        "rss_small": lambda: rss(d, results, "small"),
        "kill": lambda: kill(d, results),
        "rss_big": lambda: rss(d, results, "big"),
    }
    for name in args.only.split(","):
        steps[name]()


if __name__ == "__main__":
    main()
