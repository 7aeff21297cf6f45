"""A model bigger than its memory budget: prune a 1.24B model with `memory_gb=1.5`, equal to the unbudgeted run.

Builds a randomly initialised model with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads in 8 KV groups,
head_dim 64, ffn 8192, vocabulary 128256, tied embeddings: 1.24B parameters), saved in bfloat16 as sharded
safetensors with SmolLM2's tokenizer. Then, each in a fresh process under /usr/bin/time:

- the interpreter's own footprint: Python importing what `compactlm prune` imports (torch, transformers,
  the Llama modeling code, compactlm), nothing else;
- `compactlm prune` to hidden 1536 and ffn 4096 with `memory_gb=1.5` (scored one decoder layer at a time,
  cut tensor by tensor);
- the same command without a budget (the whole model in memory).

Prints wall time and peak RSS side by side and checks that both checkpoints (and their scores) are equal,
tensor for tensor.

    python benchmarks/bench_layerwise_prune.py [--calib 32] [--work DIR]   # benchmarks/results/layerwise_prune.json
    python benchmarks/bench_layerwise_prune.py --model DIR --hidden H --ffn F --memory-gb G --result-name NAME
    python benchmarks/bench_layerwise_prune.py --project    # only the projection to 8B and 70B
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Table, write_result
SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256}
IMPORTS = ("import torch, transformers, safetensors, accelerate, tokenizers; "
           "import transformers.models.llama.modeling_llama; import compactlm.cli, compactlm.stages")


def make_model(path: Path) -> None:
    """The random 1.24B Llama-3.2-1B-shaped model in bf16, sharded, with SmolLM2's tokenizer (ids < vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compactlm.models.loading import load_tokenizer

    if (path / "model.safetensors.index.json").is_file():
        return
    tok = load_tokenizer("smollm2-135m")
    config = LlamaConfig(**SHAPE, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # norms at exactly 1 would make every channel of the hidden score alike
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)


def timed(label: str, cmd: list[str], work: Path, env: dict) -> dict:
    """Run `cmd` in a fresh process under /usr/bin/time: exit code, wall seconds, peak RSS (GB)."""
    timing, log = work / f"{label}.time", work / f"{label}.log"
    start = time.time()
    with log.open("w") as err:
        code = subprocess.call(["/usr/bin/time", "-f", "%M", "-o", str(timing), *cmd], env=env,
                               stdout=subprocess.DEVNULL, stderr=err)
    rss = [line for line in timing.read_text().splitlines() if line.strip().isdigit()]
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {"run": label, "exit": code, "wall_s": round(time.time() - start, 1),
            "peak_rss_gb": round(int(rss[-1]) / 2**20, 2) if rss else None, "last_line": tail[0][-200:]}


def same_checkpoints(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two checkpoints and their scores files."""
    import torch
    from safetensors.torch import load_file

    from compactlm.models.shards import Shards

    sa, sb = Shards(a), Shards(b)
    names = sorted(set(sa.files) | set(sb.files))
    differ = [n for n in names if n not in sa or n not in sb or not torch.equal(sa.mapped(n), sb.mapped(n))]
    scores_a, scores_b = load_file(a / "scores.safetensors"), load_file(b / "scores.safetensors")
    differ += [f"scores.{k}" for k in scores_a if not torch.equal(scores_a[k], scores_b.get(k, torch.empty(0)))]
    return len(names) + len(scores_a), differ


PROJECTED = {  # name: (parameters, hidden, ffn, layers, heads, kv_heads, head_dim, memory_gb)
    "Llama-3.1-8B": (8.03e9, 4096, 14336, 32, 32, 8, 128, 3),
    "Llama-3.1-70B": (70.6e9, 8192, 28672, 80, 64, 8, 128, 8),
}


def project(interpreter_gb: float, calib: int = 128, seq_len: int = 256, batch: int = 8) -> Table:
    """What scoring holds in float32, in memory and layer by layer, by docs/SIZES.md's formula (GB):
    weights; one layer L; calibration states N x S x hidden x 4 (in memory up to budget/2 - L, the rest on
    disk); one batch's activations in one layer T x (4 ffn + 6 hidden) x 4; about 0.15 GB of the rest."""
    gib = 2**30
    table = Table(["model (projected)", "weights (float32)", "L (float32)", f"states ({calib} x {seq_len})",
                   f"one batch of {batch} in one layer", "score in memory", "score, layer by layer"])
    for name, (params, hidden, ffn, layers, heads, kv, head_dim, budget) in PROJECTED.items():
        layer = 4 * (hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * ffn + 2 * hidden) / gib
        states = 4 * calib * seq_len * hidden / gib
        acts = 4 * batch * seq_len * (4 * ffn + 6 * hidden) / gib
        kept = min(states, max(0.0, budget / 2 - layer))
        table.add(name, f"{4 * params / gib:.1f} GB", f"{layer:.2f} GB", f"{states:.2f} GB", f"{acts:.2f} GB",
                  f"~{interpreter_gb + 4 * params / gib + acts:.1f} GB",
                  f"~{interpreter_gb + layer + kept + acts + 0.15:.1f} GB (`memory_gb={budget}`)")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=32, help="calibration sequences of 256 tokens")
    p.add_argument("--memory-gb", type=float, default=1.5)
    p.add_argument("--model", type=Path, help="an existing safetensors checkpoint instead of the random 1.24B")
    p.add_argument("--hidden", type=int, default=1536, help="target hidden_size")
    p.add_argument("--ffn", type=int, default=4096, help="target intermediate_size")
    p.add_argument("--work", type=Path, help="where the model and outputs go (default: a temp dir)")
    p.add_argument("--result-name", default="layerwise_prune", help="benchmarks/results/NAME.json")
    p.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/NAME.json")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compactlm-layerwise-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or work / "llama-1.24b"
    env = dict(os.environ) | {"PYTHONPATH": str(ROOT / "src"), "COMPACTLM_TOKENS": str(work / "stores")}
    start = time.time()
    if args.model is None:
        subprocess.run([sys.executable, __file__, "--make", str(model)], check=True, env=env)
    print(f"model: {model} ({sum(f.stat().st_size for f in model.glob('*.safetensors')) / 2**30:.2f} GB on disk, "
          f"{time.time() - start:.0f} s)", flush=True)
    prune = [sys.executable, "-m", "compactlm", "prune", f"model={model}", "data=python-docs",
             f"target.hidden_size={args.hidden}", f"target.intermediate_size={args.ffn}", f"calib.sequences={args.calib}",
             "calib.seq_len=256"]
    # the token store once, outside the timed runs (both runs read the same store)
    warm = ("import sys; from compactlm import inputs; from compactlm.config import load_config; "
            "from compactlm.models.loading import load_tokenizer; cfg = load_config(None, sys.argv[1:]); "
            "inputs.load_splits(cfg, load_tokenizer(cfg.model), cfg.calib.seq_len)")
    subprocess.run([sys.executable, "-c", warm, *prune[4:]], env=env, check=True)
    results = [timed("interpreter", [sys.executable, "-c", IMPORTS], work, env)]
    for label, extra in (("memory_gb", [f"memory_gb={args.memory_gb}"]), ("in memory", [])):
        out = work / label.replace(" ", "_")
        results.append(timed(label.replace(" ", "_"), [*prune, f"out_dir={out}", *extra], work, env))
        results[-1]["run"] = label
    compared, differ = same_checkpoints(work / "memory_gb", work / "in_memory")
    footprint = results[0]["peak_rss_gb"]
    print(f"\n{'run':<12} {'exit':>4} {'wall s':>8} {'peak RSS GB':>12} {'above interpreter':>18}")
    for r in results:
        print(f"{r['run']:<12} {r['exit']:>4} {r['wall_s']:>8} {r['peak_rss_gb']:>12} "
              f"{round(r['peak_rss_gb'] - footprint, 2) if r['run'] != 'interpreter' else '':>18}"
              + (f"  ({r['last_line']})" if r["exit"] else ""))
    print(f"\nequal checkpoints: {compared} tensors compared, {len(differ)} differ {differ[:5]}")
    table = Table(["model", "run", "wall", "peak RSS", f"above the interpreter ({footprint:.2f} GB)", "checkpoint"])
    for r in results[1:]:
        equal = f"equal, {compared - len(differ)} of {compared} tensors" if r["run"] == "memory_gb" else ""
        table.add(model.name, f"`memory_gb={args.memory_gb}`" if r["run"] == "memory_gb" else r["run"], f"{r['wall_s']} s",
                  f"{r['peak_rss_gb']} GB", f"{r['peak_rss_gb'] - footprint:.2f} GB", equal)
    write_result(args.result_name, figures={"results": results, "compared": compared, "differ": differ,
                                            "memory_gb": args.memory_gb, "calib": args.calib},
                 tables={"measured": table, "projected": project(footprint)}, inputs={"model": str(model)}, out=args.out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make":
        make_model(Path(sys.argv[2]))
    elif len(sys.argv) == 2 and sys.argv[1] == "--project":  # the projection alone (interpreter: 0.36 GB, measured)
        write_result("layerwise_projection", figures={"interpreter_gb": 0.36, "models": PROJECTED},
                     tables={"projected": project(0.36)})
    else:
        main()
