"""Export a trained classifier for serving: TensorFlow SavedModel or TFLite.

ONNX: Keras 3 models export to ONNX only through ``model.export(format="onnx")``, which
needs the ``tf2onnx``/``onnx`` toolchain; when it is missing we say so instead of
producing a half-working file. Every export folder gets a copy of ``labels.json``.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from models.classifier import AGE_CLASSES, AGES, GENDER_CLASSES, load_classifier
from models.runtime import load_tensorflow
from tasks.storage import write_bytes_atomic

Format = Literal["savedmodel", "tflite", "onnx"]


class ExportError(RuntimeError):
    """The requested export cannot be made here; the message says why."""


FORMATS = ("savedmodel", "tflite", "onnx")
HEAD_WIDTHS = {len(GENDER_CLASSES): "gender", len(AGE_CLASSES): "age_band", len(AGES): "age"}


def check_format(fmt: str) -> None:
    """Refuse an unknown format or a missing ONNX converter before any model is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in ("tf2onnx", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"ONNX export needs {' and '.join(missing)} (pip install "
                              "tf2onnx onnx), which are not installed; use savedmodel or tflite")


def export_model(model_dir: Path, out: Path, fmt: Format) -> Path:
    """Export ``model_dir/model.keras`` to ``out``; returns the exported file or folder.
    ``labels.json`` is copied beside it only once the export has succeeded."""
    check_format(fmt)
    model_dir, out = Path(model_dir), Path(out)
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
        model.export(str(target), format="onnx", verbose=False)
    write_bytes_atomic(out / "labels.json", (model_dir / "labels.json").read_bytes())
    return target


def run_exported(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported model (SavedModel folder or .tflite file) on RGB 0..255 images."""
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
