"""Trainer's loss count: the model's loss is transformers' ``ForCausalLMLoss`` on the labels (the
targets a Llama has), so ``num_items_in_batch`` (``labels[..., 1:] != -100``) counts exactly the
targets summed. Left and right padding then give the same loss through ``Trainer`` (train and eval)
once the only target they do not share is accounted for: after left padding the first token is a
target predicted from a pad (logits 0, log V), as for a Llama; with that target masked (prompt
masking, as SFT does) the two losses are equal."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ratplus.hf import RATPlusConfig, RATPlusForCausalLM

V = 50


class PadCollator:
    """Pads to the longest row on one side; labels = ids with -100 on pads (as
    DataCollatorForLanguageModeling makes them), optionally -100 on each row's first token too."""

    def __init__(self, side: str, mask_first: bool = False):
        self.side, self.mask_first = side, mask_first

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, f in enumerate(features):
            row = torch.tensor(f["input_ids"])
            cols = slice(0, len(row)) if self.side == "right" else slice(T - len(row), T)
            ids[r, cols], mask[r, cols], labels[r, cols] = row, 1, row
            if self.mask_first:
                labels[r, cols.start] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, V, (n,), generator=g).tolist() for n in (9, 5, 7, 9, 3, 6)]
    return Dataset.from_dict({"input_ids": rows}), rows


def _losses(tmp_path, side: str, mask_first: bool) -> tuple[float, float]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = RATPlusForCausalLM(RATPlusConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, max_seq_len=32))
    data, _ = _data()
    args = TrainingArguments(
        output_dir=str(tmp_path / side), max_steps=1, per_device_train_batch_size=6, per_device_eval_batch_size=6,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=PadCollator(side, mask_first)
    )
    train = trainer.train().training_loss
    return train, trainer.evaluate()["eval_loss"]


def test_trainer_loss_equal_for_left_and_right_padding(tmp_path):
    _, rows = _data()
    T = max(len(r) for r in rows)
    right_targets = sum(len(r) - 1 for r in rows)
    padded_rows = sum(len(r) < T for r in rows)  # each has one target after its pads when left-padded
    right = _losses(tmp_path, "right", mask_first=False)
    left = _losses(tmp_path, "left", mask_first=False)
    for r, l in zip(right, left):  # train, eval
        # the same sum over the rows' own targets, plus log V per target that follows a pad
        assert l * (right_targets + padded_rows) == pytest.approx(
            r * right_targets + padded_rows * math.log(V), rel=1e-5
        )
    right = _losses(tmp_path, "right", mask_first=True)
    left = _losses(tmp_path, "left", mask_first=True)
    assert left == pytest.approx(right, rel=1e-5)  # prompt masking: the very same targets, the same loss


def test_loss_is_for_causal_lm_loss_of_a_llama(tmp_path):
    """Same labels and logits through transformers' own ForCausalLMLoss (the function a Llama uses)
    give the same loss, with and without num_items_in_batch."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(1)
    model = RATPlusForCausalLM(RATPlusConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, max_seq_len=32))
    batch = PadCollator("left")([{"input_ids": r} for r in _data()[1]])
    out = model(**batch)
    ref = ForCausalLMLoss(out.logits, batch["labels"], V)
    torch.testing.assert_close(out.loss, ref)
    n = torch.tensor(40)
    torch.testing.assert_close(
        model(**batch, num_items_in_batch=n).loss, ForCausalLMLoss(out.logits, batch["labels"], V, n)
    )
    assert model.loss_type == "ForCausalLM"  # Trainer then counts labels[..., 1:] (its _loss_shifts_labels)
