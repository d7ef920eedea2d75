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


def quiet_third_party(verbose: bool) -> None:
    """TensorFlow logs to stderr from C++ at import and at device set-up, before any
    Python setting applies: unless ``verbose``, start it with stderr pointed at /dev/null."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        from conformance.paths.tf_paths import grow_gpu_memory

        grow_gpu_memory()  # this process must not take the GPU's memory from the paths it starts
        tf.constant(0)  # device discovery logs here
    except Exception:  # a broken TensorFlow shows itself later, on the paths that need it
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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


# --- shared options -----------------------------------------------------------------------
def _add_case_option(p) -> None:
    p.add_argument("--case", action="append", dest="cases", metavar="NAME", help="case (repeatable; default all)")


def _add_store_options(p) -> None:
    p.add_argument("--golden-dir", default=None, help="golden store (default: ./golden)")
    p.add_argument("--cases-dir", default=None, help="case files (default: ./conformance/cases)")


def _load(args: argparse.Namespace):
    """The golden store, the selected cases and the tolerance policy."""
    from pathlib import Path

    from conformance.cases import default_cases_dir, load_cases
    from conformance.golden import GoldenStore
    from conformance.paths import PATH_NAMES
    from conformance.tolerances import load_policy

    store = GoldenStore(Path(args.golden_dir) if args.golden_dir else None)
    cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
    cases = load_cases(cases_dir, args.cases)
    known = [p.stem for p in cases_dir.glob("*.toml")]
    policy = load_policy(store.root / "tolerances.toml", PATH_NAMES, known)
    return store, cases, policy


# --- run -----------------------------------------------------------------------------------
def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run every execution path on every case and compare with the golden tensors",
        description="Run the selected execution paths on the selected cases, compare every tap with the "
        "golden under golden/tolerances.toml, and report. Exit 0: every available path conforms; "
        "1: some path fails or errors; 2: bad usage or bad data.",
        epilog="example: python -m conformance run --case tiny --path 'ort-cpu*' --report-dir reports/",
    )
    _add_case_option(p)
    p.add_argument(
        "--path", action="append", dest="paths", metavar="GLOB", help="paths to run (repeatable; default all)"
    )
    p.add_argument(
        "--require", action="append", metavar="GLOB", help="paths that must be available (unavailable = failure)"
    )
    p.add_argument("--report-dir", default=None, help="write report.json, junit.xml and report.md here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the paths in this process: faster, but a path that crashes takes the run with it",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="path processes at a time (default 2; their times then share the machine: use bench for speed)",
    )
    p.add_argument("--verbose", action="store_true", help="per-tap rows, third-party logs")
    _add_store_options(p)
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from conformance.paths import select_paths
    from conformance.report import table, write_reports
    from conformance.runner import run_conformance

    if args.jobs < 1:
        raise PKMError(f"--jobs must be at least 1, got {args.jobs}")
    paths = select_paths(args.paths)
    if args.require:
        select_paths(args.require)  # every --require glob must name a path
    if args.report_dir:
        _check_writable(args.report_dir)  # before minutes of work, not after
    store, cases, policy = _load(args)
    result = run_conformance(
        cases,
        paths,
        store,
        policy,
        require=args.require,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        isolate=not args.in_process,
        jobs=args.jobs,
    )
    print(table(result, verbose=args.verbose))
    if args.report_dir:
        for path in write_reports(result, args.report_dir):
            print(f"wrote {path}")
    return EXIT_OK if result.ok else EXIT_FAIL


# --- golden --------------------------------------------------------------------------------
def _add_golden(sub) -> None:
    p = sub.add_parser(
        "golden",
        help="regenerate or verify the golden tensors",
        epilog="examples: python -m conformance golden regenerate --case tiny; python -m conformance golden verify",
    )
    gsub = p.add_subparsers(dest="golden_command", required=True, metavar="ACTION")
    r = gsub.add_parser(
        "regenerate",
        help="recompute goldens from the PyTorch reference (atomic; shows the drift)",
        description="Recompute each case's golden from the PyTorch reference on CPU in float32. Prints the "
        "drift against the stored golden per tap and keeps the old golden when it drifted beyond tolerance, "
        "unless --accept-drift. Writes beside the old golden and swaps atomically.",
        epilog="example: python -m conformance golden regenerate --case tiny",
    )
    _add_case_option(r)
    r.add_argument("--accept-drift", action="store_true", help="replace goldens even if they drifted beyond tolerance")
    _add_store_options(r)
    r.set_defaults(func=_run_regenerate)
    v = gsub.add_parser(
        "verify",
        help="check every golden file against the sha256 in its case.json",
        epilog="example: python -m conformance golden verify",
    )
    _add_case_option(v)
    _add_store_options(v)
    v.set_defaults(func=_run_verify)


def _run_regenerate(args: argparse.Namespace) -> int:
    from conformance.runner import DriftError, regenerate

    store, cases, policy = _load(args)
    refused = []
    with store.lock():
        for leftover in store.cleanup_leftovers():
            print(f"removed {leftover} left by an interrupted regeneration", file=sys.stderr)
        for case in cases:
            try:
                regenerate(case, store, policy, accept_drift=args.accept_drift, progress=print)
            except DriftError as exc:
                print(f"refused: {exc}", file=sys.stderr)
                refused.append(case.name)
    return EXIT_FAIL if refused else EXIT_OK


def _run_verify(args: argparse.Namespace) -> int:
    from conformance.golden import GoldenError

    store, cases, _ = _load(args)
    problems = 0
    for case in cases:
        try:
            meta = store.verify(case.name)
            print(f"{case.name}: ok ({len(meta['sha256'])} files)")
        except GoldenError as exc:
            problems += 1
            print(f"{case.name}: {exc}", file=sys.stderr)
    if problems:
        print(f"{problems} corrupt or missing golden(s)", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# --- listings ------------------------------------------------------------------------------
def _add_listings(sub) -> None:
    p = sub.add_parser(
        "paths",
        help="list every execution path, and why it cannot run here if it cannot",
        epilog="example: python -m conformance paths",
    )
    p.set_defaults(func=_run_paths)
    c = sub.add_parser("cases", help="list the cases", epilog="example: python -m conformance cases")
    c.add_argument("--cases-dir", default=None, help="case files (default: ./conformance/cases)")
    c.set_defaults(func=_run_cases)


def _run_paths(args: argparse.Namespace) -> int:
    from conformance.paths import PATHS, PathUnavailable

    probe = None
    width = max(len(p.name) for p in PATHS)
    for path in PATHS:
        try:
            path.check(probe)
            print(f"{path.name:<{width}}  available")
        except PathUnavailable as exc:
            print(f"{path.name:<{width}}  unavailable: {exc}")
    return EXIT_OK


def _run_cases(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.cases import default_cases_dir, load_cases

    for case in load_cases(Path(args.cases_dir) if args.cases_dir else default_cases_dir()):
        shape = "x".join(map(str, case.input_shape))
        print(f"{case.name:<10} input {shape:<12} {case.description}")
    return EXIT_OK


# --- bench --------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time every execution path, each in its own process",
        description="Benchmark the execution paths. Presets: seed (the seed README's 6-layer net, input "
        "(16, 256, 768), 100 runs; meant for a GPU), cpu (one XLM-default layer, input (4, 128, 768), 20 runs), "
        "tiny (seconds). Prints a table and, with --report-dir, writes bench.json, bench.md and bench.png.",
        epilog="example: python -m conformance bench --preset cpu --path 'ort-cpu*' --path torch-eager-cpu",
    )
    p.add_argument("--preset", default="cpu", help="seed, cpu or tiny (default cpu)")
    p.add_argument("--path", action="append", dest="paths", metavar="GLOB", help="paths (repeatable; default all)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: the preset's)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every path this many times, in fresh processes taking turns, and pool its timed runs: "
        "ratios then resist a machine whose speed drifts (default 1)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per path and round (default 1800)")
    p.add_argument("--report-dir", default=None, help="write bench.json, bench.md and bench.png here")
    p.set_defaults(func=_run_bench)


def _progress_bar(done: int, total: int, name: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    line = f"[{bar}] {done}/{total} {name}"
    if sys.stderr.isatty():
        print(f"\r{line:<100}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    elif name:
        print(line, file=sys.stderr, flush=True)


def _run_bench(args: argparse.Namespace) -> int:
    from conformance.bench import get_bench_preset, run_bench, select_bench_paths
    from conformance.bench import report as bench_report

    preset = get_bench_preset(args.preset)
    paths = select_bench_paths(args.paths)
    if args.report_dir:
        _check_writable(args.report_dir)
    bench = run_bench(
        preset,
        paths,
        runs=args.runs,
        warmup=args.warmup,
        timeout=args.timeout,
        progress=_progress_bar,
        rounds=args.rounds,
    )
    print(bench_report.terminal(bench))
    if args.report_dir:
        for path in bench_report.write(bench, args.report_dir):
            print(f"wrote {path}")
    failed = [r["name"] for r in bench["paths"] if r.get("status") == "error"]
    return EXIT_FAIL if failed else EXIT_OK


def _check_writable(folder) -> None:
    from pathlib import Path

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PKMError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc


# --- export -------------------------------------------------------------------------------
def _add_export(sub) -> None:
    from conformance.export import DEFAULT_OPSET, EXPORTER_NAMES

    p = sub.add_parser(
        "export",
        help="export a preset to ONNX with every exporter (or the ones named)",
        description="Export a PKM model to ONNX. Writes OUT/<exporter>.onnx (plus <exporter>.onnx.data for "
        "models over 256 MB of weights), checks each file with onnx.checker (full check) and prints a report: "
        "op types, parameters, size, and warnings for ops that are slow or that TensorRT rejects.",
        epilog="examples:\n  python -m conformance export --preset xlm --exporter torch-fast --out exports/\n"
        "  python -m conformance export --case tiny-bn --tapped --out exports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="model preset: tiny, small, xlm, seed-bench")
    which.add_argument("--case", help="a conformance case (its config and weights)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --preset (default 0)")
    p.add_argument("--cases-dir", default=None, help="case files (default: ./conformance/cases)")
    p.add_argument(
        "--exporter",
        action="append",
        dest="exporters",
        metavar="NAME",
        help=f"one of {', '.join(EXPORTER_NAMES)}; repeatable (default: all)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tapped", action="store_true", help="also output the conformance taps (query ... output)")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "int8"),
        default="fp32",
        help="fp16/bf16: the model in that type; int8: uint8 value rows with per-row scales; writes "
        "OUT/<exporter>@<precision>.onnx, torch-fast only (default fp32; docs/precision.md)",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.export import EXPORTER_NAMES, ModelSpec, check_exporter_names, export
    from pkm_models import get_preset

    if args.case:
        from conformance.cases import default_cases_dir, load_cases

        cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
        spec = load_cases(cases_dir, [args.case])[0].spec
    else:
        spec = ModelSpec.from_preset(get_preset(args.preset), seed=args.seed)
    names = args.exporters or (list(EXPORTER_NAMES) if args.precision == "fp32" else ["torch-fast"])
    check_exporter_names(names)
    out = Path(args.out)
    _check_writable(out)
    failed = []
    for i, name in enumerate(names, start=1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        try:
            report = export(spec, name, out, opset=args.opset, tapped=args.tapped, precision=args.precision)
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
    _add_run(sub)
    _add_golden(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_convert(sub)
    _add_listings(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("run", "golden", "export", "convert", "bench", "paths"):
        quiet_third_party(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except PKMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
