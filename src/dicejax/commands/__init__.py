"""Sub-commands of the ``dicejax`` CLI beyond ``train`` and ``align``.

Each module here defines ``register(subparsers)``, which adds one sub-command whose handler
calls an experiment function, prints a table and saves JSON and figures.
"""

MODULES: tuple[str, ...] = ("cascade", "contribute", "detect", "rewire", "topo_opt")
