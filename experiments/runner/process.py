"""Process settings the entry points make (the library ``ldro`` never touches process state).

* :mod:`experiments.runner.cpu_runtime` -- XLA:CPU and malloc settings, applied
  by re-executing the program before JAX starts.
* :func:`hide_gpus_from_tensorflow` -- TensorFlow only decodes data here;
  left alone it reserves most of every visible GPU's memory when it first runs
  an op, and JAX then runs out of memory (flax's examples make the same call).
"""

import importlib.util

import jax


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the GPUs JAX trains on (call after ``jax.distributed``, if any).

  On a CPU-only JAX there is nothing to protect, and TensorFlow is not
  imported (importing it costs seconds).
  """
  if jax.default_backend() != "gpu" or importlib.util.find_spec("tensorflow") is None:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # TF already initialised its devices
    pass
