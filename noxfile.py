"""Sessions: ``nox -s tests`` (CPU test suite), ``nox -s perf`` (benchmarks + gate), ``nox -s history``
(trend plots and regressions of the benchmark history), ``nox -s cuda`` (the kernels and every variant
on a real GPU against float64), ``nox -s lint``, ``nox -s typecheck`` (``mypy --strict ring_attention``),
``nox -s transformers`` (the transformers integration against two pinned releases).

torch comes from ``RING_ATTENTION_TORCH`` (default ``torch==2.13.0``):

* a requirement (``torch==2.11.0``): installed in the session's virtualenv first. Which build
  pip picks is the index's business: PyPI's torch wheel for Linux x86-64 is a CUDA build
  (several GB of nvidia wheels). ``RING_ATTENTION_TORCH_INDEX`` names another wheel index for
  torch alone, e.g. PyTorch's CPU wheel index, which the GitHub workflows use. Unset, pip's
  own configuration decides (these project machines pin it to a local CPU wheel).
* ``skip``: keep the environment's torch. The sessions then run in the interpreter nox finds
  as ``python`` on PATH, with no virtualenv (``venv_backend="none"``), and install only this
  package (editable, ``--no-deps``) and the extras' packages other than torch, so pip never
  resolves torch and never replaces the CUDA build a GPU host already has. ``nox
  --no-install`` skips those installs too.
"""

from __future__ import annotations

import os
import re

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

DEFAULT_TORCH = "torch==2.13.0"
TORCH = os.environ.get("RING_ATTENTION_TORCH", DEFAULT_TORCH)
TORCH_INDEX = os.environ.get("RING_ATTENTION_TORCH_INDEX") or None
KEEP_TORCH = TORCH == "skip"
# Sessions that need torch: no virtualenv when the environment's torch is kept.
TORCH_BACKEND = "none" if KEEP_TORCH else None


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement string (``"torch>=2.5"`` -> ``"torch"``)."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project_extras() -> dict[str, list[str]]:
    """``[project.optional-dependencies]`` of pyproject.toml."""
    return nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]


def install_commands(extras: str, torch: str = TORCH, index: str | None = TORCH_INDEX,
                     extras_table: dict[str, list[str]] | None = None) -> list[list[str]]:
    """The ``pip install`` argument lists a session runs, in order.

    ``torch == "skip"``: the package without its dependencies, then every requirement of the
    ``extras`` (comma-separated) except torch. Otherwise torch (from ``index`` when given),
    then the package with its extras.
    """
    if torch == "skip":
        table = project_extras() if extras_table is None else extras_table
        wanted = []
        for extra in extras.split(","):
            for req in table[extra]:
                if requirement_name(req) != "torch" and req not in wanted:
                    wanted.append(req)
        return [["--no-deps", "-e", "."], wanted]
    torch_cmd = [torch] + (["--index-url", index] if index else [])
    return [torch_cmd, ["-e", f".[{extras}]"]]


def _no_install(session) -> bool:
    """Whether nox was given ``--no-install``.

    nox's ``run_install`` honours it only for a reused virtualenv, and a session without one
    is never "reused": read the flag itself (nox has no public accessor for it).
    """
    return bool(getattr(getattr(session, "_runner", None), "global_config", None)
                and session._runner.global_config.no_install)


def _install(session, extras):
    for args in install_commands(extras):
        if not args:
            continue
        if KEEP_TORCH:  # no virtualenv: pip of the interpreter that has the torch to keep
            if _no_install(session):
                session.log(f"--no-install: skipping pip install {' '.join(args)}")
                continue
            session.run("python", "-m", "pip", "install", *args, external=True)
        else:
            session.install(*args)


@nox.session(venv_backend=TORCH_BACKEND)
def tests(session):
    """The test suite: property tests against the reference, gloo ring tests, perf-gate tests."""
    _install(session, "test,perf")
    session.run("python", "-m", "pytest", "tests", "perf/tests", *session.posargs,
                env={"OMP_NUM_THREADS": "1"}, external=KEEP_TORCH)


@nox.session(venv_backend=TORCH_BACKEND)
def cuda(session):
    """On a GPU host: the CUDA tests (fails, never skips, without a CUDA device) and the fake-CUDA tier."""
    _install(session, "test")
    session.run("python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else "
                "'nox -s cuda needs a CUDA device: torch.cuda.is_available() is False')", external=KEEP_TORCH)
    session.run("python", "-m", "pytest", "tests/test_cuda.py", "tests/test_fake_cuda.py", *session.posargs,
                external=KEEP_TORCH)


@nox.session(venv_backend=TORCH_BACKEND)
def perf(session):
    """Benchmarks on the default device, compared with its saved baseline; fails on a regression.

    The first run on a device saves its baseline. Extra arguments go to the perf runner, e.g.
    ``nox -s perf -- --save-baseline`` (refresh) or ``nox -s perf -- --require-baseline`` (CI).
    """
    _install(session, "perf")
    session.run("python", "-m", "perf", *session.posargs, external=KEEP_TORCH)


@nox.session(venv_backend=TORCH_BACKEND)
def history(session):
    """Trend plots and the regression table of this device's benchmark history (not a default session).

    ``python -m perf history``: every ``nox -s perf`` run appends to ``perf/history/<device>.jsonl``;
    ``nox -s perf -- --profile history`` times enough rounds for its rank test. Extra arguments go
    to it, e.g. ``nox -s history -- --every`` or ``-- --file perf/history/sample/<device>.jsonl``.
    """
    _install(session, "perf")
    session.run("python", "-m", "perf", "history", *session.posargs, external=KEEP_TORCH)


@nox.session(venv_backend=TORCH_BACKEND)
def typecheck(session):
    """``mypy --strict ring_attention`` (not a default session): mypy reads torch's annotations,
    so it runs with the torch the other sessions use."""
    _install(session, "typecheck")
    session.run("mypy", "--strict", "ring_attention", *session.posargs, external=KEEP_TORCH)


# The oldest transformers release the integration supports and the newest at the time of writing.
TRANSFORMERS_VERSIONS = ("4.57.6", "5.25.0")


@nox.session(venv_backend=TORCH_BACKEND)
@nox.parametrize("version", TRANSFORMERS_VERSIONS)
def transformers(session, version):
    """ring_attention.integrations.transformers against one pinned transformers release: parity
    with transformers' own sdpa on tiny random models (one process and 2 gloo ranks) and every
    refusal. Not part of ``tests``: each release installs into its own environment."""
    _install(session, "test")
    requirement = f"transformers=={version}"
    if KEEP_TORCH:
        if not _no_install(session):
            session.run("python", "-m", "pip", "install", requirement, external=True)
    else:
        session.install(requirement)
    # the tests skip without transformers: make sure this session has the release it names
    session.run("python", "-c", f"import transformers, sys; sys.exit(transformers.__version__ != {version!r} "
                f"and 'transformers ' + transformers.__version__ + ' is installed, not {version}')",
                external=KEEP_TORCH)
    session.run("python", "-m", "pytest", "tests/test_integrations_transformers.py", *session.posargs,
                env={"OMP_NUM_THREADS": "1"}, external=KEEP_TORCH)


@nox.session
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", "ring_attention", "tests", "perf", "examples", "noxfile.py")
