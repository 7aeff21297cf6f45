"""How good is the pruned model before any retraining? SmolLM2-135M cut to three shapes, held-out perplexity.

    python benchmarks/prune_quality.py           # every table (~25 min alone): benchmarks/results/prune_quality.json
    python benchmarks/prune_quality.py --tables importance,aggregation                 # some of them

Tables (all zero-shot, on the same held-out python-docs rows; calibration 64 x 256 tokens unless varied):
- importance:   each `importance.method` without reconstruction, at every shape.
- reconstruct:  `prune.reconstruct` x `prune.reconstruct_inputs`, the importances and a ridge (REFITS: the rows
                that decide the defaults).
- calibration:  the default recipe with 8 to 128 calibration sequences (README shape; --calib-sizes).
- aggregation:  P1 Table 13 in miniature: all nine (batch, sequence) aggregations, activation importance, no
                reconstruction, zero-shot LM loss (README shape).
Shapes: MLP-only to ffn 1072 and 768 (of 1536), and the README's shape (hidden 384, 6 heads, ffn 1024).
"""

from __future__ import annotations

import argparse
import inspect
import time
from functools import cache

from common import README_SHAPE, Table, write_result

from compactlm import data, inputs
from compactlm.config import PruneConfig, TargetConfig, load_config
from compactlm.importance import AGGREGATIONS, score
from compactlm.metrics import perplexity
from compactlm.models.family import family_of
from compactlm.pruning import make_plan, prune_model, resolve_target
from compactlm.pruning.reconstruct import reconstruct

SHAPES = {
    "ffn 1072": TargetConfig(intermediate_size=1072),
    "ffn 768": TargetConfig(intermediate_size=768),
    "h384 6 heads ffn 1024": TargetConfig(**README_SHAPE),
}
SHAPE = "h384 6 heads ffn 1024"
TABLES = ("importance", "reconstruct", "calibration", "aggregation")
DEFAULT = PruneConfig()
_D = ("activation", DEFAULT.reconstruct, DEFAULT.reconstruct_inputs, DEFAULT.ridge)  # the default recipe
_SLICED = ("activation", "none", DEFAULT.reconstruct_inputs, DEFAULT.ridge)
# The refit table's rows per shape, (importance, prune.reconstruct, prune.reconstruct_inputs, prune.ridge): the
# settings that decide the defaults, chosen so that run_all fits in an hour (each refit row is one to two minutes).
REFITS = {
    "ffn 1072": [_SLICED, _D],
    "ffn 768": [_SLICED, ("activation", "outputs", "teacher", DEFAULT.ridge), _D,
                ("taylor", *_D[1:])],
    SHAPE: [_SLICED, ("activation", "outputs", "teacher", DEFAULT.ridge),
                   ("activation", "outputs", "sequential", DEFAULT.ridge), _D,
                   ("activation", "all", "teacher", DEFAULT.ridge), ("taylor", *_D[1:]), ("output_aware", *_D[1:]),
                   (*_D[:3], 1e-2)],
}


class Bench:
    """The teacher, held-out batches and calibration batches of any size, loaded once."""

    def __init__(self, eval_sequences: int, calib_seq_len: int):
        self.cfg = load_config(None, ["model=smollm2-135m", "data=python-docs", f"calib.seq_len={calib_seq_len}"])
        self.teacher, self.tokenizer = inputs.load(self.cfg)
        self.family = family_of(self.teacher)
        self.source = self.family.dims(self.teacher.config)
        val = inputs.load_splits(self.cfg, self.tokenizer, 256).val[:eval_sequences]
        self.val = list(data.batches(val, 8))
        self.calib = cache(self._calib)
        self.scores = cache(self._scores)
        self.rows: dict[tuple, dict] = {}

    def row(self, *args, **kwargs) -> dict:
        """_row, measured once per setting however it is spelled: every table that shows a setting shares it."""
        bound = inspect.signature(self._row).bind(*args, **kwargs)
        bound.apply_defaults()
        key = tuple(bound.arguments.values())
        if key not in self.rows:
            self.rows[key] = self._row(*key)
        return self.rows[key]

    def _calib(self, sequences: int) -> list:
        cfg = load_config(None, ["model=smollm2-135m", "data=python-docs", f"calib.sequences={sequences}",
                                 f"calib.seq_len={self.cfg.calib.seq_len}"])
        return inputs.calibration_batches(cfg, self.tokenizer, self.teacher)

    def _scores(self, method: str, aggregation: str = "l2_mean", sequences: int = 64):
        start = time.perf_counter()
        scores = score(self.teacher, self.calib(sequences), method=method, aggregation=aggregation, layer_metrics=())
        return scores, time.perf_counter() - start

    def _row(self, shape: str, method: str = "activation", aggregation: str = "l2_mean", sequences: int = 64,
            sites: str = "none", how: str = DEFAULT.reconstruct_inputs, ridge: float = DEFAULT.ridge) -> dict:
        """Prune the teacher to `shape` with these settings; held-out loss and perplexity, seconds taken."""
        scores, score_s = self.scores(method, aggregation, sequences)
        target = resolve_target(SHAPES[shape], self.source, self.family)
        plan = make_plan(scores, self.source, target, [])
        student = prune_model(self.teacher, plan)
        start = time.perf_counter()
        if sites != "none":
            reconstruct(self.teacher, student, plan, self.calib(sequences), sites=sites, inputs=how, ridge=ridge)
        ppl = perplexity(student, self.val)
        row = {"shape": shape, "method": method, "aggregation": aggregation, "calib_sequences": sequences,
               "reconstruct": sites, "inputs": how if sites != "none" else "", "ridge": ridge if sites != "none" else None,
               "loss": ppl["loss"], "perplexity": ppl["perplexity"], "score_s": round(score_s, 1),
               "reconstruct_s": round(time.perf_counter() - start, 1) if sites != "none" else 0.0}
        print(f"  {shape:22} {method:12} {aggregation:8} calib {sequences:>3} {sites:7} {row['inputs']:10} "
              f"ppl {row['perplexity']:9.2f} loss {row['loss']:.3f}  ({row['score_s']} s + {row['reconstruct_s']} s)",
              flush=True)
        return row


