"""Sessions: tests (default), lint; against Cellpose 3.1.1.2: parity, bench, golden; bridges later.

torch is always installed first and pinned (a local CPU wheel): an unpinned torch pulls
gigabytes of CUDA wheels.
"""

from __future__ import annotations

import glob

import nox

TORCH = "torch==2.13.0"
CELLPOSE = "cellpose==3.1.1.2"
nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


def install_cellplug(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, with the example and broken test plugins installed beside cellplug."""
    install_cellplug(session, "test")
    for plugin in sorted(glob.glob("tests/plugins/dists/*/pyproject.toml")):
        session.install(plugin.rsplit("/", 1)[0])
    # the OpenVINO backbone, a separate distribution: its tests and the contract kit's
    session.install("./plugins/openvino")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "plugins", "tests", "benchmarks", "training", "bridges",
                "noxfile.py")


@nox.session
def mutate(session: nox.Session) -> None:
    """Mutation testing with mutmut (issue 18; not in CI): survivors and score in
    benchmarks/results/mutation.{json,md}. Modules, tests and mutmut's settings are in
    benchmarks/mutation.py; equivalent and accepted mutants in
    benchmarks/mutation_equivalents.toml. A 1-in-6 sample takes ~15 CPU minutes on the
    2-core machine, all 2421 mutants over an hour.

    After ``--``: ``--tests-at REV`` scores today's code with the tests of commit REV (label
    "tests at REV"), ``--sample N`` (or ``N:K``) runs a deterministic 1-in-N sample of the
    mutants (the K-th of N disjoint ones),
    ``--label NAME`` names the run in the results, ``--keep`` re-uses the previous stage and
    mutmut's results in it (tests copied again; runs the mutants left and the survivors);
    anything else goes to ``mutmut run`` (e.g. ``--max-children 1`` or mutant names).
    """
    import os
    import resource

    session.install(TORCH)
    session.install("-e", ".[test]")
    for plugin in sorted(glob.glob("tests/plugins/dists/*/pyproject.toml")):
        session.install(plugin.rsplit("/", 1)[0])
    # tbb: numba's fork-safe threading layer (mutmut forks a process per mutant)
    session.install("mutmut==3.8.1", "tbb==2023.2.0")
    args = list(session.posargs)
    opts = {"--label": None, "--tests-at": None, "--sample": None}
    for flag in opts:
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            del args[i : i + 2]
    keep = "--keep" in args
    if keep:
        args.remove("--keep")
    tests_at, sample = opts["--tests-at"], opts["--sample"] or "1"
    label = opts["--label"] or (f"tests at {tests_at}" if tests_at else "now")
    stage_dir = f"{session.create_tmp()}/stage-{tests_at or 'worktree'}"
    script = "benchmarks/mutation.py"
    if not keep:  # a fresh copy: every mutant (of the sample) is run
        session.run("python", script, "stage", stage_dir,
                    *(["--tests-at", tests_at] if tests_at else []))
    elif not tests_at:
        session.run("python", script, "refresh-tests", stage_dir)
    if (sample != "1" or keep) and not any("__mutmut_" in a for a in args):  # which to run
        names = session.run("python", script, "select", stage_dir, "--sample", sample,
                            *(["--retry-survivors"] if keep else []), silent=True)
        if not names.split():
            session.log("no mutant left to run")
        args += names.split() or ["--help"]
    venv_lib = os.path.join(os.path.dirname(session.bin), "lib")
    env = {
        # one thread each: the CPU time is the work done, and forked workers stay fork-safe
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
        "NUMBA_THREADING_LAYER": "tbb", "LD_LIBRARY_PATH": venv_lib,
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with session.chdir(stage_dir):
        if args != ["--help"]:
            session.run("mutmut", "run", *args, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    session.run("python", script, "report", stage_dir, "--label", label, "--sample", sample,
                "--cpu-seconds", f"{cpu:.0f}", *(["--add-cpu"] if keep else []))


def _reference_env(session: nox.Session) -> None:
    """cellplug and Cellpose 3.1.1.2 side by side (Cellpose is only ever a reference)."""
    session.install(TORCH)
    session.install(CELLPOSE)
    session.install("-e", ".")


def _run_scripts(session: nox.Session, pattern: str) -> bool:
    """Run the posargs as one script with its arguments, else every script matching pattern.

    Returns True when the posargs were run (so a session can skip its extras).
    """
    if session.posargs:  # e.g. -- benchmarks/parity_model.py runs/x/generalist.pth --out ...
        session.run("python", *session.posargs)
        return True
    for script in sorted(glob.glob(pattern)):
        session.run("python", script)
    return False


@nox.session
def parity(session: nox.Session) -> None:
    """Numerical parity with Cellpose 3.1.1.2 (needs ../shared/data for real images)."""
    _reference_env(session)
    if _run_scripts(session, "benchmarks/parity_*.py"):
        return
    # the unit tests that compare against Cellpose directly
    session.install("pytest")
    session.run("pytest", "-q", "-rs", "tests/cellplug/test_tiling.py",
                "tests/plugins/cellplug_unet/test_network.py",
                "tests/plugins/cellplug_flows/test_dynamics.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed against Cellpose 3.1.1.2 measured in the same run; results in benchmarks/results/."""
    _reference_env(session)
    # bench_runtime: the OpenVINO backbone plugin, and ONNX Runtime measured beside it
    session.install("psutil", "./plugins/openvino", "onnxruntime", "onnx")
    _run_scripts(session, "benchmarks/bench_*.py")


