"""Loading Keras and its backend quietly: one place that imports them for every stage.

``load_keras`` imports Keras on the backend that ``KERAS_BACKEND`` names (``tensorflow``,
the default; ``jax``; ``torch``); ``accelerators`` lists the GPUs that backend sees.

TensorFlow 2.21 prints its C++ start-up lines (oneDNN notice, "Could not find cuda
drivers", "failed call to cuInit: ... (303)") straight to file descriptor 2, before its
own log level is read, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them and on a CPU machine
they read like failures. ``load_tensorflow`` imports TensorFlow and initialises its
devices with descriptor 2 captured, then passes on every captured line that is not one
of those known notices. ``KFACE_VERBOSE=1`` (``kface --verbose``) shows everything.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from types import ModuleType

START_UP_NOISE = re.compile(
    r"oneDNN custom operations|Could not find cuda drivers|failed call to cuInit"
    r"|absl::InitializeLog|cpu_feature_guard|To enable the following instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|TF-TRT Warning")


def verbose() -> bool:
    """True when the user asked for TensorFlow's own start-up output."""
    return os.environ.get("KFACE_VERBOSE", "") == "1"


@functools.cache
def load_tensorflow() -> ModuleType:
    """Import TensorFlow once (its devices initialised) without its start-up notices."""
    if verbose():
        import tensorflow as tf

        tf.config.list_physical_devices()
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # cuInit happens here, inside the capture
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        kept = [line for line in capture.read().decode(errors="replace").splitlines()
                if line.strip() and not START_UP_NOISE.search(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return tf


def keras_backend() -> str:
    """The Keras backend this process uses (``KERAS_BACKEND``, default tensorflow)."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


@functools.cache
def load_keras() -> ModuleType:
    """Import Keras once, on ``keras_backend()``. TensorFlow, when installed, is imported
    first through ``load_tensorflow``: on other backends too, Keras' TensorBoard callback
    (which the train stage uses where TensorFlow exists) imports it, and its start-up
    notices must stay hidden there as well."""
    import importlib.util

    if keras_backend() == "tensorflow" or importlib.util.find_spec("tensorflow"):
        load_tensorflow()
    import keras

    return keras


def accelerators() -> list[str]:
    """The GPUs the Keras backend will use (names), empty on a CPU-only machine."""
    backend = load_keras().backend.backend()
    if backend == "tensorflow":
        return [d.name for d in load_tensorflow().config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []
