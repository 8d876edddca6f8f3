"""A trained model restored for use without training: the CAT teacher, eval, infer, cascades.

Its parameters live apart from any train state: restored once (parameters only) from a checkpoint
written by `cat_jax.train`, optionally cast (the CAT teacher is bfloat16 by default), placed in
shards by the same logical axis rules as everything else (fitted to its sizes), and never saved. Its
model (any family of `cat_jax.models`) comes from its own MODEL_DIR's `run_info.json`, so a
checkpoint is self-describing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cat_jax import model_dir as model_dir_lib
from cat_jax import models, partitioning, vocabularies
from cat_jax.checkpoints import latest_finished_step, restore_params
from cat_jax.errors import CheckpointError, TeacherMismatchError


class FrozenModel:
    """A restored model: its `Model` (`cat_jax.models`), its sharded parameters and a logits
    function that carries the mesh and logical axis rules its parameters were placed by."""

    def __init__(
        self,
        model_dir: str,
        step: int,
        model: models.Model,
        params: Any,
        param_shardings: Any,
        info: dict[str, Any],
        mesh: Mesh,
        rules,
    ):
        self.model_dir, self.step, self.model, self.info = model_dir, step, model, info
        self.params, self.param_shardings = params, param_shardings
        self.mesh, self.rules = mesh, rules
        self._logits = jax.jit(self._constrained_logits)

    @property
    def config(self) -> Any:
        return self.model.config

    def _constrained_logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        with partitioning.traced_activation_sharding(self.mesh, self.rules):
            return self.model.logits(params, batch)

    def logits_fn(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """Teacher-forced logits [batch, length, vocab] in the model's compute dtype. Its
        activations are constrained by this model's mesh and rules wherever it is traced (inside
        `partitioning.activation_sharding` or not) or called."""
        return self._logits(params, batch)

    @property
    def abstract_params(self) -> Any:
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params
        )

    def bytes_per_device(self) -> int:
        return partitioning.per_device_bytes(self.params)

    def describe(self) -> dict[str, Any]:
        """run_info.json's record of this model as a teacher (its family only when not T5: a record
        written before families existed stays equal)."""
        out = {"model_dir": self.model_dir, "step": self.step, "model_config": self.config.to_dict()}
        if self.model.family != models.DEFAULT_FAMILY:
            out["model_family"] = self.model.family
        return out


def read_model_info(model_dir: str) -> dict[str, Any]:
    info = model_dir_lib.read_run_info(model_dir)
    if info is None:
        raise CheckpointError(
            f"{model_dir!r} has no {model_dir_lib.RUN_INFO}: it does not exist or was not written by "
            f"cat_jax.train. Point it at the MODEL_DIR of a cat_jax training run."
        )
    return info


def load_frozen_model(
    model_dir: str, *, mesh: Mesh, rules, step: int | None = None, dtype: str | None = None
) -> FrozenModel:
    """Restore a model's parameters (latest step unless given) into shards, cast to `dtype`."""
    info = read_model_info(model_dir)
    model = models.from_run_info(info, **({"dtype": dtype} if dtype is not None else {}))
    rules = model.fit_rules(mesh.shape, rules)
    abstract, specs = model.abstract_params()
    shardings = partitioning.tree_shardings(mesh, specs, rules)
    param_dtype = jnp.dtype(dtype) if dtype is not None else None
    template = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, param_dtype or a.dtype, sharding=s), abstract, shardings
    )
    params, meta = restore_params(model_dir, template, step=step)
    step = int(meta["step"])
    return FrozenModel(model_dir, step, model, params, shardings, info, mesh, rules)


