"""Checkpoints in and out of every family: what the families' converters share.

    hub.py   the Hugging Face Hub directory: config.json and safetensors, one tensor at a time
    tree.py  flat parameter dicts and the names-and-shapes check against a model config

Each family's own converters live with it (`models/t5/convert/`: the Hub's T5 / mT5 layout and T5X
checkpoints; `models/decoder/convert.py`: llama, mistral, qwen2, qwen3, gemma, gemma2). The jobs are
`cat_jax.jobs.import_checkpoint` and `cat_jax.jobs.export_checkpoint`.
"""
