"""Run HF peft in a subprocess: it shares the import name ``peft`` with this fork.

The child gets no PYTHONPATH and starts outside the repository, so ``import peft`` there is
the pip-installed HF peft, never ``peft/src``.
"""
import os
import subprocess
import sys


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def hf_peft_available() -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('peft') else 1)"
    return subprocess.run([sys.executable, "-c", probe], cwd="/", env=clean_env()).returncode == 0


def run_hf_script(script: str, work_dir) -> subprocess.CompletedProcess:
    """Write ``script`` to ``work_dir/hf.py`` and run it with ``work_dir`` as its argument."""
    path = os.path.join(str(work_dir), "hf.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)
    return subprocess.run(
        [sys.executable, path, str(work_dir)], cwd=str(work_dir), env=clean_env(), capture_output=True, text=True
    )
