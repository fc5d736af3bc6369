"""ImageNet (ILSVRC-2012) AlexNet-BN, DQ W2A2, from TFDS `imagenet2012`.

Prepare the data once (manual download of the ILSVRC tarballs into MANUAL):
  tfds build imagenet2012 --data_dir=gs://BUCKET/tfds --manual_dir=MANUAL
Paper-style two stages, same schedule shape for every method:
  1. float: --config.quant.weights=float --config.quant.acts=float --config.num_epochs=90
     --config.learning_rate=0.1 (per 256 images; scale linearly with batch)
  2. DQ W2A2 fine-tuning (this file): 30 epochs from the float checkpoint:
     python -m dq_jax.main --config=configs/imagenet_alexnet.py --workdir=gs://BUCKET/w2a2 \
         --config.data_dir=gs://BUCKET/tfds --config.init_from=gs://BUCKET/float
SGD momentum 0.9 (Nesterov), wd 1e-4, 1 warm-up epoch then cosine, peak LR 0.01 x batch/256,
label smoothing 0.1, batch 1024 (a TPU v3-32 / 8 GPUs); levels Adam 1e-4.
Augmentation: inception crop + flip at 224; eval resize + center crop.
"""
from dq_jax.configlib import base_config


def get_config():
    c = base_config()
    c.model = "alexnet"
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 30.0
    c.learning_rate = 0.01 * c.batch_size / 256
    c.levels_learning_rate = 1e-4
    c.nesterov = True
    c.weight_decay = 1e-4
    c.warmup_epochs = 1.0
    c.label_smoothing = 0.1
    c.half_precision = True
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.quant.weights, c.quant.weight_bits = "dq", 2
    c.quant.acts, c.quant.act_bits = "dq", 2
    return c
