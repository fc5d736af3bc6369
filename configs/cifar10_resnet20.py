"""CIFAR-10 ResNet-20, reading TFDS `cifar10`.

Data: prepare it once on a machine with network access (`tfds build cifar10`, into
~/tensorflow_datasets or --data_dir=DIR, then --config.data_dir=DIR); nothing is downloaded at
run time. Or any CIFAR-style .npz (x_train, y_train, x_test, y_test; see README):
  --config.dataset=npz --config.data_dir=/path/to/cifar10.npz

Paper-style two stages (the same schedule for every quantization method):
  1. float pre-training:
     python -m dq_jax.main --config=configs/cifar10_resnet20.py --workdir=W/float \
         --config.quant.weights=float --config.quant.acts=float \
         --config.num_epochs=200 --config.learning_rate=0.1
  2. quantized fine-tuning from it (this file's defaults: DQ W2A2, 60 epochs):
     python -m dq_jax.main --config=configs/cifar10_resnet20.py --workdir=W/w2a2 \
         --config.init_from=W/float
Optimiser: SGD momentum 0.9 (Nesterov), weight decay 1e-4 (5e-4 for float pre-training is
common too), cosine LR, peak 0.01 for fine-tuning, batch 128; DQ codes: rounding='inertia' — a
weight moves one level when its code momentum's step (peak code LR 0.1 = 10 x the float LR: per
gradient, a latent weight's step under SGD momentum 0.9) reaches half a level gap; the momentum
a slow trace (0.999) seeded with the float model's position inside each cell (so stage 2 needs
--config.init_from); per-channel weight levels; levels: Adam 1e-3; BatchNorm statistics
re-estimated on 50 batches after the last step (`configlib.apply_dq_findings`).
Augmentation: pad-4 random crop + horizontal flip. On 2 CPU cores an epoch of ResNet-20
takes ~10-20 min: shrink with --config.num_epochs for a quick look.

Measured (RESULTS.md, the JPEG-degraded CIFAR-10 copy): from a 20-epoch float model (85.98%),
5 epochs (1,955 steps, --config.num_train_steps=1955) of this recipe give DQ W2A2 82.67% top-1
(3 seeds 82.50-82.77; CPU); in the same protocol the paper's stochastic rounding at its own best
step (`configlib.apply_dq_findings(c, 'stochastic')`: code LR 1e-4, momentum 0.99, no float
seed) gives 81.52% (81.24-81.72), LSQ 82.63% and latent-STE 82.79% (3 seeds each; H200);
post-training quantization + BN re-estimation alone gives 71.7%. From scratch (digits) the
inertia rounding measured no gain (98.59 vs 98.74): there use --config.feedback_residual=zero or
the stochastic rule. Extrapolated: the 60-epoch default (and the 200-epoch float stage) has not
been run; W3A3/W4A4 were measured with the stochastic rule only (84.85, 85.64).
"""
from dq_jax.configlib import apply_dq_findings, base_config


def get_config():
    c = base_config()
    c.model = "resnet20"
    c.dataset = "cifar10"           # TFDS; data_dir  = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 60.0
    c.learning_rate = 0.01
    c.nesterov = True
    c.weight_decay = 1e-4
    c.schedule = "cosine"
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.quant.weights, c.quant.weight_bits = "dq", 2
    c.quant.acts, c.quant.act_bits = "dq", 2
    # rounding='inertia' (threshold 0.5, code momentum 0.999 seeded from the float model, code
    # LR 10 x the float LR), per-channel levels, levels Adam 1e-3, BN re-estimated on 50
    # batches: the settings this recipe's study chose
    return apply_dq_findings(c)
