"""``ratplus bench decode --ckpt``: a real model folder, prefill and decode tokens/s, next to peers.

The same greedy job runs on every engine: a prompt of English prose (the bundled Wikipedia
articles, tokenized with the folder's tokenizer; the first T tokens) is prefilled into a fresh
cache, then ``decode_tokens`` greedy steps follow. Prefill tokens/s = T / prefill seconds (the
prompt's last logits only, as ``generate()`` needs); decode tokens/s = steps / decode seconds.

Engines (one row each):
  ratplus <pattern>   the folder's model, ``RATPlusCache`` in that pattern; prefill = one cached
                      forward, decode = the fixed-shape ``RATPlusLM.decode_step`` (the reference
                      step for top-k), the steps ``ratplus.generate`` runs
  transformers        ``LlamaForCausalLM`` of the folder's import source (its metadata's
                      ``imported_from``, or ``peer_source``), the same weights in the same dtype,
                      default ``DynamicCache``, ``logits_to_keep=1`` at prefill (what ``generate()`` does)
  llama.cpp           ``llama_cpp.Llama`` on the GGUF file (optional: only when ``llama-cpp-python``
                      is installed; its own quantized weights and float16 KV cache)
All use the same number of threads. Timing: one warm-up round on a short prompt, then ``repeats``
rounds per prompt length, each running every engine in turn (interleaved: a change in machine
load hits all of them), medians reported; ratios are medians of the per-round ratios.

Parity before timing (nothing is timed otherwise): each ratplus pattern's greedy tokens from its
cache equal the argmax of a full forward in that pattern over the same tokens (teacher forcing),
transformers' greedy tokens equal ratplus dense's and its prompt logits are within ``PARITY_ATOL``,
and llama.cpp's first greedy token is among ratplus dense's top 5 (its weights are quantized, so
only a loose check; how many of its greedy tokens agree is reported).

Shapes: T prompt length, V vocab.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ratplus.model.cache import RATPlusCache
from ratplus.model.rat import RATPlusLM

PEERS = ("transformers", "llama.cpp")
PARITY_ATOL = 1e-3  # logits of the same float32 weights: float rounding only
PARITY_STEPS = 8
WARMUP_LEN = 128


@dataclass
class Engine:
    """``prefill(ids) -> state`` (ids: list of T ints); ``decode(state, n) -> greedy tokens``: the
    prefill's argmax and then n steps, each feeding the previous token (n + 1 tokens);
    ``last_logits(state)`` (V,) float32 of the prompt's last position; ``weight_bytes``: bytes of
    the weights a decode step reads."""

    name: str
    prefill: Callable[[list[int]], Any]
    decode: Callable[[Any, int], list[int]]
    last_logits: Callable[[Any], torch.Tensor]
    weight_bytes: int
    note: str = ""


def prose_ids(tokenizer: Any, n: int) -> list[int]:
    """The first ``n`` tokens of the bundled Wikipedia articles (train split, in order) under ``tokenizer``
    (a ``tokenizers.Tokenizer``)."""
    from ratplus.io.corpus import corpus_documents

    ids: list[int] = []
    for doc in corpus_documents("wikipedia", "train"):
        ids += tokenizer.encode(doc + "\n\n", add_special_tokens=False).ids
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the bundled Wikipedia articles hold {len(ids)} tokens; a prompt of {n} was asked for")


def ratplus_engine(model: RATPlusLM, pattern: str, room: int) -> Engine:
    """A cache of the prompt's length + ``room`` tokens per prefill (the decode step's fixed shape
    covers the whole cache, so it is sized to each prompt rather than to the longest)."""
    weight = model.embedding.wte.weight
    device, dtype = weight.device, weight.dtype

    @torch.no_grad()
    def prefill(ids: list[int]):
        cache = RATPlusCache(model.config, pattern, 1, len(ids) + room, device=device, dtype=dtype)
        h = model.hidden(torch.tensor([ids], device=device), cache=cache)  # (1, T, C)
        return cache, model.logits(h[:, -1:])[:, -1]  # (1, V)

    @torch.no_grad()
    def decode(state, n: int) -> list[int]:
        cache, logits = state
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        out = [int(token)]
        held = torch.tensor(cache.lengths, device=device) if cache.supports_fixed_step else None
        for _ in range(n):
            if held is None:
                logits = model(token, cache=cache)[:, -1]
            else:
                logits = model.decode_step(token, cache, held)
                held = held + 1
            token = logits.argmax(-1, keepdim=True)
            out.append(int(token))
        return out

    item = weight.element_size()
    return Engine(f"ratplus {pattern}", prefill, decode, lambda s: s[1][0].float(), model.num_params() * item)


def transformers_engine(peer: Any) -> Engine:
    from transformers import DynamicCache

    from ratplus.bench.decode import _peer_cache_kwarg

    kw = _peer_cache_kwarg(peer)
    device = next(peer.parameters()).device

    @torch.no_grad()
    def prefill(ids: list[int]):
        cache = DynamicCache(config=peer.config)
        out = peer(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **{kw: cache})
        return cache, out.logits[:, -1]

    @torch.no_grad()
    def decode(state, n: int) -> list[int]:
        cache, logits = state
        token = logits.argmax(-1, keepdim=True)
        out = [int(token)]
        for _ in range(n):
            logits = peer(token, use_cache=True, **{kw: cache}).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            out.append(int(token))
        return out

    nbytes = sum(p.numel() * p.element_size() for p in peer.parameters())
    return Engine("transformers", prefill, decode, lambda s: s[1][0].float(), nbytes, "DynamicCache")


def llama_cpp_engine(gguf: str | Path, n_ctx: int, threads: int) -> Engine:
    """llama.cpp through ``llama-cpp-python`` (ImportError when it is not installed)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)

    def logits_now() -> np.ndarray:  # the last evaluated token's logits (llama.cpp keeps only those)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def prefill(ids: list[int]):
        llm.reset()
        llm.eval(ids)
        return logits_now()

    def decode(state, n: int) -> list[int]:
        token = int(np.argmax(state))
        out = [token]
        for _ in range(n):
            llm.eval([token])
            token = int(np.argmax(logits_now()))
            out.append(token)
        return out

    return Engine(
        "llama.cpp",
        prefill,
        decode,
        lambda s: torch.from_numpy(np.array(s)),
        Path(gguf).stat().st_size,
        f"{Path(gguf).name}, n_batch {llm.n_batch}",
    )


