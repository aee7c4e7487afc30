"""Export a trained :class:`~padmmirnn.api.Model` for other stacks (the ``export``
extra: ``pip install 'padmmirnn[export]'``).

* ``torch``: a safetensors file whose tensors load into ``torch.nn.RNN(input_size,
  hidden, nonlinearity=..., batch_first=True)`` (prefix ``rnn.``) and an
  ``nn.Linear(hidden, classes)`` head (prefix ``head.``) with ``load_state_dict``.
  PyTorch's RNN computes ``h_t = f(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, so
  ``W_ih = U``, ``W_hh = W``, ``b_ih = b``, ``b_hh = 0``, and the head is ``V``, ``c``.
  A token model's ``U`` is ``[h, vocab]``: feed one-hot rows (or use its transpose as an
  ``nn.Embedding``).
* ``onnx``: a standard graph: the ONNX ``RNN`` operator (time-major, between two
  transposes, as ONNX Runtime requires) and the output layer, softmax included for
  cross-entropy models. Inputs as :meth:`Model.predict` takes them (float ``[N, T,
  d]`` or int64 ids ``[N, T]``, for which a ``Gather`` of ``U^T`` feeds the RNN with
  an identity input matrix); the batch size and the sequence length are dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from padmmirnn.api import Model

FORMATS = ("onnx", "torch")


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"exporting needs {module.split('.')[0]}: pip install "
                         f"'padmmirnn[export]'") from None


def torch_tensors(model: Model) -> dict[str, np.ndarray]:
    """The float32 tensors of ``nn.RNN`` (``rnn.*``) and its ``nn.Linear`` head
    (``head.*``)."""
    p = model.params
    tensors = {"rnn.weight_ih_l0": p.U, "rnn.weight_hh_l0": p.W, "rnn.bias_ih_l0": p.b,
               "rnn.bias_hh_l0": np.zeros_like(p.b), "head.weight": p.V, "head.bias": p.c}
    return {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}


def to_torch(model: Model, path: str | Path) -> None:
    """Write :func:`torch_tensors` as safetensors, with what the loader needs to know
    in its metadata (nonlinearity, input kind and size, many-to-many)."""
    save_file = _need("safetensors.numpy").save_file
    meta = {"nonlinearity": model.activation, "input_kind": model.input_kind,
            "input_size": str(model.input_dim), "hidden_size": str(model.params.W.shape[0]),
            "many_to_many": str(model.many_to_many).lower(), "loss": model.loss}
    save_file(torch_tensors(model), str(path), metadata=meta)


def onnx_model(model: Model, opset: int = 17):
    """The ONNX graph of ``model`` (an ``onnx.ModelProto``, checked)."""
    onnx = _need("onnx")
    from onnx import TensorProto, helper, numpy_helper

    p = model.params
    h = p.W.shape[0]
    f32 = np.float32
    init = {"R": p.W[None].astype(f32), "B": np.concatenate([p.b, np.zeros(h)])[None].astype(f32),
            "VT": np.ascontiguousarray(p.V.T, f32), "c": p.c.astype(f32)}
    nodes = []
    if model.input_kind == "tokens":
        x_in = helper.make_tensor_value_info("inputs", TensorProto.INT64, ["batch", "steps"])
        init["E"] = np.ascontiguousarray(p.U.T, f32)
        init["Wx"] = np.eye(h, dtype=f32)[None]
        nodes.append(helper.make_node("Gather", ["E", "inputs"], ["x"], axis=0))
        batch_first = "x"
    else:
        x_in = helper.make_tensor_value_info("inputs", TensorProto.FLOAT,
                                             ["batch", "steps", model.input_dim])
        init["Wx"] = p.U[None].astype(f32)
        batch_first = "inputs"
    # ONNX Runtime runs the RNN operator time-major only (layout 0): [T, N, .]
    nodes.append(helper.make_node("Transpose", [batch_first], ["x_t"], perm=[1, 0, 2]))
    act = "Tanh" if model.activation == "tanh" else "Relu"
    nodes.append(helper.make_node("RNN", ["x_t", "Wx", "R", "B"], ["Y", "Y_h"],
                                  hidden_size=h, activations=[act]))
    if model.many_to_many:  # Y [T, 1, N, h] -> [N, T, h]
        init["axes"] = np.array([1], np.int64)
        nodes.append(helper.make_node("Squeeze", ["Y", "axes"], ["s_t"]))
        nodes.append(helper.make_node("Transpose", ["s_t"], ["s"], perm=[1, 0, 2]))
        shape = ["batch", "steps", model.classes]
    else:  # Y_h [1, N, h] -> [N, h]
        init["axes"] = np.array([0], np.int64)
        nodes.append(helper.make_node("Squeeze", ["Y_h", "axes"], ["s"]))
        shape = ["batch", model.classes]
    nodes.append(helper.make_node("MatMul", ["s", "VT"], ["Vs"]))
    ce = model.loss == "ce"
    nodes.append(helper.make_node("Add", ["Vs", "c"], ["logits" if ce else "outputs"]))
    if ce:
        nodes.append(helper.make_node("Softmax", ["logits"], ["outputs"], axis=-1))
    name = "probabilities" if ce else "logits"
    nodes[-1].output[0] = name
    out = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "padmmirnn_rnn", [x_in], [out],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="padmmirnn")
    onnx.checker.check_model(proto)
    return proto


def to_onnx(model: Model, path: str | Path) -> None:
    """Write :func:`onnx_model` to ``path``."""
    onnx = _need("onnx")
    onnx.save(onnx_model(model), str(path))


def export(model: Model, fmt: str, path: str | Path) -> None:
    """Write ``model`` in ``fmt`` (``onnx`` or ``torch``) to ``path``, atomically."""
    from padmmirnn.atomic import atomic_path

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    with atomic_path(path) as tmp:
        (to_onnx if fmt == "onnx" else to_torch)(model, tmp)
