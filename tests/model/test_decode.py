"""KV-cache decoding equals running the whole sequence through the model, on one device and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from tweetjax.model.decode import SamplingConfig, Sampler, pad_prompts, sample_logits
from tweetjax.train.experiment import build_experiment

PROMPTS = [[1, 5, 9], [1, 17, 4, 99, 3, 8, 250], [1, 33, 33, 33, 12, 700, 6, 5, 81, 90, 11, 2], [1, 42, 7, 7, 7]]
NEW_TOKENS = 6


def _experiment(mesh_shape, scan_layers=True):
  config = load_config("tiny")
  config.mesh.update(mesh_shape)
  config.model.scan_layers = scan_layers
  devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
  experiment = build_experiment(config, devices=devices)
  return experiment, experiment.init_state(jax.random.key(3)).params


@pytest.fixture(scope="module")
def sharded():
  return _experiment({"data": 2, "fsdp": 2, "expert": 1, "tensor": 2})


def _check_against_full_sequence(experiment, params, output):
  """Every step's logits equal those of one uncached forward pass over prompt + generated tokens (unpadded)."""
  sequences = [prompt + generated for prompt, generated in zip(PROMPTS, output.tokens)]
  length = max(map(len, sequences))
  tokens = np.zeros((len(sequences), length), np.int32)
  segments = np.zeros((len(sequences), length), np.int32)
  for b, sequence in enumerate(sequences):
    tokens[b, :len(sequence)], segments[b, :len(sequence)] = sequence, 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  reference = jax.jit(experiment.model.apply)({"params": jax.device_get(params)}, tokens, positions, segments)
  reference = np.asarray(reference)
  for b, (prompt, generated, step_logits) in enumerate(zip(PROMPTS, output.tokens, output.logits)):
    assert len(generated) == NEW_TOKENS
    for t in range(NEW_TOKENS):
      np.testing.assert_allclose(step_logits[t], reference[b, len(prompt) - 1 + t], rtol=1e-5, atol=1e-5,
                                 err_msg=f"prompt of length {len(prompt)}, step {t}")


GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, eos_id=-1)


@pytest.fixture(scope="module")
def greedy_left(sharded):
  experiment, params = sharded
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules, prompt_bucket=8)
  return sampler, sampler.generate(params, PROMPTS, GREEDY, padding="left", return_logits=True)


def test_cached_greedy_matches_full_sequence_sharded(sharded, greedy_left):
  experiment, params = sharded
  sampler, left = greedy_left
  _check_against_full_sequence(experiment, params, left)
  # Right padding (same compiled loop: only the host layout differs) gives the same tokens and logits.
  right = sampler.generate(params, PROMPTS, GREEDY, padding="right", return_logits=True)
  assert right.tokens == left.tokens
  np.testing.assert_allclose(right.logits, left.logits, rtol=1e-5, atol=1e-5)
  # The uncached loop (whole buffer through the model every step) agrees token for token.
  uncached = sampler.generate(params, PROMPTS, GREEDY, padding="right", use_cache=False, return_logits=True)
  assert uncached.tokens == left.tokens
  np.testing.assert_allclose(uncached.logits, left.logits, rtol=1e-5, atol=1e-5)


def test_cached_matches_full_sequence_one_device_unscanned():
  experiment, params = _experiment({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, scan_layers=False)
  sampler = Sampler(experiment.model, experiment.mesh, experiment.rules)
  # Temperature sampling: whatever tokens come out, their logits must match the full forward pass.
  sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, eos_id=-1)
  output = sampler.generate(params, PROMPTS, sampling, jax.random.key(7), return_logits=True)
  _check_against_full_sequence(experiment, params, output)


def test_stops_at_eos_and_pads_the_rest(sharded, greedy_left):
  experiment, params = sharded
  sampler, left = greedy_left
  free = left.tokens
  eos = free[0][2]  # row 0 emits this at step 2: treat it as EOS
  stopped = sampler.generate(params, PROMPTS, SamplingConfig(NEW_TOKENS, 0.0, eos_id=eos), return_logits=True)
  assert stopped.tokens[0] == free[0][:free[0].index(eos) + 1]
  for b, (free_row, row) in enumerate(zip(free, stopped.tokens)):
    expected = free_row[:free_row.index(eos) + 1] if eos in free_row else free_row
    assert row == expected
    # Steps after a row's EOS sample nothing for it: their logits are reported as zeros.
    assert stopped.logits[b, :len(row)].any(axis=-1).all() and not stopped.logits[b, len(row):].any()


def test_sample_logits_filters():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  rng = jax.random.key(0)
  keys = jax.random.split(rng, 200)
  draw = lambda sampling: np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, sampling)[0]))(keys))
  assert int(sample_logits(logits, rng, SamplingConfig(temperature=0.0))[0]) == 0
  assert set(draw(SamplingConfig(top_k=2)).tolist()) <= {0, 1}
  # top_p=0.7: the nucleus is {0, 1} (0.5 before token 1 < 0.7, 0.8 before token 2 >= 0.7).
  top_p = draw(SamplingConfig(top_p=0.7))
  assert set(top_p.tolist()) == {0, 1}
  assert set(draw(SamplingConfig(top_p=0.4)).tolist()) == {0}
  assert len(set(draw(SamplingConfig()).tolist())) >= 3
  # Greedy in bf16 (the logits' own dtype, no fp32 copy) is jnp.argmax of the fp32 values: the first of tied
  # maxima (bf16 rounding makes ties), the vocab padding masked.
  wide = jax.random.normal(jax.random.key(1), (6, 700)).astype(jnp.bfloat16)
  wide = wide.at[:, 650].set(jnp.bfloat16(9.0)).at[2, 17].set(jnp.bfloat16(5.0)).at[2, 300].set(jnp.bfloat16(5.0))
  greedy = SamplingConfig(temperature=0.0, vocab_size=640)
  want = jnp.argmax(jnp.where(jnp.arange(700) < 640, wide.astype(jnp.float32), -jnp.inf), axis=-1)
  np.testing.assert_array_equal(jax.jit(lambda x: sample_logits(x, rng, greedy))(wide), want)
  assert int(want[2]) == 17


def test_pad_prompts_layout():
  tokens, positions, segments, last = pad_prompts([[1, 2, 3], [4]], 4, "left", pad_id=0)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
  np.testing.assert_array_equal(segments, [[0, 1, 1, 1], [0, 0, 0, 1]])
  np.testing.assert_array_equal(last, [3, 3])
  tokens, positions, segments, last = pad_prompts([[1, 2, 3], [4]], 4, "right")
  np.testing.assert_array_equal(tokens, [[1, 2, 3, 0], [4, 0, 0, 0]])
  np.testing.assert_array_equal(last, [2, 0])
  with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
    pad_prompts([[1], []], 4, "left")
