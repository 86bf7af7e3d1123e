"""ONNX exports of CLIP and DINOv2 vision towers, read by walking the graph from the image input.

The walk follows what the tower computes, not what its tensors are called, so named weights and the
unnamed, pre-transposed ``onnx::MatMul_*`` initializers of ``torch.onnx.export`` read alike:

image -> (Cast) -> patch Conv -> flatten/transpose -> Concat with the class token -> Add positions
(a constant table, or class row + a ``Resize`` of the patch table) -> [registers inserted after the
class token] -> [ln_pre] -> blocks -> final norm.

A block is found at the residual stream x as ``LN(x)`` feeding an ``Add(x, branch)``: the attention
branch (q, k, v projections of LN(x) or one packed projection, softmax(q k^T * scale) v, output
projection, optional LayerScale), then the same for the MLP (fc1, GELU or QuickGELU, fc2, optional
LayerScale). LayerNorm may be one ``LayerNormalization`` node or its decomposition. After the last
block the final norm is found on x (DINOv2 ``norm``) or on its class token (CLIP ``ln_post``);
anything after it (a decoder, a projection) is ignored.

The result is the tower in canonical naming (OpenAI CLIP or DINOv2 hub) plus hints: LayerNorm eps,
activation, heads and the position-resize rule of the graph's own ``Resize``. The ``onnx`` package
is needed only here (``pip install visualad[onnx]``). Initializers stored as external data must
lie in the model's folder; every size is checked before a byte is read.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..backbone import CLIP_BLOCK_NAMES, dinov2_block_names
from ..errors import CheckpointError

_PASS = ("Identity", "Cast", "Dropout")  # value-preserving on float tensors (Dropout: inference)
_LAYOUT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Contiguous")
_ACT_OPS = ("Mul", "Div", "Add", "Erf", "Sigmoid", "Tanh", "Pow", "Gelu", "Sqrt") + _PASS
_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}
_INT_TYPES = {2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
              12: np.uint32, 13: np.uint64}
_BFLOAT16 = 16
_MAX_FOLD_DEPTH = 64


def looks_like_onnx(path: str) -> bool:
    """True for a ``.onnx`` file, or a file whose first bytes are an ONNX ModelProto (field 1,
    ``ir_version``, a small varint, followed by another ModelProto field) and not a safetensors
    header (8-byte length, then ``{``)."""
    lower = path.lower()
    if lower.endswith(".onnx"):
        return True
    if lower.endswith(".safetensors"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[0] == 0x08 and 1 <= head[1] <= 20 and head[2] in (
        0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A) and head[8:9] != b"{"


@dataclass
class OnnxTower:
    """A tower read from a graph: canonical ``tensors`` of ``family`` and ``hints`` (ln_eps,
    activation, heads, pos_resize and, for a cubic Resize, pos_cubic_a)."""

    family: str
    tensors: dict
    hints: dict = field(default_factory=dict)


@dataclass
class _Norm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float
    output: str


class _Graph:
    """Producer / consumer maps and constant folding over one ONNX graph."""

    def __init__(self, model, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        graph = model.graph
        self.tensors = {t.name: t for t in graph.initializer}
        self.producer: dict = {}
        self.consumers: dict = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph = graph
        self._folded: dict = {}
        self.shapes = self._static_shapes(model)

    @staticmethod
    def _static_shapes(model) -> dict:
        """{tensor: dims with None where unknown} from ONNX shape inference (empty if it fails)."""
        import onnx
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # shape inference is a help, not a requirement
            return {}
        out = {}
        for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return out

    # ------------------------------------------------------------------ errors and attributes
    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: {what}")

    @staticmethod
    def attr(node, name, default=None):
        import onnx.helper
        for a in node.attribute:
            if a.name == name:
                value = onnx.helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    # ------------------------------------------------------------------ tensors
    def _external(self, t) -> np.ndarray:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location):
            self.fail(f"initializer '{t.name}': external data location {location!r} is not a relative path")
        target = os.path.realpath(os.path.join(self.folder, location))
        if os.path.commonpath([target, os.path.realpath(self.folder)]) != os.path.realpath(self.folder):
            self.fail(f"initializer '{t.name}': external data file {location!r} lies outside the model's "
                      "folder (refused)")
        if not os.path.isfile(target):
            self.fail(f"initializer '{t.name}': external data file {location!r} does not exist")
        dtype = self._dtype(t)
        nbytes = self._numel(t) * np.dtype(dtype).itemsize
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", nbytes))
        except ValueError:
            self.fail(f"initializer '{t.name}': external data offset/length are not integers")
        size = os.path.getsize(target)
        if offset < 0 or length != nbytes or offset + length > size:
            self.fail(f"initializer '{t.name}': external data ({location!r}, offset {offset}, length {length}) "
                      f"does not hold {nbytes} bytes inside a file of {size}")
        out = np.empty(self._numel(t), dtype=np.dtype(dtype).newbyteorder("<"))
        with open(target, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(out).cast("B")) != nbytes:
                self.fail(f"initializer '{t.name}': external data file {location!r} is truncated")
        return out

    def _dtype(self, t):
        if t.data_type in _FLOAT_TYPES:
            return _FLOAT_TYPES[t.data_type]
        if t.data_type in _INT_TYPES:
            return _INT_TYPES[t.data_type]
        if t.data_type == _BFLOAT16:
            return np.uint16
        self.fail(f"tensor '{t.name}' has unsupported element type {t.data_type}")

    def _numel(self, t) -> int:
        if any(d < 0 for d in t.dims) or len(t.dims) > 8:
            self.fail(f"tensor '{t.name}' has invalid dims {list(t.dims)}")
        n = math.prod(t.dims)
        if n > 1 << 34:
            self.fail(f"tensor '{t.name}' is too large ({list(t.dims)})")
        return n

    def to_array(self, t) -> np.ndarray:
        """A TensorProto as a NumPy array, its size checked against its dims first."""
        import onnx
        from onnx import numpy_helper
        dtype = self._dtype(t)
        n = self._numel(t)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            flat = self._external(t)
        elif t.HasField("raw_data"):
            if len(t.raw_data) != n * np.dtype(dtype).itemsize:
                self.fail(f"tensor '{t.name}' holds {len(t.raw_data)} bytes, its dims {list(t.dims)} need "
                          f"{n * np.dtype(dtype).itemsize}")
            flat = np.frombuffer(t.raw_data, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            try:
                flat = numpy_helper.to_array(t).reshape(-1)
            except Exception as exc:  # malformed typed fields
                self.fail(f"tensor '{t.name}' cannot be read ({type(exc).__name__}: {exc})")
            if flat.size != n:
                self.fail(f"tensor '{t.name}' holds {flat.size} values, its dims {list(t.dims)} need {n}")
            if t.data_type == _BFLOAT16:
                flat = flat.astype(np.uint16)
        if t.data_type == _BFLOAT16:
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        return np.array(flat, dtype=flat.dtype.newbyteorder("=")).reshape(tuple(t.dims))

    # ------------------------------------------------------------------ navigation
    def node_of(self, name: str, skip=_PASS):
        """The node producing ``name``, looking through value-preserving nodes."""
        node = self.producer.get(name)
        while node is not None and node.op_type in skip and node.input and node.input[0]:
            node = self.producer.get(node.input[0])
        return node

    def through(self, name: str, skip=_PASS) -> str:
        """``name`` with value-preserving producers looked through."""
        node = self.producer.get(name)
        while node is not None and node.op_type in skip and node.input and node.input[0]:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def users(self, name: str, op: str | None = None) -> list:
        return [n for n in self.consumers.get(name, []) if op is None or n.op_type == op]

    def depends_on(self, name: str, target: str, limit: int = 4000) -> bool:
        """True when ``target`` is among the ancestors of ``name`` (a bounded search)."""
        stack, seen = [name], set()
        while stack and len(seen) < limit:
            t = stack.pop()
            if t == target:
                return True
            if t in seen:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return False

    # ------------------------------------------------------------------ constant folding
    def fold(self, name: str, depth: int = 0):
        """The value of ``name`` when it depends on constants only (initializers, Constant nodes and
        the few shape/arithmetic ops exports build them with), else None."""
        if name in self._folded:
            return self._folded[name]
        if depth > _MAX_FOLD_DEPTH:
            return None
        value = self._fold(name, depth)
        self._folded[name] = value
        return value

    def _fold(self, name: str, depth: int):
        if name in self.tensors:
            return self.to_array(self.tensors[name])
        node = self.producer.get(name)
        if node is None:
            return None
        op = node.op_type
        if op == "Constant":
            return self._constant(node)
        if op == "Shape":
            if self.attr(node, "start") or self.attr(node, "end") is not None:
                return None
            value = self.fold(node.input[0], depth + 1)
            dims = list(value.shape) if value is not None else self.shapes.get(node.input[0])
            return np.array(dims, np.int64) if dims is not None and None not in dims else None
        args = [self.fold(i, depth + 1) if i else None for i in node.input]
        if op in ("Gather", "Slice") and args and args[0] is None:
            args[0] = self._partial_shape(node.input[0], node, args)
        if not args or args[0] is None:
            return None
        a = args[0]
        try:
            if op in ("Identity", "Dropout"):
                return a
            if op == "Cast":
                to = self.attr(node, "to")
                return a.astype(_FLOAT_TYPES.get(to) or _INT_TYPES.get(to) or a.dtype)
            if op in ("Add", "Sub", "Mul", "Div", "Pow") and len(args) == 2 and args[1] is not None:
                b = args[1]
                if op == "Div" and np.issubdtype(a.dtype, np.integer):
                    return np.trunc(a / b).astype(a.dtype)
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
                        "Pow": np.power}[op](a, b).astype(np.result_type(a, b) if op != "Pow" else a.dtype)
            if op == "Sqrt":
                return np.sqrt(a)
            if op == "Floor":
                return np.floor(a)
            if op == "Transpose":
                return np.transpose(a, self.attr(node, "perm") or None)
            if op == "Reshape":
                entries = args[1].tolist() if args[1] is not None else self.shape_entries(node.input[1])
                if entries is None or entries.count(None) > (0 if -1 in entries else 1):
                    return None  # a target computed at run time beyond one free entry
                shape = [-1 if s is None else (a.shape[i] if (s == 0 and not self.attr(node, "allowzero", 0)) else s)
                         for i, s in enumerate(entries)]
                return a.reshape(shape)
            if op == "Unsqueeze":
                axes = self.attr(node, "axes") or (args[1].tolist() if len(args) > 1 and args[1] is not None else None)
                if axes is None:
                    return None
                out = a
                for ax in sorted(x % (a.ndim + len(axes)) for x in axes):
                    out = np.expand_dims(out, ax)
                return out
            if op == "Squeeze":
                axes = self.attr(node, "axes") or (args[1].tolist() if len(args) > 1 and args[1] is not None else None)
                return np.squeeze(a, axis=tuple(axes) if axes is not None else None)
            if op == "Concat" and all(x is not None for x in args):
                return np.concatenate(args, axis=self.attr(node, "axis", 0))
            if op == "Gather" and args[1] is not None:
                return np.take(a, args[1], axis=self.attr(node, "axis", 0))
            if op == "Slice":
                return self._slice(node, a, args)
        except (ValueError, IndexError, TypeError) as exc:
            self.fail(f"node {node.name or op!r} ({op}) cannot be evaluated on its constants ({exc})")
        return None

    def _partial_shape(self, name: str, user, args):
        """For Gather / Slice of Shape(x) with x's shape partly known: the shape with unknown dims
        as -2 placeholders when the selected entries are all known, else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Shape" or self.attr(node, "start") or self.attr(node, "end") is not None:
            return None
        dims = self.shapes.get(node.input[0])
        if not dims:
            return None
        placeholder = np.array([-2 if v is None else v for v in dims], np.int64)
        try:
            picked = self._slice(user, placeholder, [placeholder] + args[1:]) if user.op_type == "Slice" \
                else np.take(placeholder, args[1], axis=0) if args[1] is not None else None
        except (ValueError, IndexError, TypeError):
            return None
        return placeholder if picked is not None and not (np.asarray(picked) == -2).any() else None

    def shape_entries(self, name: str):
        """The entries of a 1-D shape tensor built by Concat, with None where an entry is only known
        at run time; None when it is not such a Concat."""
        value = self.fold(name)
        if value is not None:
            return value.reshape(-1).tolist()
        concat = self.node_of(name)
        if concat is None or concat.op_type != "Concat":
            return None
        entries = []
        for i in concat.input:
            v = self.fold(i)
            entries.extend(v.reshape(-1).tolist() if v is not None else [None])
        return entries

    def _constant(self, node):
        import onnx.helper
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            if a.name in ("value", "sparse_value"):
                if a.name == "sparse_value":
                    return None
                return self.to_array(value)
            if a.name in ("value_float", "value_int"):
                return np.array(value, np.float32 if a.name == "value_float" else np.int64)
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(value), np.float32 if a.name == "value_floats" else np.int64)
        return None

    def _slice(self, node, a, args):
        if len(args) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
            if any(x is None for x in args[1:3]):
                return None
            starts, ends = args[1].tolist(), args[2].tolist()
            axes = args[3].tolist() if len(args) > 3 and args[3] is not None else list(range(len(starts)))
            steps = args[4].tolist() if len(args) > 4 and args[4] is not None else [1] * len(starts)
        else:
            starts, ends = self.attr(node, "starts"), self.attr(node, "ends")
            axes = self.attr(node, "axes") or list(range(len(starts)))
            steps = [1] * len(starts)
        index = [slice(None)] * a.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[ax] = slice(s, e, st)
        return a[tuple(index)]

    def slice_bounds(self, node):
        """(start, end, axis) of a single-axis Slice node with constant bounds, else None."""
        if node is None or node.op_type != "Slice" or len(node.input) < 3:
            return None
        starts, ends = self.fold(node.input[1]), self.fold(node.input[2])
        axes = self.fold(node.input[3]) if len(node.input) > 3 and node.input[3] else np.array([0])
        if starts is None or ends is None or axes is None or starts.size != 1:
            return None
        return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(axes.reshape(-1)[0])

    def const_through(self, name: str):
        """The constant behind ``name`` looking through broadcasts and reshapes (Expand, Tile,
        Reshape, ...), as fed to the tower (e.g. an expanded class token)."""
        for _ in range(_MAX_FOLD_DEPTH):
            value = self.fold(name)
            if value is not None:
                return value
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Expand", "Tile") + _PASS + _LAYOUT:
                return None
            name = node.input[0]
        return None

    def vector(self, name: str, n: int, what: str) -> np.ndarray:
        value = self.const_through(name)
        if value is None or not np.issubdtype(value.dtype, np.floating) or value.size != n:
            got = "not a constant" if value is None else f"shape {value.shape}"
            self.fail(f"{what}: expected a constant of {n} floats, got {got}")
        return np.ascontiguousarray(value.reshape(n), np.float32)

    def scalar(self, name: str):
        value = self.fold(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])