def check_parity(
    model: RATPlusLM, engines: list[Engine], patterns: list[str], ids: list[int], steps: int = PARITY_STEPS
) -> dict[str, Any]:
    """The checks of the module docstring on ``ids`` (raise RuntimeError when one fails); returns
    what was measured (max |logit difference| of transformers, llama.cpp's agreeing tokens)."""
    device = model.embedding.wte.weight.device
    report: dict[str, Any] = {"prompt_tokens": len(ids), "steps": steps}
    ref_tokens, ref_logits = None, None
    for engine in engines:
        state = engine.prefill(ids)
        logits = engine.last_logits(state)
        tokens = engine.decode(state, steps)
        if engine.name.startswith("ratplus "):
            pattern = engine.name.removeprefix("ratplus ")
            with torch.no_grad():
                full = model(torch.tensor([ids + tokens[:-1]], device=device), pattern=pattern)[0]  # (T + steps, V)
            forced = full[len(ids) - 1 :].argmax(-1).tolist()
            if forced != tokens:
                raise RuntimeError(
                    f"decode parity failed for {engine.name}: cached greedy tokens {tokens} != the full "
                    f"forward's argmax {forced}"
                )
            if pattern == "dense":
                ref_tokens, ref_logits = tokens, logits
        elif ref_tokens is None:
            raise RuntimeError("parity needs the ratplus dense engine first")
        elif engine.name == "transformers":
            err = float((logits - ref_logits).abs().max())
            report["transformers_max_abs_logit_diff"] = err
            if err > PARITY_ATOL or tokens != ref_tokens:
                raise RuntimeError(
                    f"transformers differs from ratplus dense: max |logit diff| {err:.3g} (tolerance "
                    f"{PARITY_ATOL}), tokens {tokens} vs {ref_tokens}"
                )
        else:  # a quantized engine: loose
            top5 = ref_logits.topk(5).indices.tolist()
            agree = sum(a == b for a, b in zip(tokens, ref_tokens))
            report[f"{engine.name}_tokens_agreeing"] = f"{agree}/{len(tokens)}"
            if tokens[0] not in top5:
                raise RuntimeError(
                    f"{engine.name}'s first greedy token {tokens[0]} is not among ratplus dense's top 5 {top5}"
                )
        del state
    report["patterns"] = patterns
    return report


