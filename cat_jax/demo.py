"""`make demo` (`python -m cat_jax.demo`): the main job at CPU scale, through the same command lines a
user would type (see `cat_jax.jobs.demo` for its stages and environment variables).
"""

from cat_jax.jobs.demo import main

if __name__ == "__main__":
    main()
