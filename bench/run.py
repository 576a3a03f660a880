"""``make bench``: every benchmark script in this folder, one line per figure (docs/performance.md).

The fsync'd maildir-create ceiling is measured in the same run as the SMTP load, so the ratio of
the server's rate to what the disk allows is visible on whatever machine runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["fsync_ceiling.py", "smtp_load.py", "queue_load.py", "imap_load.py"]

if __name__ == "__main__":
    failed = 0
    for script in SCRIPTS:
        failed |= subprocess.call([sys.executable, str(HERE / script)])
    sys.exit(failed)
