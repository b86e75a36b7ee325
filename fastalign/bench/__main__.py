"""``python -m fastalign.bench``: ``fastalign bench`` (and the memory worker that runs one variant)."""
import sys

from .cli import main

sys.exit(main())
