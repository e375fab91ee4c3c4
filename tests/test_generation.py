import pytest
import torch

from ratplus import ModelConfig, RATPlusLM, generate
from ratplus.cli import main
from ratplus.generation import generate_stream, sample_next
from ratplus.io.folder import save_pretrained


@pytest.fixture(scope="module")
def model():
    # a large init makes a random model's greedy output vary instead of repeating one token
    torch.manual_seed(0)
    return RATPlusLM(ModelConfig.from_preset("tiny", init_std=0.3)).eval()


def _greedy_by_full_forward(model, ids, n, pattern):
    """Greedy continuation recomputing the whole sequence each step (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, pattern=pattern)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("pattern", ["D4-W2-P1", "topk-B4-K2-W3-P2-moba", "D4:2+local-W3-P1:2"])
def test_greedy_equals_full_forward_argmax(model, pattern):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 11))
    out = generate(model, ids, 14, pattern=pattern)
    assert out.shape == (2, 25) and torch.equal(out[:, :11], ids)
    assert torch.equal(out, _greedy_by_full_forward(model, ids, 14, pattern))
    assert torch.equal(out, generate(model, ids, 14, pattern=pattern))  # deterministic


def test_pattern_is_chosen_at_call_time(model):
    ids = torch.randint(0, 256, (1, 40))
    assert not torch.equal(generate(model, ids, 20, pattern="D16"), generate(model, ids, 20, pattern="dense"))


def test_sampling_is_reproducible_and_filtered(model):
    ids = torch.randint(0, 256, (3, 5))

    def sample(seed, **kw):
        return generate(model, ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(3, top_p=0.9), sample(3, top_p=0.9))
    assert not torch.equal(sample(3), sample(4))
    greedy = generate(model, ids, 12)
    assert torch.equal(sample(5, top_k=1), greedy)  # top-k 1 is greedy whatever the temperature
    assert torch.equal(sample(6, top_p=1e-6), greedy)  # so is a tiny nucleus


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {1, 2}
    # nucleus: p(1) ~ 0.36, p(2) ~ 0.33, p(4) ~ 0.30: top_p 0.5 keeps tokens 1 and 2 only
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, generator=gen).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next(logits[:2], 0.0).tolist() == [1, 1]


def test_ragged_prompts_match_each_row_alone(model):
    torch.manual_seed(2)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (7, 3, 12)]
    for pattern in ("D3-W2-P1", "topk-B2-K1-W1-P1-quest"):
        out = generate(model, prompts, 9, pattern=pattern, pad_token_id=0)
        assert out.shape == (3, 12 + 9)
        for r, p in enumerate(prompts):
            alone = generate(model, [p], 9, pattern=pattern)
            assert torch.equal(out[r, 12 - len(p) :], alone[0])
            assert (out[r, : 12 - len(p)] == 0).all()  # left padding
        # the same batch as a left-padded tensor with an attention mask
        mask = (torch.arange(12) >= torch.tensor([12 - len(p) for p in prompts]).unsqueeze(1)).long()
        assert torch.equal(generate(model, out[:, :12], 9, pattern=pattern, attention_mask=mask), out)


def test_stop_tokens_pad_finished_rows(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 6))
    free = generate(model, ids, 16, pattern="D4")
    # a token that row 0 emits and row 1 never does: row 0 stops (then pads), row 1 runs on
    stop = next(t for t in free[0, 6:].tolist() if t not in free[1, 6:].tolist())
    end = 6 + free[0, 6:].tolist().index(stop) + 1  # the stop token is kept, then padding
    out = generate(model, ids, 16, pattern="D4", stop_tokens=[stop], pad_token_id=255)
    assert end < 22 and out.shape == (2, 22)
    assert torch.equal(out[0, :end], free[0, :end]) and (out[0, end:] == 255).all()
    assert torch.equal(out[1], free[1])
    # once every row has stopped, generation ends early
    stops = {stop, int(free[1, 9])}
    ends = [6 + next(i for i, t in enumerate(free[r, 6:].tolist()) if t in stops) + 1 for r in range(2)]
    assert generate(model, ids, 16, pattern="D4", stop_tokens=sorted(stops)).shape[1] == max(ends) < 22
    # the stream reads "all stopped" back only every stop_check_every steps: padding steps may follow
    for every in (1, 3, 100):
        streamed = list(
            generate_stream(model, ids, 16, pattern="D4", stop_tokens=sorted(stops), stop_check_every=every)
        )
        assert max(ends) - 6 <= len(streamed) < max(ends) - 6 + every
        assert torch.equal(
            torch.stack(streamed, dim=1)[:, : max(ends) - 6],
            generate(model, ids, 16, pattern="D4", stop_tokens=sorted(stops))[:, 6:],
        )
    with pytest.raises(ValueError, match="stop_check_every"):
        next(generate_stream(model, ids, 4, stop_check_every=0))


def test_max_length_and_streaming(model):
    ids = torch.randint(0, 256, (2, 10))
    assert generate(model, ids, 50, max_length=15).shape == (2, 15)
    assert torch.equal(generate(model, ids, 0), ids)
    seen = []
    out = generate(model, ids, 6, pattern="D2", streamer=seen.append)
    assert len(seen) == 6 and torch.equal(torch.stack(seen, dim=1), out[:, 10:])
    assert torch.equal(torch.stack(list(generate_stream(model, ids, 6, pattern="D2")), dim=1), out[:, 10:])


def test_bad_input_fails_before_any_forward(model):
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 256, (2, 10))
    bad = [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=-2), "top_k"),
        (dict(stop_tokens=[256]), "stop token"),
        (dict(pattern="D4x"), "unknown attention pattern"),
        (dict(pattern="D4:3+dense:3"), "covers 6 heads"),
        (dict(max_length=5), "longer than max_length"),
        (dict(max_length=10_000), "max_seq_len"),
    ]
    try:
        for kwargs, match in bad:
            with pytest.raises(ValueError, match=match):
                generate(model, ids, 5, **kwargs)
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, ids, -1)
        for empty in (torch.zeros(1, 0, dtype=torch.long), [[1, 2], []], []):
            with pytest.raises(ValueError, match="empty"):
                generate(model, empty, 5)
        with pytest.raises(ValueError, match="vocab_size"):
            generate(model, ids + 300, 5)
        with pytest.raises(ValueError, match="token ids"):
            generate(model, ids.float(), 5)
        assert not calls
    finally:
        hook.remove()


WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]


def _word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return tok


def test_cli_generate(tmp_path, capsys):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=12, init_std=0.3)).eval()
    with_tok, without = tmp_path / "with", tmp_path / "without"
    save_pretrained(model, with_tok, tokenizer=_word_tokenizer())
    save_pretrained(model, without)
    args = ["--pattern", "D2-W1-P1", "--max-new-tokens", "6"]
    assert main(["generate", "--ckpt", str(with_tok), "--prompt", "the cat sat", *args]) == 0
    text = capsys.readouterr().out.strip()
    expected = generate(model, torch.tensor([[1, 2, 3]]), 6, pattern="D2-W1-P1")[0, 3:].tolist()
    assert text == " ".join(["the", "cat", "sat"] + [WORDS[i] for i in expected])
    assert main(["generate", "--ckpt", str(without), "--prompt-ids", "1,2,3", *args]) == 0
    assert capsys.readouterr().out.split("|")[1].split() == [str(i) for i in expected]
    assert main(["generate", "--ckpt", str(without), "--prompt", "the cat"]) == 2
    assert "prompt-ids" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by argparse (ratplus.cli.common.number)
        main(["generate", "--ckpt", str(with_tok), "--prompt", "the", "--top-p", "2", "--temperature", "1"])
    assert e.value.code == 2 and "argument --top-p" in capsys.readouterr().err


def test_decode_loop_reads_nothing_back_per_token(model, monkeypatch):
    """After the prefill, the loop reads device values on the host (``bool``, ``int``, ``item``,
    ``tolist``) only for the stop check every ``stop_check_every`` steps: generating 40 tokens costs
    at most 30 / 8 + 1 more reads than generating 10."""
    torch.manual_seed(7)
    ids = torch.randint(0, 256, (3, 9))
    reads = {"n": 0}
    for name in ("__bool__", "__int__", "__index__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(new: int) -> int:
        reads["n"] = 0
        for _ in generate_stream(model, ids, new, pattern="D3-W2-P1", stop_tokens=[0], stop_check_every=8):
            pass
        return reads["n"]

    assert count(40) - count(10) <= 30 // 8 + 1


# ---- sampling transforms (ratplus serve's fields), against plain loops --------------------------------
def _naive_penalties(logits, prompt, output, presence, frequency, repetition):
    out = logits.clone().tolist()
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return torch.tensor(out)


@pytest.mark.parametrize("presence, frequency, repetition", [(0.7, 0.0, 1.0), (0.0, 0.4, 1.0), (0.0, 0.0, 1.3),
                                                             (-0.5, 1.1, 0.8), (2.0, -2.0, 1.5)])  # fmt: skip
def test_penalties_equal_a_plain_loop(presence, frequency, repetition):
    from ratplus.generation import apply_penalties

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    prompt, output = [1, 2, 3, 3, 40], [3, 7, 7, 7, 49, 2]
    got = apply_penalties(logits, prompt, output, presence, frequency, repetition)
    assert torch.allclose(got, _naive_penalties(logits, prompt, output, presence, frequency, repetition), atol=1e-6)
    assert torch.equal(apply_penalties(logits, [], [], presence, frequency, repetition), logits)


def test_process_logits_bias_and_min_tokens():
    from ratplus.generation import SamplingParams, process_logits, sample_row

    logits = torch.tensor([0.0, 5.0, 1.0, -1.0])
    p = SamplingParams(logit_bias={3: 10.0, 1: -100.0}, min_tokens=2).check(4)
    out = process_logits(logits, p, output=[2], stop_ids=[3])
    assert out[3] == float("-inf") and out[1] == -95.0 and out[2] == 1.0  # 3 is a stop token, banned until 2 tokens
    assert process_logits(logits, p, output=[2, 2], stop_ids=[3])[3] == 9.0
    assert sample_row(logits, p, output=[2, 2], stop_ids=[3]) == 3  # greedy after the bias
    assert sample_row(logits, p, output=[], stop_ids=[3]) == 2
    for bad, field in [({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition"),
                       ({"logit_bias": {9: 1.0}}, "logit_bias"), ({"min_p": 2.0}, "min_p"),
                       ({"min_tokens": -1}, "min_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad).check(4)


def test_min_p_keeps_tokens_near_the_best():
    # softmax([3, 2.9, 0, -1]) ~ [.50, .45, .03, .01]: min_p 0.5 keeps tokens 0 and 1 only
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]]).repeat(3000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, generator=gen, min_p=0.5).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=gen, min_p=0.0).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="min_p"):
        sample_next(logits, 1.0, min_p=1.5)


def test_token_logprobs_are_log_softmax():
    from ratplus.generation import token_logprobs

    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    lp, top = token_logprobs(logits, torch.tensor([0, 2]), top=2)
    want = torch.log_softmax(logits, -1)
    assert lp == pytest.approx([float(want[0, 0]), float(want[1, 2])])
    assert [t for t, _ in top[0]] == [2, 1] and top[1][0] == (2, pytest.approx(float(want[1, 2])))


def test_incremental_detokenizer_prints_every_character():
    """Pieces join to the decoded whole, for text with multi-byte characters split across byte-level
    tokens and for random token soup; a piece never ends in half a character."""
    from ratplus.generation import IncrementalDetokenizer
    from ratplus.io.tokenizer import train_bpe

    tok = train_bpe(["plain ascii text, with some words that merge " * 4], vocab_size=300)
    text = "naïve café — 日本語 🙂 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # characters are split across byte tokens
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) + d.flush() == text
    assert not any(p.endswith("\ufffd") for p in pieces)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        soup = torch.randint(0, tok.get_vocab_size(), (25,), generator=g).tolist()
        d = IncrementalDetokenizer(tok)
        assert "".join(d.push(t) for t in soup) + d.flush() == tok.decode(soup)
    d = IncrementalDetokenizer(tok, context=tok.encode("a prompt").ids)  # the prompt seeds the window
    assert "".join(d.push(t) for t in tok.encode(" and more").ids) + d.flush() == " and more"


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.6}, {"presence_penalty": 1.2, "frequency_penalty": 0.5},
                                {"repetition_penalty": 0.7, "frequency_penalty": -0.4}])  # fmt: skip
def test_generate_penalties_equal_a_plain_loop_per_row(model, kw):
    """Ragged prompts (left padding must not count as seen tokens), greedy: each row equals a full
    forward per step with the penalties of its own prompt and output applied in plain Python."""
    torch.manual_seed(2)
    rows = [torch.randint(0, 256, (n,)).tolist() for n in (5, 9, 3)]
    out = generate(model, rows, 12, pattern="D4-W2-P1", stop_tokens=[], **kw)
    plain = generate(model, rows, 12, pattern="D4-W2-P1", stop_tokens=[])
    assert not torch.equal(out, plain)  # the penalties change these continuations
    T = max(map(len, rows))
    for b, prompt in enumerate(rows):
        seq: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([prompt + seq]), pattern="D4-W2-P1")[0, -1]
                logits = _naive_penalties(
                    logits, prompt, seq, kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0),
                    kw.get("repetition_penalty", 1.0),
                )  # fmt: skip
                seq.append(int(logits.argmax()))
        assert out[b, T:].tolist() == seq


def test_generate_min_p_and_bad_values(model):
    ids = torch.randint(0, 256, (2, 6))
    greedy = generate(model, ids, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, ids, 8, temperature=1.5, min_p=1.0, generator=g), greedy)
    for bad, field in [({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"presence_penalty": 9}, "presence_penalty")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            generate(model, ids, 4, **bad)


def test_cli_generate_sampling_flags(tmp_path, capsys):
    torch.manual_seed(0)
    model = RATPlusLM(ModelConfig.from_preset("tiny", vocab_size=12, init_std=0.3)).eval()
    save_pretrained(model, tmp_path / "m")
    flags = {"--repetition-penalty": 1.8, "--presence-penalty": 0.5, "--frequency-penalty": 0.3}
    argv = ["generate", "--ckpt", str(tmp_path / "m"), "--prompt-ids", "1,2,3", "--max-new-tokens", "8"]
    assert main([*argv, *(str(x) for kv in flags.items() for x in kv)]) == 0
    got = capsys.readouterr().out.split("|")[1].split()
    want = generate(model, torch.tensor([[1, 2, 3]]), 8, repetition_penalty=1.8, presence_penalty=0.5,
                    frequency_penalty=0.3)[0, 3:].tolist()  # fmt: skip
    assert got == [str(i) for i in want] != [str(i) for i in generate(model, torch.tensor([[1, 2, 3]]), 8)[0, 3:]]
    with pytest.raises(SystemExit):
        main([*argv, "--presence-penalty", "3"])
    assert "argument --presence-penalty" in capsys.readouterr().err
