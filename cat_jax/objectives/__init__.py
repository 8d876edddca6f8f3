"""Training objectives, chosen by gin (`train.objective = @TokenLoss()`, `@Salt()`): what a train
step minimises, in which phases, with or without the frozen teacher.

    base.py        Objective: phases, the loss of each phase, checks, run_info entries, its data
    token_loss.py  TokenLoss: cross-entropy, distillation and CAT (every mask rule) as LossOptions
    (cat_jax/salt/objective.py: Salt, SALT and SALT_DS, imported by their run files)

The training loop asks the objective for the phase of each step and compiles one step per phase;
it knows no method.
"""

from cat_jax.objectives.base import LOSS_DENOMINATOR, LossFn, Objective
from cat_jax.objectives.token_loss import LossOptions, TokenLoss

__all__ = ["LOSS_DENOMINATOR", "LossFn", "LossOptions", "Objective", "TokenLoss"]
