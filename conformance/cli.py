"""``python -m conformance``: one ``main()``, a few obvious subcommands.

User mistakes (the project's ``PKMError``) print one ``error:`` line and exit 2; no
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from conformance import __version__
from pkm_models.errors import PKMError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _quiet_third_party() -> None:
    """TensorFlow and friends log to stderr at import; keep the terminal for our output."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


# --- convert ------------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between PyTorch, numpy and Keras formats",
        description="Convert a PKM checkpoint. The format is read from each file's suffix: "
        ".pt/.pth (PyTorch state_dict), .npz (numpy arrays under state_dict names), "
        ".keras (a Keras model of ProductKeyMemory layers).",
        epilog="example: python -m conformance convert model.pt model.keras --knn 32",
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="checkpoint to write (an existing file is replaced)")
    p.add_argument(
        "--knn",
        type=int,
        default=None,
        help="value rows per head; .pt and .npz files do not store it (default: the source's, else 32)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from pkm_models.convert import convert_checkpoint

    config = convert_checkpoint(args.src, args.dst, knn=args.knn)
    print(f"wrote {args.dst} ({config})")
    return EXIT_OK


# --- main ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Product Key Memory conformance toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PKMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
