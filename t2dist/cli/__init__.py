"""The ``t2dist`` command line: one module per group of commands; ``main`` builds the parser."""