# ---------------------------------------------------------------------- LayerNorm


def _layernorm(g: _Graph, x: str, d: int, what: str) -> _Norm | None:
    """The LayerNorm over the last axis applied to ``x``, or None when none is."""
    for node in g.users(x):
        if node.op_type == "LayerNormalization" and node.input[0] == x:
            axis = g.attr(node, "axis", -1)
            if axis not in (-1, 2):
                g.fail(f"{what}: LayerNormalization over axis {axis}, expected the last")
            w = g.vector(node.input[1], d, f"{what} weight")
            b = g.vector(node.input[2], d, f"{what} bias") if len(node.input) > 2 and node.input[2] \
                else np.zeros(d, np.float32)
            return _Norm(w, b, float(g.attr(node, "epsilon", 1e-5)), node.output[0])
        if node.op_type == "ReduceMean":
            norm = _decomposed_layernorm(g, x, node, d, what)
            if norm is not None:
                return norm
    return None


def _last_axis_mean(g: _Graph, node) -> bool:
    axes = g.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        folded = g.fold(node.input[1])
        axes = folded.tolist() if folded is not None else None
    return axes is not None and list(np.reshape(axes, -1)) in ([-1], [2]) and g.attr(node, "keepdims", 1) == 1


def _only(nodes: list, op: str):
    found = [n for n in nodes if n.op_type == op]
    return found[0] if len(found) == 1 else None


