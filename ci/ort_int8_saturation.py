#!/usr/bin/env python3
"""Shows whether ONNX Runtime's int8 products are exact on this CPU.

    python3 ci/ort_int8_saturation.py

Runs a `MatMulInteger` (uint8 activation 255 by an int8 weight 127, then by a uint8 weight
255; contraction 64) through ONNX Runtime on one thread and prints each sum next to the exact
one. On x86 CPUs without
AVX-512 VNNI, ONNX Runtime's u8 x s8 kernel multiplies byte pairs with `vpmaddubsw`, whose
16-bit pair sums saturate at 32767 (2 * 255 * 127 = 64770): the sum comes out about half.
edgevlm's int8 kernels are exact on every CPU (its AVX2 kernel widens to 16 bits and uses
`vpmaddwd`), which costs it speed against ONNX Runtime on such CPUs: compare int8 ratios
there with the uint8 export's, where both sides are exact. Exit code 0 either way.
"""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

k, n = 64, 16
x = np.full((1, k), 255, dtype=np.uint8)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
for name, w in [("u8 x s8 (int8 export)", np.full((k, n), 127, dtype=np.int8)),
                ("u8 x u8 (uint8 export)", np.full((k, n), 255, dtype=np.uint8))]:
    dtype = TensorProto.INT8 if w.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = int(session.run(None, {"x": x})[0][0, 0])
    exact = int(x.astype(np.int64)[0] @ w.astype(np.int64)[:, 0])
    verdict = "exact" if got == exact else "NOT exact (saturated 16-bit pair sums)"
    print(f"onnxruntime {ort.__version__} MatMulInteger {name}: {got}, exact {exact}: {verdict}")
