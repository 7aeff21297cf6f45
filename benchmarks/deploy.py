"""Deployment: the teacher and the compressed student exported to GGUF, run in llama.cpp and in transformers.

For each model (teacher, student) and GGUF type this prints, side by side: the file size; llama.cpp's held-out
perplexity next to transformers' on the same token ids (their ratio, goal within 1% at f16); how often
llama.cpp's next-token argmax agrees with transformers'; and batch-1 generation speed in llama.cpp with the same
thread count as torch. Then transformers' own generation speed (dynamic cache, static cache, static cache +
torch.compile: `compactlm eval`'s eval.speed_modes) at batch 1 and 8. The student's speed-up is compared with
the parameter ratio (goal: at least 0.9x of it).

    pip install -e ".[deploy]"          # llama-cpp-python: builds llama.cpp from source, a few minutes on 2 cores
    python benchmarks/deploy.py --student runs/main/distill/final      # benchmarks/results/deploy.json

The student defaults to the README main command's distilled model (`python benchmarks/main_command.py --keep
runs/main` leaves it there). Run alone: other processes on the cores change the speeds.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import Table, write_result

from compactlm import inputs
from compactlm.config import load_config
from compactlm.export import export_gguf
from compactlm.metrics import generation_speeds
from compactlm.models.loading import load_model, load_tokenizer
from compactlm.models.params import num_params

PROMPT_TOKENS = 16


def hf_logits(model, rows: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def llama_logits(llm, rows: list[list[int]]) -> list[np.ndarray]:
    out = []
    for r in rows:
        llm.reset()
        llm.eval(r)
        out.append(np.array(llm.scores[: len(r)], dtype=np.float32))
    return out


def nll_and_agreement(logits: list[np.ndarray], rows: list[list[int]], reference: list[np.ndarray] | None):
    """Mean next-token NLL over all positions; share of positions whose argmax equals `reference`'s."""
    total, count, same = 0.0, 0, 0
    for lg, r, ref in zip(logits, rows, reference or [None] * len(rows)):
        lg = torch.from_numpy(lg[:-1]).double()
        total += torch.nn.functional.cross_entropy(lg, torch.tensor(r[1:]), reduction="sum").item()
        count += len(r) - 1
        if ref is not None:
            same += int((lg.argmax(-1) == torch.from_numpy(ref[:-1]).argmax(-1)).sum())
    return total / count, same / count


def llama_decode_tokens_per_s(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy batch-1 decoding in llama.cpp: seconds for `new_tokens` single-token steps after the prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", default="runs/main/distill/final")
    parser.add_argument("--types", default="f16,q8_0", help="GGUF types to export and run")
    parser.add_argument("--work-dir", default="runs/bench/deploy", help="where the GGUF files go")
    parser.add_argument("--eval-sequences", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/deploy.json")
    args = parser.parse_args()
    from llama_cpp import Llama  # the [deploy] extra; fails here, before any work, when missing

    if not Path(args.student, "config.json").is_file():
        raise SystemExit(f"--student {args.student}: no checkpoint there (python benchmarks/main_command.py --keep runs/main)")
    cfg = load_config(None, ["data=python-docs", f"model={args.teacher}"])
    tokenizer = load_tokenizer(args.teacher)
    rows = [r.tolist() for r in inputs.load_splits(cfg, tokenizer, 256).val[: args.eval_sequences]]
    prompt = rows[0][:PROMPT_TOKENS]
    work = Path(args.work_dir)
    result = {"threads": args.threads, "tokens": sum(len(r) for r in rows), "models": {}}
    torch.set_num_threads(args.threads)
    for name, spec in (("teacher", args.teacher), ("student", args.student)):
        model = load_model(spec)
        entry = result["models"][name] = {"params": num_params(model), "gguf": {}, "hf": {}}
        reference = hf_logits(model, rows)
        hf_nll, _ = nll_and_agreement(reference, rows, None)
        entry["hf_perplexity"] = math.exp(hf_nll)
        for type_name in args.types.split(","):
            path = work / f"{name}-{type_name}.gguf"
            written = export_gguf(model, load_tokenizer(spec), path, type_name)
            llm = Llama(model_path=str(path), n_ctx=max(map(len, rows)), n_batch=512, n_threads=args.threads,
                        n_threads_batch=args.threads, logits_all=True, verbose=False)
            nll, agree = nll_and_agreement(llama_logits(llm, rows), rows, reference)
            del llm
            entry["gguf"][type_name] = {
                "bytes": written["bytes"], "perplexity": math.exp(nll), "ppl_vs_hf": math.exp(nll - hf_nll),
                "top1_agreement": agree, "tokens_per_s": llama_decode_tokens_per_s(path, prompt, args.new_tokens, args.threads),
            }
            print(name, type_name, entry["gguf"][type_name], flush=True)
        modes = ("dynamic", "static") + (() if args.no_compile else ("compiled",))
        entry["hf"] = generation_speeds(model, tokenizer, modes, (1, 8))["speeds"]  # what `compactlm eval` times
        print(name, "transformers", entry["hf"], flush=True)
        del model

    t, s = result["models"]["teacher"], result["models"]["student"]
    param_ratio = t["params"] / s["params"]
    result["param_ratio"] = param_ratio
    print(f"\nheld-out: {len(rows)} python-docs validation sequences ({result['tokens']:,} tokens); "
          f"{args.threads} threads; {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt")
    print(f"parameters: teacher {t['params'] / 1e6:.1f}M, student {s['params'] / 1e6:.1f}M ({param_ratio:.2f}x fewer)\n")
    gguf = Table(["model", "GGUF", "size", "llama.cpp perplexity", "transformers (float32)", "ratio", "top-1 agreement",
                  "llama.cpp tokens/s"])
    for name, m in result["models"].items():
        for type_name, g in m["gguf"].items():
            gguf.add(f"{name}, {m['params'] / 1e6:.1f}M", type_name, f"{g['bytes'] / 2**20:,.1f} MiB", f"{g['perplexity']:.2f}",
                     f"{m['hf_perplexity']:.2f}", f"{g['ppl_vs_hf']:.4f}", f"{g['top1_agreement']:.1%}", f"{g['tokens_per_s']:.1f}")
    speed = Table(["runtime", "teacher tokens/s", "student tokens/s", "speed-up",
                   f"speed-up / parameter ratio ({param_ratio:.2f}x)"])
    pairs = [(f"llama.cpp, {k}, batch 1", t["gguf"][k]["tokens_per_s"], s["gguf"][k]["tokens_per_s"]) for k in t["gguf"]]
    pairs += [(f"transformers, {k}", t["hf"][k], s["hf"][k]) for k in t["hf"]]
    result["speedups"] = {}
    for label, a, b in pairs:
        if a and b:
            result["speedups"][label] = b / a
            speed.add(label, f"{a:.1f}", f"{b:.1f}", f"**{b / a:.2f}x**", f"{b / a / param_ratio:.2f}")
        else:
            speed.add(label, f"{a:.1f}" if a else "failed", f"{b:.1f}" if b else "failed", "", "")
    import llama_cpp

    write_result("deploy", figures=result, tables={"llama_cpp": gguf, "speed": speed}, out=args.out,
                 values={"llama_cpp_python": llama_cpp.__version__},
                 inputs={"teacher": args.teacher, "student": args.student, "data": "python-docs"})

if __name__ == "__main__":
    main()
