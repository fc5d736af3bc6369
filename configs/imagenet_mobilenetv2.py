"""ImageNet (ILSVRC-2012) MobileNetV2-1.0, DQ W4A4, from TFDS `imagenet2012`.

Prepare the data once (manual download of the ILSVRC tarballs into MANUAL):
  tfds build imagenet2012 --data_dir=gs://BUCKET/tfds --manual_dir=MANUAL
Paper-style two stages, same schedule shape for every method:
  1. float: --config.quant.weights=float --config.quant.acts=float --config.num_epochs=90
     --config.learning_rate=0.1 (per 256 images; scale linearly with batch)
  2. DQ W4A4 fine-tuning (this file): 30 epochs from the float checkpoint:
     python -m dq_jax.main --config=configs/imagenet_mobilenetv2.py --workdir=gs://BUCKET/w4a4 \
         --config.data_dir=gs://BUCKET/tfds --config.init_from=gs://BUCKET/float
SGD momentum 0.9 (Nesterov), wd 1e-4, 1 warm-up epoch then cosine, peak LR 0.01 x batch/256,
label smoothing 0.1, batch 1024 (a TPU v3-32 / 8 GPUs).
Augmentation: inception crop + flip at 224; eval resize + center crop.

DQ settings: `configlib.apply_dq_findings` — rounding='inertia' (a weight moves one level when
its code momentum's step reaches half a gap; momentum 0.999, seeded with the float model's
position inside each cell, so this recipe needs --config.init_from), code LR 10 x the float LR,
per-layer levels (per-channel is impossible here: a depthwise 3x3 kernel has 9 weights per
channel, fewer than the 16 levels of 4 bits), levels Adam 1e-3, BatchNorm re-estimated on 50
batches after training.
Measured: those settings were chosen on CIFAR-10 ResNet-20 W2A2 (5-epoch fine-tune from a
20-epoch float model, 3 seeds each; RESULTS.md): inertia 82.67 (82.50-82.77, CPU) against 81.52
for the paper's stochastic rounding, LSQ 82.63 and latent-STE 82.79 (H200). The stochastic rule
at its own chosen step: `configlib.apply_dq_findings(c, 'stochastic')`. Extrapolated: everything
about this recipe (ImageNet, MobileNetV2, W4A4, 30 epochs, batch 1024) — no run of it exists
yet, so its accuracy is unknown.
"""
from dq_jax.configlib import imagenet_recipe


def get_config():
    c = imagenet_recipe("mobilenetv2", bits=4)
    c.quant.granularity = "per_layer"  # depthwise 3x3: 9 weights per channel < 16 levels
    return c
