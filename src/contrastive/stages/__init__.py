"""The pipeline's stages, one module each: ``prepare``, ``pretrain``, ``probe``, ``export`` and
``register``.

A stage is a thin function ``run(params, layout, ...)``: it reads its inputs from the
:class:`~contrastive.layout.Layout`, calls the library (``train``, ``evaluate``, ``export``,
``registry``, which compute and return and write nothing), and writes the outputs, each
atomically, at the end. The CLI (and through it DVC and Prefect), the tests and the benches call
these same functions. This package imports no stage module itself, so that a stage's DVC
dependencies are its own module and what it imports (``tests/test_stage_deps.py``), and the
library never imports from here (``tests/test_architecture.py``); docs/architecture.md draws the
layers.
"""
