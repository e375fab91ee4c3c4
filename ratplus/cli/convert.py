"""``ratplus convert``: native <-> Hugging Face folders, import of the paper's checkpoints and of
Llama-family models (a Hugging Face folder or a GGUF file; ``ratplus.hf.llama``), all in
``ratplus.hf.convert`` (imported when the command runs, since it needs ``transformers``).

    ratplus convert --from-hf path/to/llama-folder models/llama
    ratplus convert --from-hf path/to/folder --gguf-file model.Q4_1.gguf models/llama
"""

from __future__ import annotations

from typing import Any

from ratplus.cli.common import nonneg_int, picked, positive_int
from ratplus.runtime import resolve_dtype

#: flags that are keyword arguments of ``ratplus.hf.convert.convert`` under the same name
_PASSED_AS_IS = (
    "to",
    "pattern",
    "tokenizer",
    "num_heads",
    "head_dim",
    "max_seq_len",
    "eos_token_id",
    "trust_pickle",
    "overwrite",
    "from_hf",
    "gguf_file",
)
PAPER_HEAD_DIM = 128  # the reference import's default head size (ratplus.hf.convert.PAPER_HEAD_DIM)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints: native <-> Hugging Face folder, import the paper's .pth or a Llama-family model",
        description=(
            "Checkpoint conversion: native folder <-> Hugging Face folder, import of the paper's checkpoints, and "
            "import of Llama-family models (Hugging Face folder or GGUF file) as exact ratplus models."
        ),
    )
    p.add_argument(
        "src",
        help="native folder, Hugging Face folder (RAT+ or Llama-family), GGUF file, or a reference checkpoint "
        "file (.pth/.safetensors)",
    )
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=("native", "hf"), default=None, help="output format (default: the other one)")
    p.add_argument(
        "--pattern",
        default=None,
        help="default attention pattern to record, e.g. D16-W256-P4 (default: the source's adapted pattern, if any)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json / tokenizer.model (or a folder) to save beside (default: the source's, if any)",
    )
    p.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="reference import: heads per layer (default: the checkpoint's stored config, else d_model / head size)",
    )
    p.add_argument(
        "--head-dim",
        type=positive_int,
        default=None,
        help=f"reference import: head size if no --num-heads (default: stored config, else {PAPER_HEAD_DIM})",
    )
    p.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        help="reference import: context (default: stored config, else 4096)",
    )
    p.add_argument(
        "--eos-token-id",
        type=nonneg_int,
        default=None,
        help="reference import: EOS id (default: 2 for vocab 32000, else none)",
    )
    p.add_argument(
        "--from-hf",
        action="store_true",
        help="SRC is a Llama-family Hugging Face folder (or GGUF file) to import; refuse anything else",
    )
    p.add_argument(
        "--gguf-file",
        default=None,
        help="import this GGUF file, a name inside SRC or a path (default: SRC itself when it ends in .gguf)",
    )
    p.add_argument(
        "--dtype", default=None, help="cast weights to float32, bfloat16 or float16 (default: keep the source's)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in DST")
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    from ratplus.hf.convert import convert

    dtype = resolve_dtype(args.dtype) if args.dtype is not None else None
    kind, to = convert(args.src, args.dst, dtype=dtype, **picked(args, *_PASSED_AS_IS))
    print(f"converted {args.src} ({kind}) -> {args.dst} ({to})")
    return 0
