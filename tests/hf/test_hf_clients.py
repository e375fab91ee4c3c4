"""The real fine-tuning clients on a tiny model: transformers' Trainer with the default causal-LM
collator, TRL's SFTTrainer (default config, which turns gradient checkpointing on, and packing),
PEFT LoRA (train, save, reload, merge) and pipeline batching. Each trains a few steps on a tiny
repetitive corpus and checks the loss went down and that what was saved loads back equal."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM, save_tokenizer

WORDS = ["<eos>", "[UNK]", "the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "rug"]
WORDS += ["big", "small", "red", "blue", "and", "then"]


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    out = []
    for _ in range(n):
        size, colour, animal = pick(["big", "small"]), pick(["red", "blue"]), pick(["cat", "dog"])
        out.append(f"the {size} {animal} sat on a {colour} mat" + pick(["", " and then ran"]))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny RAT+ model folder with its tokenizer (EOS doubles as pad), as `ratplus convert` writes it."""
    path = tmp_path_factory.mktemp("tiny-hf")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = RATPlusConfig(vocab_size=len(WORDS), d_model=32, num_layers=2, num_heads=4, max_seq_len=64, eos_token_id=0)
    model = RATPlusForCausalLM(config)
    model.save_pretrained(path)
    save_tokenizer(tok, path, config)
    return path


def _eval_loss(model, tokenizer, texts) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


def test_converted_tokenizer_has_a_pad_token(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token == tok.eos_token == "<eos>"


def test_trainer_with_default_collator_learns_and_saves(folder, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    texts = _sentences(64)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    before = _eval_loss(model, tok, texts[:16])
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    )
    trainer.train()
    after = _eval_loss(model, tok, texts[:16])
    assert after < 0.6 * before, (before, after)
    trainer.save_model(str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _eval_loss(back, tok, texts[:16]) == pytest.approx(after, rel=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_default_config_and_packing(folder, tmp_path, packing):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    texts = _sentences(64, seed=1)
    before = _eval_loss(model, tok, texts[:16])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=25,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        use_cpu=True,
        max_length=32,
        packing=packing,
    )
    assert args.gradient_checkpointing  # TRL's default: transformers' checkpointing of every block
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok
    )
    assert trainer.padding_free == packing  # packing: one row per batch, sequences told apart by position_ids
    trainer.train()
    assert model.is_activation_checkpointing  # turned on by train(): transformers' own, on every block
    assert all(b.gradient_checkpointing for b in model.model.backbone.layers)
    assert _eval_loss(model.eval(), tok, texts[:16]) < 0.6 * before
    trainer.save_model(str(tmp_path / "out"))
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), RATPlusForCausalLM)


def test_peft_lora_trains_saves_reloads_and_merges(folder, tmp_path):
    peft = pytest.importorskip("peft")
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "fc1", "fc2"], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, lora)
    texts = _sentences(64, seed=2)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    before = _eval_loss(model, tok, texts[:16])
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        activation_checkpointing=True,
    )
    Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False)
    ).train()
    after = _eval_loss(model, tok, texts[:16])
    assert after < 0.9 * before, (before, after)  # low-rank updates of a random model: a smaller drop
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    assert _eval_loss(reloaded, tok, texts[:16]) == pytest.approx(after, rel=1e-5)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, RATPlusForCausalLM)
    assert _eval_loss(merged, tok, texts[:16]) == pytest.approx(after, rel=1e-4)


def test_pipeline_batches_left_padded_prompts(folder):
    from transformers import pipeline

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompts = ["the big cat sat", "the dog", "a red mat and then the small"]
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    kwargs = dict(max_new_tokens=5, do_sample=False, return_full_text=False)
    batched = gen(prompts, batch_size=3, **kwargs)
    alone = [gen(p, **kwargs) for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]
