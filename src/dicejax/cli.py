"""The ``dicejax`` command: ``dicejax train``, ``align``, ``detect``, ``rewire``, ...

Options are parsed and checked before any heavy import or any work (names, ranges and their
relations, the output folder). Expected failures end with one line on stderr and a
documented exit code (:data:`dicejax.commands.options.EXIT_CODES`), never a traceback:
bad options or input (2), divergence (3), I/O errors (4), Ctrl-C (130).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys

from dicejax.commands import MODULES, options


def _version() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (f"dicejax {version('dicejax')} (jax {version('jax')}, jaxlib {version('jaxlib')}, "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    """The ``dicejax`` parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="dicejax", formatter_class=options.HelpFormatter,
        description="Decentralized learning simulation and DICE data-influence cascades. "
                    "Every sub-command has its own --help.",
        epilog="exit codes: " + "; ".join(f"{code} {text}"
                                          for code, text in options.EXIT_CODES.items()))
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the versions of dicejax, jax and jaxlib and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"dicejax.commands.{name}").register(
            sub, options.add_run_args, options.run_config)
    return parser


def _error(message: str) -> None:
    from rich.markup import escape

    from dicejax.commands.console import err_console

    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def _diverged(message: str, args: argparse.Namespace) -> str:
    text = message.removeprefix("simulate: ").removeprefix("diverged: ")
    text = text.removesuffix("; lower the learning rate or check the data")
    lr = getattr(args, "lr", None)
    hint = f"lower --lr (it is {lr:g})" if lr is not None else "lower the learning rate"
    return f"training diverged: {text}; {hint} or check the data"


def main(argv: list[str] | None = None) -> int:
    """Runs ``dicejax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    sub = getattr(args, "parser", None)
    from dicejax.commands.progress import Interrupted

    try:
        return args.fn(args)
    except Interrupted as e:
        _error(str(e))
        return options.EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _error("interrupted")
        return options.EXIT_INTERRUPTED
    except FloatingPointError as e:
        _error(_diverged(str(e), args))
        return options.EXIT_DIVERGED
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        _error(options.flag_message(str(e), sub, default_name="--model"))
        return options.EXIT_USAGE
    except OSError as e:
        _error(f"I/O error: {e}")
        return options.EXIT_IO


# Names kept for callers of the first CLI (tests register single sub-commands with them).
_run_args = options.add_run_args
_config = options.run_config

if __name__ == "__main__":
    sys.exit(main())
