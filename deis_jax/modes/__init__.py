"""Run modes of ``main.py``: each module defines ``validate(config)`` and ``run(config, workdir)``."""
