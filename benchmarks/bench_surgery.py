"""Surgery's memory: the pruned model built on the meta device (compactlm) against a random model allocated first.

SmolLM2-135M (float32) cut to the README's shape (hidden 384, 6 heads, ffn 1024) with random scores (memory and
time do not depend on which units are kept). Each variant runs in a fresh process; the peak is measured above
the loaded source model (the kernel's RSS high-water mark, reset after loading):

- reference: `AutoModelForCausalLM.from_config` (parameters allocated and randomly initialised), then
  `load_state_dict` copies the sliced weights in;
- compactlm: `compactlm.pruning.prune_model`: parameters on the meta device, the sliced weights assigned.

The compactlm process also builds the reference afterwards and checks that the two models' weights are equal.

    python benchmarks/bench_surgery.py          # benchmarks/results/surgery.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import Table, peak, readme_cut, reset_peak, write_result


def reference_prune(model, plan):
    """The plain way: allocate the pruned shape at random, then copy the sliced weights in."""
    from transformers import AutoModelForCausalLM

    from compactlm.models.family import family_of
    from compactlm.pruning.surgery import prune_config, prune_state_dict, rescale_for

    family = family_of(model)
    state_dict = prune_state_dict(family, family.dims(model.config), model.state_dict(), plan,
                                  rescale_for(family, model.config, plan))
    config = prune_config(model.config, family, plan)
    new = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    new.load_state_dict(state_dict, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


def worker(variant: str) -> dict:
    import torch

    from compactlm.pruning import prune_model

    model, plan = readme_cut()
    build = prune_model if variant == "compactlm" else reference_prune
    baseline = reset_peak("cpu")
    start = time.perf_counter()
    pruned = build(model, plan)
    seconds = time.perf_counter() - start
    out = {"variant": variant, "seconds": seconds, "peak_mib": peak("cpu", baseline) / 2**20,
           "params": sum(p.numel() for p in pruned.parameters())}
    if variant == "compactlm":
        want = reference_prune(model, plan).state_dict()
        got = pruned.state_dict()
        out["equal_to_reference"] = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["reference", "compactlm"])
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/surgery.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    rows = {v: json.loads(subprocess.run([sys.executable, __file__, "--worker", v], check=True, text=True,
                                         stdout=subprocess.PIPE).stdout.strip().splitlines()[-1])
            for v in ("reference", "compactlm")}
    if not rows["compactlm"]["equal_to_reference"]:
        sys.exit("the meta-device surgery's weights differ from the reference's")
    ref, ours = rows["reference"], rows["compactlm"]
    table = Table(["building the pruned model (SmolLM2-135M to 67.6M, float32)", "peak memory above the source",
                   "seconds"])
    table.add("random model first, then load_state_dict (reference)", f"{ref['peak_mib']:.0f} MiB", f"{ref['seconds']:.2f}")
    table.add("meta device, weights assigned (compactlm)", f"{ours['peak_mib']:.0f} MiB", f"{ours['seconds']:.2f}")
    table.add("ratio", f"{ours['peak_mib'] / ref['peak_mib']:.2f}x", f"{ours['seconds'] / ref['seconds']:.2f}x")
    write_result("surgery", figures=rows, tables={"surgery": table},
                 values={"memory_ratio": f"{ours['peak_mib'] / ref['peak_mib']:.2f}"},
                 inputs={"model": "smollm2-135m"}, out=args.out)


if __name__ == "__main__":
    main()
