"""Integrations with other libraries: optional extras the core package never imports.

- :mod:`ring_attention.integrations.transformers`: Hugging Face transformers attention
  backends (``pip install ring-attention[transformers]``).
"""
