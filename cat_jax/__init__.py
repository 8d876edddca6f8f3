"""cat_jax: cascade-aware training and cascade evaluation of language models in JAX/Flax."""
