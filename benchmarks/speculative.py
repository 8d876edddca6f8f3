"""Speculative cascades' decoding throughput against the large model's greedy decoding.

    python benchmarks/speculative.py --large=small --small=tiny --batches=1,8,32 --gammas=1,3,5 \
        [--rules=lossless,chow --alpha=0.5] [--inputs=64 --max-decode-length=64 --dtype=float32]
    python benchmarks/speculative.py --large-model-dir=runs/demo/large --small-model-dir=runs/demo/small_ce \
        --task=cmudict_g2p --batches=1,8,32 --inputs=32 --max-decode-length=64
    python benchmarks/speculative.py --large=gin_configs/models/decoder/decoder_demo_large.gin \
        --small=gin_configs/models/decoder/decoder_demo_small.gin --batches=1,8,32 --gammas=1,3,5

Any family of the model contract: a T5 pair (encoder inputs) or a decoder-only pair (the inputs are
the prompts, prefilled by both models); drafter and verifier are of one family. Random mode
(`--large` / `--small`: gin model files) decodes random inputs with random weights and
EOS disabled, so every row makes exactly --max-decode-length tokens; the drafter then agrees with
the large model almost never: the worst case, one token per large-model call plus the drafts.
Checkpoint mode (`--large-model-dir` / `--small-model-dir`, trained models sharing a vocabulary)
decodes the first rows of `--task`'s `--split` and stops at EOS, with the acceptance those models
reach. Greedy (temperature 0) throughout.

JSON lines on stdout, one per measurement:
- `large_greedy`: `cat_jax.decoding.greedy_decode` of the large model (the reference);
- `speculative`: `cat_jax.decoding.speculative.speculative_decode` per (batch, gamma, rule), with
  tokens/s, the speed-up over `large_greedy` at that batch, the acceptance rate and tokens per
  large-model call;
- `cache_block_write`: one large-model call scoring gamma + 1 tokens with one shared cache position
  against one position per row (what rows accepting different numbers of drafts need): the cost of
  the per-row cache.
Each figure is the median of --repeats timed calls after --warmup untimed ones (compilation
excluded). The same command runs unchanged on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BENCHMARK = "speculative"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", default="small", help="random mode: the large model's size or .gin file")
    p.add_argument("--small", default="tiny", help="random mode: the drafter's size or .gin file")
    p.add_argument("--large-model-dir", default=None, help="checkpoint mode: the large model's MODEL_DIR")
    p.add_argument("--small-model-dir", default=None, help="checkpoint mode: the drafter's MODEL_DIR")
    p.add_argument("--task", default="cmudict_g2p", help="checkpoint mode: the task whose inputs are decoded")
    p.add_argument("--split", default="test")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--gammas", default="1,3,5")
    p.add_argument("--rules", default="lossless", help="comma-separated rules of cat_jax.cascade.speculative")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha of every rule but lossless")
    p.add_argument("--inputs", type=int, default=64, help="input length: the encoder's, or the prompt's")
    p.add_argument("--max-decode-length", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"), help="random mode only")
    p.add_argument("--vocab", type=int, default=common.T5_VOCAB, help="random mode only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    a.batch_list, a.gamma_list, a.rule_list = (
        common.csv_ints(a.batches),
        common.csv_ints(a.gammas),
        common.csv_list(a.rules),
    )
    if (a.large_model_dir is None) != (a.small_model_dir is None):
        p.error("give both --large-model-dir and --small-model-dir, or neither (random mode)")
    if a.repeats < 1 or a.warmup < 0 or min(a.batch_list + a.gamma_list, default=0) < 1:
        p.error("--repeats, batches and gammas must be >= 1, --warmup >= 0")
    return a


def shape(model, config) -> dict:
    """The model's family and shape fields for the JSON lines."""
    if model.family == "t5":
        return {"family": "t5", **common.shape_fields(config)}
    fields = ("model_type", "emb_dim", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "num_layers", "vocab_size")
    return {"family": model.family, **{k: getattr(config, k) for k in fields}}


