"""Export a trained :class:`~padmmirnn.api.Model` for other stacks (the ``export``
extra: ``pip install 'padmmirnn[export]'``). Every cell (Elman, GRU, LSTM) and any
number of layers; padmmirnn holds each layer's weights gate-stacked in PyTorch's order
(``U = W_ih``, ``W = W_hh``, ``b``, and a GRU's ``bh``; :mod:`padmmirnn.nn.params`).

* ``torch``: a safetensors file whose tensors load into ``torch.nn.RNN`` /
  ``torch.nn.GRU`` / ``torch.nn.LSTM(input_size, hidden, num_layers=L,
  batch_first=True)`` (prefix ``rnn.``) and an ``nn.Linear(hidden, classes)`` head
  (prefix ``head.``) with ``load_state_dict``. Per layer ``k``: ``rnn.weight_ih_l{k} =
  U``, ``rnn.weight_hh_l{k} = W``, ``rnn.bias_ih_l{k} = b`` and ``rnn.bias_hh_l{k} = 0``,
  except a GRU's, which is ``[0, 0, bh]``: PyTorch's GRU adds ``b_hn`` inside the reset
  product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, and only there does the
  split of a bias between ``b_ih`` and ``b_hh`` matter. Gate blocks in PyTorch's order:
  LSTM ``i, f, g, o``, GRU ``r, z, n``. The head is ``V``, ``c``. The metadata name the
  cell (``cell``: rnn, gru, lstm, and ``module``: RNN, GRU, LSTM), ``num_layers``, the
  Elman ``nonlinearity``, the input kind and size and the layout. A token model's
  ``weight_ih_l0`` is ``[G h, vocab]``: feed one-hot rows (or use its transpose as an
  ``nn.Embedding`` followed by an identity input matrix).
* ``onnx``: a standard graph: per layer one ONNX ``RNN``, ``GRU`` or ``LSTM`` operator
  (time-major, between two transposes, as ONNX Runtime requires; each layer's ``Y``
  feeds the next), then the output layer, softmax included for cross-entropy models.
  ONNX orders the gate blocks differently, so they are permuted: LSTM ``i, o, f, c``
  (PyTorch's blocks 0, 3, 1, 2), GRU ``z, r, h`` (PyTorch's 1, 0, 2); its bias ``B`` is
  ``[Wb; Rb]`` (``[1, 2 G h]``): ``Wb = b`` permuted, ``Rb = 0`` except the GRU's
  ``Rb_h = bh``, with ``linear_before_reset = 1`` (PyTorch's GRU, and padmmirnn's).
  Inputs as :meth:`Model.predict` takes them: float ``[N, T, d]``, or int64 ids ``[N,
  T]``, for which a ``Gather`` of ``U^T`` (gate blocks permuted) feeds the first layer
  with an identity input matrix; the batch size and the sequence length are dynamic.
  With ``lengths`` a second input ``lengths`` (int32 ``[N]``, each in [1, T]) feeds every
  recurrent operator's ``sequence_lens``: the operators stop each sequence at its
  length, ``Y_h`` is its last real state (the many-to-one output, as padmmirnn reads it
  with lengths) and ``Y`` is zero past it (a many-to-many model's rows there are not
  outputs: padmmirnn masks them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from padmmirnn.api import Model

FORMATS = ("onnx", "torch")
# ONNX's gate blocks, as indices of PyTorch's (padmmirnn's) blocks
ONNX_GATES = {"rnn": (0,), "lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}
ONNX_OPS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
TORCH_MODULES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"exporting needs {module.split('.')[0]}: pip install "
                         f"'padmmirnn[export]'") from None


def _bias_hh(model: Model, layer: int) -> np.ndarray:
    """PyTorch's ``b_hh`` of ``layer``: zero, but ``b_hn = bh`` for a GRU."""
    w = model.params.layer(layer)
    out = np.zeros_like(w.b)
    if w.bh is not None:
        out[2 * model.params.hidden:] = w.bh
    return out


def torch_tensors(model: Model) -> dict[str, np.ndarray]:
    """The float32 tensors of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (``rnn.*``, every layer)
    and its ``nn.Linear`` head (``head.*``)."""
    p = model.params
    tensors = {}
    for k in range(p.layers):
        w = p.layer(k)
        tensors.update({f"rnn.weight_ih_l{k}": w.U, f"rnn.weight_hh_l{k}": w.W,
                        f"rnn.bias_ih_l{k}": w.b, f"rnn.bias_hh_l{k}": _bias_hh(model, k)})
    tensors.update({"head.weight": p.V, "head.bias": p.c})
    return {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}


def torch_metadata(model: Model) -> dict[str, str]:
    """What the loader needs to know: the cell and its PyTorch module, the layers, the
    Elman nonlinearity, the input kind and size, the layout and the loss."""
    cell = model.net.cell.name
    return {"cell": cell, "module": f"torch.nn.{TORCH_MODULES[cell]}",
            "num_layers": str(model.params.layers), "nonlinearity": model.activation,
            "input_kind": model.input_kind, "input_size": str(model.input_dim),
            "hidden_size": str(model.params.hidden),
            "many_to_many": str(model.many_to_many).lower(), "loss": model.loss}


