"""Alias of experiments/llama3_2_1b.py (Llama 3.2 1B, its RoPE scaling included): the GPU benchmark model."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "experiments_llama3_2_1b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_2_1b.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