def decoding_inputs(model, tokens, vocab) -> dict:
    """The model's decoding inputs for input token rows [b, Li] (the data layer's encoder inputs; a
    decoder's prompt drops their EOS and gets the vocabulary's prompt tokens)."""
    import numpy as np

    zeros = np.zeros((tokens.shape[0], 1), np.int32)
    examples = {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": zeros,
        "decoder_target_tokens": zeros,
        "decoder_loss_weights": zeros.astype(np.float32),
    }
    return model.decoding_inputs(model.make_batch(examples, vocab))


def random_models(a: argparse.Namespace, mesh, rules):
    """{'large'|'small': (model, params, config)}, random inputs [max batch, Li], eos -1 and the
    vocabulary that lays out a decoder's prompts (bytes: no prompt tokens)."""
    import jax
    import numpy as np
    from flax import linen as nn

    from cat_jax import models as models_lib
    from cat_jax import partitioning, vocabularies

    models = {}
    for role, size, seed in (("large", a.large, 0), ("small", a.small, 1)):
        config = common.model_config(size, a.dtype, a.vocab)
        model = models_lib.build(config)
        _, specs = model.abstract_params()
        params = jax.jit(
            lambda k, m=model, d=config.compute_dtype: jax.tree_util.tree_map(
                lambda x: x.astype(d), nn.meta.unbox(m.init_params(k))
            ),
            out_shardings=partitioning.tree_shardings(mesh, specs, rules),
        )(jax.random.key(seed))
        models[role] = (model, params, config)
    inputs = np.random.default_rng(0).integers(2, a.vocab, (max(a.batch_list), a.inputs), dtype=np.int32)
    return models, inputs, -1, vocabularies.ByteVocabulary()  # eos_id -1 never matches: fixed-length decoding


