"""dq_jax: Direct Quantization for low bit-width QAT of CNNs in JAX/Flax.

Installs for what you use:

    pip install dq_jax               # layers, optimizer, models, export/predict (.npz input)
    pip install 'dq_jax[train]'      # + the training program (python -m dq_jax.main):
                                     #   TF/TFDS input, clu/TensorBoard, digits, progress bar,
                                     #   image folders (predict, dq_jax.data.folder_to_npz)
    pip install 'dq_jax[test]'       # + pytest (pulls [train]: the tests train models)
    pip install 'dq_jax[bench]'      # + matplotlib, qwix (pulls [train])

Version ranges are the ones tested (CPU, Python 3.11, 2026-11). For GPUs install
`jax[cuda12]` in the same range; for Cloud TPU `jax[tpu]` (see launch/README.md).
`tests/test_standalone.py` checks that the core modules import without the extras.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1.0,<1.2",
    "absl-py>=2.5,<3",
    "numpy>=2.4,<3",
    "etils[epath]>=1.15,<2",          # workdirs on local disk or gs://
]

TRAIN_REQUIRES = [
    "tensorflow-cpu>=2.21,<2.22",     # tf.data input pipelines only (no TF compute)
    "tensorflow-datasets>=4.9.10,<4.10",
    "clu>=0.0.12,<0.1",               # metric writers (TensorBoard + logging)
    "tensorboard>=2.21,<2.22",        # clu's TensorBoard writer imports it
    "scikit-learn>=1.9,<2",           # the bundled digits dataset (the embedded default)
    "tqdm>=4.67,<5",                  # progress bar on interactive terminals
    "pillow>=11,<14",                 # image folders (dq_jax.predict, dq_jax.data.folder_to_npz)
]

EXTRAS_REQUIRE = {
    "train": TRAIN_REQUIRES,
    "test": TRAIN_REQUIRES + ["pytest>=9,<10", "pytest-xdist>=3.8,<4"],
    "bench": TRAIN_REQUIRES + ["matplotlib>=3.9,<4", "qwix==0.1.8"],  # plots; the QAT peer
}

setup(
    name="dq_jax",
    version="0.1.0",
    description="Direct quantization (learnable levels + integer codes) and channel-aware "
                "activation quantization for low bit-width CNN training in JAX/Flax.",
    packages=find_packages(include=["dq_jax", "dq_jax.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
