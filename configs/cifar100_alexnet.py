"""CIFAR-100 AlexNet-BN (CIFAR variant) from TFDS `cifar100` (prepare it first:
`tfds build cifar100 --data_dir=DATA`).

Paper-style: float pre-training (`--config.quant.weights=float --config.quant.acts=float
--config.num_epochs=200 --config.learning_rate=0.1`), then this file's DQ W2A2 fine-tuning:
  python -m dq_jax.main --config=configs/cifar100_alexnet.py --workdir=W/w2a2 \
      --config.data_dir=DATA --config.init_from=W/float
SGD momentum 0.9 (Nesterov), wd 5e-4, cosine, peak LR 0.01, batch 128, 100 epochs;
levels Adam 1e-4. Augmentation: pad-4 crop + flip.
"""
from dq_jax.configlib import base_config


def get_config():
    c = base_config()
    c.model = "alexnet_cifar"
    c.dataset = "cifar100"
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 100.0
    c.learning_rate = 0.01
    c.levels_learning_rate = 1e-4
    c.nesterov = True
    c.weight_decay = 5e-4
    c.quant.weights, c.quant.weight_bits = "dq", 2
    c.quant.acts, c.quant.act_bits = "dq", 2
    return c
