"""MobileFaceNet (InsightFace's ArcFace "model-y1-test2"), rebuilt in Keras from its MXNet files.

The shared weights folder holds the network as MXNet wrote it: ``*-symbol.json`` (the
graph, layer by layer) and ``*-0000.params`` (MXNet's NDArray file). ``read_params``
reads that file with NumPy (no MXNet), and ``build_mobilefacenet`` walks the symbol's
nodes and makes the same layers in Keras: convolutions (depthwise where the group count
is the channel count; MXNet's symmetric padding as an explicit ``ZeroPadding2D`` where a
stride-2 "same" would pad one side only), BatchNormalization with MXNet's epsilon
(1e-3 unless the node says otherwise; ``fix_gamma`` as a scale of 1), PReLU per channel,
additions, and the fully connected layer. The result maps a 112 x 112 face, already
normalised as the network expects (``(x - 127.5) / 128``, which
``models.preprocess.BackbonePreprocess`` mode ``arcface`` does, so the symbol's two
scalar nodes are checked and skipped), to the 128-d embedding. Faces must be aligned to
the ArcFace five-point template, which ``models.face_crop.alignment_template(112, 0.2)``
is exactly. A test checks that the embedding equals the TFLite conversion's within 1e-3.

The files are checked by sha256 (``KNOWN_SHA256``); a missing or different file is one
line naming it. Licence: InsightFace's pretrained models are for non-commercial research
(docs/model.md says what that means for a model trained from them).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from core.storage import file_sha256

INPUT_SIZE = 112
EMBEDDING = 128
SYMBOL = "model-y1-test2-symbol.json"
PARAMS = "model-y1-test2-0000.params"
TFLITE = "mobilefacenet.tflite"
KNOWN_SHA256 = {
    SYMBOL: "967a17dd970632480609caac8b0a809f4784f1caa333a1d801365f7d34517e55",
    PARAMS: "b151f97e392e68cb540fb9710a91a574a4187d491eeda77d1c1799ae6dc3b82b",
    TFLITE: "83b5245fc21e66002d497c377bf0904d3b6ca4dafbbd55cb2c98ed3711285c23",
}
MXNET_BN_EPS = 1e-3  # MXNet's BatchNorm default
# the symbol's own input normalisation, done by BackbonePreprocess('arcface') instead
INPUT_OPS = {"_minus_scalar": 127.5, "_mul_scalar": 0.0078125}
_NDARRAY_V2, _NDARRAY_V1, _LIST_MAGIC = 0xF993FAC9, 0xF993FAC8, 0x112
_MXNET_FLOAT32 = 0


class MobileFaceNetError(ValueError):
    """The MobileFaceNet files are missing, changed, or not what this module reads."""


# the two files ship with kface (models/data/mobilefacenet, its README: source, sha256,
# licence): ``model.weights: builtin`` names them
BUILTIN = Path(__file__).resolve().parent / "data" / "mobilefacenet"


def weights_folder(weights: str | Path) -> Path:
    """The folder ``weights`` names: ``builtin`` (the files that ship with kface), a
    folder, or either file in it."""
    path = BUILTIN if str(weights) == "builtin" else Path(weights)
    return path if path.is_dir() or not path.suffix else path.parent


def weight_files(weights: str | Path) -> tuple[Path, Path]:
    """The symbol and params files of ``weights`` (``builtin``, their folder, or either
    file), checked by sha256; one line naming the file when one is missing or
    different."""
    path = weights_folder(weights)
    files = (path / SYMBOL, path / PARAMS)
    for file in files:
        if not file.is_file():
            raise MobileFaceNetError(
                f"model.weights: {file} not found: set model.weights to builtin (the "
                f"MobileFaceNet files that ship with kface) or to a folder with {SYMBOL} "
                f"and {PARAMS}")
        digest = file_sha256(file)
        if digest != KNOWN_SHA256[file.name]:
            raise MobileFaceNetError(
                f"model.weights: {file} has sha256 {digest[:12]}..., not the published "
                f"{KNOWN_SHA256[file.name][:12]}...: the file is corrupt or another network")
    return files


def read_params(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an MXNet ``.params`` file (``nd.save``'s list format, dense float32),
    by name without MXNet's ``arg:``/``aux:`` prefix."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    try:
        magic, _ = take("QQ")
        if magic != _LIST_MAGIC:
            raise MobileFaceNetError(f"{path}: not an MXNet NDArray list file")
        arrays = []
        for _ in range(take("Q")[0]):
            head = take("I")[0]
            if head == _NDARRAY_V2:
                if take("i")[0] != 0:
                    raise MobileFaceNetError(f"{path}: sparse arrays are not supported")
                ndim = take("I")[0]
                shape = take(f"{ndim}q")
            elif head == _NDARRAY_V1:
                ndim = take("I")[0]
                shape = take(f"{ndim}q")
            else:  # the oldest format: the head is the dimension count
                shape = take(f"{head}I")
            _, _, dtype = take("iii")  # device type and id, then the element type
            if dtype != _MXNET_FLOAT32:
                raise MobileFaceNetError(f"{path}: element type {dtype} is not float32")
            size = int(np.prod(shape))
            arrays.append(np.frombuffer(data, np.float32, size, offset).reshape(shape).copy())
            offset += 4 * size
        names = []
        for _ in range(take("Q")[0]):
            length = take("Q")[0]
            names.append(data[offset:offset + length].decode())
            offset += length
    except MobileFaceNetError:
        raise
    except (struct.error, ValueError) as exc:  # (NumPy: "buffer is smaller than requested")
        raise MobileFaceNetError(f"{path}: truncated MXNet params file ({exc})") from None
    if len(names) != len(arrays):
        raise MobileFaceNetError(f"{path}: {len(arrays)} arrays but {len(names)} names")
    return {name.split(":", 1)[-1]: array for name, array in zip(names, arrays, strict=True)}


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(v) for v in text.strip("()").split(","))
    return a, b


def build_mobilefacenet(weights: str | Path, name: str = "mobilefacenet",
                        start: str | None = None, stop: str | None = None):
    """The Keras MobileFaceNet with the shared weights loaded: input a normalised
    ``112 x 112 x 3`` face (see the module docstring), output the 128-d embedding (the
    ``fc1`` BatchNormalization, as InsightFace returns it before L2 normalisation).

    ``stop``: the network up to that node's output; ``start``: the network from that
    node's output on (its input has that node's output shape; the node must be a cut
    that no later layer reaches around, such as a block's end). The layers keep their
    names, so weights move between the parts and the whole by name."""
    from keras import Input, Model, layers

    symbol_file, params_file = weight_files(weights)
    nodes = json.loads(symbol_file.read_text())["nodes"]
    params = read_params(params_file)
    names = [n["name"] for n in nodes]
    for cut in (start, stop):
        if cut is not None and cut not in names:
            raise MobileFaceNetError(f"{symbol_file}: no node {cut!r} to cut at")
    first = names.index(start) + 1 if start else 0
    shape = (INPUT_SIZE, INPUT_SIZE, 3)
    if start:  # the cut's output shape, from the part before it (built without weights)
        shape = tuple(_part_shape(nodes, start))
    inputs = Input(shape, name=f"{start}_out" if start else "face")
    tensors: dict[str, object] = {start: inputs} if start else {}
    loads: list[tuple[object, list[np.ndarray]]] = []

    def source(node: dict, k: int = 0):
        upstream = nodes[node["inputs"][k][0]]["name"]
        if upstream not in tensors:
            raise MobileFaceNetError(f"{node['name']} reads {upstream}, before the cut at "
                                     f"{start}: cut at a block's end")
        return tensors[upstream]

    for node in nodes[first:names.index(stop) + 1 if stop else len(nodes)]:
        op, node_name, attrs = node["op"], node["name"], node.get("attrs", {})
        if op == "null":
            if node_name == "data":
                tensors[node_name] = inputs
            continue
        if op in INPUT_OPS:
            if not np.isclose(float(attrs["scalar"]), INPUT_OPS[op]):
                raise MobileFaceNetError(f"{symbol_file}: {node_name} is {attrs['scalar']}, "
                                         f"not the expected {INPUT_OPS[op]}")
            tensors[node_name] = source(node)
        elif op == "Convolution":
            x = source(node)
            kernel, stride, pad = (_pair(attrs[k]) for k in ("kernel", "stride", "pad"))
            filters, groups = int(attrs["num_filter"]), int(attrs.get("num_group", 1))
            weight = params[f"{node_name}_weight"]
            if pad != (0, 0):
                x = layers.ZeroPadding2D(pad, name=f"{node_name}_pad")(x)
            if groups == 1:
                layer = layers.Conv2D(filters, kernel, stride, use_bias=False, name=node_name)
                loads.append((layer, [weight.transpose(2, 3, 1, 0)]))
            elif groups == filters == x.shape[-1]:
                layer = layers.DepthwiseConv2D(kernel, stride, use_bias=False, name=node_name)
                loads.append((layer, [weight.transpose(2, 3, 0, 1)]))
            else:
                raise MobileFaceNetError(f"{symbol_file}: {node_name} is a grouped "
                                         f"convolution ({groups} groups), not supported")
            tensors[node_name] = layer(x)
        elif op == "BatchNorm":
            fixed = attrs.get("fix_gamma", "True") == "True"  # MXNet's default is True
            layer = layers.BatchNormalization(
                epsilon=float(attrs.get("eps", MXNET_BN_EPS)),
                momentum=float(attrs.get("momentum", 0.9)), scale=not fixed, name=node_name)
            stats = [params[f"{node_name}_{k}"] for k in ("beta", "moving_mean", "moving_var")]
            loads.append((layer, stats if fixed else [params[f"{node_name}_gamma"], *stats]))
            tensors[node_name] = layer(source(node))
        elif op == "LeakyReLU":
            if attrs.get("act_type") != "prelu":
                raise MobileFaceNetError(f"{symbol_file}: {node_name}: activation "
                                         f"{attrs.get('act_type')} not supported")
            layer = layers.PReLU(shared_axes=[1, 2], name=node_name)
            loads.append((layer, [params[f"{node_name}_gamma"].reshape(1, 1, -1)]))
            tensors[node_name] = layer(source(node))
        elif op == "elemwise_add":
            tensors[node_name] = layers.Add(name=node_name)([source(node, 0), source(node, 1)])
        elif op == "FullyConnected":
            x = layers.Flatten(name=f"{node_name}_flatten")(source(node))
            weight = params[f"{nodes[node['inputs'][1][0]]['name']}"]
            layer = layers.Dense(int(attrs["num_hidden"]), name=node_name)
            loads.append((layer, [weight.T, params[f"{node_name}_bias"]]))
            tensors[node_name] = layer(x)
        else:
            raise MobileFaceNetError(f"{symbol_file}: operation {op} ({node_name}) is not "
                                     "one this module rebuilds")
    model = Model(inputs, tensors[stop or nodes[-1]["name"]], name=name)
    for layer, values in loads:
        layer.set_weights(values)
    return model


def _part_shape(nodes: list[dict], cut: str) -> tuple[int, ...]:
    """The output shape (without the batch) of node ``cut``, by shape arithmetic."""
    shapes: dict[str, tuple[int, ...]] = {"data": (INPUT_SIZE, INPUT_SIZE, 3)}
    for node in nodes:
        op, attrs = node["op"], node.get("attrs", {})
        if op == "null" or node["name"] in shapes:
            continue
        shape = shapes[nodes[node["inputs"][0][0]]["name"]]
        if op == "Convolution":
            (kh, kw), (sh, sw), (ph, pw) = (_pair(attrs[k]) for k in ("kernel", "stride", "pad"))
            h, w, _ = shape
            shape = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1,
                     int(attrs["num_filter"]))
        elif op == "FullyConnected":
            shape = (int(attrs["num_hidden"]),)
        shapes[node["name"]] = shape
        if node["name"] == cut:
            return shape
    raise MobileFaceNetError(f"no node {cut!r}")


def tflite_embeddings(tflite_file: Path, faces: np.ndarray) -> np.ndarray:
    """The TFLite conversion's embeddings of RGB 0..255 ``112 x 112`` faces (the
    reference the Keras network is tested against; needs TensorFlow)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(tflite_file))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    result = []
    for face in np.asarray(faces, np.float32):
        interpreter.set_tensor(inp["index"], face[None])
        interpreter.invoke()
        result.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(result)
