"""The offline multi-domain preference benchmark (tasks CSG and KA) and its builder.

Build with ``python -m bench.datagen build`` (``make data``); read with
``training.data.load_benchmark``. See ``benchdata/README.md`` for the datasheet.
"""
