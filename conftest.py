"""Repository-wide pytest setup: the vendored fork must win over any pip-installed peft."""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "peft", "src"))
sys.path.insert(0, ROOT)
