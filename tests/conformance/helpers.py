"""Editing goldens the way an attacker or a bit flip would: consistently hashed."""

import json

import numpy as np
from onnx import numpy_helper

from conformance.golden import DATA_SET, sha256


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
