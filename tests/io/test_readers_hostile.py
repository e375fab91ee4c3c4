"""External formats read by ``data prepare`` (zstd, gzip, Parquet, datasets streams): whatever the
library raises becomes one line naming the file, and no reader outlives the command (a pyarrow /
datasets thread left to the interpreter's exit could abort it with rc 134)."""

import json
import os
import subprocess
import sys

import pytest

from ratplus.cli import main
from ratplus.io.corpus import iter_documents


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar, if the reading had begun
    assert last.startswith("ratplus data prepare: error: ") and match in last and "Traceback" not in err, err


def test_compressed_files_that_are_not_what_they_say(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "plain.jsonl.zst").write_text(json.dumps({"text": "not compressed"}) + "\n")
    raw = "".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)).encode()
    packed = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "cut.jsonl.gz").write_bytes(__import__("gzip").compress(raw)[:300])
    for name, match in [
        ("plain.jsonl.zst", "plain.jsonl.zst: cannot read it as zstd data (zstd decompressor error"),
        ("cut.jsonl.zst", "cut.jsonl.zst: cannot read it as zstd data (the file ends inside a zstd frame"),
        ("cut.jsonl.gz", "cut.jsonl.gz: cannot read it as gzip data"),
    ]:
        with pytest.raises(ValueError, match="cannot read it as"):
            list(iter_documents(tmp_path / name))
        argv = ["data", "prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "o"), "--tokenizer", "gpt2"]
        _one_line_error(capsys, argv, match)


def test_parquet_damaged_in_its_footer_or_its_pages(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")
    rows = [f"row {i} " * 20 for i in range(4000)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "ok.parquet", row_group_size=500, compression="none")
    data = bytearray((tmp_path / "ok.parquet").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xff" * 4096  # pages of a row group in the middle, footer intact
    (tmp_path / "pages.parquet").write_bytes(bytes(data))
    out = ["--out", str(tmp_path / "o"), "--tokenizer", "gpt2"]
    _one_line_error(capsys, ["data", "prepare", "--input", str(tmp_path / "garbage.parquet"), *out], "garbage.parquet")
    _one_line_error(
        capsys, ["data", "prepare", "--input", str(tmp_path / "ok.parquet"), "--text-field", "nope", *out],
        "ok.parquet has no column 'nope' (columns: text)",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"pages.parquet"):
        list(iter_documents(tmp_path / "pages.parquet"))
    pytest.importorskip("datasets")
    _one_line_error(
        capsys, ["data", "prepare", "--hf-dataset", str(tmp_path / "garbage.parquet"), *out],
        "cannot open dataset",
    )  # fmt: skip


@pytest.mark.slow
def test_a_failing_hf_dataset_never_aborts_at_exit(tmp_path):
    """``--hf-dataset x.parquet --text-field nope`` (and a parquet folder) exit with the one-line error
    and rc 2, 20 times out of 20: the stream is closed before the error leaves the reader."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    for k in range(2):
        table = pa.table({"text": [f"doc {i} " * 30 for i in range(20000)]})
        pq.write_table(table, folder / f"part{k}.parquet", row_group_size=2000)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = []
    for run in range(20):
        target = folder / "part0.parquet" if run % 2 else folder
        argv = ["data", "prepare", "--hf-dataset", str(target), "--text-field", "nope", "--out", str(tmp_path / "o")]
        code = "import sys\nfrom ratplus.cli import main\nsys.exit(main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
        results.append((proc.returncode, proc.stderr.strip().splitlines()[-1:] or [""]))
    failed = [
        (run, rc, last) for run, (rc, last) in enumerate(results) if rc != 2 or "has no field 'nope'" not in last[0]
    ]
    assert not failed, failed
