"""Mutation testing of the core and the bundled plugins with mutmut (issue 18); not in CI.

``nox -s mutate`` runs the three steps below; ``python benchmarks/mutation.py --help`` runs
one. mutmut 3 copies the code to ``mutants/``, makes every mutant of every function at once
(a trampoline picks the active one from an environment variable), records which tests call
each function, and then runs, for each mutant, only those tests, in a forked process.

1. ``stage DIR [--tests-at REV]``: lay out a copy of the repository that mutmut can work
   on. mutmut names a mutant after its file's path with ``src/`` stripped, and puts
   ``mutants/src`` first on ``sys.path``; the bundled plugins live in ``plugins/``, so the
   stage puts ``src/cellplug`` and every ``plugins/<package>`` side by side under
   ``DIR/src/`` (same import names, so the installed entry points load the mutated copies).
   ``tests/`` comes from the working tree, or from commit REV (``--tests-at 67ef360``: the
   tests before issue 18, against today's code). The mutmut configuration is written into
   ``DIR/pyproject.toml`` from :data:`MODULES` and :data:`SLOW_TESTS` below.
2. ``mutmut run`` inside DIR (the nox session does this).
3. ``report DIR --label now``: read mutmut's results, classify the survivors with
   ``benchmarks/mutation_equivalents.toml`` (mutant name -> reason it cannot be killed) and
   write ``benchmarks/results/mutation.json`` (one entry per label, so "before" and "now"
   sit side by side) and ``benchmarks/results/mutation.md``.

Score = killed / (mutants - equivalent), where killed includes timeouts and crashes (a test
run that does not pass); "no tests" mutants (no selected test calls the function) count as
not killed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EQUIVALENTS = REPO / "benchmarks" / "mutation_equivalents.toml"

# Modules mutated, as staged paths (plugins/<pkg>/x.py is staged as src/<pkg>/x.py), and why.
# Functions decorated with anything but @staticmethod/@classmethod (numba's @njit kernels,
# @property, @contextmanager, @functools.cache) are never mutated by mutmut 3: the numba
# kernels are checked against Cellpose's own outputs by the golden fixtures
# (tests/data/golden, test_golden_flows.py) and by `nox -s parity`.
MODULES: dict[str, str] = {
    "src/cellplug/metrics.py": "IoU matching and AP (the numbers the model card reports)",
    "src/cellplug/evaluate.py": "per-image, pooled and per-group scores of `cellplug eval`",
    "src/cellplug/transforms.py": "channels, normalisation, resizing: what every model sees",
    "src/cellplug/tiling.py": "padding, tile layout, flips, taper and blending",
    "src/cellplug/inference.py": "tiled / whole network passes, style, precision, memory",
    "src/cellplug/segmenter.py": "the composition image -> labels, SegmentOptions, niter",
    "src/cellplug_flows/heat.py": "masks -> flows: the Python driver (relabelling, order)",
    "src/cellplug_flows/dynamics.py": "following flows: the Python driver of the kernels",
    "src/cellplug_flows/reconstruct.py": "flows -> masks: clustering, flow check, clean-up",
    "src/cellplug_flows/decoder.py": "raw network output <-> flows, targets and loss",
}
# Left out, so that one run stays affordable (about half an hour of CPU on the 2-core
# machine, and a list of survivors a person can read):
# - cellplug/cli.py, train.py: exercised by the CLI, corpus and training tests, which run
#   subprocesses, SIGTERM and training epochs (see SLOW_TESTS); also where most day-to-day
#   changes land, so mutant names would not stay stable between runs.
# - cellplug/models.py, io.py (about 1350 mutants): mostly input validation, whose tests are
#   the bad-input corpus (tests/test_corpus.py, slow) and docs/robustness.md.
# - cellplug_unet/network.py: pinned end to end by the golden fixtures (Cellpose 3.1.1.2's raw
#   output and style to 1e-4, tests/plugins/cellplug_unet/test_golden_network.py); its other
#   mutants are in training-only settings (batch-norm momentum).
# - cellplug/{plugins,hookspecs,annotations,safeload,render,errors}.py, cellplug_sources,
#   cellplug_selectors, cellplug_zoo: plugin discovery and glue, annotation file formats
#   (round-trip tests), the restricted unpickler (tested with hostile files).
# - the numba kernels of cellplug_flows (see above).

# Tests left out of the mutation run: subprocesses, SIGTERM, training epochs (the issue asks
# for "the fast tests"). Everything else under tests/ runs, for the mutants it reaches, within
# the per-mutant budget of benchmarks/mutation_budget.py.
SLOW_TESTS = (
    "tests/test_corpus.py",
    "tests/cellplug/test_cli.py",
    "tests/cellplug/test_cli_train.py",
    "tests/cellplug/test_train.py",
)

# Tests of an older commit (``--tests-at``) that fail on today's code because the behaviour they
# pinned was changed on purpose; mutmut needs a passing suite, so they are deselected.
DESELECT_AT = {
    "67ef360": (
        # the error messages for a size file that is not a size model were reworded (issue 17)
        "tests/cellplug/test_models.py::test_size_file_of_the_wrong_kind",
        # the example plugin has since gained a command (example-hello) in its provides list
        "tests/cellplug/test_plugins.py::test_example_plugin_is_listed_beside_the_defaults",
    ),
}

MUTMUT_CONFIG = {
    "source_paths": ["src"],
    "only_mutate": sorted(MODULES),
    # examples/ and the zoo weights are read by tests through the repository layout;
    # mutation_budget.py is the pytest plugin that caps each mutant's tests
    "also_copy": ["examples", "plugins/cellplug_zoo/weights", "mutation_budget.py"],
    "pytest_add_cli_args_test_selection": ["tests", *(f"--ignore={t}" for t in SLOW_TESTS)],
    "pytest_add_cli_args": ["-p", "no:cacheprovider", "-W", "ignore", "-p", "mutation_budget"],
    # fork from the process that ran the clean tests: torch, numba and the compiled kernels
    # are already loaded. The session pins torch, numba and OpenMP to one thread each and
    # numba to its TBB threading layer: the default (GNU OpenMP) layer kills a forked child
    # that runs a parallel kernel with SIGTERM. For the same reason a test must not give torch
    # more than one thread for real (a forked child would hang on the parent's OpenMP team).
    "process_isolation": "fork",
    "use_git_change_detection": False,
}

IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "build", "*.egg-info")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def stage(dest: Path, tests_at: str | None = None) -> None:
    """Lay out ``dest`` for mutmut (see the module docstring)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "src").mkdir(parents=True)
    shutil.copytree(REPO / "src" / "cellplug", dest / "src" / "cellplug", ignore=IGNORE)
    for pkg in sorted((REPO / "plugins").iterdir()):
        if (pkg / "__init__.py").exists():
            shutil.copytree(pkg, dest / "src" / pkg.name, ignore=IGNORE)
    shutil.copytree(REPO / "examples", dest / "examples", ignore=IGNORE)
    shutil.copy2(REPO / "benchmarks" / "mutation_budget.py", dest / "mutation_budget.py")
    shutil.copytree(REPO / "plugins" / "cellplug_zoo" / "weights",
                    dest / "plugins" / "cellplug_zoo" / "weights")
    if tests_at is None:
        shutil.copytree(REPO / "tests", dest / "tests", ignore=IGNORE)
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", tests_at,
                                  "tests"], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    text = (REPO / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:
        raise SystemExit("pyproject.toml has its own [tool.mutmut]; the stage writes one")
    lines = ["", "# written by benchmarks/mutation.py stage", "[tool.mutmut]"]
    config = dict(MUTMUT_CONFIG)
    deselect = DESELECT_AT.get(tests_at or "", ())
    config["pytest_add_cli_args_test_selection"] = [
        *config["pytest_add_cli_args_test_selection"], *(f"--deselect={t}" for t in deselect)]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items()]
    (dest / "pyproject.toml").write_text(text + "\n".join(lines) + "\n")
    (dest / "STAGE.json").write_text(json.dumps({"tests_at": tests_at or "working tree"}) + "\n")
    print(f"staged {len(MODULES)} modules and tests from {tests_at or 'the working tree'} "
          f"in {dest}")


