"""``python -m conformance``: one ``main()``, a few obvious subcommands.

User mistakes and bad data (the project's ``PKMError``, and any file-system error such as
a full disk or a read-only folder) print one ``error:`` line and exit 2; no traceback.
SIGINT and SIGTERM end every worker process, clean up, and exit 130 and 143.
Every command validates all of its inputs before it creates or writes anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from conformance import __version__
from conformance.isolation import Terminated, end_workers, handle_signals, quiet_third_party
from pkm_models.errors import PKMError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


# --- convert ------------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (PyTorch, XLM, numpy, Keras) to .pt, .npz or .keras",
        description="Convert a PKM checkpoint. SRC: a PyTorch state_dict of one HashingMemory or a stack "
        "(.pt/.pth), an XLM training checkpoint (.pth), numpy arrays under state_dict names (.npz) or a Keras "
        "model of ProductKeyMemory layers (.keras); the format is read from the content and must match the "
        "suffix. DST: .pt/.pth, .npz or .keras, written beside and then renamed (an existing file survives "
        "any failure). Several memories are written as a stack. See docs/checkpoints.md.",
        epilog="example: python -m conformance convert model.pt model.keras --knn 32\n"
        "example: python -m conformance convert xlm-checkpoint.pth memories.npz --memories 4_in 8_after",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument(
        "dst", help="checkpoint to write (an existing file is replaced, unless it is SRC itself: that is refused)"
    )
    p.add_argument(
        "--knn",
        type=int,
        default=None,
        help="value rows read per head: required when SRC does not record it (.pt, .npz); must agree with it "
        "where it does (XLM params, .keras)",
    )
    p.add_argument(
        "--memories",
        nargs="+",
        default=None,
        metavar="NAME",
        help="memories to write, in this order: XLM names (4_in, 8_after; encoder:4_in where an encoder and "
        "a decoder both hold memories) or indices 0, 1, ... of a stack (default: all, in layer order)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from conformance.files import refuse_overwriting_inputs
    from pkm_models.convert import convert_checkpoint

    refuse_overwriting_inputs([args.src], [args.dst])  # before anything is read
    if any(str(p).lower().endswith(".keras") for p in (args.src, args.dst)):
        quiet_third_party(verbose=False)  # Keras needs TensorFlow, which logs at start-up
    checkpoint = convert_checkpoint(args.src, args.dst, knn=args.knn, memories=args.memories)
    for note in checkpoint.notes:
        print(f"note: {note}", file=sys.stderr)
    memories = list(checkpoint.memories)
    print(f"wrote {args.dst}: memories {memories} of {checkpoint.format} {args.src} ({checkpoint.config})")
    return EXIT_OK


# --- shared options -----------------------------------------------------------------------
def _add_case_option(p) -> None:
    p.add_argument(
        "--case", action="append", dest="cases", metavar="NAME", help="case (repeatable; default all outside a group)"
    )
    p.add_argument(
        "--group",
        action="append",
        dest="groups",
        metavar="NAME",
        help="also the cases of this group, e.g. large (repeatable; cases in a group are left out by default)",
    )


def _add_store_options(p) -> None:
    p.add_argument("--golden-dir", default=None, help="golden store (default: ./golden)")
    p.add_argument("--cases-dir", default=None, help="case files (default: ./conformance/cases)")


def _load(args: argparse.Namespace):
    """The golden store, the selected cases and the tolerance policy."""
    from pathlib import Path

    from conformance.cases import case_names, default_cases_dir, load_cases
    from conformance.golden import GoldenStore
    from conformance.paths import PATH_NAMES
    from conformance.tolerances import load_policy

    store = GoldenStore(Path(args.golden_dir) if args.golden_dir else None)
    cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
    cases = load_cases(cases_dir, args.cases, args.groups)
    policy = load_policy(store.root / "tolerances.toml", PATH_NAMES, case_names(cases_dir))
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
        "--path",
        action="append",
        dest="paths",
        metavar="GLOB",
        help="paths to run (repeatable; default: every conformance path; a glob matching only paths that "
        "bench alone times is an error)",
    )
    p.add_argument(
        "--require", action="append", metavar="GLOB", help="paths that must be available (unavailable = failure)"
    )
    p.add_argument(
        "--report-dir",
        default=None,
        help="write report.json, junit.xml, report.md, its histograms (PNG) and a failing path's "
        "obtained taps (obtained/<case>/<path>.npz) here",
    )
    p.add_argument(
        "--isolation",
        choices=("family", "path"),
        default="family",
        help="family (default): long-lived worker processes, one family of paths each (torch, tf, ort, "
        "onnx-reference), replaced after a crash or a time-out, which is then that path's error; "
        "path: a fresh process for every (case, path), slower, the same verdicts",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the paths in this process: no worker start-up, but a path that crashes takes the run with it",
    )
    p.add_argument(
        "--jobs",
        type=_count,
        default=None,
        help="(case, path) pairs at a time (default: the cores this process may use; their times then "
        "share the machine: use bench for speed)",
    )
    p.add_argument(
        "--timeout", type=_seconds, default=1800, help="seconds allowed per (case, path) in a worker (default 1800)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="keep the exports here, by content, for the next run (default: $PKM_CONFORMANCE_CACHE, else "
        "$XDG_CACHE_HOME/pkm-conformance, else ~/.cache/pkm-conformance)",
    )
    p.add_argument("--no-cache", action="store_true", help="build every export for this run only")
    p.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the table sweep (every value-table row read through each path's lookup) and the weight "
        "audit of the ONNX files",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="skip the cases' token streams (the [stream] table of a case file)",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="FILE",
        help="an ONNX file of yours to judge against the case's golden, as the paths ort-cpu[file:NAME], "
        "ort-cuda[file:NAME], ort-tensorrt[file:NAME] and onnx-reference[file:NAME] (NAME: the file's stem; "
        "repeatable; also [deploy] onnx = [...] in a case file)",
    )
    p.add_argument(
        "--model-precision",
        choices=["fp32", "fp16", "bf16", "int8"],
        help="the precision of the --model files' value tables (default: read from each file)",
    )
    p.add_argument(
        "--model-output",
        action="append",
        default=[],
        metavar="TAP=NAME",
        help="the --model files' output NAME is the case's tap TAP, e.g. output=logits (repeatable; "
        "default: outputs named as taps, or a file's only output as the final one)",
    )
    p.add_argument("--verbose", action="store_true", help="per-tap rows, third-party logs")
    _add_store_options(p)
    p.set_defaults(func=_run_run)


def _with_models(cases, args):
    """The cases, each also naming the --model files (conformance.deploy)."""
    import dataclasses
    from pathlib import Path

    from conformance.deploy import DeployError, model_file

    outputs = {}
    for given in args.model_output:
        tap, eq, name = given.partition("=")
        if not eq or not tap or not name:
            raise PKMError(f"--model-output {given!r}: expected TAP=NAME, e.g. output=logits")
        outputs[tap] = name
    if outputs and not args.models:
        raise PKMError("--model-output applies to --model files: name one")
    out = []
    for case in cases:
        taken = {f.name for f in case.deploy}
        try:
            files = [
                model_file(Path(m), taken, outputs, args.model_precision, where="--model") for m in args.models or []
            ]
        except DeployError as exc:
            raise PKMError(str(exc)) from None
        out.append(dataclasses.replace(case, deploy=case.deploy + tuple(files)))
    return out


def _run_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.files import check_writable, refuse_overwriting_inputs
    from conformance.paths import deployed_paths, select_paths
    from conformance.report import table, write_reports
    from conformance.runner import RunOptions, default_jobs, run_conformance

    if args.jobs is not None and args.jobs < 1:
        raise PKMError(f"--jobs must be at least 1, got {args.jobs}")
    store, cases, policy = _load(args)
    cases = _with_models(cases, args)
    deployed = deployed_paths(cases)  # the paths of the user's own ONNX files
    paths = select_paths(args.paths, extra=deployed)
    if args.require:
        select_paths(args.require, extra=deployed)  # every --require glob must name a path
    if args.report_dir:
        report_dir = Path(args.report_dir)
        inputs = [store.root / "tolerances.toml", *(f for case in cases for f in case.user_files)]
        refuse_overwriting_inputs(
            inputs, [report_dir / n for n in ("report.json", "junit.xml", "report.md")], [report_dir / "obtained"]
        )
        check_writable(args.report_dir)  # before minutes of work, not after; creates nothing
    cache_dir = None
    if not args.no_cache:
        from pathlib import Path

        from conformance.export.cache import default_cache_dir

        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        check_writable(cache_dir)
    options = RunOptions(
        cache_dir=cache_dir,
        require=args.require or [],
        isolate=not args.in_process,
        isolation=args.isolation,
        timeout=args.timeout,
        jobs=args.jobs or default_jobs(),
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        sweep=not args.no_sweep,
        streams=not args.no_stream,
    )
    result = run_conformance(cases, paths, store, policy, options)
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
        help="check every golden: files confined to its folder, sha256 as in case.json, finite tensors, weights",
        epilog="example: python -m conformance golden verify",
    )
    _add_case_option(v)
    _add_store_options(v)
    v.set_defaults(func=_run_verify)


def _run_regenerate(args: argparse.Namespace) -> int:
    from conformance.files import refuse_overwriting_inputs
    from conformance.regenerate import regenerate_cases

    store, cases, policy = _load(args)
    for case in cases:  # a golden folder is replaced whole: none of the case's own files may live in it
        refuse_overwriting_inputs(case.user_files, folders=[store.case_dir(case.name)])
    refused = regenerate_cases(
        cases,
        store,
        policy,
        accept_drift=args.accept_drift,
        progress=lambda m: print(m, flush=True),
        warn=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return EXIT_FAIL if refused else EXIT_OK


def _run_verify(args: argparse.Namespace) -> int:
    from conformance.golden import GoldenError

    store, cases, _ = _load(args)
    problems = 0
    for case in cases:
        try:
            with store.reading():
                meta = store.verify(case.name, case)
            print(
                f"{case.name}: ok ({len(meta['sha256'])} files, finite tensors, weights as the case says, "
                "made from the case, checkpoint and input file as they are now)"
            )
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
    from conformance.paths import REGISTRY, PathUnavailable
    from conformance.text import aligned

    rows = []
    for path in REGISTRY:
        suffix = "  (bench only)" if path.benchmark_only else ""
        try:
            path.check(None)
            rows.append((path.name, f"available{suffix}"))
        except PathUnavailable as exc:
            rows.append((path.name, f"unavailable: {exc}{suffix}"))
    print("\n".join(aligned(rows, header=False)))
    return EXIT_OK


def _run_cases(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.cases import case_names, default_cases_dir, load_cases
    from conformance.text import aligned

    cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
    cases = load_cases(cases_dir, case_names(cases_dir))  # the large group too
    rows = [
        (c.name, "input " + "x".join(map(str, c.input_shape)), (f"[{c.group}] " if c.group else "") + c.description)
        for c in cases
    ]
    print("\n".join(aligned(rows, header=False)))
    return EXIT_OK


# --- bench --------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the execution paths, each in its own process",
        description="Benchmark the execution paths. Presets: seed (the seed README's 6-layer net, input "
        "(16, 256, 768), 100 runs; meant for a GPU), cpu (one XLM-default layer, input (4, 128, 768), 20 runs), "
        "tiny (seconds). Prints a table and, with --report-dir, writes bench.json, bench.md and bench.png.",
        epilog="example: python -m conformance bench --preset cpu --path 'ort-cpu*' --path torch-eager-cpu",
    )
    p.add_argument("--preset", default=None, help="seed, cpu or tiny (default cpu)")
    p.add_argument(
        "--case",
        default=None,
        help="benchmark a conformance case instead (its model, a seed's or a checkpoint's, on its input's shape; "
        "5 runs unless --runs)",
    )
    p.add_argument("--cases-dir", default=None, help="case files for --case (default: ./conformance/cases)")
    p.add_argument(
        "--path",
        action="append",
        dest="paths",
        metavar="GLOB",
        help="paths (repeatable; default: every path except ONNX's reference evaluator, too slow to time)",
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: the preset's)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every path this many times, in fresh processes taking turns, and pool its timed runs: "
        "ratios then resist a machine whose speed drifts (default 1)",
    )
    p.add_argument("--timeout", type=_seconds, default=1800, help="seconds allowed per path and round (default 1800)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time each path's table sweep (every value row through its lookup) beside numpy reading the "
        "tables once",
    )
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
    from conformance.bench import get_bench_preset, run_bench
    from conformance.bench import report as bench_report
    from conformance.files import check_writable
    from conformance.paths import select_paths

    if args.case and args.preset:
        raise PKMError("bench takes --preset or --case, not both")
    if args.case:
        from pathlib import Path

        from conformance.bench import BenchPreset
        from conformance.cases import default_cases_dir, load_cases

        cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
        preset = BenchPreset.from_case(load_cases(cases_dir, [args.case])[0])
    else:
        preset = get_bench_preset(args.preset or "cpu")
    paths = select_paths(args.paths, bench=True)
    if args.report_dir:
        check_writable(args.report_dir)
    bench = run_bench(
        preset,
        paths,
        runs=args.runs,
        warmup=args.warmup,
        timeout=args.timeout,
        progress=_progress_bar,
        rounds=args.rounds,
        sweep=args.sweep,
    )
    print(bench_report.terminal(bench))
    if args.report_dir:
        for path in bench_report.write(bench, args.report_dir):
            print(f"wrote {path}")
    failed = [r["name"] for r in bench["paths"] if r.get("status") in ("error", "fail")]
    return EXIT_FAIL if failed else EXIT_OK


# --- merge --------------------------------------------------------------------------------
def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="combine the report.json (or bench.json) files of several machines into one",
        description="No machine runs every path: merge what each ran. report.json files become one matrix, "
        "one row per (case, path) naming the machine where it ran; a path unavailable on one machine and run "
        "on another shows the run; different verdicts on two machines are a conflict that fails the merge "
        "(exit 1); reports of different goldens are refused (exit 2). bench.json files go side by side, one "
        "column per machine, ratios only within a machine. One command for both kinds: the files say which "
        "they are, and a bench's own options (--preset, --runs) mean nothing to a merge.",
        epilog="examples:\n  python -m conformance merge ci/report.json gpu/report.json --report-dir merged/\n"
        "  python -m conformance merge cpu/bench.json gpu/bench.json --report-dir merged-bench/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="two or more report.json files, or bench.json files, one per run"
    )
    p.add_argument(
        "--report-dir", default=None, help="write report.json, report.md and junit.xml (or bench.json, bench.md) here"
    )
    p.set_defaults(func=_run_merge)


MERGED_FILES = ("report.json", "report.md", "junit.xml", "bench.json", "bench.md")


def _run_merge(args: argparse.Namespace) -> int:
    """Merge report.json files, or bench.json files (the files say which), into one; print
    it and, with --report-dir, write it there."""
    from pathlib import Path

    from conformance import merge
    from conformance.files import refuse_overwriting_inputs

    if len(args.files) < 2:
        raise merge.MergeError(f"merge needs at least two files, got {len(args.files)}")
    sources = [Path(f) for f in args.files]
    if args.report_dir:
        refuse_overwriting_inputs(sources, [Path(args.report_dir) / name for name in MERGED_FILES])
    data = [merge.read_json(s) for s in sources]
    kinds = {merge.kind(s, d) for s, d in zip(sources, data, strict=True)}
    if len(kinds) > 1:
        raise merge.MergeError("cannot merge report.json files with bench.json files: merge each kind on its own")
    if kinds == {"bench"}:
        from conformance.bench import merge as bench_merge

        merged = bench_merge.merge_benches(sources, data)
        print(bench_merge.terminal(merged))
        written = bench_merge.write(merged, Path(args.report_dir)) if args.report_dir else []
    else:
        merged = merge.merge_reports(sources, data)
        print(merge.table(merged))
        written = merge.write(merged, Path(args.report_dir)) if args.report_dir else []
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK if merged["ok"] else EXIT_FAIL


# --- export -------------------------------------------------------------------------------
def _add_export(sub) -> None:
    from conformance.export import DEFAULT_OPSET, EXPORTER_NAMES

    p = sub.add_parser(
        "export",
        help="export a preset or a case to ONNX with every exporter (or the ones named)",
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
    p.add_argument("--seed", type=_count, default=0, help="weight seed for --preset (default 0)")
    p.add_argument("--cases-dir", default=None, help="case files (default: ./conformance/cases)")
    p.add_argument(
        "--exporter",
        action="append",
        dest="exporters",
        metavar="NAME",
        help=f"one of {', '.join(EXPORTER_NAMES)}; repeatable (default: all; with --precision other than fp32, "
        "torch-fast only)",
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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace files of the same name already in OUT (default: refuse, naming them, before exporting)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses
    import os
    from pathlib import Path

    from conformance.export import EXPORTER_NAMES, SUPPORTED_OPSETS, ModelSpec, check_exporter_names, export
    from conformance.export.onnx_files import EXTERNAL_DATA_THRESHOLD
    from conformance.files import FileProblem, check_writable, refuse_overwriting_inputs, staging_dir
    from pkm_models import get_preset

    case_files = []
    if args.case:
        from conformance.cases import default_cases_dir, load_cases

        cases_dir = Path(args.cases_dir) if args.cases_dir else default_cases_dir()
        case = load_cases(cases_dir, [args.case])[0]
        spec, case_files = case.spec, case.user_files
    else:
        spec = ModelSpec.from_preset(get_preset(args.preset), seed=args.seed)
    names = args.exporters or (list(EXPORTER_NAMES) if args.precision == "fp32" else ["torch-fast"])
    check_exporter_names(names)
    if args.opset not in SUPPORTED_OPSETS:
        raise PKMError(f"--opset {args.opset} is not supported; choose one of {list(SUPPORTED_OPSETS)}")
    out = Path(args.out)
    suffix = "" if args.precision == "fp32" else f"@{args.precision}"
    targets = [out / f"{name}{suffix}.onnx{data}" for name in names for data in ("", ".data")]
    refuse_overwriting_inputs(case_files, targets)  # even with --force: never a file the export reads
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not args.force:
        raise FileProblem(
            f"{existing[0]} already exists"
            + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
            + "; export does not replace files unless told to: pass --force, or choose another --out"
        )
    check_writable(out)
    failed = []
    with contextlib.ExitStack() as stack:
        if spec.weight_bytes > EXTERNAL_DATA_THRESHOLD:  # written once, memory-mapped by every exporter
            out.mkdir(parents=True, exist_ok=True)
            folder = stack.enter_context(staging_dir(out, ".weights-"))  # an abandoned one is removed first
            print(f"writing the weights ({spec.weight_bytes / 1e9:,.1f} GB) once, for every exporter ...", flush=True)
            spec = dataclasses.replace(spec, weights_file=spec.write_weights(folder), checkpoint=None)
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
    _add_merge(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    handle_signals()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        # a run in family workers loads no framework in this process (its workers are quiet themselves)
        in_workers = args.command == "run" and not args.in_process and args.isolation == "family"
        if args.command in ("run", "golden", "export", "bench", "paths") and not in_workers:  # convert: .keras only
            quiet_third_party(getattr(args, "verbose", False))
        return args.func(args)
    except PKMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file operation outside the checks: full disk, permissions, a vanished file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        end_workers()
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        end_workers()
        print("terminated", file=sys.stderr)
        return 143
