"""The `tokenmill` command: `env`, `conformance` and (with the serving layer) `serve`.

Flags fall back to environment variables here, in one place; nothing below the CLI reads the
environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tokenmill import __version__

logger = logging.getLogger("tokenmill")


def _add_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=os.environ.get("TOKENMILL_BACKEND") or None,
        help="force this backend plugin instead of the best discovered one [env: TOKENMILL_BACKEND]",
    )


def _cmd_env(args: argparse.Namespace) -> int:
    from tokenmill.env_report import print_report
    from tokenmill.registry import load_registry

    print_report(load_registry(), args.backend, args.json)
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from tokenmill.conformance.runner import run_conformance

    return run_conformance(args.backend or "", [a for a in args.extra_args if a != "--"])


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.backend import resolve_backend
    from tokenmill.errors import BackendUnavailableError

    try:
        _, selection = resolve_backend(args.backend)
    except BackendUnavailableError as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 2
    print(f"backend: {selection.name} ({selection.reason})")
    print("tokenmill serve: the HTTP and gRPC serving layer is not built yet (issue #4); nothing to start",
          file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference server with pluggable hardware backends")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"),
                        help="logging level [env: LOG_LEVEL]")
    commands = parser.add_subparsers(dest="command", required=True)

    env = commands.add_parser("env", help="list the backend plugins, their devices and which one would be chosen")
    _add_backend_flag(env)
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=_cmd_env)

    conformance = commands.add_parser(
        "conformance", help="run the conformance suite every backend must pass (needs tokenmill[test])")
    _add_backend_flag(conformance)
    conformance.set_defaults(accepts_extra_args=True)  # anything unrecognised goes to pytest, e.g. -q, -k
    conformance.set_defaults(func=_cmd_conformance)
    serve = commands.add_parser("serve", help="start the server on the best discovered backend")
    _add_backend_flag(serve)
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
