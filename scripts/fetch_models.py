"""Fetch the real models of the demo, tests and benchmarks into $MLAIFY_CACHE (default ~/.cache/mlaify)."""

import argparse
import logging

from mlaify.fetch import MODELS, fetch_model

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    for name in parser.parse_args().names:
        print(fetch_model(name))