def time_engines(
    engines: list[Engine], prompts: dict[int, list[int]], decode_tokens: int, repeats: int
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Seconds of every engine's prefill and decode, per prompt length and round (interleaved), after
    one warm-up round on a short prompt."""
    shortest = min(prompts.values(), key=len)
    for engine in engines:  # warm-up: allocations, thread pools, kernels
        engine.decode(engine.prefill(shortest[:WARMUP_LEN]), 2)
    out: dict[str, dict[int, dict[str, list[float]]]] = {
        e.name: {T: {"prefill": [], "decode": []} for T in prompts} for e in engines
    }
    for T, ids in prompts.items():
        for _ in range(repeats):
            for engine in engines:
                gc.collect()
                t0 = time.perf_counter()
                state = engine.prefill(ids)
                t1 = time.perf_counter()
                engine.decode(state, decode_tokens)
                t2 = time.perf_counter()
                del state
                out[engine.name][T]["prefill"].append(t1 - t0)
                out[engine.name][T]["decode"].append(t2 - t1)
    return out


def rates(times: dict[str, dict[int, dict[str, list[float]]]], prompts: dict[int, list[int]], steps: int) -> dict:
    """Median tokens/s per engine, length and phase, and the medians of the per-round ratios."""
    per_round = {
        name: {
            T: {"prefill": [T / s for s in per_t[T]["prefill"]], "decode": [steps / s for s in per_t[T]["decode"]]}
            for T in prompts
        }
        for name, per_t in times.items()
    }
    med = {
        n: {T: {ph: statistics.median(v) for ph, v in d.items()} for T, d in pt.items()} for n, pt in per_round.items()
    }

    def ratio(name: str, base: str) -> dict[int, dict[str, float]]:
        return {
            T: {
                ph: statistics.median(a / b for a, b in zip(per_round[name][T][ph], per_round[base][T][ph]))
                for ph in ("prefill", "decode")
            }
            for T in prompts
        }

    out: dict[str, Any] = {"tokens_per_s": med, "per_round": per_round}
    for base in ("ratplus dense", "transformers"):
        if base in per_round:
            out[f"vs {base}"] = {name: ratio(name, base) for name in per_round}
    return out


def peer_source_of(ckpt: str | Path) -> str | None:
    """Where the folder was imported from (its metadata's ``imported_from``), or None."""
    from ratplus.io.folder import load_metadata

    return load_metadata(ckpt).get("imported_from")


def real_model(
    ckpt: str | Path,
    patterns: list[str],
    prompt_lens: list[int],
    decode_tokens: int,
    repeats: int,
    peers: list[str],
    peer_source: str | None,
    gguf: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Parity, then timing (module docstring); prints the tables and returns the record."""
    from ratplus.io.folder import load_pretrained, load_tokenizer
    from ratplus.runtime import print_table

    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose among {', '.join(PEERS)}")
    if decode_tokens < 1 or repeats < 1 or not prompt_lens or min(prompt_lens) < 2:
        raise ValueError("decode_tokens and repeats must be >= 1, prompt lengths >= 2")
    model = load_pretrained(ckpt, device=device, dtype=dtype)
    patterns = ["dense", *[p for p in patterns if p != "dense"]]
    for p in patterns:
        model.config.canonical_pattern(p)  # validates before anything runs
    room = max(decode_tokens, PARITY_STEPS)
    limit = model.config.max_seq_len - room
    lens = sorted({min(T, limit) for T in prompt_lens})  # the prompt + its decoded tokens fit max_seq_len
    text = prose_ids(load_tokenizer(ckpt), max(lens))
    prompts = {T: text[:T] for T in lens}
    max_len = max(lens) + room
    engines = [ratplus_engine(model, p, room) for p in patterns]
    notes: list[str] = []
    source = peer_source or peer_source_of(ckpt)
    if "transformers" in peers:
        if source is None:
            raise ValueError(f"{ckpt} records no import source: give the transformers peer's --peer-source")
        from ratplus.hf.llama import load_llama_source

        peer, _, _ = load_llama_source(source, dtype=dtype)
        engines.append(transformers_engine(peer.to(device)))
    if "llama.cpp" in peers:
        path = gguf or (source if source and str(source).endswith(".gguf") else None)
        if path is None and source and str(source).startswith("pkg:"):
            from ratplus.hf.llama import package_gguf

            path = str(package_gguf(str(source).removeprefix("pkg:")))
        if path is None:
            raise ValueError("the llama.cpp peer needs a GGUF file: give --gguf")
        try:
            engines.append(llama_cpp_engine(path, max_len + 8, torch.get_num_threads()))
        except ImportError:
            notes.append("llama.cpp: not timed (llama-cpp-python is not installed)")
            print("(no llama.cpp row: llama-cpp-python is not installed; it is an optional peer)")
    parity = check_parity(model, engines, patterns, text[: min(256, min(lens))])
    times = time_engines(engines, prompts, decode_tokens, repeats)
    r = rates(times, prompts, decode_tokens)
    threads = torch.get_num_threads()
    print(
        f"\nreal model {ckpt}: prefill and greedy decode, {threads} threads for every engine, prompt = the bundled "
        f"Wikipedia articles; median of {repeats} interleaved rounds, {decode_tokens} decode steps after each prefill"
    )
    tps = r["tokens_per_s"]
    headers = ["engine", "weights MB"] + [f"{ph} {T}" for T in lens for ph in ("prefill", "decode@")]
    rows = [
        [e.name, e.weight_bytes / 1e6] + [tps[e.name][T][ph] for T in lens for ph in ("prefill", "decode")]
        for e in engines
    ]
    print_table(headers, rows)
    for base in ("transformers", "ratplus dense"):
        key = f"vs {base}"
        if key in r:
            print(f"ratios to {base} (median of per-round ratios):")
            print_table(
                ["engine"] + [f"{ph} {T}" for T in lens for ph in ("prefill", "decode@")],
                [[n] + [r[key][n][T][ph] for T in lens for ph in ("prefill", "decode")] for n in r[key]],
            )
    print("(tokens/s; decode@T: greedy steps right after a T-token prefill)")
    for note in notes:
        print(note)
    return {
        "ckpt": str(ckpt),
        "threads": threads,
        "prompt_lens": lens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "engines": {e.name: {"weight_bytes": e.weight_bytes, "note": e.note} for e in engines},
        "parity": parity,
        "notes": notes,
        "tokens_per_s": {n: {str(T): v for T, v in d.items()} for n, d in tps.items()},
        **{
            k.replace(" ", "_"): {n: {str(T): v for T, v in d.items()} for n, d in r[k].items()}
            for k in r
            if k.startswith("vs ")
        },
        "seconds": {n: {str(T): v for T, v in d.items()} for n, d in times.items()},
    }
