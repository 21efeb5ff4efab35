"""``python -m t2dist.cli``: the ``t2dist`` command."""
import sys

from t2dist.cli.main import main

sys.exit(main())
