"""Scaling-law fit: recovers a known law from noisy synthetic runs, the compute-optimal closed form matches a
brute-force search, N counts non-embedding parameters exactly, and the sweep report fits and plots a law."""

import json
import os

import numpy as np
import pytest

from tweetjax import scaling
from tweetjax.model.config import ModelConfig
from tweetjax.sweep import report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Chinchilla fit (Hoffmann et al. 2022, approach 3) as ground truth.
TRUE = scaling.ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)


def _synthetic_runs(law, noise, seed=0):
  N, D = np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6))
  N, D = N.ravel(), D.ravel()
  L = law.loss(N, D) * np.exp(np.random.default_rng(seed).normal(0.0, noise, N.shape))
  return N, D, L


@pytest.fixture(scope="module")
def noisy_fit():
  N, D, L = _synthetic_runs(TRUE, noise=0.005)
  return scaling.fit(N, D, L), (N, D, L)


def test_fit_recovers_known_exponents_from_noisy_runs(noisy_fit):
  law, (N, D, L) = noisy_fit
  # 36 runs with 0.5% multiplicative noise: exponents within 0.02, E within 5%, predictions within 1%.
  assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02)
  assert law.beta == pytest.approx(TRUE.beta, abs=0.02)
  assert law.E == pytest.approx(TRUE.E, rel=0.05)
  assert np.max(np.abs(scaling.residuals(law, N, D, L))) < 0.015
  n_opt, d_opt = law.compute_optimal(1e21)
  true_n, true_d = TRUE.compute_optimal(1e21)
  assert n_opt == pytest.approx(true_n, rel=0.25) and d_opt == pytest.approx(true_d, rel=0.25)


def test_fit_is_exact_without_noise():
  N, D, L = _synthetic_runs(TRUE, noise=0.0)
  law = scaling.fit(N, D, L)
  for name in ("E", "A", "alpha", "B", "beta"):
    assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=2e-3), name


def test_compute_optimal_matches_brute_force(noisy_fit):
  law, _ = noisy_fit
  for flops in (1e18, 1e21, 1e24):
    N = np.geomspace(1e5, 1e14, 200_001)
    best = N[np.argmin(law.loss(N, flops / (6 * N)))]
    n_opt, d_opt = law.compute_optimal(flops)
    assert n_opt == pytest.approx(best, rel=1e-3)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-9)


def test_fit_rejects_unusable_runs():
  with pytest.raises(ValueError, match="at least 5 runs"):
    scaling.fit([1e6] * 4, [1e8, 2e8, 3e8, 4e8], [3.0] * 4)
  with pytest.raises(ValueError, match="vary both N"):
    scaling.fit([1e6] * 6, np.geomspace(1e8, 1e10, 6), np.linspace(3, 2, 6))
  with pytest.raises(ValueError, match="positive"):
    scaling.fit([1e6, 2e6, 3e6, 4e6, -1], [1e8, 2e8, 3e8, 4e8, 5e8], [3.0] * 5)


@pytest.mark.parametrize("tie,norm_style", [(False, "pre"), (True, "sandwich")])
def test_non_embedding_params_counts_everything_but_embedding_and_head(tie, norm_style):
  c = ModelConfig(vocab_size=1000, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, mlp_dim=100,
                  tie_embeddings=tie, norm_style=norm_style)
  attention = c.d_model * c.num_heads * c.head_dim * 2 + 2 * c.d_model * c.num_kv_heads * c.head_dim
  norms = (2 if norm_style == "pre" else 4) * c.d_model
  expected = c.num_layers * (attention + 3 * c.d_model * c.mlp_dim + norms) + c.d_model  # + final norm
  assert scaling.non_embedding_params(c) == expected


def test_scaling_experiment_sweep_varies_model_size_and_tokens(tmp_path):
  points = runner.plan(os.path.join(REPO, "experiments", "scaling.py"), str(tmp_path))
  assert len(points) == 15 and all(p.devices == 1 for p in points)
  sizes = {scaling.non_embedding_params(ModelConfig.from_config(p.config.model)) for p in points}
  assert len(sizes) == 5 and max(sizes) / min(sizes) > 40
  assert {p.total_steps for p in points} == {100, 200, 400}
  assert all(p.config.optimizer.warmup_steps == p.total_steps // 10 for p in points)
  assert len(runner.plan(os.path.join(REPO, "experiments", "scaling.py") + ":quick", str(tmp_path))) == 6


def test_report_fits_the_law_to_a_sweeps_metrics(tmp_path):
  """The scaling experiment's 15 points with metrics.jsonl files written from a known law: report end to end."""
  law = scaling.ScalingLaw(E=0.9, A=30.0, alpha=0.4, B=60.0, beta=0.35)
  points = runner.plan(os.path.join(REPO, "experiments", "scaling.py"), str(tmp_path / "work"))
  rng = np.random.default_rng(0)
  for point in points:
    N = scaling.non_embedding_params(ModelConfig.from_config(point.config.model))
    tokens_per_step = point.config.data.global_batch_size * point.config.data.seq_len
    os.makedirs(point.workdir)
    with open(os.path.join(point.workdir, "metrics.jsonl"), "w") as f:
      for step in range(10, point.total_steps + 1, 10):
        loss = float(law.loss(N, step * tokens_per_step)) * (1 + rng.normal(0, 0.002))
        f.write(json.dumps({"step": step, "loss": loss + 0.01, "ce_loss": loss, "tokens_per_s": 1000.0}) + "\n")
    with open(os.path.join(point.workdir, runner.DONE), "w") as f:
      json.dump({"final_step": point.total_steps, "wall_s": 1.0}, f)
  out_dir = str(tmp_path / "report")
  text = report.write_report(points, out_dir, fit_tail=0.0, flop_budgets=[1e15])
  with open(os.path.join(out_dir, "scaling_fit.json")) as f:
    summary = json.load(f)
  assert summary["metric"] == "ce_loss" and len(summary["points"]) == 15
  assert summary["law"]["alpha"] == pytest.approx(law.alpha, abs=0.05)
  assert summary["law"]["beta"] == pytest.approx(law.beta, abs=0.05)
  assert summary["residual_max_abs"] < 0.01
  [optimal] = summary["compute_optimal"]
  assert optimal["flops"] == 1e15 and 6 * optimal["N"] * optimal["D"] == pytest.approx(1e15)
  assert "alpha = " in text and "Compute-optimal" in text
  assert os.path.getsize(os.path.join(out_dir, "scaling_fit.png")) > 1000
