"""``ratplus generate``: the printed text is the whole decoded continuation even where a multi-byte
character is split across tokens; ``--chat`` wraps the prompt in the folder's chat template and
prints the reply alone."""

from __future__ import annotations

import json

import pytest
import torch

import ratplus.generation
from ratplus.cli import main
from ratplus.config import ModelConfig
from ratplus.io.folder import save_pretrained
from ratplus.io.tokenizer import train_bpe
from ratplus.model.rat import RATPlusLM

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = train_bpe(["plain ascii text only, nothing else here"] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), eos_token_id=None))
    path = tmp_path_factory.mktemp("gen") / "model"
    save_pretrained(
        model, path, tokenizer=tok, extra_files={"tokenizer_config.json": json.dumps({"chat_template": TEMPLATE})}
    )
    return path, tok


def _fake_generate(tokens: list[int], seen: list):
    """A stand-in for ratplus.generation.generate that streams ``tokens`` and records its prompt."""

    def fake(model, input_ids, max_new_tokens, streamer=None, **kw):
        seen.append(input_ids[0].tolist())
        for t in tokens:
            streamer(torch.tensor([t]))
        return torch.cat([input_ids, torch.tensor([tokens])], dim=1)

    return fake


def test_a_character_split_across_tokens_is_printed_whole(folder, capsys, monkeypatch):
    path, tok = folder
    reply = " café, naïve, 東京 and ☃ end"
    ids = tok.encode(reply).ids
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # really split
    monkeypatch.setattr(ratplus.generation, "generate", _fake_generate(ids, []))
    assert main(["generate", "--ckpt", str(path), "--prompt", "plain"]) == 0
    assert capsys.readouterr().out == "plain" + reply + "\n"


def test_chat_wraps_the_prompt_and_prints_the_reply_alone(folder, capsys, monkeypatch):
    path, tok = folder
    seen: list = []
    monkeypatch.setattr(ratplus.generation, "generate", _fake_generate(tok.encode(" ok").ids, seen))
    argv = ["generate", "--ckpt", str(path), "--chat", "--system", "be brief", "--prompt", "hi there"]
    assert main(argv) == 0
    assert capsys.readouterr().out == " ok\n"
    assert tok.decode(seen[0]) == "[system] be brief\n[user] hi there\n[assistant]"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-ids", "1,2", "--chat"], "--chat / --system take"),
        (["--prompt", "a", "--system", "s"], "--system needs"),
    ],
)
def test_chat_flags_are_checked(folder, capsys, extra, message):
    assert main(["generate", "--ckpt", str(folder[0]), *extra]) == 2
    assert message in capsys.readouterr().err