def run_tables(bench: Bench, tables: list[str], shapes: list[str], calib_sizes: list[int]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"teacher": [{"perplexity": perplexity(bench.teacher, bench.val)["perplexity"]}]}
    if "importance" in tables:
        out["importance"] = [bench.row(shape, method) for shape in shapes
                             for method in ("activation", "output_aware", "taylor", "magnitude", "random")]
    if "reconstruct" in tables:
        out["reconstruct"] = [bench.row(shape, method, sites=sites, how=how, ridge=ridge)
                              for shape in shapes for method, sites, how, ridge in REFITS[shape]]
    if "calibration" in tables:
        out["calibration"] = [bench.row(SHAPE, sequences=n, sites=DEFAULT.reconstruct) for n in calib_sizes]
    if "aggregation" in tables:
        out["aggregation"] = [bench.row(SHAPE, aggregation=a) for a in AGGREGATIONS]
    return out


TABLE_IDS = {"importance": "importance", "reconstruct": "refit", "calibration": "calibration",
             "aggregation": "aggregation"}  # the script's tables -> the docs' blocks


def tables_of(results: dict[str, list[dict]]) -> dict[str, Table]:
    """One table per measured table: its settings, held-out perplexity, loss and seconds (score + refit)."""
    columns = {"importance": ("shape", "method"), "reconstruct": ("shape", "method", "reconstruct", "inputs", "ridge"),
               "calibration": ("calib_sequences",), "aggregation": ("aggregation",)}
    out = {}
    for name, keys in columns.items():
        if name in results:
            table = out[TABLE_IDS[name]] = Table([*keys, "held-out perplexity", "loss", "seconds"])
            for r in results[name]:
                table.add(*(r[k] for k in keys), f"{r['perplexity']:,.2f}", f"{r['loss']:.3f}",
                          f"{r['score_s'] + r['reconstruct_s']:.0f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--calib-sizes", default="8,16,32,64,128", help="calibration sequences of that table")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/prune_quality.json")
    args = parser.parse_args()
    tables, shapes = [t for t in args.tables.split(",") if t], [s for s in args.shapes.split(",") if s]
    for given, known, what in ((tables, TABLES, "table"), (shapes, SHAPES, "shape")):
        if unknown := [x for x in given if x not in known]:
            parser.error(f"unknown {what} '{unknown[0]}' (choose from {', '.join(known)})")
    start = time.perf_counter()
    results = run_tables(Bench(args.eval_sequences, args.calib_seq_len), tables, shapes,
                         [int(n) for n in args.calib_sizes.split(",")])
    print(f"\nteacher: held-out perplexity {results['teacher'][0]['perplexity']:.2f}")
    print(f"({time.perf_counter() - start:.0f} s in all; defaults: prune.reconstruct={DEFAULT.reconstruct}, "
          f"prune.reconstruct_inputs={DEFAULT.reconstruct_inputs}, prune.ridge={DEFAULT.ridge})")
    if set(tables) != set(TABLES) and not args.out:  # a partial run must not replace the committed results
        args.out = f"runs/bench/prune_quality-{'-'.join(tables)}.json"
    write_result("prune_quality", figures=results, tables=tables_of(results),
                 inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)

if __name__ == "__main__":
    main()