def check_vocabulary(
    model_dir: str, info: dict[str, Any], config: Any, vocab, role: str = "teacher", same_size: bool = True
) -> None:
    """Refuse a checkpoint (by its run_info) whose vocabulary differs from `vocab` / `config`
    (with `same_size=False`, its tokenizer only: a teacher's logits may have more or fewer padding
    rows past the tokenizer's ids than the student's, e.g. Qwen2.5 7B's 152064 and 0.5B's 151936)."""
    theirs = info["vocabulary"]
    ours = model_dir_lib.vocab_info(vocab)
    if theirs != ours:
        source = (info.get("imported_from") or {}).get("source")
        resolved = vocabularies.resolve(vocab)
        ours_from = getattr(resolved, "directory", None) or getattr(resolved, "sentencepiece_model_file", None)
        raise TeacherMismatchError(
            f"The {role} in {model_dir}{f' (imported from {source})' if source else ''} was trained "
            f"with vocabulary {theirs}, but this run uses {ours}{f' (from {ours_from})' if ours_from else ''}: "
            f"their tokenizers differ. Both models of a cascade (and a model and its task) must share one "
            f"vocabulary: tokenize the task with that model's vocabulary "
            f"(--gin.get_vocabulary.from_model_dir={model_dir}), or train the models on tasks with "
            f"the same vocabulary."
        )
    if not same_size and info["model_config"]["vocab_size"] < vocabularies.resolve(vocab).vocab_size:
        raise TeacherMismatchError(
            f"The {role}'s vocab_size {info['model_config']['vocab_size']} is smaller than its tokenizer's "
            f"{vocabularies.resolve(vocab).vocab_size} ids: {model_dir}'s run_info.json does not describe its model."
        )
    if same_size and info["model_config"]["vocab_size"] != config.vocab_size:
        raise TeacherMismatchError(
            f"The {role}'s vocab_size {info['model_config']['vocab_size']} differs from "
            f"{config.vocab_size}. Use the same {type(config).__name__}.vocab_size in both runs: unset (the "
            f"trainer pads the vocabulary to a multiple of 128) or the one a pretrained model's gin file sets."
        )


def check_config(model_dir: str, info: dict[str, Any], expected: Any, role: str = "checkpoint") -> None:
    """Refuse a checkpoint written for a different model (family or config) than the one gin names
    (the vocab_size and compute dtype are not compared)."""
    family = models.family_of_run_info(info)
    if family != expected.family:
        raise TeacherMismatchError(
            f"The {role} in {model_dir} is a {family!r} model, but the configured model is a {expected.family!r} "
            f"one ({type(expected).__name__}). Point the directory at the right run or give the gin model file of "
            f"that checkpoint."
        )
    written = models.config_from_run_info(info).to_dict()
    diffs = model_dir_lib.config_differences(
        written, expected.replace(vocab_size=written["vocab_size"], dtype=written["dtype"]).to_dict()
    )
    if diffs:
        raise TeacherMismatchError(
            f"The {role} in {model_dir} was written for a different model config than "
            f"the one configured:\n  "
            + "\n  ".join(diffs)
            + "\nPoint the directory at the right run or fix the configured model (e.g. the "
            "gin_configs/models/ file of that checkpoint)."
        )


def check_cascade_models(model_dirs: Mapping[str, str], large: str, *, shared_vocabulary: bool = True) -> None:
    """Refuses, before anything is decoded (model_dirs[large] is the large model), a model directory
    without run_info.json (CheckpointError), with shared_vocabulary (speculative decoding: the
    drafter's tokens are the verifier's) a model whose vocabulary differs from the large one's
    (TeacherMismatchError), and a model directory without a finished checkpoint (CheckpointError).
    cascade_eval's models may have different vocabularies: each reads the split's text in its own."""
    info = {name: read_model_info(d) for name, d in model_dirs.items()}
    want = (info[large]["vocabulary"], info[large]["model_config"]["vocab_size"])
    for name, model_dir in model_dirs.items():
        have = (info[name]["vocabulary"], info[name]["model_config"]["vocab_size"])
        if shared_vocabulary and have != want:
            raise TeacherMismatchError(
                f"small model {name!r} ({model_dir}) has vocabulary {have[0]} with vocab_size {have[1]}, "
                f"but the large model ({model_dirs[large]}) has {want[0]} with vocab_size {want[1]}. "
                "Speculative decoding verifies the drafter's tokens with the large model, so both must share "
                "one vocabulary: pair models trained with the same tokenizer (cascade_eval takes models with "
                "different tokenizers)."
            )
    for model_dir in model_dirs.values():
        latest_finished_step(model_dir)
