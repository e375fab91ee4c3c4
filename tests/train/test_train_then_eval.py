"""What training writes, read back by evaluation: a tiny model is trained, then opened the way
`ratplus eval` opens it (no hand-written metadata)."""

import dataclasses

from ratplus.eval.common import eos_token_id, open_checkpoint
from ratplus.io.tokenizer import train_bpe
from ratplus.train.config import TrainConfig
from ratplus.train.data import TokenDataset, prepare_shards
from ratplus.train.trainer import train


def _train(tmp_path, data, **kw):
    cfg = dict(out_dir=str(tmp_path / "run"), model="tiny", data=str(data), seq_len=32, batch_size=2, steps=1)
    return train(TrainConfig(**cfg, eval_interval=0, progress=False, **kw))


def test_joint_trained_checkpoint_is_recognised_at_its_sparse_pattern(tmp_path, data_dir):
    final = _train(tmp_path, data_dir, joint_train=True, sparse_pattern="D4-W0-P0")
    em = open_checkpoint(final)
    assert em.status("D4") == "joint-trained"  # the same pattern in another spelling
    assert em.status("D8-W0-P0") == "not adapted (no adaptation recorded)"
    assert em.status("dense") == "dense"


def test_pattern_trained_without_joint_training_is_not_called_joint_trained(tmp_path, data_dir):
    final = _train(tmp_path, data_dir, joint_train=False, train_pattern="dense", sparse_pattern="D4-W0-P0")
    assert open_checkpoint(final).status("D4") == "not adapted (no adaptation recorded)"


def test_evaluation_finds_the_end_of_document_token_training_appended(tmp_path, docs):
    """A tokenizer whose only special token is ``<|im_end|>``: training appends it after every
    document; evaluation, asked to find the end-of-text token from the tokenizer alone (as for a
    model folder whose config records none), finds the same id."""
    tok = train_bpe(docs[:4], 300, eos_token="<|im_end|>")
    data = prepare_shards(docs[:4], tok, tmp_path / "data", show_progress=False)
    appended = TokenDataset(data).eos_id
    em = open_checkpoint(_train(tmp_path, data))
    assert em.eos_id == appended == tok.token_to_id("<|im_end|>")
    assert eos_token_id(dataclasses.replace(em.config, eos_token_id=None), em.tokenizer) == appended
