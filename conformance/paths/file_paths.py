"""A user's own ONNX file as a path: ``ort-cpu[file:NAME]``, ``ort-cuda[file:NAME]``,
``ort-tensorrt[file:NAME]``, ``onnx-reference[file:NAME]`` (see :mod:`conformance.deploy`).

The file is run as it is, on the case's golden input (and its stream): the input enters by
name (``input``) or, when the file has one input, whatever its name, reshaped to the rank
the file declares; an input of another width is refused. Each output that is named as a
tap (``query``, ``0/output``...) or mapped onto one (``outputs = { output = "logits" }``)
is that tap; a file with a single unmapped output is judged on it as the case's final
output. Only the taps the file exposes are judged (:attr:`ExecutionPath.partial_taps`):
where it exposes no ``indices``, the tokens whose golden selection is near a tie are set
aside from the output's verdict, as for a path whose selection legitimately flipped.
"""

from __future__ import annotations

import math
import re

import numpy as np

from conformance.deploy import DeployError, FileFacts, ModelFile, read_facts
from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from conformance.paths.ort_paths import OrtPath, provider_problem
from conformance.precision import REDUCED
from pkm_models.config import tap_names

KINDS = ("cpu", "cuda", "tensorrt")
REFERENCE_MAX_BYTES = 8 << 20  # the reference evaluator, for small files only


def deployed(case, name: str) -> ModelFile:
    """The file ``name`` of ``case`` (a PathUnavailable where the case names no such file)."""
    for model_file in case.deploy:
        if model_file.name == name:
            return model_file
    raise PathUnavailable(f"case {case.name} names no ONNX file {name!r} (--model, or [deploy] in its case file)")


def file_precision(model_file: ModelFile) -> str:
    """The precision the file is judged at: declared, else read from its value table."""
    return model_file.precision or read_facts(model_file.path).precision


class FileIO:
    """How the case's input enters the file and which of its outputs are which taps."""

    def __init__(self, model_file: ModelFile, facts: FileFacts, case):
        self.file = model_file.path.name
        c = case.config
        inputs = dict(facts.inputs)
        if len(inputs) == 1:
            self.input = next(iter(inputs))
        elif "input" in inputs:
            self.input = "input"
        else:
            raise DeployError(
                f"{self.file}: {len(inputs)} inputs ({', '.join(inputs)}) and none named 'input': "
                "the file must take the layer's input alone"
            )
        dims = inputs[self.input]
        width = dims[-1] if dims else None
        if not dims or (isinstance(width, int) and width != c.input_dim):
            raise DeployError(
                f"{self.file}: input {self.input!r} has shape {list(dims)}; the case's input has "
                f"{c.input_dim} features in its last dimension"
            )
        self.rank = len(dims)
        taps = tap_names(case.spec.layers, c)
        self.final = taps[-1]
        self.outputs: dict[str, str] = {}  # the file's output -> the tap it is
        for tap, output in model_file.outputs:
            if tap not in taps:
                raise DeployError(f"{self.file}: outputs maps {tap!r}, which is not a tap of the case ({taps})")
            if output not in facts.outputs:
                raise DeployError(
                    f"{self.file}: outputs maps {tap} to {output!r}, which the file does not output "
                    f"(its outputs: {list(facts.outputs)})"
                )
            self.outputs[output] = tap
        for output in facts.outputs:
            if output in taps and output not in self.outputs and output not in self.outputs.values():
                self.outputs[output] = output
        if not self.outputs:
            if len(facts.outputs) != 1:
                raise DeployError(
                    f"{self.file}: none of its outputs {list(facts.outputs)} is a tap of the case {taps}; "
                    f'name the one that is the final output: outputs = {{ {self.final} = "NAME" }} in [deploy], '
                    f"or --model-output {self.final}=NAME"
                )
            self.outputs[facts.outputs[0]] = self.final
        self.shapes = {"output": c.v_dim, "layer_output": c.output_dim}

    @property
    def exposed(self) -> list[str]:
        return list(self.outputs.values())

    def feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.rank == x.ndim:
            return {self.input: x}
        if self.rank == 2:
            return {self.input: x.reshape(-1, x.shape[-1])}
        if self.rank == 1 and math.prod(x.shape[:-1]) == 1:
            return {self.input: x.reshape(-1)}
        raise DeployError(f"{self.file}: input {self.input!r} has rank {self.rank}; the case's input is {x.shape}")

    def taps(self, values: list, x: np.ndarray) -> dict[str, np.ndarray]:
        """The file's outputs (in :attr:`outputs`' order) as taps: a final output of the
        right size takes the golden's shape (tokens first, as the input)."""
        out = {}
        for tap, value in zip(self.outputs.values(), values, strict=True):
            value = np.asarray(value)
            width = self.shapes.get(tap.rpartition("/")[2])
            if width is not None and value.size == math.prod(x.shape[:-1]) * width:
                value = value.reshape(*x.shape[:-1], width)
            out[tap] = value
        return out


def _file_and_io(context: CaseContext, name: str) -> tuple[ModelFile, FileIO]:
    model_file = deployed(context.case, name)
    facts = read_facts(model_file.path)
    return model_file, FileIO(model_file, facts, context.case)


def _suffix(precision: str) -> str:
    return f"@{precision}" if precision in REDUCED else ""


