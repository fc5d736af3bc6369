"""ImageNet (ILSVRC-2012) ResNet-18, DQ W2A2, from TFDS `imagenet2012`.

Prepare the data once (manual download of the ILSVRC tarballs into MANUAL):
  tfds build imagenet2012 --data_dir=gs://BUCKET/tfds --manual_dir=MANUAL
Paper-style two stages, same schedule shape for every method:
  1. float: --config.quant.weights=float --config.quant.acts=float --config.num_epochs=90
     --config.learning_rate=0.1 (per 256 images; scale linearly with batch)
  2. DQ W2A2 fine-tuning (this file): 30 epochs from the float checkpoint:
     python -m dq_jax.main --config=configs/imagenet_resnet.py --workdir=gs://BUCKET/w2a2 \
         --config.data_dir=gs://BUCKET/tfds --config.init_from=gs://BUCKET/float
SGD momentum 0.9 (Nesterov), wd 1e-4, 1 warm-up epoch then cosine, peak LR 0.01 x batch/256,
label smoothing 0.1, batch 1024 (a TPU v3-32 / 8 GPUs).
Augmentation: inception crop + flip at 224; eval resize + center crop.
Other depths: --config.model=resnet34 / resnet50.

DQ settings: `configlib.apply_dq_findings` — rounding='inertia' (a weight moves one level when
its code momentum's step reaches half a gap; momentum 0.999, seeded with the float model's
position inside each cell, so this recipe needs --config.init_from), code LR 10 x the float LR,
per-channel levels, levels Adam 1e-3, BatchNorm re-estimated on 50 batches after training.
Measured: those settings were chosen on CIFAR-10 ResNet-20 W2A2 (5-epoch fine-tune from a
20-epoch float model, 3 seeds each; RESULTS.md): inertia 82.67 (82.50-82.77, CPU) against 81.52
for the paper's stochastic rounding, LSQ 82.63 and latent-STE 82.79 (H200). The stochastic rule
at its own chosen step: `configlib.apply_dq_findings(c, 'stochastic')`. Extrapolated: everything
about this recipe (ImageNet, ResNet-18, W2A2, 30 epochs, batch 1024) — no run of it exists yet,
so its accuracy is unknown.
"""
from dq_jax.configlib import imagenet_recipe


def get_config():
    return imagenet_recipe("resnet18", bits=2)
