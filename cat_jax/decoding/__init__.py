"""Every decoding loop, over the model contract's hooks (start_decoding, decode_block,
set_positions), with per-token scores: greedy, sampling, beam search, speculative.

    greedy.py       DecodeOutput, the cached one-token-per-step loop, greedy_decode
    sampling.py     temperature / top-k / top-p sampling (seeded)
    beam.py         beam search with T5X's length penalty
    speculative.py  speculative (cascade) decoding: drafts, block verification, per-row rollback
    scoring.py      teacher-forced scoring of given tokens
    method.py    the gin-chosen method of eval / infer / cascade_eval (`decoding.method`)
"""

from cat_jax.decoding.beam import BeamOutput, beam_search, length_penalty
from cat_jax.decoding.greedy import DecodeOutput, decode_loop, greedy_decode, greedy_token, next_token_logp, suppress
from cat_jax.decoding.method import DecodingConfig, make_decoder
from cat_jax.decoding.sampling import Sampler, sample_decode, sampling_probs
from cat_jax.decoding.scoring import score_tokens, shift_right

__all__ = [
    "BeamOutput",
    "DecodeOutput",
    "DecodingConfig",
    "Sampler",
    "beam_search",
    "decode_loop",
    "greedy_decode",
    "greedy_token",
    "length_penalty",
    "make_decoder",
    "next_token_logp",
    "sample_decode",
    "sampling_probs",
    "score_tokens",
    "shift_right",
    "suppress",
]