# -- sample -------------------------------------------------------------------------------
def mutant_names(stage_dir: Path) -> list[str]:
    """Every mutant mutmut makes of :data:`MODULES` in ``stage_dir`` (without running it)."""
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    cwd = os.getcwd()
    os.chdir(stage_dir)
    try:
        names = []
        for path in sorted(MODULES):
            mf = mutate_file_contents(path, Path(path).read_text())
            names += [get_mutant_name(Path(path), n) for n in mf.mutant_names]
        return names
    finally:
        os.chdir(cwd)


def in_sample(name: str, sample: str | int) -> bool:
    """Deterministic sample ``"N"`` (1 in N) or ``"N:K"`` (the K-th of N disjoint ones, K < N),
    from a hash of the mutant's name: stable while the name does not change. ``"6"`` is
    ``"6:0"`` and part of ``"3"`` and ``"2"``."""
    every, _, part = str(sample).partition(":")
    n = int(every)
    return n <= 1 or int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % n == int(part or 0)


def select(stage_dir: Path, every: str = "1", retry_survivors: bool = False) -> list[str]:
    """Mutants of the sample ``every`` (see :func:`in_sample`) that have no result yet in
    ``stage_dir`` (and, with ``retry_survivors``, those that survived or had no tests)."""
    statuses = {name: r["status"] for name, r in _results(stage_dir, diffs=False).items()}
    retry = ("survived", "no tests") if retry_survivors else ()
    return [n for n in mutant_names(stage_dir) if in_sample(n, every)
            and (n not in statuses or statuses[n] in retry)]


