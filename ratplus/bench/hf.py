"""``ratplus bench hf``: ``transformers`` ``generate()`` versus ``ratplus.generate`` on one model.

Shapes: B batch, T prompt length.

Both run greedy decoding of the same prompts with the same pattern and the same compact cache; the
HF path adds ``GenerationMixin``'s per-step bookkeeping (logits processors, stopping criteria,
input preparation). The tokens are compared first and nothing is timed when they differ. Timing
is interleaved (native, HF, native, HF, ...) and the median of the repeats is reported, so the
ratio is meaningful even on a noisy machine (``--threads 1`` by default, as in ``bench decode``).
Stop tokens are disabled on both sides so every run generates exactly ``new_tokens`` tokens.

Peer rows (``peer=True``): ``generate()`` of the same-size ``LlamaForCausalLM`` (random weights,
see ``ratplus.bench.decode.llama_peer``) on the same prompts, with transformers' default
``DynamicCache`` and with ``cache_implementation="static"``, timed in the same interleaved rounds.

Compiled rows (``compile=True``): the HF model's full forward over the prompts (no cache, the
scoring / training shape) eager and under ``torch.compile(model)``, and ``generate()`` eager, with
``torch.compile(model.forward)`` and with ``model.compile_decode()`` (the compiled fixed-shape step),
side by side with their ratio. The compiled logits must
match eager (``COMPILE_ATOL``) and the compiled generate must give the same tokens, else nothing is
timed. Compilation happens in the warm-up call and is reported apart (``compile_seconds``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ratplus.bench.timing import time_interleaved
from ratplus.config import ModelConfig
from ratplus.model.rat import RATPlusLM
from ratplus.runtime import emit_json, environment, print_table


def build_model(preset: str | None, model_dir: str | None, device: torch.device, dtype: torch.dtype) -> RATPlusLM:
    """A model folder's weights, or a preset with random weights (seed 0): decode speed does not
    depend on the weight values."""
    if model_dir is not None:
        from ratplus.io.folder import load_pretrained

        return load_pretrained(model_dir, device=device, dtype=dtype)
    torch.manual_seed(0)
    return RATPlusLM(ModelConfig.from_preset(preset or "demo")).to(device=device, dtype=dtype).eval()


def run(
    preset: str | None,
    model_dir: str | None,
    pattern: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    json_path: str | None = None,
    peer: bool = True,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> dict[str, Any]:
    """Check token parity, time both generate() paths (and, with ``compile``, eager vs compiled forward
    and generate), print a table and the JSON record."""
    from ratplus.generation import generate
    from ratplus.hf import from_native

    if new_tokens < 1 or prompt_len < 1 or batch < 1 or repeats < 1:
        raise ValueError("batch, prompt_len, new_tokens and repeats must be >= 1")
    native = build_model(preset, model_dir, device, dtype)
    config = native.config
    if prompt_len + new_tokens > config.max_seq_len:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} > max_seq_len={config.max_seq_len}")
    hf = from_native(native, attention_pattern=pattern)
    hf.generation_config.eos_token_id = None  # no early stop: both sides generate exactly new_tokens
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).to(device)

    def run_native() -> torch.Tensor:
        return generate(native, ids, new_tokens, pattern=pattern, stop_tokens=[])

    def run_hf() -> torch.Tensor:
        return hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, pad_token_id=0)

    ref, out = run_native(), run_hf()
    if not torch.equal(ref, out):
        raise ValueError("HF generate() and ratplus.generate() produced different tokens; refusing to time them")
    fns = {"ratplus.generate": run_native, "hf generate": run_hf}
    params = {name: native.num_params() for name in fns}
    if peer:
        from ratplus.bench.decode import llama_peer

        llama = llama_peer(config, prompt_len + new_tokens, device, dtype)
        llama.generation_config.eos_token_id = None
        for kind in ("dynamic", "static"):
            extra = {"cache_implementation": "static"} if kind == "static" else {}
            fns[f"llama generate ({kind})"] = lambda extra=extra: llama.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, pad_token_id=0, **extra
            )
            params[f"llama generate ({kind})"] = sum(t.numel() for t in llama.parameters())
    compiled = compile_rows(native, pattern, ids, new_tokens, compile_backend) if compile else None
    times = time_interleaved(fns, device, repeats, warmup=1)
    tokens = batch * new_tokens
    base = times["ratplus.generate"]
    rows = [
        [name, f"{params[name] / 1e6:.4g}M", s * 1e3, s * 1e3 / new_tokens, tokens / s, base / s]
        for name, s in times.items()
    ]
    ratio = times["hf generate"] / times["ratplus.generate"]
    print(
        f"model {config.name} (C={config.d_model}, L={config.num_layers}, V={config.vocab_size}), pattern "
        f"{hf.config.attention_pattern}, batch {batch}, prompt {prompt_len}, new {new_tokens}, greedy"
    )
    print_table(["impl", "params", "total ms", "ms/step", "tokens/s", "vs ratplus"], rows)
    print(f"HF / native time ratio: {ratio:.3f} (tokens identical)")
    record = {
        "bench": "hf_generate",
        **environment(device, dtype),
        "model": config.name,
        "d_model": config.d_model,
        "num_layers": config.num_layers,
        "vocab_size": config.vocab_size,
        "pattern": hf.config.attention_pattern,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "tokens_identical": True,
        "seconds": times,
        "params": params,
        "ratio_hf_over_native": ratio,
    }
    if compiled is not None:
        fns_c, compile_seconds = compiled
        # compiled in compile_rows; one more warm-up round: the compiled forward's frames are shared by
        # both compiled wrappers (one code object), so a call after the other kind may trace once more
        times_c = time_interleaved(fns_c, device, repeats, warmup=1)
        rows_c = []
        for what, eager_key, comp_key in COMPILED_ROWS:
            eager, comp = times_c[eager_key], times_c[comp_key]
            rows_c.append([what, eager * 1e3, comp * 1e3, eager / comp, compile_seconds[what]])
        print(f"torch.compile ({compile_backend}) vs eager, HF model, pattern {hf.config.attention_pattern}")
        print_table(["path", "eager ms", "compiled ms", "speedup", "compile s"], rows_c)
        record["compile_backend"] = compile_backend
        record["compiled_seconds"] = times_c
        record["compile_seconds"] = compile_seconds
        record["speedup_compiled"] = {row[0]: row[3] for row in rows_c}
    emit_json(record, json_path)
    return record


#: (row, eager key, compiled key) of the compiled table: the full forward under torch.compile(model),
#: generate() with a compiled forward, generate() with compile_decode()'s compiled fixed-shape step.
COMPILED_ROWS = (
    ("forward", "forward eager", "forward compiled"),
    ("generate", "generate eager", "generate compiled"),
    ("compile_decode", "generate eager", "generate compile_decode"),
)
#: Largest |compiled - eager| logit difference accepted before timing (float32 reassociation only).
COMPILE_ATOL = 1e-3


def compile_rows(
    native: RATPlusLM, pattern: str, ids: torch.Tensor, new_tokens: int, backend: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """Eager and compiled callables of the HF forward (ids (B, T), no cache) and of generate(), after
    checking the compiled ones against eager; also the seconds each first (compiling) call took."""
    from ratplus.hf import from_native

    # four wrappers of the same weights: eager, compiled as a module, with a compiled forward (what
    # torch.compile(model) gives generate), with the compiled fixed-shape decode step (compile_decode)
    eager, whole, comp, fixed = (from_native(native, attention_pattern=pattern).eval() for _ in range(4))
    compiled_model = torch.compile(whole, backend=backend)
    comp.forward = torch.compile(comp.forward, backend=backend)
    fixed.compile_decode(backend=backend)
    for m in (eager, comp, fixed):
        m.generation_config.eos_token_id = None

    def forward(model):
        def call() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits

        return call

    def gen(model):
        return lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, pad_token_id=0)

    fns = {
        "forward eager": forward(eager),
        "forward compiled": forward(compiled_model),
        "generate eager": gen(eager),
        "generate compiled": gen(comp),
        "generate compile_decode": gen(fixed),
    }
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    got = fns["forward compiled"]()
    seconds["forward"] = time.perf_counter() - start
    diff = float((got - fns["forward eager"]()).abs().max())
    if diff > COMPILE_ATOL:
        raise ValueError(f"compiled forward differs from eager by {diff:.3g} > {COMPILE_ATOL}; refusing to time it")
    want = fns["generate eager"]()
    for what in ("generate", "compile_decode"):
        start = time.perf_counter()
        got = fns[f"generate {'compiled' if what == 'generate' else what}"]()
        seconds[what] = time.perf_counter() - start
        if not torch.equal(got, want):
            raise ValueError(f"{what}: compiled generate() gave other tokens than eager; refusing to time it")
    return fns, seconds