class FileOrtPath(OrtPath):
    """ONNX Runtime on a user's file (a provider: ``kind``)."""

    partial_taps = True

    def __init__(self, kind: str, file: str, precision: str = "fp32"):
        super().__init__(kind, f"file:{file}")
        self.exporter = None  # runs no export of the toolkit's
        self.file, self.precision = file, precision
        self.name = f"ort-{kind}[file:{file}]{_suffix(precision)}"

    def check(self, case) -> None:
        if case is not None:
            check_judgeable(deployed(case, self.file))
        problem = provider_problem(self.kind)
        if problem:
            raise PathUnavailable(problem)

    def onnx_file(self, context: CaseContext):
        return deployed(context.case, self.file).path

    def prepare(self, context: CaseContext):
        model_file, io = _file_and_io(context, self.file)
        try:
            session = self.session(model_file.path)
        except PathUnavailable:
            raise
        except Exception as exc:  # an operator or opset the runtime lacks, missing external data
            raise DeployError(f"{model_file.path.name}: ONNX Runtime cannot load it: {_first_line(exc)}") from None
        names = list(io.outputs)

        def run(x):
            try:
                values = session.run(names, io.feeds(x))
            except DeployError:
                raise
            except Exception as exc:
                raise DeployError(
                    f"{model_file.path.name}: ONNX Runtime failed to run it: {_first_line(exc)}"
                ) from None
            return io.taps(values, x)

        return run

    def prepare_timed(self, context: CaseContext, x):
        run = self.prepare(context)
        return lambda: run(x)

    def table_reads(self, context: CaseContext) -> list:
        """The value stage cut out of the file, where it exposes ``indices``, ``weights``
        and ``output`` under the taps' names (a single layer)."""
        from conformance.paths.ort_paths import onnx_table_reads, stage_output
        from conformance.sweep import NotSwept

        model_file, io = _file_and_io(context, self.file)
        if not {"indices", "weights", "output"} <= set(io.outputs):
            raise NotSwept(f"{model_file.path.name} exposes no indices, weights and output to cut its value stage from")
        config = context.case.config

        def make_read(stage):
            session = self.session(stage.model.SerializeToString(), model_file.path.parent)
            return lambda idx, w: stage_output(session.run, stage, idx, w, config.heads * config.knn, config.input_dim)

        return onnx_table_reads(context, model_file.path, make_read)


class FileReferencePath(ExecutionPath):
    """ONNX's reference evaluator on a small user file."""

    family = "onnx-reference"
    partial_taps = True

    def __init__(self, file: str, precision: str = "fp32"):
        self.exporter = None
        self.file, self.precision = file, precision
        self.name = f"onnx-reference[file:{file}]{_suffix(precision)}"

    def check(self, case) -> None:
        if case is None:
            return
        model_file = deployed(case, self.file)
        check_judgeable(model_file)
        path = model_file.path
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.stem))
        if size > REFERENCE_MAX_BYTES:
            raise PathUnavailable(
                f"the reference evaluator is for small files (up to {REFERENCE_MAX_BYTES >> 20} MB); "
                f"{path.name} and its data take {size / 2**20:,.0f} MB"
            )

    def onnx_file(self, context: CaseContext):
        return deployed(context.case, self.file).path

    def prepare(self, context: CaseContext):
        from onnx.reference import ReferenceEvaluator

        from conformance.paths.onnx_reference import _gather_elements_op

        model_file, io = _file_and_io(context, self.file)
        try:
            evaluator = ReferenceEvaluator(str(model_file.path), new_ops=[_gather_elements_op()])
        except Exception as exc:
            raise DeployError(
                f"{model_file.path.name}: the reference evaluator cannot load it: {_first_line(exc)}"
            ) from None
        names = list(io.outputs)
        return lambda x: io.taps(evaluator.run(names, io.feeds(x)), x)

    def stream_problem(self, case) -> str | None:
        return "the reference evaluator is for the golden batch (a stream's tokens would take it minutes)"


def _first_line(exc: Exception) -> str:
    """One line of a runtime's error: ONNX Runtime's source location and C++ signature,
    which come before what it says, left out."""
    text = re.sub(r"/onnxruntime_src/\S+:\d+ \S+?\(.*?\) ", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}"


def file_paths(model_file: ModelFile) -> list[ExecutionPath]:
    """The paths of one user file, named with its precision (declared, or read from it).
    A file that cannot be read is named float32: its paths report why when they run."""
    try:
        precision = file_precision(model_file)
    except DeployError:
        precision = "fp32"
    if precision not in REDUCED:
        precision = "fp32"  # float32, or a format not judged yet (its paths say so: check_judgeable)
    return [
        *(FileOrtPath(kind, model_file.name, precision) for kind in KINDS),
        FileReferencePath(model_file.name, precision),
    ]


def check_judgeable(model_file: ModelFile) -> None:
    """PathUnavailable for a file whose value table is in a format not judged yet (int4)."""
    try:
        precision = file_precision(model_file)
    except DeployError:
        return  # unreadable: its paths' error says why
    if precision not in ("fp32", *REDUCED):
        raise PathUnavailable(
            f"{model_file.path.name}: its value table is stored as {precision}, which is not judged yet "
            "(fp32, fp16, bf16 and int8 are)"
        )


def parse_file_path(name: str) -> ExecutionPath | None:
    """The file path of this name, or None where ``name`` is not one."""
    from conformance.deploy import file_of
    from conformance.precision import split_name

    file = file_of(name)
    if file is None:
        return None
    base, precision = split_name(name)
    for kind in KINDS:
        if base == f"ort-{kind}[file:{file}]":
            return FileOrtPath(kind, file, precision)
    if base == f"onnx-reference[file:{file}]":
        return FileReferencePath(file, precision)
    return None
