"""fp32 LoRA against 4-bit QLoRA on CPU: the same SFT on the same rows, then routing.

Samples disjoint train and test questions from an outcomes file (seeded), trains the
LoRA router (fast mode, SFT) on the train rows once on an fp32 base and once on a
4-bit NF4 base, each in its own process so that its peak memory (RSS) is its own,
and routes the test rows with each adapter. Prints, per precision: wall time per
optimizer step (the first step left out), peak RSS while training, the final
training loss, and the routing APGR on the test rows (the adapter on an fp32 base,
merged, as it is served; the QLoRA adapter also on the 4-bit base it trained on);
then the paired-bootstrap 95% interval of QLoRA minus fp32 LoRA.

    python benchmarks/lora_precision.py        # 96 MMLU train rows (12 steps of 8), 200 test rows: ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"
PRECISIONS = {"fp32": "none", "qlora": "4bit"}  # label -> TrainConfig.quantization


def split_rows(outcomes: Path, train_rows: int, test_rows: int, seed: int):
    """(train, test) frames of distinct questions with medium_label / large_label / policy."""
    import pandas as pd

    from router_pipeline.policies import oracle_cell

    rows = pd.read_csv(outcomes).drop_duplicates("query").sample(frac=1.0, random_state=seed)
    rows = rows.rename(columns={"medium_grade": "medium_label", "large_grade": "large_label"}).reset_index(drop=True)
    rows["qid"] = [f"q{i}" for i in range(len(rows))]
    cells = [oracle_cell(m, g) for m, g in zip(rows["medium_label"], rows["large_label"])]
    rows["policy"], rows["rationale"] = [c.policy for c in cells], [c.rationale for c in cells]
    return rows.iloc[:train_rows], rows.iloc[train_rows:train_rows + test_rows]


def train_and_route(label: str, args) -> dict:
    """One precision, in this process: SFT, then the test rows routed. Returns figures and scores."""
    import resource

    import pandas as pd
    from transformers import TrainerCallback

    from router_pipeline.routers.lora import LoraRouter
    from router_pipeline.training.examples import (
        build_sft_dataset,
        build_training_examples,
    )
    from router_pipeline.training.lora import TrainConfig, train_sft

    train, test = split_rows(Path(args.outcomes), args.train_rows, args.test_rows, args.seed)
    analyses = pd.DataFrame({"qid": train["qid"], "analysis": ""})  # fast mode: the completion is the decision only
    sft = build_sft_dataset(build_training_examples(train, analyses)[0], "fast")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **kw):
            self.ends.append(time.perf_counter())

    steps = StepTimes()
    cfg = TrainConfig(quantization=PRECISIONS[label], batch_size=args.batch_size, grad_accum=1, epochs=args.epochs,
                      save_steps=10_000)
    result = train_sft(sft, cfg, Path(args.out) / label, callbacks=[steps])
    peak_train_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    step_s = (steps.ends[-1] - steps.ends[0]) / (len(steps.ends) - 1)
    out = {"label": label, "quantization": result.quantization, "rows": len(sft), "steps": result.steps,
           "s_per_step": step_s, "peak_rss_gb": peak_train_gb, "final_loss": result.final_loss,
           "first_loss": result.losses[0][1], "train_wall_s": result.wall_s, "scores": {}}
    queries = list(test["query"])
    bases = ("none", "4bit") if result.quantization == "4bit" else ("none",)
    for base in bases:
        t0 = time.perf_counter()
        decisions = LoraRouter(result.adapter_dir, quantization=base).route_batch(queries)
        out["scores"][base] = [d.p_complex for d in decisions]
        out[f"route_s_{base}"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outcomes", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--train-rows", type=int, default=96)
    p.add_argument("--test-rows", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "lora_precision"))
    p.add_argument("--only", choices=sorted(PRECISIONS), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.only:
        (out / f"{args.only}.json").write_text(json.dumps(train_and_route(args.only, args)))
        return 0

    import shutil

    from router_pipeline.evaluation.metrics import apgr_weighted, paired_bootstrap
    from router_pipeline.policies import CORRECT

    shutil.rmtree(out, ignore_errors=True)  # fresh runs: no resuming from an older checkpoint
    out.mkdir(parents=True)
    runs = {}
    for label in PRECISIONS:  # each in its own process: peaks do not mix, and no run warms the other's caches
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", label],
                       check=True)
        runs[label] = json.loads((out / f"{label}.json").read_text())
    _, test = split_rows(Path(args.outcomes), args.train_rows, args.test_rows, args.seed)
    med, large = (test["medium_label"] == CORRECT).to_numpy(), (test["large_label"] == CORRECT).to_numpy()
    print(f"\nSFT on {runs['fp32']['rows']} rows ({runs['fp32']['steps']} steps of {args.batch_size}), "
          f"routing {len(test)} test rows; CPU")
    print(f"{'':8} {'s/step':>7} {'peak RSS GB':>12} {'loss first->final':>18} {'APGR (fp32 base)':>17} "
          f"{'APGR (4-bit base)':>18}")
    for label, r in runs.items():
        apgr = {b: apgr_weighted(s, med, large) for b, s in r["scores"].items()}
        r["apgr"] = apgr
        on_4bit = f"{apgr['4bit']:.3f}" if "4bit" in apgr else "-"
        print(f"{label:8} {r['s_per_step']:7.2f} {r['peak_rss_gb']:12.2f} "
              f"{r['first_loss']:8.3f} -> {r['final_loss']:6.3f} {apgr['none']:17.3f} {on_4bit:>18}")
    diff = paired_bootstrap(test, runs["qlora"]["scores"]["none"], runs["fp32"]["scores"]["none"])
    print(f"APGR QLoRA - fp32 LoRA (both on the fp32 base): {diff['diff']:+.3f} "
          f"[{diff['lo']:+.3f}, {diff['hi']:+.3f}] (95%, {diff['resamples']} paired resamples)")
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "runs": runs, "difference": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