def _other(node, name: str) -> str:
    ins = [i for i in node.input if i]
    if len(ins) != 2 or name not in ins:
        return ""
    return ins[1] if ins[0] == name else ins[0]


def _decomposed_layernorm(g: _Graph, x: str, mean_node, d: int, what: str) -> _Norm | None:
    """mean = ReduceMean(x); c = x - mean; var = ReduceMean(c^2); y = c / sqrt(var + eps) * w + b."""
    if not _last_axis_mean(g, mean_node):
        return None
    sub = _only([n for n in g.users(mean_node.output[0]) if n.input[0] == x], "Sub")
    if sub is None:
        return None
    c = sub.output[0]
    pow_node, div = _only(g.users(c), "Pow"), _only(g.users(c), "Div")
    if pow_node is None or div is None or g.scalar(pow_node.input[1]) != 2.0:
        return None
    var = _only(g.users(pow_node.output[0]), "ReduceMean")
    if var is None or not _last_axis_mean(g, var):
        return None
    add = _only(g.users(var.output[0]), "Add")
    eps = g.scalar(_other(add, var.output[0])) if add is not None else None
    sqrt = _only(g.users(add.output[0]), "Sqrt") if add is not None else None
    if eps is None or sqrt is None or div.input[1] != sqrt.output[0]:
        return None
    mul = _only(g.users(div.output[0]), "Mul")
    if mul is None:
        g.fail(f"{what}: LayerNorm without a weight")
    w = g.vector(_other(mul, div.output[0]), d, f"{what} weight")
    bias = _only(g.users(mul.output[0]), "Add")
    if bias is None:
        g.fail(f"{what}: LayerNorm without a bias")
    b = g.vector(_other(bias, mul.output[0]), d, f"{what} bias")
    return _Norm(w, b, eps, bias.output[0])


