"""Export a trained classifier for serving: ONNX, TensorFlow SavedModel or TFLite.

ONNX: Keras 3 exports through ``model.export(format="onnx")`` (tf2onnx and onnx: the
``onnx`` extra); when they are missing we say so instead of producing a half-working
file. Keras refuses a loaded model that has never been called ("The model provided has
never called"), so the model is called once on a blank batch first. The export is
checked before it is kept: ONNX Runtime's outputs must equal Keras' within
``ONNX_TOLERANCE`` on every head, after ``models.onnx_graph`` has rewritten its PReLUs
for ONNX Runtime's fast layout. The exact-age head is exported; of a flip-averaged model
the single-view network is, and the mirror pass runs outside it where the analyser asks
for it (``models.backends``; the folder's labels.json says ``onnx_mirror: runtime``),
checked against Keras' averaged answers. The ONNX folder (``model.onnx`` +
``labels.json``) is a model folder that every inference path takes without TensorFlow.
Every export folder gets a copy of ``labels.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from core.labels import AGE_BANDS, AGES, GENDERS
from core.storage import FILE_MODE, write_bytes_atomic, write_json_atomic
from models.backends import MIRROR_AT_RUN_TIME
from models.classifier import load_classifier, single_view_network
from models.onnx_graph import optimise_onnx_file
from models.runtime import load_keras, load_tensorflow, verbose

Format = Literal["savedmodel", "tflite", "onnx"]


class ExportError(RuntimeError):
    """The requested export cannot be made here; the message says why."""


FORMATS = ("savedmodel", "tflite", "onnx")
ONNX_TOLERANCE = 1e-4
HEAD_WIDTHS = {len(GENDERS): "gender", len(AGE_BANDS): "age_band", len(AGES): "age"}


def check_format(fmt: str) -> None:
    """Refuse an unknown format or a missing ONNX converter before any model is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in ("tf2onnx", "onnx", "onnxruntime")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"ONNX export needs {', '.join(missing)}, not installed here: "
                              "pip install 'kface-pipeline[onnx]' (or pip install tf2onnx "
                              "onnx onnxruntime); or use savedmodel or tflite")


def export_model(model_dir: Path, out: Path, fmt: Format) -> Path:
    """Export ``model_dir/model.keras`` to ``out``; returns the exported file or folder.
    ``labels.json`` is copied beside it only once the export has succeeded."""
    check_format(fmt)
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "model.keras").is_file():
        raise ExportError(f"{model_dir} holds no model.keras (an exported model?): export "
                          "from the trained model folder, OUT/experiments/NAME/model")
    model = load_classifier(model_dir / "model.keras")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "savedmodel":
        target = out / "savedmodel"
        with tempfile.TemporaryDirectory(dir=out, prefix=".savedmodel.") as tmp:
            model.export(str(Path(tmp) / "m"), format="tf_saved_model", verbose=False)
            shutil.rmtree(target, ignore_errors=True)
            (Path(tmp) / "m").replace(target)
    elif fmt == "tflite":
        load_tensorflow()
        import tensorflow as tf

        with tempfile.TemporaryDirectory() as tmp:
            model.export(tmp, format="tf_saved_model", verbose=False)
            flat = tf.lite.TFLiteConverter.from_saved_model(tmp).convert()
        target = out / "model.tflite"
        write_bytes_atomic(target, flat)
    else:
        target = out / "model.onnx"
        size = model.input_shape[1]
        probe = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
        expected = model.predict_on_batch(probe)  # also: Keras exports only a called model
        # tf2onnx logs a traceback when one of its optional graph optimisations does not
        # apply (MobileNetV3's transposes); the export still passes check_onnx
        logging.getLogger("tf2onnx").setLevel(logging.DEBUG if verbose() else logging.ERROR)
        single = single_view(model)  # a flip-averaged model: the mirror pass runs outside
        with tempfile.TemporaryDirectory(dir=out, prefix=".onnx.") as tmp:
            try:
                single.export(str(Path(tmp) / "model.onnx"), format="onnx", verbose=False)
            except Exception as exc:  # the converter's own error types
                raise ExportError(f"ONNX conversion of {model_dir / 'model.keras'} failed: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
            optimise_onnx_file(Path(tmp) / "model.onnx")  # same answers, faster on CPU
            check_onnx(Path(tmp) / "model.onnx", probe, expected, mirror=single is not model)
            os.chmod(Path(tmp) / "model.onnx", FILE_MODE)
            (Path(tmp) / "model.onnx").replace(target)
        if single is not model:
            labels = json.loads((model_dir / "labels.json").read_text())
            write_json_atomic(out / "labels.json", {**labels,
                                                    "onnx_mirror": MIRROR_AT_RUN_TIME})
            return target
    write_bytes_atomic(out / "labels.json", (model_dir / "labels.json").read_bytes())
    return target


def single_view(model):
    """The single-view network of a flip-averaged classifier (its inner model, called
    once so that Keras exports it), else ``model`` itself."""
    inner = single_view_network(model)
    if inner is None:
        return model
    keras = load_keras()
    image = keras.Input(model.input_shape[1:], name="image")
    single = keras.Model(image, inner(image), name="kface_classifier")
    single.predict_on_batch(np.zeros((1, *model.input_shape[1:]), "float32"))
    return single


def check_onnx(path: Path, images: np.ndarray, expected: dict, mirror: bool = False
               ) -> None:
    """Raise ExportError unless ONNX Runtime gives ``expected`` (Keras' outputs) on
    ``images``, within ``ONNX_TOLERANCE``, on every head (``mirror``: with the mirror pass
    run outside the file, as the analyser runs it)."""
    from models.backends import OnnxClassifier

    got = OnnxClassifier(path, mirror=mirror)(images)
    for head, want in expected.items():
        if head not in got:
            raise ExportError(f"the ONNX export lacks the {head!r} output")
        diff = float(np.abs(got[head] - np.asarray(want, np.float64)).max())
        if diff > ONNX_TOLERANCE:
            raise ExportError(f"the ONNX export's {head!r} differs from Keras by {diff:.2g} "
                              f"(> {ONNX_TOLERANCE}): not kept")


def run_exported(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported model (SavedModel folder, .tflite or .onnx file) on RGB 0..255
    images."""
    if Path(path).suffix == ".onnx":
        from models.backends import OnnxClassifier

        return OnnxClassifier(path)(images)
    load_tensorflow()
    import tensorflow as tf

    images = np.asarray(images, dtype=np.float32)
    path = Path(path)
    if path.suffix == ".tflite":
        interp = tf.lite.Interpreter(model_path=str(path))
        inp = interp.get_input_details()[0]
        outs = {}
        for image in images:
            interp.resize_tensor_input(inp["index"], (1, *image.shape))
            interp.allocate_tensors()
            interp.set_tensor(inp["index"], image[None])
            interp.invoke()
            for d in interp.get_output_details():  # names are opaque: tell heads by width
                head = HEAD_WIDTHS[int(d["shape"][-1])]
                outs.setdefault(head, []).append(interp.get_tensor(d["index"])[0])
        return {k: np.stack(v) for k, v in outs.items()}
    loaded = tf.saved_model.load(str(path))  # keep a reference: serve() uses its variables
    return {k: np.asarray(v) for k, v in loaded.serve(images).items()}
