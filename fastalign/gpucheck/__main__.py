"""``python -m fastalign.gpucheck``: the ``fastalign gpu-check`` command (the child process of ``--dry-run``)."""
import argparse
import sys

from . import add_arguments, run_from_arguments

parser = argparse.ArgumentParser(prog="python -m fastalign.gpucheck", description=__doc__)
add_arguments(parser)
sys.exit(run_from_arguments(parser.parse_args()))
