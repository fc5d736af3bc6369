"""Input pipelines: TFDS + tf.data, and in-memory arrays (digits, .npz).

Public API::

    ds = create_dataset(config, process_index=None, process_count=None)
    for batch in prefetch(ds.train_batches(start_step)): ...   # infinite
    for batch in ds.eval_batches(): ...                        # one padded pass

See `Dataset` for the batch format and the determinism/resume contract.
TensorFlow is imported only for the TFDS datasets; TFDS datasets and digits
need the `train` extra (`pip install 'dq_jax[train]'`), `.npz` files only numpy.
An image folder with one sub-folder per class becomes such an `.npz` with
`python -m dq_jax.data.folder_to_npz` (see that module).
"""
from dq_jax.data.base import Dataset
from dq_jax.data.factory import DATASETS, create_dataset
from dq_jax.data.prefetch import prefetch

__all__ = ["DATASETS", "Dataset", "create_dataset", "prefetch"]
