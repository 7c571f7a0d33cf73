"""Checkpoint conversion to and from other ecosystems (Hugging Face Llama: hf.py)."""
