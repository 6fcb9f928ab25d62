"""Where the tests find what they share: this folder (helper scripts run as processes:
launch_script.py, cluster_script.py, checkpoint_script.py, secret_script.py) and the
checkout's root. Test files live in unit/, integration/ and system/ below it."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
