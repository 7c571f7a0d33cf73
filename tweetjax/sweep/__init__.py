"""Hyper-parameter sweeps: defined next to the config (`sweep()`), run locally or emitted for a cluster, reported.

  # in experiments/<name>.py, next to get_config(arg):
  def sweep():
    from tweetjax.sweep import product, zip_
    return product({"optimizer.learning_rate": [1e-3, 3e-3]},
                   zip_({"model.d_model": [64, 128], "model.num_layers": [2, 4]}))

Modules: `spec` (combinators, point names, overrides), `runner` (local subprocess runs, resume, failures),
`emit` (SLURM / shell launch scripts), `report` (tables, plots, scaling-law fit). Entry point: tools/sweep.py.
"""

from tweetjax.sweep.spec import (apply_overrides, axis, chain, format_value, load_config, load_sweep, name_points,
                                 point_name, product, zip_)

__all__ = ["apply_overrides", "axis", "chain", "format_value", "load_config", "load_sweep", "name_points",
           "point_name", "product", "zip_"]
