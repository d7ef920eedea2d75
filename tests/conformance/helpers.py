"""Editing goldens the way an attacker or a bit flip would: consistently hashed."""

import json

import numpy as np
from onnx import numpy_helper

from conformance.golden import DATA_SET, sha256
from conformance.paths import CaseContext, ExecutionPath
from conformance.runner import run_path


def rewrite_tap(project, case: str, index: int, edit) -> None:
    """Apply ``edit`` to the array of output_<index>.pb and fix case.json's sha256, so that
    only the comparison can notice."""
    folder = project.store.case_dir(case)
    pb = folder / DATA_SET / f"output_{index}.pb"
    import onnx

    tensor = onnx.TensorProto()
    tensor.ParseFromString(pb.read_bytes())
    array = numpy_helper.to_array(tensor).copy()
    array = edit(array)
    pb.write_bytes(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name).SerializeToString())
    meta = json.loads((folder / "case.json").read_text())
    meta["sha256"][f"{DATA_SET}/output_{index}.pb"] = sha256(pb)
    (folder / "case.json").write_text(json.dumps(meta, indent=2))


class StubPath(ExecutionPath):
    """Returns the golden taps after ``edit``: a path whose results we choose."""

    name = "torch-eager-cpu"

    def __init__(self, golden, edit):
        self.golden, self.edit = golden, edit

    def prepare(self, context):
        return lambda x: self.edit({k: v.copy() for k, v in self.golden.taps.items()})


def run_stub(project, case_name, edit):
    """``StubPath`` on one case of ``project``, in this process: (its result, the golden)."""
    case = project.cases(case_name)[0]
    golden = project.store.read(case_name)
    context = CaseContext(case, golden.weights)
    return run_path(StubPath(golden, edit), context, golden, project.policy(), required=False), golden