# -- report ------------------------------------------------------------------------------
KILLED = ("killed", "timeout", "segfault")


def _results(stage_dir: Path, diffs: bool = True) -> dict[str, dict[str, object]]:
    """mutant name -> {status, module[, diff]} from mutmut's files in ``stage_dir``
    (mutants that were not run are left out)."""
    cwd = os.getcwd()
    os.chdir(stage_dir)
    try:
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code

        out: dict[str, dict[str, object]] = {}
        for path in sorted(MODULES):
            data = SourceFileMutationData(path=Path(path))
            data.load()
            for name, code in data.exit_code_by_key.items():
                status = status_by_exit_code[code]
                if status == "not checked":
                    continue
                entry: dict[str, object] = {"status": status, "module": path}
                if diffs and status not in KILLED:
                    entry["diff"] = get_diff_for_mutant(name, path=path)
                out[name] = entry
        return out
    finally:
        os.chdir(cwd)


def _changed_line(diff: str) -> str:
    plus = [ln[1:].strip() for ln in diff.splitlines()
            if ln.startswith("+") and not ln.startswith("+++")]
    return " / ".join(plus)


def load_classified() -> dict[str, dict[str, str]]:
    """benchmarks/mutation_equivalents.toml: mutant name -> {changed, reason[, kind]}.

    ``kind = "equivalent"`` (default): no test can tell it from the original; left out of
    the score. ``kind = "accepted"``: could be told apart, but is not worth a test (said why);
    ``kind = "gap"``: a missing test, noted. Both stay in the score as survivors.
    """
    if not EQUIVALENTS.exists():
        return {}
    return tomllib.loads(EQUIVALENTS.read_text())


def summarise(results: dict[str, dict[str, object]], classified: dict[str, dict[str, str]]
              ) -> dict[str, object]:
    per_module: dict[str, dict[str, int]] = {}
    survivors, equivalent, stale = [], [], []
    statuses = {}
    for name, r in sorted(results.items()):
        mod = per_module.setdefault(str(r["module"]),
                                    {"mutants": 0, "killed": 0, "equivalent": 0, "survived": 0})
        mod["mutants"] += 1
        if r["status"] in KILLED:
            mod["killed"] += 1
            statuses[name] = "killed"
            continue
        changed = _changed_line(str(r["diff"]))
        c = classified.get(name)
        if c is not None and c.get("changed", changed) != changed:
            stale.append({"mutant": name, "expected": c.get("changed"), "got": changed})
            c = None
        if c is not None and c.get("kind", "equivalent") == "equivalent":
            mod["equivalent"] += 1
            statuses[name] = "equivalent"
            equivalent.append({"mutant": name, "changed": changed, "reason": c["reason"],
                               "status": r["status"]})
        else:
            mod["survived"] += 1
            statuses[name] = "survived"
            survivors.append({"mutant": name, "status": r["status"], "changed": changed,
                              "reason": c["reason"] if c else None,
                              "kind": c.get("kind") if c else None})
    total = sum(m["mutants"] for m in per_module.values())
    killed = sum(m["killed"] for m in per_module.values())
    n_eq = len(equivalent)
    return {
        "mutants": total, "killed": killed, "equivalent": n_eq, "survived": len(survivors),
        "score": round(killed / max(1, total - n_eq), 4),
        "per_module": per_module, "survivors": survivors, "equivalents": equivalent,
        "stale": stale, "statuses": statuses,
    }


