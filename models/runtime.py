"""Loading TensorFlow quietly: one place that imports it for every stage and command.

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
