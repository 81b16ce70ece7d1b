"""Command line: ``python -m esm_core <command>``. The subcommands, one table:

    coefficients, merge, methods, settings   esm_core/cli/core.py
    import                                   esm_core/cli/importing.py
    extract-lora                             esm_core/cli/extract.py
    stability                                esm_core/cli/stability.py
    evaluate, compare                        esm_core/cli/bench.py
    zoo build | skills | results | demo-data esm_core/cli/zoo.py

User mistakes end with exit status 2 and one line ``error: <reason> Fix: <fix>``; nothing half-written
is left (esm_core/io.py). Nothing is downloaded (esm_core/models.py loads local directories only).
"""

from __future__ import annotations

import argparse
import sys

from esm_core.cli import bench, core, extract, importing, stability, zoo
from esm_core.errors import Cancelled, ESMError

COMMANDS = [*core.COMMANDS, *importing.COMMANDS, *extract.COMMANDS, *stability.COMMANDS, *bench.COMMANDS,
            *zoo.COMMANDS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esm_core", description="ES-Merging of LoRA specialists.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    runs = {}
    for name, add, run, help_ in COMMANDS:
        add(sub.add_parser(name, help=help_, description=help_))
        runs[name] = run
    args = parser.parse_args(argv)
    try:
        return int(runs[args.cmd](args) or 0)
    except ESMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