# ---------------------------------------------------------------------- linear layers


def _linear(g: _Graph, out: str, n_in: int | None, what: str):
    """(W [out, in] (torch layout), b [out] or None, input tensor) of the linear layer producing
    ``out``: Add(MatMul(a, W^T), b) in either order, MatMul alone, or Gemm (on flattened rows:
    reshapes after it are looked through)."""
    node = g.node_of(out, _PASS + ("Reshape", "Flatten"))
    bias = None
    if node is not None and node.op_type == "Add":
        ins = [i for i in node.input if i]
        consts = [i for i in ins if g.fold(i) is not None]
        if len(ins) != 2 or len(consts) != 1:
            g.fail(f"{what}: expected a bias added to a matrix product")
        bias = consts[0]
        node = g.node_of(ins[0] if ins[1] == bias else ins[1])
    if node is not None and node.op_type == "Gemm":
        w = g.fold(node.input[1])
        if w is None or w.ndim != 2 or g.attr(node, "transA", 0) or g.attr(node, "alpha", 1.0) != 1.0:
            g.fail(f"{what}: unsupported Gemm")
        w = w if g.attr(node, "transB", 0) else w.T
        if len(node.input) > 2 and node.input[2]:
            if bias is not None:
                g.fail(f"{what}: two biases")
            bias = node.input[2]
        a = node.input[0]
    elif node is not None and node.op_type == "MatMul":
        wt = g.fold(node.input[1])
        if wt is None or wt.ndim != 2:
            g.fail(f"{what}: the matrix product has no constant 2-D weight")
        w, a = wt.T, node.input[0]
    else:
        g.fail(f"{what}: expected a linear layer (MatMul / Gemm), found "
               f"{node.op_type if node is not None else 'the graph input'}")
    if n_in is not None and w.shape[1] != n_in:
        g.fail(f"{what}: weight has {w.shape[1]} inputs, expected {n_in}")
    b = g.vector(bias, w.shape[0], f"{what} bias") if bias is not None else np.zeros(w.shape[0], np.float32)
    return np.ascontiguousarray(w, np.float32), b, a


# ---------------------------------------------------------------------- attention


@dataclass
class _Path:
    """What lies between a tensor and the op that made it: scalar factors and reshapes passed."""

    node: object
    tensor: str
    scale: float = 1.0
    reshapes: list = field(default_factory=list)


def _walk_back(g: _Graph, name: str, what: str) -> _Path:
    """Back from ``name`` through layout ops, value-preserving ops and scalar Mul / Div."""
    scale, reshapes = 1.0, []
    for _ in range(64):
        node = g.producer.get(name)
        if node is None:
            return _Path(None, name, scale, reshapes)
        if node.op_type in _PASS or node.op_type in _LAYOUT:
            if node.op_type == "Reshape":
                reshapes.append(node)
            name = node.input[0]
            continue
        if node.op_type in ("Mul", "Div"):
            ins = [i for i in node.input if i]
            factor = [g.scalar(i) for i in ins]
            if len(ins) == 2 and (factor[1] is not None or (node.op_type == "Mul" and factor[0] is not None)):
                k = 1 if factor[1] is not None else 0
                f = factor[k]
                scale *= (1.0 / f) if node.op_type == "Div" else f
                name = ins[1 - k]
                continue
        return _Path(node, name, scale, reshapes)
    g.fail(f"{what}: chain of reshapes too long")


def _heads(g: _Graph, reshapes: list, d: int):
    """Number of heads d / dh, dh the last entry of the reshape nearest the attention product
    (the one giving the per-head layout [..., dh]), where it is a constant."""
    for node in reshapes:
        entries = g.shape_entries(node.input[1])
        if not entries or len(entries) < 3:
            continue
        dh = entries[-1]
        if isinstance(dh, (int, float)) and float(dh).is_integer() and 1 <= dh < d and d % int(dh) == 0:
            return d // int(dh)
        return None
    return None


