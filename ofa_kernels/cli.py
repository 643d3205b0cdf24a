"""The ``ofa`` command."""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck(device=args.device, backend=args.backend)


def _backends(args: argparse.Namespace) -> int:
    from . import backends

    for name, info in backends().items():
        print(f"{name:7s} {'yes' if info['available'] else 'no ':3s} {info['detail']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ofa", description="Fused norms and OFA few-shot adaptation.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="patch the real SmolLM2-135M with the fused norms, compare and time")
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.add_argument("--backend", default=None, help="torch, triton or auto (default: auto / OFA_BACKEND)")
    check.set_defaults(func=_check)
    sub.add_parser("backends", help="list the norm backends and whether they are available").set_defaults(
        func=_backends)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
