"""A distilled student's GGUF export, read back: the file's size and the held-out perplexity of the model
transformers reads out of it, beside the student's own, on the run's evaluation rows.

    python benchmarks/export_student.py --config configs/gemma3-270m.yaml --student runs/gemma3/distill/final \
        --result-name gemma3_270m_export

The student is what `benchmarks/main_command.py --config ... --keep DIR` leaves in DIR/distill/final. The export
type is the config's `export.type` (q8_0 when unset). Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ROOT, Table, write_result

from compactlm import data, inputs
from compactlm.config import load_config
from compactlm.export import export_gguf
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "gemma3-270m.yaml"))
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--result-name", default="gemma3_270m_export")
    p.add_argument("--out", help="write the results here instead of benchmarks/results/NAME.json")
    args = p.parse_args()
    cfg = load_config(args.config)
    kind = cfg.export.type or "q8_0"
    student, tokenizer = load_model(str(args.student)), load_tokenizer(str(args.student))
    val = inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len, calib=False,
                             val_rows=cfg.eval.sequences).val[: cfg.eval.sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        written = export_gguf(student, tokenizer, Path(tmp) / f"model-{kind}.gguf", kind)
        reread = load_model(written["gguf"])
        reread_ids = load_tokenizer(written["gguf"])(tokenizer.decode(val[0].tolist()))["input_ids"]
    same_tokens = reread_ids == tokenizer(tokenizer.decode(val[0].tolist()))["input_ids"]
    rows = {"student": perplexity(student, batches), f"GGUF {kind}, read back": perplexity(reread, batches)}
    table = Table(["model", "file", "held-out perplexity"])
    table.add("distilled student (safetensors, float32)", "", f"{rows['student']['perplexity']:.1f}")
    table.add(f"its GGUF export ({kind}), read back by transformers", f"{written['bytes'] / 2**20:.0f} MiB",
              f"{rows[f'GGUF {kind}, read back']['perplexity']:.1f}")
    print(f"the reread tokenizer gives the same ids on a validation row: {same_tokens}")
    write_result(args.result_name, figures={"export": written | {"gguf": Path(written["gguf"]).name}, "rows": rows,
                                            "same_token_ids": same_tokens},
                 tables={"export": table}, inputs={"config": args.config, "student": str(args.student)}, out=args.out)


if __name__ == "__main__":
    main()
