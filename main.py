"""The seed project's entry point: `python main.py --config configs/config_llama1b.yaml` runs the whole pipeline.

Same as `compactlm run --config ...`; extra `key=value` overrides and `--dry-run` are accepted too.
"""

import sys

from compactlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
