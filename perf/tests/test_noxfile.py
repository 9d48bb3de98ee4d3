"""The noxfile's torch handling: what pip is asked to install, and a dry run of ``skip``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nox = pytest.importorskip("nox")

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {"test": ["pytest>=8", "hypothesis>=6.100"], "perf": ["pytest>=8", "torch>=2.5", "matplotlib>=3.8"]}


def _load_noxfile(monkeypatch, **env):
    for key in ("RING_ATTENTION_TORCH", "RING_ATTENTION_TORCH_INDEX"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    # A fresh session registry: loading the noxfile again must not re-register into nox's own.
    monkeypatch.setattr(nox.registry, "_REGISTRY", type(nox.registry._REGISTRY)())
    spec = importlib.util.spec_from_file_location(f"noxfile_under_test_{len(env)}", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Session:
    """A nox session that records what it is asked to run: ``("run" | "install", args, external)``."""

    def __init__(self, posargs: list[str] | tuple[str, ...] = ()):
        self.posargs = list(posargs)
        self.calls: list[tuple] = []

    @property
    def runs(self) -> list[tuple]:
        return [args for kind, args, _ in self.calls if kind == "run"]

    def run(self, *args, **kwargs):
        self.calls.append(("run", args, kwargs.get("external")))

    def install(self, *args, **kwargs):  # pragma: no cover - must not be called
        self.calls.append(("install", args, None))

    def log(self, *args):  # pragma: no cover
        pass


def _names(requirements):
    return [r.split(">")[0].split("=")[0].split("[")[0] for r in requirements]


def test_default_installs_the_pinned_torch_with_no_index(monkeypatch):
    nf = _load_noxfile(monkeypatch)
    assert nf.install_commands("perf") == [["torch==2.13.0"], ["-e", ".[perf]"]]
    assert nf.perf.venv_backend is None and nf.tests.venv_backend is None  # nox's virtualenv


def test_index_variable_applies_to_torch_only(monkeypatch):
    nf = _load_noxfile(monkeypatch, RING_ATTENTION_TORCH_INDEX="file:///somewhere/cpu")
    torch_cmd, package_cmd = nf.install_commands("test,perf")
    assert torch_cmd == ["torch==2.13.0", "--index-url", "file:///somewhere/cpu"]
    assert package_cmd == ["-e", ".[test,perf]"]


def test_skip_keeps_the_environment_torch(monkeypatch):
    nf = _load_noxfile(monkeypatch, RING_ATTENTION_TORCH="skip")
    assert nf.perf.venv_backend == "none" and nf.tests.venv_backend == "none"  # no virtualenv
    package_cmd, deps_cmd = nf.install_commands("test,perf", extras_table=EXTRAS)
    assert package_cmd == ["--no-deps", "-e", "."]
    assert _names(deps_cmd) == ["pytest", "hypothesis", "matplotlib"]  # torch>=2.5 left out, pytest once
    # The real pyproject: every perf extra but torch, none of them torch.
    _, real = nf.install_commands("test,perf")
    assert real and "torch" not in _names(real)
    assert nf.requirement_name("torch >= 2.5; sys_platform == 'linux'") == "torch"
    assert nf.requirement_name("pytest-benchmark>=5.1") == "pytest-benchmark"


def test_skip_session_installs_run_in_the_calling_interpreter(monkeypatch):
    nf = _load_noxfile(monkeypatch, RING_ATTENTION_TORCH="skip")

    rec = _Session()
    nf._install(rec, "perf")
    assert [c[0] for c in rec.calls] == ["run", "run"]
    assert all(c[1][:4] == ("python", "-m", "pip", "install") and c[2] for c in rec.calls)
    assert rec.calls[0][1][4:] == ("--no-deps", "-e", ".")
    assert not any(n == "torch" for c in rec.calls for n in _names(c[1][4:]))


@pytest.mark.skipif(shutil.which("nox") is None and importlib.util.find_spec("nox") is None, reason="no nox")
def test_dry_run_of_skip_installs_no_torch():
    """``RING_ATTENTION_TORCH=skip nox -s perf --no-install -- --help``: logs, installs nothing."""
    env = dict(os.environ, RING_ATTENTION_TORCH="skip")
    env.pop("RING_ATTENTION_TORCH_INDEX", None)
    proc = subprocess.run([sys.executable, "-m", "nox", "-s", "perf", "--no-install", "--", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    skipped = [line for line in out.splitlines() if "--no-install: skipping pip install" in line]
    assert len(skipped) == 2 and "--no-deps -e ." in skipped[0], out
    assert not any("torch" in line.split("pip install", 1)[1] for line in skipped), out
    assert "Creating virtual environment" not in out and "python -m perf --help" in out
    assert "--require-baseline" in out  # the runner's help: the session ran in this interpreter


def test_history_session_runs_the_history_command_and_is_not_a_default(monkeypatch):
    nf = _load_noxfile(monkeypatch, RING_ATTENTION_TORCH="skip")
    assert "history" not in nf.nox.options.sessions and nf.history.venv_backend == "none"

    rec = _Session(posargs=["--every"])
    nf.history(rec)
    assert rec.runs[-1] == ("python", "-m", "perf", "history", "--every")


def test_typecheck_session_runs_mypy_strict_and_is_not_a_default(monkeypatch):
    nf = _load_noxfile(monkeypatch, RING_ATTENTION_TORCH="skip")
    assert "typecheck" not in nf.nox.options.sessions and nf.typecheck.venv_backend == "none"
    _, deps = nf.install_commands("typecheck")
    assert _names(deps) == ["mypy"]  # and no torch: the environment's is kept

    rec = _Session()
    nf.typecheck(rec)
    assert rec.runs[-1] == ("mypy", "--strict", "ring_attention")
