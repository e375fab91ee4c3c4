"""The server processes ``ratplus bench serve`` starts and drives: ``Server`` (one ``ratplus serve``
child on a free localhost port) and ``PeerServer`` (``transformers serve`` with the same-size
Llama), and the model folders they serve (a preset with random weights and a small BPE tokenizer;
the peer's word-level tokenizer). The phases that time them are in ``bench/serve.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ratplus.config import ModelConfig

_TEXT = ["The quick brown fox jumps over the lazy dog while the server streams tokens to many clients."] * 8


def make_folder(preset: str, max_seq_len: int, path: Path) -> Path:
    """A model folder of the preset with random weights (seed 0) and a small BPE tokenizer."""
    from ratplus.io.folder import save_pretrained
    from ratplus.io.tokenizer import train_bpe
    from ratplus.model.rat import RATPlusLM

    tok = train_bpe(_TEXT, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, max_seq_len=max_seq_len, eos_token_id=0)
    save_pretrained(RATPlusLM(config).eval(), path, tokenizer=tok)
    return path


class Server:
    """``python -m ratplus serve`` in a child process on a free port; stopped with SIGTERM."""

    def __init__(
        self,
        ckpt: Path,
        patterns: list[str],
        kv_memory: str,
        max_batch: int,
        threads: int,
        compile_: bool,
        extra: list[str] | None = None,
    ):
        # the child runs this very copy of ratplus (an installed one elsewhere must not win)
        root = str(Path(__file__).resolve().parents[2])
        boot = f"import sys; sys.path.insert(0, {root!r}); from ratplus.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", boot, "serve", "--ckpt", str(ckpt), "--port", "0"]
        cmd += ["--patterns", ",".join(patterns), "--kv-memory", kv_memory, "--max-batch", str(max_batch)]
        cmd += ["--max-queue", "1024", "--threads", str(threads), "--log-level", "warning"]
        cmd += ["--compile" if compile_ else "--no-compile", "--device", "cpu", *(extra or [])]
        env = dict(os.environ)
        t0 = time.perf_counter()
        # the server's log goes to a file: a pipe nobody reads would block it once full
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="ratplus-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stderr=self.log_file, text=True)
        self.url = None
        deadline = time.monotonic() + 600
        while self.url is None:
            time.sleep(0.1)
            log = Path(self.log_file.name).read_text()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ValueError("ratplus serve did not start:\n" + log)
            m = re.search(r"listening on (http://\S+)", log)
            self.url = m.group(1) if m else None
        self.startup_seconds = time.perf_counter() - t0

    def model_name(self) -> str:
        """The model's name in the API (the server picks it: ``ratplus.serve.engine.served_name``)."""
        return self.get("/v1/models")[0]["id"].partition(":")[0]

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            body = r.read().decode()
        return json.loads(body)["data"] if path.startswith("/v1/") else body

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics")
        return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def rss(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def make_peer_folder(config: ModelConfig, max_len: int, path: Path) -> Path:
    """The same-size ``LlamaForCausalLM`` (random weights, seed 0, EOS off) saved the transformers way for
    ``transformers serve``, with a word-level tokenizer of the model's vocabulary: token ``i`` is the
    word ``t{i}``, so a prompt of ids is its words joined by spaces (exactly those ids served) and
    every generated token streams as one text chunk (no byte fragments held back)."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise ValueError(f"--peer needs transformers (pip install 'ratplus[hf]'): {e}") from e

    from ratplus.bench.decode import llama_peer

    model = llama_peer(config, max_len, torch.device("cpu"), torch.float32)
    model.generation_config.eos_token_id = None  # every request runs its max_tokens, as the ratplus rows' prompts do
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return path


class PeerServer(Server):
    """``transformers serve FOLDER --continuous-batching --device cpu`` in a child process, offline."""

    def __init__(self, folder: Path, max_len: int, threads: int, max_requests: int):
        import socket
        import urllib.request

        with socket.socket() as s:  # transformers serve has no port 0: take a free one and hand it over
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        boot = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        cmd = [sys.executable, "-c", boot, "serve", str(folder), "--continuous-batching", "--device", "cpu"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len), "--log-level", "warning"]
        # its paged cache is sized from free memory by default (about 0.8 of the machine's RAM on a CPU, all
        # touched): give it the blocks the clients need, one request of max_len per client, as ratplus's pool
        cmd += ["--cb-block-size", "256", "--cb-num-blocks", str(max_requests * -(-max_len // 256))]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.model_id = str(folder)
        t0 = time.perf_counter()
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="transformers-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=self.log_file, text=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            time.sleep(0.2)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = Path(self.log_file.name).read_text()
                self.stop()
                raise ValueError("transformers serve did not start:\n" + log[-4000:])
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5):
                    break
            except OSError:
                continue
        self.startup_seconds = time.perf_counter() - t0
        self._warm_up()

    def _pids(self) -> list[int]:
        """The server and its children: the model runs in a spawned engine process."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                todo += [int(c) for c in task.read_text().split()]
        return pids

    def _status(self, key: str) -> int:
        total = 0
        for pid in self._pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
        return total

    def reset_peak(self) -> None:
        for pid in self._pids():
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def _warm_up(self) -> None:
        """One short request: the engine's first one pays for setting itself up (its paged cache),
        which the ratplus server pays at start-up; neither belongs in the first client's TTFT."""
        import urllib.request

        body = json.dumps({"model": self.model_id, "prompt": "t1 t2 t3 t4", "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"{self.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
