"""The offline multi-domain preference benchmark's data (tasks CSG and KA), with its datasheet
(``README.md``). Built by ``python -m bench.datagen build``; read with
``training.data.load_benchmark``. Shipped with the package, so the job kinds that train on
the bundled benchmark find it wherever generalrm is installed, whatever the working directory.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
