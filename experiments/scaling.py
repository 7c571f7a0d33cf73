"""A compute-optimal scaling sweep that runs on a CPU: 5 model sizes x 3 token counts on the synthetic stream.

  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --parallel=2
  python tools/sweep.py --config=experiments/scaling.py --workdir=/tmp/scaling --report --flop_budget=1e18

Each point trains its own cosine schedule to its own token count (a fit needs final losses of complete schedules,
not intermediate points of one long run). No batch is seen twice, so the training loss of the last steps (logged
before each update) is a held-out loss: the report fits `ce_loss` averaged over the last 10% of steps.
Config args (`experiments/scaling.py:<arg>`):
  size=K               get_config() trains SIZES[K] (default 2)
  sizes=(0,1,2,3,4)    which SIZES the sweep covers
  steps=(100,200,400)  the step counts the sweep covers (tokens = steps x 16 x 64)
  quick                a 6-point smoke version (3 sizes x 2 short step counts)
"""

from tweetjax.config import base_config
from tweetjax.config_args import parse_arg

# (d_model, num_layers, num_heads): head_dim 16, mlp 4 x d_model, no grouped kv heads.
# Non-embedding parameters (N): 16.5k, 37.0k, 131k, 295k, 787k.
SIZES = ((32, 1, 2), (48, 1, 3), (64, 2, 4), (96, 2, 6), (128, 3, 8))
ARGS = dict(size=2, sizes=(0, 1, 2, 3, 4), steps=(100, 200, 400), quick=False)


def _parse(arg):
  arg = parse_arg(arg, **ARGS)
  if arg.quick:
    arg.sizes, arg.steps = (0, 2, 4), (20, 40)
  return arg


def model_overrides(index: int) -> dict:
  d_model, num_layers, num_heads = SIZES[index]
  return {"model.d_model": d_model, "model.num_layers": num_layers, "model.num_heads": num_heads,
          "model.num_kv_heads": num_heads, "model.mlp_dim": 4 * d_model}


def get_config(arg=None):
  arg = _parse(arg)
  config = base_config()
  config.model.update(vocab_size=512, head_dim=16)
  config.model.update({key.split(".")[1]: value for key, value in model_overrides(arg.size).items()})
  config.mesh.update(data=-1)
  config.data.seq_len = 64
  config.data.global_batch_size = 16
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 20
  config.train.steps = 200
  config.train.log_every = 5
  config.checkpoint.every_steps = 100  # a killed sweep resumes its points from at most 100 steps back
  config.lock()
  return config


def sweep(arg=None):
  from tweetjax.sweep import product, zip_
  arg = _parse(arg)
  sizes = [model_overrides(i) for i in arg.sizes]
  schedules = zip_({"train.steps": list(arg.steps), "optimizer.warmup_steps": [s // 10 for s in arg.steps]})
  return product(sizes, schedules)
