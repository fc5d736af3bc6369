"""CIFAR-100 AlexNet-BN (CIFAR variant) from TFDS `cifar100` (prepare it first:
`tfds build cifar100 --data_dir=DATA`).

Paper-style: float pre-training (`--config.quant.weights=float --config.quant.acts=float
--config.num_epochs=200 --config.learning_rate=0.1`), then this file's DQ W2A2 fine-tuning:
  python -m dq_jax.main --config=configs/cifar100_alexnet.py --workdir=W/w2a2 \
      --config.data_dir=DATA --config.init_from=W/float
SGD momentum 0.9 (Nesterov), wd 5e-4, cosine, peak LR 0.01, batch 128, 100 epochs.
Augmentation: pad-4 crop + flip.

DQ settings: `configlib.apply_dq_findings` — rounding='inertia' (a weight moves one level when
its code momentum's step reaches half a gap; momentum 0.999, seeded with the float model's
position inside each cell, so this recipe needs --config.init_from), code LR 10 x the float LR,
per-channel levels, levels Adam 1e-3, BatchNorm re-estimated on 50 batches after training.
Measured: those settings were chosen on CIFAR-10 ResNet-20 W2A2 (5-epoch fine-tune from a
20-epoch float model, 3 seeds each; RESULTS.md): inertia 82.67 (82.50-82.77, CPU) against 81.52
for the paper's stochastic rounding, LSQ 82.63 and latent-STE 82.79 (H200). The stochastic rule
at its own chosen step: `configlib.apply_dq_findings(c, 'stochastic')`. Extrapolated: everything
about this recipe (CIFAR-100, AlexNet, W2A2, 100 epochs) — no run of it exists yet, so its
accuracy is unknown.
"""
from dq_jax.configlib import cifar100_recipe


def get_config():
    return cifar100_recipe("alexnet_cifar", bits=2)
