"""`ray job submit --working-dir . -- python jobs/convert.py SRC DST --to {native,hf} [...]`"""

import sys

from rugpt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
