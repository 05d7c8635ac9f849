import sys

from lorasum_assets.tools.cli import main

sys.exit(main())
