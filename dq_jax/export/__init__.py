"""Bit-packed export of trained models (`.dqz` files) and size reports.

    python -m dq_jax.export --workdir=DIR --out=model.dqz            # a training run
    python -m dq_jax.export --model=pkg.mod:attr --variables=v.msgpack \
        --num_classes=10 --image_shape=32,32,3 --out=model.dqz       # your own Flax module

Python:

    report = export.save(path, model=..., variables=..., num_classes=..., image_shape=...,
                         config=...)                 # registry name + training config, or a
                                                     # user module / "pkg.mod:attr" reference
    exp = export.load(path)                          # -> Export (validated)
    export.check_model(exp, module=None)             # the file matches the (given) module
    export.export_workdir(workdir, out, step=None)
    export.size_report_for_model("resnet18", 2)      # no training, from shapes

The file format is specified in docs/format.md. The pieces: `bitpack` (code bit packing),
`convert` (latent-STE / LSQ / DQ variables -> codes + levels), `fileformat` (header, payload,
validation, user-module references), `sizes` (size reports), `workdir` (exports from a training
workdir or saved variables; the dataset facts a training run records), `__main__` (the CLI).
"""
from dq_jax.export.bitpack import pack_bits, packed_nbytes, unpack_bits, unpack_bits_jnp
from dq_jax.export.convert import (COLLECTIONS, LEVELS, RUNTIME_WEIGHTS, STEP, LayerInfo,
                                   quant_of)
from dq_jax.export.fileformat import (FORMAT_NAME, FORMAT_VERSION, MAGIC, PREFIX_SIZE, Export,
                                      check_model, encode, is_user_model, load, numerics_digest,
                                      resolve_model, save, unflatten_names)
from dq_jax.export.sizes import (format_model_summary, format_size_report, size_report,
                                 size_report_for_model, size_report_for_variables)
from dq_jax.export.workdir import (DATASET_FILE, dataset_facts, export_variables, export_workdir,
                                   load_variables, read_dataset_facts)

__all__ = ["COLLECTIONS", "DATASET_FILE", "FORMAT_NAME", "FORMAT_VERSION", "LEVELS", "MAGIC",
           "PREFIX_SIZE", "RUNTIME_WEIGHTS", "STEP", "Export", "LayerInfo", "check_model",
           "dataset_facts", "encode", "export_variables", "export_workdir", "format_model_summary", "format_size_report",
           "is_user_model", "load", "load_variables", "numerics_digest", "pack_bits", "packed_nbytes", "quant_of",
           "read_dataset_facts", "resolve_model", "save", "size_report", "size_report_for_model", "size_report_for_variables",
           "unflatten_names", "unpack_bits", "unpack_bits_jnp"]
