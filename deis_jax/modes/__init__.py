"""Run modes of ``main.py``: each module has ``validate(config)`` and ``run(config, workdir)``."""