def restored_models(a: argparse.Namespace, mesh, rules):
    """The two checkpoints, the task split's first inputs [max batch, Li] (as the data layer gives
    them: ending in EOS, which a decoder's prompt drops), its EOS id and vocabulary."""
    import numpy as np

    import tasks  # noqa: F401  (registers the tasks)
    from cat_jax import data as data_lib
    from cat_jax.frozen_model import load_frozen_model

    models = {}
    for role, model_dir in (("large", a.large_model_dir), ("small", a.small_model_dir)):
        frozen = load_frozen_model(model_dir, mesh=mesh, rules=rules)
        models[role] = (frozen.model, frozen.params, frozen.config)
    arrays = data_lib.load_split(
        a.task, a.split, {"inputs": a.inputs, "targets": a.max_decode_length}, max_examples=max(a.batch_list)
    )
    vocab = data_lib.get_vocabulary_of(a.task)
    enc = arrays.features["encoder_input_tokens"]
    reps = -(-max(a.batch_list) // len(enc))
    return models, np.tile(enc, (reps, 1))[: max(a.batch_list)], vocab.eos_id, vocab


def timed_ms(compiled, args: tuple, a: argparse.Namespace) -> tuple[float, object]:
    """(median milliseconds of a call, its last output)."""
    import jax

    out = []
    times = common.time_steps(
        lambda: out.append(compiled(*args)) or out[-1], jax.block_until_ready, a.repeats, a.warmup
    )
    return 1e3 * statistics.median(times), jax.device_get(out[-1])


def run(a: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    from cat_jax import partitioning
    from cat_jax.cascade.speculative import rule_id
    from cat_jax.decoding import greedy_decode
    from cat_jax.decoding.speculative import speculative_decode

    mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
    sharding = partitioning.batch_sharding(mesh, rules)
    models, inputs, eos_id, vocab = (restored_models if a.large_model_dir else random_models)(a, mesh, rules)
    (large, large_params, large_config), (small, small_params, small_config) = models["large"], models["small"]
    device, steps = common.jax_device_name(), a.max_decode_length
    base = {
        "benchmark": BENCHMARK,
        "device": device,
        "inputs": a.inputs,
        "max_decode_length": steps,
        "large": shape(large, large_config),
        "small": shape(small, small_config),
        "mode": "checkpoints" if a.large_model_dir else "random",
        **common.versions(),
    }
    greedy = jax.jit(functools.partial(greedy_decode, large, max_decode_length=steps, eos_id=eos_id))
    for batch in a.batch_list:
        enc = {k: jax.device_put(v, sharding) for k, v in decoding_inputs(large, inputs[:batch], vocab).items()}
        with common.guarded({**base, "impl": "large_greedy", "batch": batch}):
            start = time.perf_counter()
            compiled = greedy.lower(large_params, enc).compile()
            compile_s = time.perf_counter() - start
            ms, out = timed_ms(compiled, (large_params, enc), a)
            tokens = int(out.lengths.sum())
            reference = tokens / ms * 1e3
            common.emit(
                {
                    **base,
                    "impl": "large_greedy",
                    "batch": batch,
                    "decode_ms": round(ms, 3),
                    "generated_tokens": tokens,
                    "tokens_per_s": round(reference, 1),
                    "compile_s": round(compile_s, 2),
                }
            )
        for gamma in a.gamma_list:
            spec = jax.jit(
                lambda sp, lp, e, key, index, alpha, gamma=gamma: speculative_decode(
                    small, sp, large, lp, e, key, index, alpha, gamma=gamma, max_decode_length=steps, eos_id=eos_id
                )
            )
            for rule in a.rule_list:
                fields = {
                    **base,
                    "impl": "speculative",
                    "batch": batch,
                    "gamma": gamma,
                    "rule": rule,
                    "alpha": None if rule == "lossless" else a.alpha,
                }
                with common.guarded(fields):
                    args = (
                        small_params,
                        large_params,
                        enc,
                        jax.random.key(0),
                        jnp.int32(rule_id(rule)),
                        jnp.float32(a.alpha),
                    )
                    start = time.perf_counter()
                    compiled = spec.lower(*args).compile()
                    compile_s = time.perf_counter() - start
                    ms, out = timed_ms(compiled, args, a)
                    tokens, calls = int(out.lengths.sum()), int(out.rounds.sum())
                    common.emit(
                        {
                            **fields,
                            "decode_ms": round(ms, 3),
                            "generated_tokens": tokens,
                            "tokens_per_s": round(tokens / ms * 1e3, 1),
                            "speedup_over_large_greedy": common.ratio(tokens / ms * 1e3, reference),
                            "acceptance_rate": round(int(out.accepted.sum()) / (gamma * calls), 4),
                            "tokens_per_large_call": round(tokens / calls, 3),
                            "compile_s": round(compile_s, 2),
                        }
                    )
            with common.guarded({**base, "impl": "cache_block_write", "batch": batch, "gamma": gamma}):
                shared, _ = large.start_decoding(large_params, enc, steps + gamma + 1)
                block = jnp.ones((batch, gamma + 1), jnp.int32)
                call = jax.jit(lambda c: large.decode_block(large_params, c, block)[0])
                position = steps // 2  # mid-sequence: a realistic context, room for the block
                per_row = large.set_positions(shared, jnp.full((batch,), position, jnp.int32))
                shared = large.set_positions(shared, position)
                shared_ms, _ = timed_ms(call, (shared,), a)
                row_ms, _ = timed_ms(call, (per_row,), a)
                common.emit(
                    {
                        **base,
                        "impl": "cache_block_write",
                        "batch": batch,
                        "gamma": gamma,
                        "shared_position_ms": round(shared_ms, 4),
                        "per_row_positions_ms": round(row_ms, 4),
                        "per_row_over_shared": common.ratio(row_ms, shared_ms),
                    }
                )


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