def report(stage_dir: Path, label: str, cpu_seconds: float | None = None, every: str = "1",
           add_cpu: bool = False, tests_from: str | None = None) -> dict[str, object]:
    results = {k: v for k, v in _results(stage_dir).items() if in_sample(k, every)}
    if not results:
        raise SystemExit(f"no mutmut results in {stage_dir}/mutants")
    summary = summarise(results, load_classified())
    meta = json.loads((stage_dir / "STAGE.json").read_text())
    from importlib.metadata import version

    summary.update({
        "label": label, "tests_at": tests_from or meta["tests_at"], "sample": every,
        "date": _dt.date.today().isoformat(),
        "mutmut": version("mutmut"), "config": MUTMUT_CONFIG,
        "budget_s": float(os.environ.get("MUTATION_TEST_BUDGET", "3")),
        "cpu_seconds": cpu_seconds,
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "mutation.json"
    runs = json.loads(json_path.read_text()) if json_path.exists() else {}
    if add_cpu and cpu_seconds is not None and (runs.get(label) or {}).get("cpu_seconds"):
        summary["cpu_seconds"] = cpu_seconds + runs[label]["cpu_seconds"]
    runs[label] = summary
    json_path.write_text(json.dumps(runs, indent=1, ensure_ascii=False) + "\n")
    write_markdown(runs)
    print(f"{label}: {_score_line(summary)}")
    if summary["stale"]:
        print(f"{len(summary['stale'])} entries of {EQUIVALENTS.name} no longer match their "
              "mutant (the code changed): classify them again")
    return summary


def _percent(killed: int, n: int) -> str:
    return f"{killed} / {n} = {100 * killed / max(1, n):.1f} %"


def _score_line(s: dict) -> str:
    n = s["mutants"] - s["equivalent"]
    return (f"{_percent(s['killed'], n)} killed "
            f"({s['mutants']} mutants run, {s['equivalent']} equivalent left out, "
            f"{s['survived']} survived)")


def _rescore(run: dict, names: set[str]) -> str:
    """``run``'s score on the mutants ``names`` only (another run's, e.g. a sample)."""
    st = [v for k, v in run["statuses"].items() if k in names]
    return _percent(st.count("killed"), len(st) - st.count("equivalent"))


def _counts(run: dict, equivalent: set[str], names: set[str] | None = None) -> str:
    """``run``'s score from its per-mutant statuses, with today's list of equivalent mutants
    (so that every run leaves out the same ones), on ``names`` only if given."""
    st = [("equivalent" if k in equivalent and v != "killed" else v)
          for k, v in run["statuses"].items() if names is None or k in names]
    killed, eq = st.count("killed"), st.count("equivalent")
    return (f"{_percent(killed, len(st) - eq)} killed ({len(st)} mutants run, {eq} equivalent "
            f"left out, {len(st) - eq - killed} survived)")


def write_markdown(runs: dict[str, dict]) -> None:
    md = RESULTS / "mutation.md"
    head = md.read_text().split(MARK)[0].rstrip() + "\n\n" if md.exists() else ""
    out = [head + MARK, "", "## Scores", ""]
    now = runs.get("now")
    equivalent = {k for k, v in load_classified().items()
                  if v.get("kind", "equivalent") == "equivalent"}
    for label, s in runs.items():
        cpu = f", {s['cpu_seconds'] / 60:.0f} CPU min" if s.get("cpu_seconds") else ""
        n, _, k = str(s.get("sample", "1")).partition(":")
        sample = (f"1-in-{n} sample{' no. ' + k if k else ''} of the mutants, "
                  if int(n) > 1 else "")
        line = (f"- **{label}** ({sample}tests from {s['tests_at']}, {s['date']}{cpu}): "
                f"**{_counts(s, equivalent)}**")
        same = set(s["statuses"])
        if now is not None and label != "now" and same <= set(now["statuses"]):
            line += (f"; today's tests on the same mutants: "
                     f"{_counts(now, equivalent, same).split(' killed')[0]}")
        out.append(line)
    latest = now or list(runs.values())[-1]
    out += ["", f"## Per module ({latest['label']})", "",
            "| module | mutants | killed | equivalent | survived | killed / non-equivalent |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mod, m in sorted(latest["per_module"].items()):
        n = m["mutants"] - m["equivalent"]
        out.append(f"| `{mod}` | {m['mutants']} | {m['killed']} | {m['equivalent']} | "
                   f"{m['survived']} | {_percent(m['killed'], n).split(' = ')[1]} |")
    out += ["", f"## Surviving mutants ({latest['label']})", "",
            "Not equivalent: a test could tell them apart. Each has the reason it is accepted, "
            "or is marked as a gap (a missing test), in `benchmarks/mutation_equivalents.toml`; "
            "both count as survivors.", ""]
    if not latest["survivors"]:
        out.append("None.")
    for s in latest["survivors"]:
        why = (("**gap**: " if s.get("kind") == "gap" else "") + s["reason"] if s["reason"]
               else "**not classified**")
        out.append(f"- `{s['mutant']}` ({s['status']}): `{s['changed']}`: {why}")
    for label, run in runs.items():
        if label == latest["label"] or not label.startswith("now"):
            continue
        out += ["", f"## Surviving mutants ({label})", "",
                "An independent sample, not used to choose the tests added. Its survivors were "
                "classified afterwards, without adding tests for them: accepted (why), or a gap "
                "(a missing test); both count as survivors.", ""]
        for sv in run["survivors"]:
            gap = "**gap**: " if sv.get("kind") == "gap" else ""
            out.append(f"- `{sv['mutant']}` ({sv['status']}): `{sv['changed']}`"
                       + (f": {gap}{sv['reason']}" if sv["reason"] else ": **not classified**"))
        out += [f"- `{e['mutant']}` (equivalent): `{e['changed']}`: {e['reason']}"
                for e in run["equivalents"]]
    out += ["", f"## Equivalent mutants ({latest['label']})", "",
            "No test can tell them from the original (reasons in "
            "`benchmarks/mutation_equivalents.toml`); left out of the score.", ""]
    for e in latest["equivalents"]:
        out.append(f"- `{e['mutant']}`: `{e['changed']}`: {e['reason']}")
    if latest["stale"]:
        out += ["", "## Stale entries of mutation_equivalents.toml (code changed)", ""]
        out += [f"- `{e['mutant']}`: expected `{e['expected']}`, now `{e['got']}`"
                for e in latest["stale"]]
    md.write_text("\n".join(out) + "\n")


MARK = "<!-- everything below is written by benchmarks/mutation.py report -->"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage", help="lay out a copy for mutmut")
    s.add_argument("dir", type=Path)
    s.add_argument("--tests-at", help="git revision to take tests/ from (default: working tree)")
    m = sub.add_parser("select", help="print the names of the mutants left to run")
    m.add_argument("dir", type=Path)
    m.add_argument("--sample", default="1", help="N (1 in N) or N:K (see in_sample)")
    m.add_argument("--retry-survivors", action="store_true",
                   help="also the mutants that survived or had no tests (tests were added)")
    t = sub.add_parser("refresh-tests", help="copy tests/ from the working tree into a stage")
    t.add_argument("dir", type=Path)
    r = sub.add_parser("report", help="write benchmarks/results/mutation.{json,md}")
    r.add_argument("dir", type=Path)
    r.add_argument("--label", default="now")
    r.add_argument("--cpu-seconds", type=float)
    r.add_argument("--sample", default="1", help="score only a sample: N or N:K")
    r.add_argument("--tests-from", help="say where the tests came from (default: the stage's)")
    r.add_argument("--add-cpu", action="store_true",
                   help="add --cpu-seconds to the run's earlier total (a --keep run)")
    args = p.parse_args(argv)
    if args.cmd == "stage":
        stage(args.dir.resolve(), args.tests_at)
    elif args.cmd == "select":
        print("\n".join(select(args.dir.resolve(), args.sample, args.retry_survivors)))
    elif args.cmd == "refresh-tests":
        shutil.rmtree(args.dir / "tests")
        shutil.copytree(REPO / "tests", args.dir / "tests", ignore=IGNORE)
    else:
        report(args.dir.resolve(), args.label, args.cpu_seconds, args.sample, args.add_cpu,
               args.tests_from)


if __name__ == "__main__":
    sys.exit(main())
