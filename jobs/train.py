"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny-cpu.yaml [key=value ...]`

The same as `rugpt-ray train`; the run folder is printed on the last line.
"""

import sys

from rugpt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