@nox.session
def golden(session: nox.Session) -> None:
    """Regenerate tests/data/golden/ (Cellpose 3.1.1.2's outputs the default tests compare to)."""
    _reference_env(session)
    session.run("python", "tests/data/golden/make_golden.py")


# CellProfiler 5 exists on PyPI only as pinned nightlies; these install on Python 3.11 and run
# headless. They need numpy<2 and scipy<1.11, so cellplug's core runs there too (issue 19).
CELLPROFILER = (
    "cellprofiler-core-nightly==5.0.0.dev784",
    "cellprofiler-library-nightly==5.0.0.dev784",
    "centriole-nightly==5.0.0.dev784",
)
CELLPROFILER_STACK = ("numpy==1.26.4", "scipy==1.10.1", "scikit-image==0.24.0")
# the headless `cellprofiler` command, installed --no-deps (it requires wxPython and
# mysqlclient, for the GUI and ExportToDatabase only), and what it imports at run time
CELLPROFILER_APP = "cellprofiler-nightly==5.0.0.dev784"
CELLPROFILER_APP_DEPS = ("imageio", "Jinja2", "joblib", "sentry-sdk~=2.8.0", "rapidfuzz",
                         "requests", "six", "Pillow", "docutils==0.15.2")


@nox.session
def hitl(session: nox.Session) -> None:
    """Human-in-the-loop benchmark (issue 20; needs ../shared/data): fine-tunes the nuclei-only
    model (training/nuclei/train.sh, ~50 min on 2 cores) on 1, 2, 3 and 5 Usiigaci images.
    After ``--``: benchmarks/hitl.py's options (default base: runs/nuclei/nuclei.pth)."""
    install_cellplug(session)
    session.run("python", "benchmarks/hitl.py", *session.posargs)


@nox.session
def zoo(session: nox.Session) -> None:
    """``--model auto`` (with the style-model pack) against the generalist on the validation
    split, and the cost of choosing (issue 21; needs ../shared/data)."""
    install_cellplug(session)
    session.install("plugins/style-models")
    session.run("python", "benchmarks/zoo.py", *session.posargs)


@nox.session
def cellprofiler(session: nox.Session) -> None:
    """The CellProfiler bridge (bridges/cellprofiler) in a headless CellProfiler 5: its tests,
    then cellplug's own suite under numpy 1.26 / scipy 1.10 / scikit-image 0.24."""
    session.install(TORCH)
    # one resolver run with every pin, so that nothing later upgrades numpy to 2
    session.install("-e", ".[test]", "-e", "bridges/cellprofiler[test]", *CELLPROFILER,
                    *CELLPROFILER_STACK)
    session.install("--no-deps", CELLPROFILER_APP)
    session.install(*CELLPROFILER_APP_DEPS, *CELLPROFILER, *CELLPROFILER_STACK)
    for plugin in sorted(glob.glob("tests/plugins/dists/*/pyproject.toml")):
        session.install(plugin.rsplit("/", 1)[0])
    session.run("python", "-c", "import numpy, scipy, skimage; "
                "v = (numpy.__version__, scipy.__version__, skimage.__version__); print(v); "
                "assert v == ('1.26.4', '1.10.1', '0.24.0'), v")
    with session.chdir("bridges/cellprofiler"):
        session.run("pytest", "-p", "no:cacheprovider", *session.posargs)
    if not session.posargs:  # cellplug's own suite, on CellProfiler's numpy/scipy/skimage
        # without the bridge's entry point, as in `nox -s tests` (the suite counts the
        # plugins' commands); CellProfiler and the pinned versions stay
        session.run("python", "-m", "pip", "uninstall", "-y", "cellplug-cellprofiler")
        session.run("pytest", "tests")
        session.install("--no-deps", "-e", "bridges/cellprofiler")  # back, for the benchmark
