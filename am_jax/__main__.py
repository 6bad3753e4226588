"""``python -m am_jax finetune --config=...``: the ``am-jax`` command."""
from am_jax.cli import main

raise SystemExit(main())
