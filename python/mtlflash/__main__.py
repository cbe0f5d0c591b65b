"""python -m mtlflash [run|info|check] — see `python -m mtlflash --help`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtlflash",
        description="mtlflash: build facts, a real attention run side by side with torch, or a self-check.",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="(default) build facts, then real attention timed against torch SDPA")
    run.add_argument("--seqlen", type=int, default=4096, help="sequence length (default 4096)")
    run.add_argument("--heads", type=int, default=16, help="heads (default 16)")
    run.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    run.add_argument("--repeats", type=int, default=3, help="timed repetitions, best kept (default 3)")
    sub.add_parser("info", help="build facts and tiers only")
    check = sub.add_parser("check", help="self-check every tier this machine has; prints a pasteable report")
    check.add_argument("--quick", action="store_true", help="a smaller grid and shorter timings")
    args = parser.parse_args(argv)

    from . import cli

    if args.command == "info":
        cli.print_info()
        return 0
    if args.command == "check":
        return cli.check(quick=args.quick)
    if args.command is None:
        args = run.parse_args([])
    problem = cli._check_args(args.seqlen, args.heads, args.head_dim, args.repeats)
    if problem:
        run.error(problem)  # usage line + message, exit status 2, no traceback
    cli.print_info()
    return cli.run_demo(args.seqlen, args.heads, args.head_dim, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
