"""Sessions: ``nox -s tests`` (CPU test suite), ``nox -s perf`` (benchmarks + gate), ``nox -s lint``.

torch is installed as ``torch==2.13.0`` by default (the CPU build on CI machines); set
``RING_ATTENTION_TORCH`` to another requirement (say ``torch==2.11.0``) on a GPU host,
or to ``skip`` to keep the torch already in the session's environment.
"""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("RING_ATTENTION_TORCH", "torch==2.13.0")


def _install(session, extras):
    if TORCH != "skip":
        session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session):
    """The test suite: property tests against the reference, gloo ring tests, perf-gate tests."""
    _install(session, "test,perf")
    session.run("pytest", "tests", "perf/tests", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def perf(session):
    """Benchmarks on the default device, compared with its saved baseline; fails on a regression.

    Extra arguments go to the perf runner, e.g. ``nox -s perf -- --save-baseline``.
    """
    _install(session, "perf")
    session.run("python", "-m", "perf", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", "ring_attention", "tests", "perf", "examples", "noxfile.py")
