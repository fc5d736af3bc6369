"""`create_default_writer` with scalars only, via tensorboard's TF-free event writer."""
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class _ScalarWriter:
    """The subset of clu's MetricWriter that dq_jax.train calls (histograms are dropped)."""

    def __init__(self, logdir: str):
        self._w = EventFileWriter(logdir)

    def write_scalars(self, step, scalars):
        vals = [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                for k, v in scalars.items()]
        self._w.add_event(event_pb2.Event(step=int(step), summary=summary_pb2.Summary(value=vals)))

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_texts(self, step, texts):
        del step, texts

    def write_hparams(self, hparams):
        del hparams

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


def create_default_writer(logdir=None, *, just_logging=False, asynchronous=True,
                          collection=None):
    del just_logging, asynchronous, collection
    return _ScalarWriter(logdir)
