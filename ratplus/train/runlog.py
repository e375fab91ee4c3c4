"""The JSON-lines log of a training run (``<out>/log.jsonl``), with TensorBoard scalars when asked:
written by rank 0 only, trimmed back to a checkpoint's step when the run resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ratplus.runtime import atomic_write_text, writing

LOG_FILE = "log.jsonl"


class RunLog:
    """JSON-lines log (and TensorBoard scalars when asked), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.tb = out_dir / LOG_FILE, enabled, None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def trim(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as f:  # a line cut short is dropped by trim() on resume
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self.tb.add_scalar(f"{key}/{sub}", v, record["step"])
                elif isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
