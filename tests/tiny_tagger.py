"""A tiny WD14-format tagger (model.onnx built with the onnx helper API + selected_tags.csv) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# name, category, weights on (B, G, R) means in 0..1, bias: the score is sigmoid(w . mean + b)
TAGS = [
    ("general", 9, (0, 0, 0), 2.0),  # 0.88
    ("explicit", 9, (0, 0, 0), -2.0),
    ("red_hair", 0, (0, 0, 10), -5.0),  # a red image: 0.99, a blue one: 0.007
    ("blue_sky", 0, (10, 0, 0), -5.0),
    ("half_sure", 0, (0, 0, 0), 0.0),  # 0.5 everywhere: in at threshold 0.35, out at 0.6
    ("^_^", 0, (0, 0, 0), 3.0),  # a kaomoji keeps its underscore
    ("watermark", 0, (0, 0, 0), 4.0),  # excluded in one test
    ("hero_(series)", 4, (0, 0, 0), 1.5),  # character, 0.82: under the 0.85 default
]
SIZE = 32


def build_tagger(folder: Path) -> Path:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'sdstudio[test]')")
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T / 255.0  # inputs are 0..255
    bias = np.array([t[3] for t in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
         numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _w, _b) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder
