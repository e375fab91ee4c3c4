"""``ratplus generate``: load a model folder and print a continuation as it is generated.

    ratplus generate --ckpt PATH --pattern D16-W256-P4 --prompt "Once upon a time"
    ratplus generate --ckpt PATH --prompt-ids 1,2,3        # folders without tokenizer.json
    ratplus generate --ckpt PATH --chat --prompt "What is the capital of France?"

The pattern defaults to the folder's ``metadata.json`` ``default_pattern`` (recorded by
``ratplus tune-pattern --record``), else its ``adapted_pattern`` (the pattern it was
adapted to), else dense.
"""

from __future__ import annotations

import sys

import torch

from ratplus.cli.common import add_device, comma_list, fraction, nonneg_float, nonneg_int, number, positive_int

token_ids = comma_list(nonneg_int, "token ids")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model folder, streaming tokens as they come")
    p.add_argument("--ckpt", required=True, help="model folder (config.json, model.safetensors, tokenizer.json)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the folder's tokenizer.json; or --prompt-ids)")
    prompt.add_argument("--prompt-ids", type=token_ids, help="prompt as comma-separated token ids (or --prompt)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="--prompt is a user message: wrap it in the folder's chat template (tokenizer_config.json, as "
        "ratplus serve does) and print only the reply",
    )
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's (default: none)")
    p.add_argument(
        "--pattern",
        default=None,
        help="attention pattern, e.g. D16-W256-P4 (default: the folder's recorded default, else adapted, else dense)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    p.add_argument(
        "--temperature",
        type=nonneg_float,
        default=0.0,
        help="sampling temperature (default: 0 = greedy, the most likely token each step, so the same output "
        "every run; ratplus serve's requests default to 1 instead, as OpenAI's API does)",
    )
    p.add_argument(
        "--top-k", type=nonneg_int, default=None, help="sample among the k most likely tokens (default: all)"
    )
    p.add_argument(
        "--top-p",
        type=number(float, 0, 1, low_open=True),
        default=None,
        help="sample from the smallest set of tokens whose probability reaches p (default: 1, all)",
    )
    p.add_argument(
        "--min-p",
        type=fraction,
        default=None,
        help="sample only tokens at least this fraction as likely as the most likely one (default: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=number(float, 0, 10, low_open=True),
        default=1.0,
        help="every token already in the prompt or the output: its logit divided by this when positive, "
        "multiplied when negative (default: 1 = off; 1.1-1.3 curbs loops)",
    )
    p.add_argument(
        "--presence-penalty",
        type=number(float, -2, 2),
        default=0.0,
        help="subtracted from the logit of every token generated so far, once (default: 0 = off)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=number(float, -2, 2),
        default=0.0,
        help="subtracted from the logit of every generated token, times its count so far (default: 0 = off)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sampling draws")
    p.add_argument("--stop", type=token_ids, default=None, help="stop token ids (default: the config's eos_token_id)")
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="cap on prompt + new tokens (default: the model's max_seq_len)",
    )
    add_device(p, "cpu")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ratplus.generation import IncrementalDetokenizer, generate
    from ratplus.io.folder import load_pretrained, load_tokenizer
    from ratplus.io.metadata import read_metadata
    from ratplus.io.tokenizer import chat_prompt, load_chat_template
    from ratplus.runtime import resolve_device

    device = resolve_device(args.device)
    model = load_pretrained(args.ckpt, device=device)
    tokenizer = load_tokenizer(args.ckpt)
    if (args.chat or args.system is not None) and args.prompt is None:
        raise ValueError("--chat / --system take the user's message as --prompt (text), not --prompt-ids")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{args.ckpt} has no tokenizer.json: give the prompt as --prompt-ids 1,2,3")
        text = args.prompt
        if args.chat:
            messages = ([("system", args.system)] if args.system is not None else []) + [("user", args.prompt)]
            eos = model.config.eos_token_id
            text = chat_prompt(
                load_chat_template(args.ckpt), messages, None if eos is None else tokenizer.id_to_token(eos)
            )
        prompt = tokenizer.encode(text).ids
        if not prompt:
            raise ValueError("the prompt encodes to no tokens")
    else:
        prompt = args.prompt_ids
        if not prompt:
            raise ValueError("--prompt-ids is empty")
    vocab = model.config.vocab_size
    for flag, ids in (("--prompt-ids", prompt), ("--stop", args.stop or [])):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:  # checked before the tokenizer decodes the prompt for display
            raise ValueError(f"{flag}: token id {bad[0]} is outside [0, vocab_size={vocab})")
    meta = read_metadata(args.ckpt)
    # an empty --pattern "" is an error (from the parser), not a silent fall back to the default
    pattern = args.pattern if args.pattern is not None else (meta.default_pattern or meta.adapted_pattern or "dense")
    print(f"[pattern {pattern}, {len(prompt)} prompt tokens]", file=sys.stderr)

    new_ids: list[int] = []
    shown = tokenizer.decode(prompt) if tokenizer is not None else " ".join(map(str, prompt)) + " |"
    if args.chat:
        shown = ""  # the reply alone; the template's markup is not echoed

    # the server's detokenizer: pieces are handed out once their characters are complete (a token
    # may end inside a multi-byte character), seeded with the prompt so spacing is the whole text's
    detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, () if args.chat else prompt)

    def stream(tokens: torch.Tensor) -> None:
        if not new_ids:  # the arguments were validated before the first token: show the prompt now
            print(shown, end="", flush=True)
        new_ids.append(int(tokens[0]))
        if detok is None:
            print(f" {new_ids[-1]}", end="", flush=True)
        else:
            print(detok.push(new_ids[-1]), end="", flush=True)

    generate(
        model,
        torch.tensor([prompt]),
        args.max_new_tokens,
        pattern=pattern,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop_tokens=args.stop,
        max_length=args.max_length,
        streamer=stream,
        generator=torch.Generator(device=device).manual_seed(args.seed),
    )
    print(shown if not new_ids else (detok.flush() if detok is not None else ""))
    return 0
