"""Checkpoints in and out: Hugging Face and T5X -> cat_jax MODEL_DIR, cat_jax -> Hugging Face.

tree.py      flat parameter dicts and the names-and-shapes check
hf.py        the Hub's T5 / mT5 layout (config.json, safetensors, tokenizer)
t5x.py       T5X checkpoints (legacy msgpack + TensorStore, Orbax)
importer.py  `python -m cat_jax.import_checkpoint`
exporter.py  `python -m cat_jax.export_checkpoint`
"""
