"""seqio task registrations for cat_jax; importing this package registers every task and mixture."""
