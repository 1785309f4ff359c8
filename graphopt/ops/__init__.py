"""graphopt's custom operators (``torch.ops.graphopt.*``).

Each module holds one kernel family: the ``torch.library`` registration, the launcher(s) and a
pure-torch reference that defines what correct means. Importing this package registers the ops; it
does not initialize CUDA.
"""
