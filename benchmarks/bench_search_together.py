"""The search's distillation phase: its top_k candidates distilled together, one teacher forward per batch for
all of them (`search.distill_together=true`, the default), against one after another (false, as before).

    python benchmarks/bench_search_together.py [--top-k 3] [--out runs/bench/search_together.json]

Runs the architecture search of configs/smollm2-135m-search.yaml (SmolLM2-135M to ~50% of its parameters) once;
its distillation phase runs both ways on copies of the same pruned candidates, same batches, and prints each
candidate's validation loss after the brief distillation and the phase's wall time side by side.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

from compactlm import stages
from compactlm.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-search.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="search.distill_steps")
    parser.add_argument("--run-dir", default="runs/bench/search_together")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(str(CONFIG), [f"search.top_k={args.top_k}", f"search.distill_steps={args.steps}",
                                    f"out_dir={args.run_dir}"])
    measured = {}
    brief = stages._brief_distill

    def both(run_cfg, students, teacher, rows):
        """The phase both ways, on copies of the same candidates; the search goes on with the shared run's losses."""
        copies = [copy.deepcopy(s) for s in students]
        for together, models in ((False, copies), (True, students)):
            mode = dataclasses.replace(run_cfg, search=dataclasses.replace(run_cfg.search, distill_together=together))
            start = time.perf_counter()
            measured[together] = {"losses": brief(mode, models, teacher, rows), "wall_s": time.perf_counter() - start}
        return measured[True]["losses"]

    stages._brief_distill = both
    result = stages.search(cfg)
    alone, together = measured[False], measured[True]
    print(f"\nsearch: {result['candidates']} candidates, top {args.top_k} distilled {args.steps} steps of "
          f"{cfg.distill.batch_size} x {cfg.distill.seq_len} tokens each")
    print("| candidate | val loss, one after another | val loss, together |\n|---|---|---|")
    for i, (a, b) in enumerate(zip(alone["losses"], together["losses"])):
        print(f"| {i + 1} | {a:.6f} | {b:.6f} |")
    speedup = alone["wall_s"] / together["wall_s"]
    print(f"| phase wall time | {alone['wall_s']:.1f} s | {together['wall_s']:.1f} s ({speedup:.2f}x) |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"top_k": args.top_k, "steps": args.steps, "alone": alone,
                                              "together": together, "speedup": speedup,
                                              "chosen": result["target"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
