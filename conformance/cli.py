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


# --- export -------------------------------------------------------------------------------
def _add_export(sub) -> None:
    from conformance.export import DEFAULT_OPSET, EXPORTER_NAMES

    p = sub.add_parser(
        "export",
        help="export a preset to ONNX with every exporter (or the ones named)",
        description="Export a PKM model to ONNX. Writes OUT/<exporter>.onnx (plus <exporter>.onnx.data for "
        "models over 1 GB of weights), checks each file with onnx.checker (full check) and prints a report: "
        "op types, parameters, size, and warnings for ops that are slow or that TensorRT rejects.",
        epilog="example: python -m conformance export --preset xlm --exporter torch-fast --out exports/",
    )
    p.add_argument("--preset", required=True, help="model preset: tiny, small, xlm, seed-bench")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument(
        "--exporter",
        action="append",
        dest="exporters",
        metavar="NAME",
        help=f"one of {', '.join(EXPORTER_NAMES)}; repeatable (default: all)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tapped", action="store_true", help="also output the conformance taps (query ... output)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.export import EXPORTER_NAMES, ModelSpec, check_exporter_names, export
    from pkm_models import get_preset

    spec = ModelSpec.from_preset(get_preset(args.preset), seed=args.seed)
    names = args.exporters or list(EXPORTER_NAMES)
    check_exporter_names(names)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PKMError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    failed = []
    for i, name in enumerate(names, start=1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        try:
            report = export(spec, name, out, opset=args.opset, tapped=args.tapped)
        except Exception as exc:  # one exporter failing must not stop the others
            failed.append(name)
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(report.render(), flush=True)
    if failed:
        print(f"{len(failed)} of {len(names)} exporter(s) failed: {failed}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


# --- main ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Product Key Memory conformance toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
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
