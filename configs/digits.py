"""scikit-learn digits (8x8, 10 classes, bundled: no download) — the embedded default.

Command (float, DQ W2A2 and W4A4 side by side, ~1-2 min on 2 CPU cores):
  python -m dq_jax.main --config=configs/digits.py --workdir=/tmp/dq_digits \
      --variants=float,w2a2,w4a4
Schedule: trained from scratch, 400 steps (~19 epochs of 1347 images), SGD momentum
0.9, peak LR 0.05 cosine, weight decay 5e-4; levels Adam 1e-3. No augmentation.
Expected (docs/notebook.md §1.2, 3 seeds): float ~0.991, W2A2 ~0.990, W3A3 ~0.989, W4A4 ~0.990 top-1
on the 450 held-out images (one image = 0.22 points).
"""
from dq_jax.configlib import base_config


def get_config():
    c = base_config()
    c.model = "digits_cnn"
    c.dataset = "digits"
    c.batch_size = 64
    c.eval_batch_size = 512
    c.num_train_steps = 400
    c.learning_rate = 0.05
    c.levels_learning_rate = 1e-3
    c.weight_decay = 5e-4
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.eval_every_steps = 200
    c.quant.weights, c.quant.weight_bits = "dq", 2
    c.quant.acts, c.quant.act_bits = "dq", 2
    return c