def _projection(g: _Graph, name: str, h: str, d: int, what: str):
    """(W, b, slot or None, scale, heads) of the q, k or v feeding an attention product; slot is
    the index into a packed q|k|v projection."""
    path = _walk_back(g, name, what)
    slot = None
    node = path.node
    if node is not None and node.op_type in ("Gather", "Split", "Slice"):
        slot, source = _packed_slot(g, node, path.tensor, d, what)
        more = _walk_back(g, source, what)
        path = _Path(more.node, more.tensor, path.scale * more.scale, path.reshapes + more.reshapes)
    w, b, a = _linear(g, path.tensor, d, what)
    if g.through(a) != h:
        g.fail(f"{what}: the projection does not read the block's first LayerNorm")
    if w.shape[0] != (3 * d if slot is not None else d):
        g.fail(f"{what}: projection has {w.shape[0]} outputs")
    return w, b, slot, path.scale, _heads(g, path.reshapes, d)


def _packed_slot(g: _Graph, node, tensor: str, d: int, what: str):
    """(slot 0|1|2, source tensor) of one of q, k, v taken out of a packed projection."""
    if node.op_type == "Gather":
        index = g.scalar(node.input[1])
        if index is None or index not in (0, 1, 2):
            g.fail(f"{what}: packed q/k/v taken with a non-constant index")
        return int(index), node.input[0]
    if node.op_type == "Split":
        outputs = list(node.output)
        if len(outputs) != 3 or tensor not in outputs:
            g.fail(f"{what}: packed q/k/v split into {len(outputs)} parts")
        return outputs.index(tensor), node.input[0]
    bounds = g.slice_bounds(node)
    if bounds is None or bounds[1] - bounds[0] not in (1, d) or bounds[0] % (bounds[1] - bounds[0]):
        g.fail(f"{what}: packed q/k/v sliced in an unsupported way")
    return bounds[0] // (bounds[1] - bounds[0]), node.input[0]


def _layer_scale(g: _Graph, branch: str, d: int):
    """(layer scale (d,) float32 or None, the tensor it multiplies): a branch ending in a Mul by a
    constant of d values (DINOv2's LayerScale) is that constant times the tensor before it."""
    node = g.node_of(branch)
    if node is not None and node.op_type == "Mul":
        for i, j in ((0, 1), (1, 0)):
            v = g.fold(node.input[j])
            if v is not None and v.size == d:
                return np.ascontiguousarray(v.reshape(d), np.float32), node.input[i]
    return None, branch


