"""``ratplus tune-pattern``: per-layer (or per head-group) patterns under a KV-cache budget.

Prints the greedy steps and the uniform patterns for comparison, writes ``tune.json`` under
``--out`` and, with ``--record``, stores the chosen pattern in the model folder's metadata as its
``default_pattern`` (the only write into a model folder; a folder with a manifest is verified
first and its manifest rewritten, so it stays verifiable).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ratplus.cli.common import add_device, names, number, positive_int
from ratplus.runtime import emit_json, print_table, resolve_device, write_json


def add_parser(sub) -> None:
    from ratplus.eval.tune import DEFAULT_LADDER

    p = sub.add_parser("tune-pattern", help="pick per-layer patterns minimising calibration PPL under a KV budget")
    p.add_argument("--ckpt", required=True, help="model folder")
    p.add_argument("--data", nargs="+", required=True, help="calibration text: .txt/.md/.jsonl files or folders")
    p.add_argument(
        "--kv-budget",
        type=number(float, 0, 1, low_open=True),
        required=True,
        help="KV cache as a fraction of dense, in (0, 1]",
    )
    p.add_argument("--ladder", type=names, default=list(DEFAULT_LADDER), help="candidate patterns (comma-separated)")
    p.add_argument("--head-groups", type=positive_int, default=1, help="tune this many head groups per layer")
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="window / context length (default: the model's max_seq_len)"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows scored per forward pass")
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="calibrate on about this many tokens (default: all of --data)",
    )
    p.add_argument("--record", action="store_true", help="store the choice as the folder's default pattern")
    add_device(p)
    p.add_argument("--out", default="runs/tune", help="output folder for tune.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from ratplus.eval.common import open_checkpoint
    from ratplus.eval.tune import tune_pattern
    from ratplus.io.corpus import read_documents

    texts = read_documents(args.data)
    em = open_checkpoint(args.ckpt, device=resolve_device(args.device))
    res = tune_pattern(
        em,
        texts,
        args.kv_budget,
        args.ladder,
        args.head_groups,
        args.seq_len,
        args.batch_size,
        args.max_tokens,
        not args.quiet,
    )
    print_table(
        ["step", "pattern", "calib PPL", "KV vs dense"],
        [[i, s["pattern"], s["ppl"], s["kv_bytes"] / res["dense_kv_bytes"]] for i, s in enumerate(res["steps"])],
    )
    print_table(
        ["uniform", "calib PPL", "KV vs dense"], [[u["pattern"], u["ppl"], u["kv_frac"]] for u in res["uniform"]]
    )
    res["json"] = str(write_json(Path(args.out) / "tune.json", res))
    if args.record:
        _record(Path(args.ckpt), res)
        res["recorded"] = str(args.ckpt)
    emit_json({k: v for k, v in res.items() if k not in ("steps", "uniform")})
    return 0


def _record(folder: Path, res: dict) -> None:
    from ratplus.io.lock import folder_lock
    from ratplus.io.manifest import MANIFEST_FILE, read_manifest, verify_folder, write_manifest
    from ratplus.io.metadata import METADATA_FILE, metadata_json, read_metadata
    from ratplus.runtime import atomic_write_text

    with folder_lock(folder, "tune-pattern --record"):
        signed = (folder / MANIFEST_FILE).is_file()
        if signed:
            verify_folder(folder)  # never re-sign a folder that was already damaged
        tuned = {k: res[k] for k in ("ppl", "kv_frac", "kv_budget", "seq_len", "head_groups", "tokens")}
        meta = dataclasses.replace(read_metadata(folder), default_pattern=res["pattern"], tuned=tuned)
        atomic_write_text(folder / METADATA_FILE, metadata_json(meta))
        if signed:
            write_manifest(folder, sorted({*read_manifest(folder), METADATA_FILE}))
