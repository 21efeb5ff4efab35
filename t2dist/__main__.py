"""``python -m t2dist``: the ``t2dist`` command."""
import sys

from t2dist.cli.main import main

sys.exit(main())