def _attention(g: _Graph, branch: str, h: str, d: int, what: str) -> dict:
    """The attention branch ending at ``branch`` (the tensor added to the residual stream)."""
    ls, branch = _layer_scale(g, branch, d)
    w_o, b_o, a = _linear(g, branch, d, f"{what} output projection")
    pv = _walk_back(g, a, what)
    if pv.node is None or pv.node.op_type != "MatMul":
        g.fail(f"{what}: expected attention weights times values before the output projection")
    soft = g.node_of(pv.node.input[0])
    if soft is None or soft.op_type != "Softmax" or g.attr(soft, "axis", -1) not in (-1, 3):
        g.fail(f"{what}: expected a softmax over the keys")
    scores = _walk_back(g, soft.input[0], what)
    if scores.node is None or scores.node.op_type != "MatMul":
        g.fail(f"{what}: expected the query-key product before the softmax (an attention mask is not supported)")
    wq, bq, sq, scale_q, heads_q = _projection(g, scores.node.input[0], h, d, f"{what} query")
    wk, bk, sk, scale_k, heads_k = _projection(g, scores.node.input[1], h, d, f"{what} key")
    wv, bv, sv, scale_v, heads_v = _projection(g, pv.node.input[1], h, d, f"{what} value")
    if (sq, sk, sv) == (None, None, None):
        qkv_w, qkv_b = np.concatenate([wq, wk, wv]), np.concatenate([bq, bk, bv])
    elif (sq, sk, sv) == (0, 1, 2) and np.array_equal(wq, wk) and np.array_equal(wk, wv):
        qkv_w, qkv_b = wq, bq
    else:
        g.fail(f"{what}: q, k and v come from different packed projections or slots {sq, sk, sv}")
    heads = heads_q or heads_k or heads_v
    if heads is None:
        g.fail(f"{what}: the number of attention heads cannot be read from the reshapes")
    expected = (d // heads) ** -0.5
    scale = scale_q * scale_k * scores.scale
    if scale_v != 1.0 or not math.isclose(scale, expected, rel_tol=1e-5):
        g.fail(f"{what}: attention scale {scale:.6g} is not 1/sqrt(head dim) = {expected:.6g}")
    return dict(qkv_w=qkv_w, qkv_b=qkv_b, proj_w=w_o, proj_b=b_o, ls=ls, heads=heads)


# ---------------------------------------------------------------------- MLP


def _activation(g: _Graph, out: str, what: str) -> tuple[str, str]:
    """(activation name, input tensor) of the elementwise activation producing ``out``."""
    ops, leaves, consts = set(), set(), []
    stack, seen = [out], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        value = g.fold(t)
        if value is not None:
            consts.append(value)
            continue
        node = g.producer.get(t)
        linear_out = node is not None and (node.op_type == "MatMul" or (
            node.op_type == "Add" and any(g.node_of(i) is not None and g.node_of(i).op_type == "MatMul"
                                          for i in node.input)))
        if node is None or linear_out or node.op_type not in _ACT_OPS:
            leaves.add(t)
            continue
        ops.add(node.op_type if node.op_type != "Gelu" else "Gelu:" + str(g.attr(node, "approximate", "none")))
        stack.extend(i for i in node.input if i)
    if len(leaves) != 1:
        g.fail(f"{what}: expected one elementwise activation between the MLP's layers")
    values = {round(float(v.reshape(-1)[0]), 4) for v in consts if v.size == 1}
    if ops <= {"Gelu:none"} | set(_PASS) and ops:
        return "gelu", leaves.pop()
    if "Erf" in ops and not {"Sigmoid", "Tanh"} & ops and (1.4142 in values or 0.7071 in values):
        return "gelu", leaves.pop()
    if "Sigmoid" in ops and not {"Erf", "Tanh"} & ops and 1.702 in values:
        return "quick_gelu", leaves.pop()
    g.fail(f"{what}: unsupported activation (ops {sorted(ops)}); GELU (erf) and QuickGELU are supported")


def _mlp(g: _Graph, branch: str, h: str, d: int, what: str) -> dict:
    ls, branch = _layer_scale(g, branch, d)
    w2, b2, a = _linear(g, branch, None, f"{what} fc2")
    if w2.shape[0] != d:
        g.fail(f"{what} fc2: {w2.shape[0]} outputs, expected the width {d}")
    act, z = _activation(g, a, what)
    w1, b1, x = _linear(g, z, d, f"{what} fc1")
    if w1.shape[0] != w2.shape[1]:
        g.fail(f"{what}: fc1 has {w1.shape[0]} outputs but fc2 {w2.shape[1]} inputs")
    if g.through(x) != h:
        g.fail(f"{what}: fc1 does not read the block's second LayerNorm")
    return dict(fc1_w=w1, fc1_b=b1, fc2_w=w2, fc2_b=b2, ls=ls, activation=act)


# ---------------------------------------------------------------------- blocks


def _residual(g: _Graph, x: str, norm: _Norm):
    """The Add(x, branch) whose branch reads LN(x), or None."""
    for node in g.users(x, "Add"):
        branch = _other(node, x)
        if branch and g.depends_on(branch, norm.output):
            return node, branch
    return None


def _block(g: _Graph, x: str, d: int, index: int):
    """(block dict, output stream) of the block at stream ``x``, or None at the end of the blocks."""
    what = f"block {index}"
    n1 = _layernorm(g, x, d, f"{what} norm1")
    if n1 is None:
        return None
    found = _residual(g, x, n1)
    if found is None:
        return None
    add1, branch = found
    attn = _attention(g, branch, n1.output, d, f"{what} attention")
    x2 = add1.output[0]
    n2 = _layernorm(g, x2, d, f"{what} norm2")
    found = _residual(g, x2, n2) if n2 is not None else None
    if found is None:
        g.fail(f"{what}: no MLP (LayerNorm + residual Add) after the attention")
    add2, branch = found
    mlp = _mlp(g, branch, n2.output, d, f"{what} mlp")
    return dict(norm1=n1, norm2=n2, attn=attn, mlp=mlp), add2.output[0]


def _swap_batch_and_sequence(g: _Graph, x: str) -> tuple[str, bool]:
    """(stream, True) past a Transpose(1, 0, 2) that is the stream's only consumer (OpenAI CLIP
    runs its blocks on [T, B, D]), else (x, False)."""
    users = [n for n in g.users(x) if n.op_type != "Shape"]
    if len(users) == 1 and users[0].op_type == "Transpose" and list(g.attr(users[0], "perm", [])) == [1, 0, 2]:
        return users[0].output[0], True
    return x, False


def _final_norm(g: _Graph, x: str, d: int) -> _Norm | None:
    """The tower's final norm: on the whole stream (DINOv2) or on its class token (CLIP)."""
    norm = _layernorm(g, x, d, "final norm")
    if norm is not None:
        return norm
    for node in g.users(x):
        if node.op_type == "Gather" and g.attr(node, "axis", 0) == 1 and g.scalar(node.input[1]) == 0:
            norm = _layernorm(g, node.output[0], d, "final norm")
        elif node.op_type == "Slice" and g.slice_bounds(node) is not None and g.slice_bounds(node)[0] == 0:
            inner = node.output[0]
            norm = _layernorm(g, inner, d, "final norm")
            for sel in g.users(inner):
                if norm is None and sel.op_type in ("Gather", "Squeeze", "Slice"):
                    norm = _layernorm(g, sel.output[0], d, "final norm")
        if norm is not None:
            return norm
    return None


# ---------------------------------------------------------------------- embeddings


def _image_input(g: _Graph) -> str:
    inputs = [i for i in g.graph.input if i.name not in g.tensors]
    images = [i for i in inputs if len(i.type.tensor_type.shape.dim) == 4]
    if len(images) != 1:
        g.fail(f"expected one 4-D image input, the graph has inputs {[i.name for i in inputs]}")
    return images[0].name


def _forward_one(g: _Graph, name: str, allowed: tuple, what: str):
    """The one consumer of ``name`` (Shape consumers aside), looking through ``allowed`` ops."""
    for _ in range(16):
        users = [n for n in g.users(name) if n.op_type != "Shape"]
        if len(users) != 1:
            g.fail(f"{what}: expected one consumer of '{name}', found {[n.op_type for n in users]}")
        if users[0].op_type not in allowed:
            return users[0]
        name = users[0].output[0]
    g.fail(f"{what}: chain too long")


def _patch_conv(g: _Graph, image: str):
    conv = _forward_one(g, image, _PASS, "patch embedding")
    if conv.op_type != "Conv":
        g.fail(f"patch embedding not found: the image input feeds {conv.op_type}, expected Conv "
               "(normalisation inside the graph is not supported)")
    w = g.fold(conv.input[1])
    if w is None or w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        g.fail("patch embedding: Conv weight is not a constant (D, 3, P, P)")
    p = w.shape[2]
    if (list(g.attr(conv, "strides", [1, 1])) != [p, p] or any(g.attr(conv, "pads", [0] * 4))
            or g.attr(conv, "group", 1) != 1 or list(g.attr(conv, "dilations", [1, 1])) != [1, 1]):
        g.fail(f"patch embedding: Conv {p}x{p} must have stride {p}, no padding, one group")
    d = w.shape[0]
    b = g.vector(conv.input[2], d, "patch embedding bias") if len(conv.input) > 2 and conv.input[2] else None
    return conv, np.ascontiguousarray(w, np.float32), b


def _positions(g: _Graph, pos: str, d: int) -> tuple[np.ndarray, dict | None]:
    """(table [1 + G0^2, D], the Resize node's rule or None) of the positions added to the tokens."""
    table = g.fold(pos)
    if table is not None:
        return np.ascontiguousarray(table.reshape(-1, d), np.float32), None
    cat = g.node_of(pos)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
        g.fail("positions: expected a constant table or class row + resized patch table")
    cls_row = g.vector(cat.input[0], d, "class position")
    node, perm_ok = g.producer.get(cat.input[1]), False
    while node is not None and node.op_type in _PASS + _LAYOUT:
        if node.op_type == "Transpose":
            perm_ok = list(g.attr(node, "perm", [])) == [0, 2, 3, 1]
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Resize" or not perm_ok:
        g.fail("positions: the patch positions are neither constant nor a Resize of a constant table")
    grid_table = g.fold(node.input[0])
    if grid_table is None or grid_table.ndim != 4 or grid_table.shape[:2] != (1, d) or \
            grid_table.shape[2] != grid_table.shape[3]:
        g.fail("positions: the Resize input is not a constant (1, D, G, G) table")
    g0 = grid_table.shape[2]
    patches = grid_table[0].transpose(1, 2, 0).reshape(g0 * g0, d)
    rule = _resize_rule(g, node, g0)
    return np.ascontiguousarray(np.concatenate([cls_row[None], patches]), np.float32), rule


def _resize_rule(g: _Graph, node, g0: int) -> dict:
    """The engine's position rule for the graph's Resize node (docs/method.md §9: ONNX graphs follow their own node)."""
    mode = g.attr(node, "mode", "nearest")
    coord = g.attr(node, "coordinate_transformation_mode", "half_pixel")
    a = float(g.attr(node, "cubic_coeff_a", -0.75))
    if g.attr(node, "antialias", 0) or g.attr(node, "exclude_outside", 0) or \
            mode not in ("cubic", "linear") or coord not in ("half_pixel", "pytorch_half_pixel"):
        g.fail(f"positions: unsupported Resize (mode {mode}, coordinate_transformation_mode {coord}, "
               f"antialias {g.attr(node, 'antialias', 0)}, exclude_outside {g.attr(node, 'exclude_outside', 0)}); "
               "supported: cubic or linear, half_pixel, no antialias")
    sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    scales = node.input[2] if len(node.input) > 2 and node.input[2] else (
        node.input[1] if len(node.input) == 2 else None)
    rule = {"pos_resize": "bicubic_size" if mode == "cubic" else "bilinear", "pos_cubic_a": a}
    if sizes is not None:
        return rule
    value = g.fold(scales) if scales is not None else None
    if value is None or value.size != 4 or value[2] != value[3]:
        g.fail("positions: the Resize scales are not constant and equal on both axes")
    s = float(value[2])
    grid = int(math.floor(g0 * s))
    if np.float32(s) == np.float32((grid + 0.1) / g0) and mode == "cubic" and a == -0.75:
        return {"pos_resize": "bicubic_scale"}  # the hub's offset rule, fixed at export for this grid
    if np.float32(s) == np.float32(grid / g0):
        return rule
    g.fail(f"positions: Resize scale {s} matches neither g/G0 nor (g + 0.1)/G0 for G0 = {g0}")


def _registers(g: _Graph, x: str, d: int):
    """(register tokens [R, D] or None, stream) of tokens inserted after the class token:
    Concat(x[:, :1], registers, x[:, 1:]) along the sequence."""
    for node in g.users(x, "Slice"):
        bounds = g.slice_bounds(node)
        if bounds is None or bounds[:3] != (0, 1, 1):
            continue
        for cat in g.users(node.output[0], "Concat"):
            if g.attr(cat, "axis") != 1 or len(cat.input) != 3 or cat.input[0] != node.output[0]:
                continue
            rest = g.node_of(cat.input[2])
            rb = g.slice_bounds(rest)
            if rest is None or rest.input[0] != x or rb is None or rb[0] != 1 or rb[2] != 1:
                g.fail("registers: the tokens after the class token are not the rest of the sequence")
            reg = g.const_through(cat.input[1])
            if reg is None or reg.size % d or not np.issubdtype(reg.dtype, np.floating):
                g.fail("registers: the inserted tokens are not a constant (R, D) table")
            return np.ascontiguousarray(reg.reshape(-1, d), np.float32), cat.output[0]
    return None, x


def _embeddings(g: _Graph, d: int, conv) -> tuple:
    """(class token, positions, Resize rule, registers, stream) after the embeddings."""
    cat = _forward_one(g, conv.output[0], _PASS + _LAYOUT, "patch tokens")
    if cat.op_type != "Concat" or g.attr(cat, "axis") not in (1, -2) or len(cat.input) != 2:
        g.fail(f"class token not found: the patch tokens feed {cat.op_type}, expected Concat(class, patches)")
    cls = g.vector(cat.input[0], d, "class token")
    adds = g.users(cat.output[0], "Add")
    if len(adds) != 1:
        g.fail("positions not found: expected one Add of positions to the token sequence")
    pos, rule = _positions(g, _other(adds[0], cat.output[0]), d)
    registers, x = _registers(g, adds[0].output[0], d)
    return cls, pos, rule, registers, x


# ---------------------------------------------------------------------- canonical naming


def _block_tensors(blk: dict) -> dict:
    """One block's tensors under the engine's names (the keys of ``CLIP_BLOCK_NAMES``)."""
    a, m = blk["attn"], blk["mlp"]
    t = {"ln1.weight": blk["norm1"].weight, "ln1.bias": blk["norm1"].bias, "qkv.weight": a["qkv_w"],
         "qkv.bias": a["qkv_b"], "proj.weight": a["proj_w"], "proj.bias": a["proj_b"],
         "ln2.weight": blk["norm2"].weight, "ln2.bias": blk["norm2"].bias, "fc1.weight": m["fc1_w"],
         "fc1.bias": m["fc1_b"], "fc2.weight": m["fc2_w"], "fc2.bias": m["fc2_b"]}
    if a["ls"] is not None:
        t["ls1"], t["ls2"] = a["ls"], m["ls"]
    return t


def _canonical(family: str, d: int, conv_w, conv_b, cls, pos, registers, ln_pre, blocks, final) -> dict:
    """The tower's tensors under the family's canonical names (visualad.backbone reads them)."""
    if family == "clip":
        t = {"visual.conv1.weight": conv_w, "visual.class_embedding": cls, "visual.positional_embedding": pos,
             "visual.ln_pre.weight": ln_pre.weight, "visual.ln_pre.bias": ln_pre.bias,
             "visual.ln_post.weight": final.weight, "visual.ln_post.bias": final.bias}
        prefix, names = "visual.transformer.resblocks.{}.", CLIP_BLOCK_NAMES
    else:
        t = {"patch_embed.proj.weight": conv_w, "patch_embed.proj.bias": conv_b, "cls_token": cls.reshape(1, 1, d),
             "pos_embed": pos[None], "norm.weight": final.weight, "norm.bias": final.bias}
        if registers is not None:
            t["register_tokens"] = registers[None]
        prefix = "blocks.{}."
        names = dinov2_block_names(swiglu=False, layerscale=blocks[0]["attn"]["ls"] is not None)
    for i, blk in enumerate(blocks):
        t.update({prefix.format(i) + names[role]: value for role, value in _block_tensors(blk).items()})
    return t


def _family(g: _Graph, conv_b, ln_pre, registers, blocks) -> str:
    layerscale = {blk["attn"]["ls"] is not None for blk in blocks} | {blk["mlp"]["ls"] is not None for blk in blocks}
    if len(layerscale) != 1:
        g.fail("LayerScale is present in some blocks only")
    if ln_pre is not None and conv_b is None and registers is None and layerscale == {False}:
        return "clip"
    if ln_pre is None and conv_b is not None:
        return "dinov2"
    g.fail("the tower is neither CLIP (ln_pre, patch conv without bias) nor DINOv2 (patch conv with bias, "
           "no ln_pre)")


def read_onnx(path: str) -> OnnxTower:
    """Reads the CLIP or DINOv2 vision tower of an ONNX graph (see the module docstring)."""
    try:
        import onnx
    except ImportError:
        raise ImportError(f"{path}: reading ONNX files needs the 'onnx' package "
                          "(pip install 'visualad[onnx]')") from None
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        return _read_tower(_Graph(model, path))
    except CheckpointError:
        raise
    except (ValueError, IndexError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        # a graph malformed in a way no check above anticipated: still a clear error, never a crash
        raise CheckpointError(f"{path}: malformed ONNX graph ({type(exc).__name__}: {exc})") from None


def _read_tower(g: _Graph) -> OnnxTower:
    if not g.graph.node:
        g.fail("the ONNX graph has no nodes")
    conv, conv_w, conv_b = _patch_conv(g, _image_input(g))
    d = conv_w.shape[0]
    cls, pos, rule, registers, x = _embeddings(g, d, conv)
    ln_pre = None
    first = _layernorm(g, x, d, "ln_pre")
    if first is not None and _residual(g, x, first) is None:
        ln_pre, x = first, first.output
    x, seq_first = _swap_batch_and_sequence(g, x)
    blocks = []
    while True:
        found = _block(g, x, d, len(blocks))
        if found is None:
            break
        blocks.append(found[0])
        x = found[1]
        if len(blocks) > 1024:
            g.fail("more than 1024 blocks")
    if not blocks:
        g.fail("no transformer block found after the embeddings (expected LayerNorm + attention + residual Add)")
    if seq_first:
        x, back = _swap_batch_and_sequence(g, x)
        if not back:
            g.fail("the blocks run sequence-first but the stream is not transposed back after them")
    final = _final_norm(g, x, d)
    if final is None:
        g.fail(f"final norm not found after block {len(blocks) - 1}")
    family = _family(g, conv_b, ln_pre, registers, blocks)
    norms = [n for blk in blocks for n in (blk["norm1"], blk["norm2"])] + [final] + ([ln_pre] if ln_pre else [])
    eps = {np.float32(n.eps) for n in norms}
    acts = {blk["mlp"]["activation"] for blk in blocks}
    heads = {blk["attn"]["heads"] for blk in blocks}
    if len(eps) != 1 or len(acts) != 1 or len(heads) != 1:
        g.fail(f"blocks differ in LayerNorm eps {sorted(eps)}, activation {sorted(acts)} or heads {sorted(heads)}")
    hints = {"ln_eps": float(eps.pop()), "activation": acts.pop(), "heads": heads.pop()}
    if rule is not None:
        hints.update(rule)
    tensors = _canonical(family, d, conv_w, conv_b, cls, pos, registers, ln_pre, blocks, final)
    return OnnxTower(family, tensors, hints)
