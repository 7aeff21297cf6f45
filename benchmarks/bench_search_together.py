"""The search's distillation phase: its top_k candidates distilled together, one teacher forward per batch for
all of them (`search.distill_together=true`, the default), against one after another (false, as before).

    python benchmarks/bench_search_together.py [--top-k 3]

Runs the architecture search of configs/smollm2-135m-search.yaml (SmolLM2-135M to ~50% of its parameters) once;
its distillation phase runs both ways on copies of the same pruned candidates, same batches, and prints each
candidate's validation loss after the brief distillation and the phase's wall time side by side.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from common import ROOT, Table, write_result

from compactlm import stages
from compactlm.config import load_config

CONFIG = ROOT / "configs" / "smollm2-135m-search.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="search.distill_steps")
    parser.add_argument("--run-dir", default="runs/bench/search_together")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/search_together.json")
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
    table = Table(["candidate", "validation loss, one after another", "validation loss, together"])
    for i, (a, b) in enumerate(zip(alone["losses"], together["losses"])):
        table.add(i + 1, f"{a:.6f}", f"{b:.6f}")
    speedup = alone["wall_s"] / together["wall_s"]
    table.add("phase wall time", f"{alone['wall_s']:.1f} s", f"**{together['wall_s']:.1f} s ({speedup:.2f}x)**")
    write_result("search_together", figures={"top_k": args.top_k, "steps": args.steps, "alone": alone,
                                             "together": together, "speedup": speedup, "chosen": result["target"]},
                 tables={"phase": table}, inputs={"config": str(CONFIG.relative_to(ROOT)), "data": "python-docs"},
                 out=args.out)


if __name__ == "__main__":
    main()
