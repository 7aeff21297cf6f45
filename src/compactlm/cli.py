"""`compactlm <command> [--config FILE.yaml] [key=value ...]`: thin functions over the library's stages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import yaml

from compactlm import keys, ownership, pipeline, stages
from compactlm.config import load_config, to_dict
from compactlm.errors import CompactLMError
from compactlm.models.loading import trusting_remote_code

log = logging.getLogger("compactlm")


def _print(result) -> None:
    """The command's result as JSON on the last line of stdout (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))


# command -> (the function it calls, what it does); `compactlm eval` is accepted for `evaluate`
COMMANDS: dict[str, tuple[Callable, str]] = {
    "score": (stages.score, "compute importance scores of model= on data= and save them to out_dir"),
    "prune": (stages.prune, "prune model= to target.* and write a Hugging Face checkpoint to out_dir"),
    "evaluate": (stages.evaluate, "perplexity, parameters, speed (and KL/agreement to teacher=) as JSON on the last line"),
    "distill": (stages.distill, "retrain student= from teacher= by knowledge distillation"),
    "train": (stages.train, "train model= with plain cross-entropy (teacher correction, baselines, from scratch)"),
    "search": (stages.search, "find the best architecture of ~search.target_params parameters from model='s scores"),
    "export": (stages.export, "write model= as a GGUF file out=FILE.gguf for llama.cpp (export.type=f32|f16|bf16|q8_0)"),
    "report": (stages.report, "write report.md and plots of a run directory: compactlm report RUN_DIR"),
    "run": (pipeline.run, "every stage from the teacher to a compact model and report.md, resuming where it stopped"),
}
ALIASES = {"evaluate": ["eval"]}
NO_OUT_DIR = ("evaluate", "export")  # commands that write nothing but their result (export: its out= file)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compactlm", description="Minitron-style pruning and distillation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=ALIASES.get(name, []),
                           epilog=keys.help_epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(command=name)
        p.add_argument("--config", help="YAML file of keys (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override any key, e.g. target.hidden_size=384")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (defaults, --config and overrides) as YAML and exit")
        if name == "run":
            p.add_argument("--dry-run", action="store_true", help="validate the config and list the stages; load nothing")
    return parser


def _quiet_transformers() -> None:
    """Our own progress bars and errors only: no per-file loading bars or advisory warnings from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    _quiet_transformers()
    try:
        overrides = args.overrides
        if args.command == "report" and overrides and "=" not in overrides[0]:  # compactlm report RUN_DIR
            overrides = [f"out_dir={overrides[0]}", *overrides[1:]]
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command not in NO_OUT_DIR and not cfg.out_dir:
            raise CompactLMError(f"{args.command} needs out_dir=DIR")
        if args.command == "run" and args.dry_run:
            print("\n".join(pipeline.dry_run(cfg)))
            return 0
        # one run per out_dir, never into a source; transformers runs a checkpoint's code only when allowed
        with ownership.claim(cfg), trusting_remote_code(cfg.trust_remote_code):
            result = COMMANDS[args.command][0](cfg)
        _print(result)
    except _expected() as e:
        if os.environ.get("COMPACTLM_DEBUG") == "1":
            raise
        print(f"compactlm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compactlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _expected() -> tuple[type[BaseException], ...]:
    """The errors a user's input or machine can cause, shown as one line (COMPACTLM_DEBUG=1: the traceback):
    compactlm's own, the OS's (a full disk, a permission, a cross-device rename), text that is not UTF-8, JSON or
    YAML that does not parse, a safetensors file that is not one. Anything else is a bug and keeps its traceback."""
    from safetensors import SafetensorError

    return CompactLMError, OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, SafetensorError


def _one_line(e: BaseException) -> str:
    """An error as one line; an OSError names its file and the OS's reason (e.g. 'No space left on device')."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, CompactLMError) else f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
