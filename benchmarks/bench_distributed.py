"""Sharded covariance, K ranks x 1 thread against 1 process x K threads: `refframe bench --distributed K`."""

import sys

from refframe.bench.distributed import main

if __name__ == "__main__":
    sys.exit(main())
