"""The Flax ImageNet example's training code (examples/imagenet/train.py), float, cut to what a
digits-sized test runs: `jax.jit` instead of `pmap` (no `pmean`), no half precision / dynamic
scale, no checkpoints or metric writers, batches given as arrays. The functions and their lines
are the example's otherwise. Nothing here knows about quantization: docs/quantize_any_model.md
gives the complete diff that turns it into DQ training, and tests/test_flax_example.py applies
that diff to this file and runs both.
"""
import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from tests import flax_example_resnet as models

NUM_CLASSES = 10


def create_model(*, model_cls, half_precision, **kwargs):
  model_dtype = jnp.float32
  return model_cls(num_classes=NUM_CLASSES, dtype=model_dtype, **kwargs)


def initialized(key, image_size, model):
  input_shape = (1, image_size, image_size, 1)

  @jax.jit
  def init(*args):
    return model.init(*args)

  variables = init({'params': key}, jnp.ones(input_shape, model.dtype))
  return variables['params'], variables['batch_stats']


def cross_entropy_loss(logits, labels):
  one_hot_labels = jax.nn.one_hot(labels, num_classes=NUM_CLASSES)
  xentropy = optax.softmax_cross_entropy(logits=logits, labels=one_hot_labels)
  return jnp.mean(xentropy)


def compute_metrics(logits, labels):
  loss = cross_entropy_loss(logits, labels)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics = {
      'loss': loss,
      'accuracy': accuracy,
  }
  return metrics


def create_learning_rate_fn(config, base_learning_rate, steps_per_epoch):
  warmup_fn = optax.linear_schedule(
      init_value=0.0, end_value=base_learning_rate,
      transition_steps=config.warmup_epochs * steps_per_epoch)
  cosine_epochs = max(config.num_epochs - config.warmup_epochs, 1)
  cosine_fn = optax.cosine_decay_schedule(
      init_value=base_learning_rate, decay_steps=cosine_epochs * steps_per_epoch)
  schedule_fn = optax.join_schedules(
      schedules=[warmup_fn, cosine_fn],
      boundaries=[config.warmup_epochs * steps_per_epoch])
  return schedule_fn


def train_step(state, batch, learning_rate_fn):
  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'],
        mutable=['batch_stats'],
    )
    loss = cross_entropy_loss(logits, batch['label'])
    weight_penalty_params = jax.tree_util.tree_leaves(params)
    weight_decay = 0.0001
    weight_l2 = sum(jnp.sum(x**2) for x in weight_penalty_params if x.ndim > 1)
    weight_penalty = weight_decay * 0.5 * weight_l2
    loss = loss + weight_penalty
    return loss, (new_model_state, logits)

  step = state.step
  lr = learning_rate_fn(step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  aux, grads = grad_fn(state.params)
  new_model_state, logits = aux[1]
  metrics = compute_metrics(logits, batch['label'])
  metrics['learning_rate'] = lr
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state['batch_stats']
  )
  return new_state, metrics


def eval_step(state, batch):
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits = state.apply_fn(variables, batch['image'], train=False, mutable=False)
  return compute_metrics(logits, batch['label'])


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_train_state(rng, config, model, image_size, learning_rate_fn):
  params, batch_stats = initialized(rng, image_size, model)
  tx = optax.sgd(
      learning_rate=learning_rate_fn,
      momentum=config.momentum,
      nesterov=True,
  )
  state = TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=tx,
      batch_stats=batch_stats,
  )
  return state


def train_and_evaluate(config, train_batches, eval_batch):
  """The example's loop, over given batches; returns (state, last train metrics, eval)."""
  model_cls = getattr(models, config.model)
  model = create_model(model_cls=model_cls, half_precision=config.half_precision)
  steps_per_epoch = config.steps_per_epoch
  base_learning_rate = config.learning_rate * config.batch_size / 256.0
  learning_rate_fn = create_learning_rate_fn(config, base_learning_rate, steps_per_epoch)
  state = create_train_state(jax.random.key(0), config, model, config.image_size,
                             learning_rate_fn)
  p_train_step = jax.jit(functools.partial(train_step, learning_rate_fn=learning_rate_fn))
  p_eval_step = jax.jit(eval_step)
  for batch in train_batches:
    state, metrics = p_train_step(state, batch)
  return state, metrics, p_eval_step(state, eval_batch)
