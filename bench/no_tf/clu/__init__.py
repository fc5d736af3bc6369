"""Stand-in for `clu` on machines without TensorFlow (e.g. a JAX GPU image).

clu's `metric_writers` imports TensorFlow at import time; `bench/gpu_grid.py` puts this folder
first on PYTHONPATH only when `import tensorflow` fails, so the training program's scalars still
reach TensorBoard event files (written by tensorboard's own writer), where
`bench/accuracy.read_layer_scalars` reads the per-layer diagnostics. Not part of the library.
"""
