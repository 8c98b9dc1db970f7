"""Each model trains for a few steps on CPU and its loss falls; context-parallel training on
8 host devices gives the single-device losses."""
import jax
import numpy as np
import pytest
from flax import nnx

from models import causal_lm, nat_classifier, text_to_image, video_dit
from models.train import context_mesh, train


# extended: op-level features again (test_sinks, test_soft_cap); the NAT classifier, which the
# CI's run of colab/02_train_nat.ipynb trains (its loss must fall there)
@pytest.mark.parametrize("name", [
    pytest.param("nat", marks=pytest.mark.extended), "dit", "lm", "t2i", "moba",
    pytest.param("moba_shared", marks=pytest.mark.extended),
    pytest.param("lm_sinks", marks=pytest.mark.extended),
    pytest.param("lm_soft_cap", marks=pytest.mark.extended)])
def test_model_trains(name):
  if name == "lm_sinks":  # learned sink logits (gpt-oss) beside the mask's sink tokens
    model = causal_lm.CausalLM(dim=32, backend="xla", learned_sinks=True, rngs=nnx.Rngs(0))
    batches = causal_lm.synthetic_batches(4, 48)
    loss_fn, steps, lr = causal_lm.loss_fn, 100, 5e-3
  elif name == "lm_soft_cap":  # Gemma 2's capped scores (a small cap, so that it binds)
    model = causal_lm.CausalLM(dim=32, backend="xla", logits_soft_cap=5.0, rngs=nnx.Rngs(0))
    batches = causal_lm.synthetic_batches(4, 48)
    loss_fn, steps, lr = causal_lm.loss_fn, 100, 5e-3
  elif name in ("moba", "moba_shared"):  # the LM with content-routed blocks (MoBA): top 2 of
    # 16-token blocks, per query head or shared by each GQA group (NSA)
    model = causal_lm.CausalLM(dim=32, backend="xla", moba=(16, 2),
                               moba_shared=name == "moba_shared", rngs=nnx.Rngs(0))
    batches = causal_lm.synthetic_batches(4, 48)
    loss_fn, steps, lr = causal_lm.loss_fn, 100, 5e-3
  elif name == "t2i":  # joint attention: image NA + text as extra tokens, text -> all
    model = text_to_image.TextToImageDiT(backend="xla", rngs=nnx.Rngs(0))
    batches = text_to_image.synthetic_batches(4, 12)
    loss_fn, steps, lr = text_to_image.loss_fn, 25, 2e-3
  elif name == "nat":
    model = nat_classifier.NATClassifier(image_size=16, backend="xla", rngs=nnx.Rngs(0))
    batches = nat_classifier.synthetic_batches(8, 16)
    loss_fn, steps, lr = nat_classifier.loss_fn, 25, 1e-3
  elif name == "dit":
    model = video_dit.VideoDiT(dim=32, backend="xla", rngs=nnx.Rngs(0))
    batches = video_dit.synthetic_batches(2, 8)
    loss_fn, steps, lr = video_dit.loss_fn, 25, 2e-3
  else:
    model = causal_lm.CausalLM(dim=32, backend="xla", rngs=nnx.Rngs(0))
    batches = causal_lm.synthetic_batches(4, 48)
    loss_fn, steps, lr = causal_lm.loss_fn, 100, 5e-3
  losses = train(model, loss_fn, batches, steps, lr, verbose=False)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
  if name == "lm_sinks":  # the sinks learned something
    assert float(np.abs(model.blocks[0].attn.core.sinks[...]).max()) > 1e-3


# extended: the LM's ring (on kernels and meshes in test_context_parallel) and its MoBA form
# (the same model wiring; content-routed blocks on a context axis: test_routing, test_multiprocess)
@pytest.mark.parametrize("name", ["dit", pytest.param("lm", marks=pytest.mark.extended),
                                  pytest.param("moba", marks=pytest.mark.extended)])
def test_context_parallel_training_matches_single_device(name):
  def run(context_axis):
    if name == "dit":  # 4 frames, one per device: the causal-time halo takes two hops
      model = video_dit.VideoDiT(dim=32, backend="xla", context_axis=context_axis,
                                 rngs=nnx.Rngs(0))
      return train(model, video_dit.loss_fn, video_dit.synthetic_batches(2, 8), 3, 2e-3,
                   verbose=False)
    moba = (16, 2) if name == "moba" else None  # 16-token blocks, one per device
    model = causal_lm.CausalLM(dim=32, backend="xla", context_axis=context_axis, moba=moba,
                               rngs=nnx.Rngs(0))
    return train(model, causal_lm.loss_fn, causal_lm.synthetic_batches(4, 64 if moba else 48),
                 3, 5e-3, verbose=False)

  want = run(None)
  with jax.set_mesh(context_mesh(4)):
    got = run("context")
  np.testing.assert_allclose(got, want, rtol=2e-4)
