"""The gate curriculum (``uptrain --gate-open``) on a Llama of scripts/uptrain_experiment.py: the same
data, budget and evaluation as that study's (a) rows. Needs that study's output folder (``--out`` there,
/tmp/upx here) for the seed's converted Llama and the token shards.

    OMP_NUM_THREADS=1 python scripts/uptrain_gate_curriculum.py SEED OUT BUDGET GATE_OPEN GATE_TARGET LR
    OMP_NUM_THREADS=1 python scripts/uptrain_gate_curriculum.py 1337 /tmp/gatecur 0.3 0.5 0.0 7.5e-4
"""

import json
import sys
import time
from pathlib import Path

import uptrain_experiment as X  # the study's settings and evaluation (same folder)

from ratplus.train.trainer import uptrain

STUDY = Path("/tmp/upx")  # scripts/uptrain_experiment.py --out

seed, root = int(sys.argv[1]), Path(sys.argv[2])
budget, gate_open, target, lr = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
llama_dir = json.loads((STUDY / f"seed{seed}" / "stages" / "convert.json").read_text())["result"]["ckpt"]
name = f"a_{budget}_open{gate_open}_to{target}_lr{lr}"
t = time.perf_counter()
final = uptrain(
    llama_dir,
    out_dir=str(root / name),
    gate_init=-12.0,
    data=str(STUDY / "data"),
    tokens=round(budget * X.PRETRAIN_TOKENS),
    lr=lr,
    sparse_pattern=X.D16,
    adam_eps=1e-8,
    gate_open=gate_open,
    gate_target=target,
    **X.common(seed),
)
res = {
    "name": name,
    "seed": seed,
    "seconds": time.perf_counter() - t,
    "ppl": X.ppl(final, ["dense", X.D16]),
    "gates": X.gate_stats(final, STUDY / "data"),
}
res["gates"].pop("layers", None)
print(json.dumps(res))
(root / f"{name}_seed{seed}.json").write_text(json.dumps(res, indent=1))