def to_torch(model: Model, path: str | Path) -> None:
    """Write :func:`torch_tensors` as safetensors, with :func:`torch_metadata`."""
    save_file = _need("safetensors.numpy").save_file
    save_file(torch_tensors(model), str(path), metadata=torch_metadata(model))


def onnx_gates(a: np.ndarray, cell: str, h: int) -> np.ndarray:
    """``a`` (gate blocks of ``h`` rows along axis 0, PyTorch's order) in ONNX's order."""
    return np.concatenate([a[g * h:(g + 1) * h] for g in ONNX_GATES[cell]], axis=0)


def onnx_model(model: Model, opset: int = 17, lengths: bool = False):
    """The ONNX graph of ``model`` (an ``onnx.ModelProto``, checked): one recurrent
    operator per layer in ONNX's gate order (:func:`onnx_gates`), then ``V s + c`` and,
    for cross-entropy models, a softmax; ``lengths``: the second input ``lengths``, every
    operator's ``sequence_lens``."""
    onnx = _need("onnx")
    from onnx import TensorProto, helper, numpy_helper

    p = model.params
    cell, h = model.net.cell.name, p.hidden
    rows = model.net.cell.gates * h
    f32 = np.float32
    init = {"VT": np.ascontiguousarray(p.V.T, f32), "c": p.c.astype(f32),
            "axis0": np.array([0], np.int64), "axis1": np.array([1], np.int64)}
    nodes = []
    if model.input_kind == "tokens":  # U x_t = the columns of U: a gather, then identity
        x_in = helper.make_tensor_value_info("inputs", TensorProto.INT64, ["batch", "steps"])
        init["E"] = np.ascontiguousarray(onnx_gates(p.U, cell, h).T, f32)
        nodes.append(helper.make_node("Gather", ["E", "inputs"], ["x"], axis=0))
        first, batch_first = np.eye(rows, dtype=f32), "x"
    else:
        x_in = helper.make_tensor_value_info("inputs", TensorProto.FLOAT,
                                             ["batch", "steps", model.input_dim])
        first, batch_first = onnx_gates(p.U, cell, h), "inputs"
    # ONNX Runtime runs the recurrent operators time-major only (layout 0): [T, N, .]
    nodes.append(helper.make_node("Transpose", [batch_first], ["x0"], perm=[1, 0, 2]))
    attrs = {"hidden_size": h}
    if cell == "rnn":
        attrs["activations"] = ["Tanh" if model.activation == "tanh" else "Relu"]
    elif cell == "gru":
        attrs["linear_before_reset"] = 1
    inputs = [x_in]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    for k in range(p.layers):
        w = p.layer(k)
        init[f"W{k}"] = (first if k == 0 else onnx_gates(w.U, cell, h))[None].astype(f32)
        init[f"R{k}"] = onnx_gates(w.W, cell, h)[None].astype(f32)
        init[f"B{k}"] = np.concatenate([onnx_gates(w.b, cell, h),
                                        onnx_gates(_bias_hh(model, k), cell, h)])[None].astype(f32)
        nodes.append(helper.make_node(ONNX_OPS[cell], [f"x{k}", f"W{k}", f"R{k}", f"B{k}",
                                                       *(["lengths"] if lengths else [])],
                                      [f"Y{k}", f"Y_h{k}"], **attrs))
        if k + 1 < p.layers or model.many_to_many:  # Y [T, 1, N, h] -> [T, N, h]
            nodes.append(helper.make_node("Squeeze", [f"Y{k}", "axis1"], [f"x{k + 1}"]))
    top = p.layers - 1
    if model.many_to_many:  # [T, N, h] -> [N, T, h]
        nodes.append(helper.make_node("Transpose", [f"x{top + 1}"], ["s"], perm=[1, 0, 2]))
        shape = ["batch", "steps", model.classes]
    else:  # Y_h [1, N, h] -> [N, h]
        nodes.append(helper.make_node("Squeeze", [f"Y_h{top}", "axis0"], ["s"]))
        shape = ["batch", model.classes]
    nodes.append(helper.make_node("MatMul", ["s", "VT"], ["Vs"]))
    ce = model.loss == "ce"
    nodes.append(helper.make_node("Add", ["Vs", "c"], ["logits" if ce else "outputs"]))
    if ce:
        nodes.append(helper.make_node("Softmax", ["logits"], ["outputs"], axis=-1))
    name = "probabilities" if ce else "logits"
    nodes[-1].output[0] = name
    out = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, f"padmmirnn_{cell}", inputs, [out],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="padmmirnn")
    onnx.checker.check_model(proto)
    return proto


def to_onnx(model: Model, path: str | Path, lengths: bool = False) -> None:
    """Write :func:`onnx_model` to ``path``."""
    onnx = _need("onnx")
    onnx.save(onnx_model(model, lengths=lengths), str(path))


def export(model: Model, fmt: str, path: str | Path, lengths: bool = False) -> None:
    """Write ``model`` in ``fmt`` (``onnx`` or ``torch``) to ``path``, atomically;
    ``lengths``: the ONNX graph takes sequence lengths (:func:`onnx_model`)."""
    from padmmirnn.atomic import atomic_path

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if lengths and fmt != "onnx":
        raise ValueError("--lengths is for --format onnx (PyTorch takes lengths through "
                         "torch.nn.utils.rnn.pack_padded_sequence)")
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            to_onnx(model, tmp, lengths)
        else:
            to_torch(model, tmp)
