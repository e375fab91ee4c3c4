import pytest
import torch

from ratplus.io.corpus import shakespeare_documents
from ratplus.io.tokenizer import train_bpe
from ratplus.train.data import prepare_shards


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """Eight short documents cut from the bundled plays (fast to tokenize)."""
    plays = shakespeare_documents("train")
    return [p[i * 3000 : (i + 1) * 3000] for p in plays[:4] for i in range(2)]


@pytest.fixture(scope="session")
def tokenizer(docs):
    return train_bpe(docs, 300)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, docs, tokenizer):
    """A prepared corpus: train/ (small shards, so windows cross shard borders) and val/."""
    root = tmp_path_factory.mktemp("data")
    prepare_shards(docs[:-2], tokenizer, root / "train", shard_tokens=2000, show_progress=False)
    prepare_shards(docs[-2:], tokenizer, root / "val", show_progress=False)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: a second intra-op thread only adds OpenMP hand-offs, which on
    a busy 2-core machine made these tests several times slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
