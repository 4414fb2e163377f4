"""The ``kface`` command line, apart from the orchestration (``flows/``) and the product
(``inference/``) it calls: ``cli.main`` (the pipeline's commands and the app),
``cli.product`` (the commands that run a model), ``cli.shop`` (count, counts, dashboard),
``cli.options`` (shared options) and ``cli.terminal`` (what they print)."""
