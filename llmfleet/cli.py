"""The `llmfleet` command."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.settings import Settings


def _up(args: argparse.Namespace) -> int:
    from llmfleet.supervisor import Supervisor

    return Supervisor(Settings(), workers=args.workers, state_dir=Path(args.state_dir)).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfleet")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run Redis, the gateway and workers on this machine")
    up.add_argument("--workers", type=int, default=1, help="workers per model")
    up.add_argument("--state-dir", default=".run", help="where the owned Redis keeps its data")
    up.set_defaults(func=_up)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
