"""Repeated frame builds (PCA cache hit vs miss, K clusters, hashing): `refframe bench --repeated`."""

import sys

from refframe.bench.repeated import main

if __name__ == "__main__":
    sys.exit(main())
