"""Regenerating goldens: the one flow from a case to its stored golden.

For each case: compute the reference taps (PyTorch reference, CPU, float32), compare them
with the stored golden and show the drift, refuse drift beyond tolerance unless accepted,
then write the new golden beside the old one and swap it in (:meth:`GoldenStore.write`).
The whole regeneration holds the store's exclusive lock: readers wait, a second
regeneration is refused, and staging folders left by a killed one are removed first.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conformance.cases import Case
from conformance.compare import compare_case
from conformance.files import staging_dir
from conformance.golden import GoldenError, GoldenStore
from conformance.results import Comparison
from conformance.spec import read_weights_dir
from conformance.tolerances import TolerancePolicy

Progress = Callable[[str], None]
GENERATOR_PATH = "torch-eager-cpu"  # the path whose tolerances judge drift


class DriftError(GoldenError):
    """The regenerated golden differs from the stored one beyond tolerance."""


def reference_taps(case: Case, weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """The golden taps: the PyTorch reference in float32 on CPU, every layer's taps."""
    import torch

    model = case.spec.torch_model(weights)
    with torch.inference_mode():
        taps = model(torch.from_numpy(x), return_taps=True)
    return {k: taps[k].numpy() for k in case.spec.output_names(tapped=True)}


def _drift(case, taps, x, old, weights, policy, say) -> Comparison | None:
    old_weights = old.weights if old.weights is not None else weights
    same_shapes = old.input.shape == x.shape and all(
        k in old_weights and old_weights[k].shape == weights[k].shape for k in weights
    )
    if not same_shapes or set(old.taps) != set(taps):
        say(f"{case.name}: input, layers or weight shapes changed; drift not comparable")
        return None
    drift = compare_case(case, taps, old.taps, weights=weights, policy=policy, path=GENERATOR_PATH)
    for t in drift.tensors:
        max_abs = t.max_abs if t.max_abs is not None else float("nan")
        say(f"{case.name}: drift {t.name:8s} max abs {max_abs:.3g}  {t.status}{'  ' + t.message if t.message else ''}")
    return drift


def regenerate(
    case: Case,
    store: GoldenStore,
    policy: TolerancePolicy,
    accept_drift: bool = False,
    progress: Progress | None = None,
) -> Comparison | None:
    """Regenerate one case's golden; returns the drift against the old one (None if there
    was no comparable old one). Raises DriftError, leaving the old golden, when the drift
    is beyond tolerance and ``accept_drift`` is False. The caller holds the lock
    (:func:`regenerate_cases` does)."""
    say = progress or (lambda _: None)
    case.check_fits()
    # written once and memory-mapped: the reference and the drift check share one copy; the
    # folder is held by a lock while this process lives, so the next command removes one a
    # killed regeneration left
    with staging_dir(Path(tempfile.gettempdir()), "pkm-weights-") as tmp:
        weights = read_weights_dir(case.spec.write_weights(Path(tmp)), writable=True)
        try:
            return _regenerate(case, store, policy, accept_drift, say, weights)
        finally:
            weights.clear()


def _regenerate(case, store, policy, accept_drift, say, weights) -> Comparison | None:
    x = case.make_input()
    taps = reference_taps(case, weights, x)
    previous, drift = None, None
    try:
        old = store.read(case.name)
        previous = old.meta
    except GoldenError as exc:
        if store.case_dir(case.name).exists():
            say(f"{case.name}: the previous golden is unusable and will be replaced ({exc})")
        else:
            say(f"{case.name}: new case, no previous golden")
    else:
        drift = _drift(case, taps, x, old, weights, policy, say)
        if drift is not None and not drift.ok and not accept_drift:
            raise DriftError(
                f"{case.name}: the new golden drifted beyond tolerance from the stored one (first at "
                f"{drift.first_divergence!r}); the old golden is kept. Pass --accept-drift to replace it."
            )

    model_writer = None
    if case.store_weights:

        def model_writer(target: Path) -> None:
            from conformance.export import export

            with tempfile.TemporaryDirectory() as tmp:
                report = export(case.spec, "torch-fast", Path(tmp), tapped=True)
                shutil.move(report.path, target)

    sample = None
    if case.stream is not None:  # the reference on a fixed sample of the stream, so a changed one is seen
        from conformance.stream import sample_input

        sx = sample_input(case.stream, case.config.input_dim)
        sample = (sx, reference_taps(case, weights, sx))
        say(f"{case.name}: the stream's sample, {sx.shape[1]:,} of its {case.stream.tokens:,} tokens")
    store.write(case, taps, x, weights if case.store_weights else None, model_writer, previous, sample)
    say(f"{case.name}: wrote {store.case_dir(case.name)}")
    return drift


def regenerate_cases(
    cases: list[Case],
    store: GoldenStore,
    policy: TolerancePolicy,
    accept_drift: bool = False,
    progress: Progress | None = None,
    warn: Progress | None = None,
) -> list[str]:
    """Regenerate every case under the store's lock; returns the names of the cases whose
    drift was refused (their old goldens are kept)."""
    warn = warn or progress or (lambda _: None)
    refused = []
    for case in cases:
        case.check_fits()  # every case before the first is written
    with store.lock():
        for leftover in store.cleanup_leftovers():
            warn(f"removed {leftover} left by an interrupted regeneration")
        for case in cases:
            try:
                regenerate(case, store, policy, accept_drift=accept_drift, progress=progress)
            except DriftError as exc:
                warn(f"refused: {exc}")
                refused.append(case.name)
    return refused
