"""The demo's seed-0 figures against README's: `python .ci/check_demo.py NEW_RUN_DIR` (make check-demo; CI).

Runs the demo into NEW_RUN_DIR (which must not hold a report: a stale run would prove nothing; `--report
FILE` compares an existing report.md instead), then compares, character by character, the rows README
shows from report.md (3 model rows, 2 pseudo-label rows) and every seed-0 figure of the default run that
README or docs/ repeat (the seed tables' seed-0 column). On drift it names each row that moved, then what
the numbers depend on here: the installed releases that differ from requirements-lock.txt, and torch's CPU
kernels, the processor and torch's threads against those README states.

A machine whose CPU differs from README's (its kernels, or the processor itself: two AVX512 machines of
other makes printed other students) cannot reproduce its students' figures bit for bit (docs/results.md,
"What the demo's numbers depend on"): there the check says so and exits 0 without judging, rather than
fail on every change for a reason outside the project."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
MODEL_ROW = re.compile(r"^\| (\d+) \| (teacher|student) \|")
LABEL_ROW = re.compile(r"^\| (\d+) \| [\d,]+ \| [\d,]+ \(threshold")
WANT_ROWS = {("model", "0", "teacher"), ("model", "1", "student"), ("model", "2", "student"), ("labels", "1"),
             ("labels", "2")}
# Rows of the seed tables (header `| top-1 on the eval split | seed 0 | ...`) whose first number is a seed-0
# top-1 of the default demo on README's machine. (The calibration and fine-tune pages compare against a
# default run measured beside them on the machine they name, so their rows are not README's.)
SEED_ROWS = {"teacher, 10 labels per class": ("0", "teacher"), "round 1 student": ("1", "student"),
             "round 2 student": ("2", "student")}
# README states where its figures were measured:
# "... CPU kernels `AVX512` on `AuthenticAMD family 25 model 17` with 2 torch threads ..."
MEASURED_ON = re.compile(r"CPU kernels `([A-Z0-9_]+)`\s+on\s+`([^`]+)`,?\s+(?:with\s+)?(\d+)\s+(?:torch\s+)?threads")


def rows(text: str) -> dict[tuple, str]:
    out = {}
    for line in text.splitlines():
        line = line.rstrip()
        if m := MODEL_ROW.match(line):
            out.setdefault(("model", m.group(1), m.group(2)), line)
        elif m := LABEL_ROW.match(line):
            out.setdefault(("labels", m.group(1)), line)
    return out


def seed_zero(page: Path) -> list[tuple[str, tuple, str]]:
    """(where, (round, role), seed-0 figure) for each seed-table row that repeats the default demo."""
    out, inside = [], False
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["top-1 on the eval split", "seed 0"]:
            inside = True
        elif inside and not line.startswith("|"):
            inside = False
        elif inside and cells[0] in SEED_ROWS:
            out.append((f"{page.relative_to(REPO)}: {cells[0]}", SEED_ROWS[cells[0]], cells[1]))
    return out


def processor() -> str:
    """The processor's make and generation as Linux names them (vendor, family, model): the same kernels
    on another generation pick other blockings in MKL and oneDNN, so other last bits."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "vendor_id" not in info:
        import platform

        return platform.processor() or platform.machine()
    return f"{info['vendor_id']} family {info.get('cpu family', '?')} model {info.get('model', '?')}"


class Machine(NamedTuple):
    kernels: str  # torch.backends.cpu.get_cpu_capability()
    processor: str  # processor()
    threads: int

    def same_cpu(self, other: Machine) -> bool:
        return (self.kernels, self.processor) == (other.kernels, other.processor)


def machine(readme: str) -> tuple[Machine, Machine | None]:
    import torch

    here = Machine(torch.backends.cpu.get_cpu_capability(), processor(), torch.get_num_threads())
    stated = MEASURED_ON.search(readme)
    return here, Machine(stated.group(1), stated.group(2), int(stated.group(3))) if stated else None


def release_drift() -> list[str]:
    notes = []
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, want = line.split("==")
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an extra the demo does not use)
        if have != want:
            notes.append(f"  {name} {have} installed, the lock says {want}")
    return notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", help="a new directory to run the demo into")
    ap.add_argument("--report", help="compare this existing report.md instead of running the demo")
    args = ap.parse_args()
    readme = (REPO / "README.md").read_text()
    here, stated = machine(readme)
    if stated is None:
        print("check_demo: README.md does not say where its figures were measured ('CPU kernels `X` on `CPU` "
              "with N torch threads'): add it", file=sys.stderr)
        return 1
    if args.report:
        report = Path(args.report)
    else:
        if not args.run_dir:
            ap.error("give a new run directory, or --report FILE")
        report = Path(args.run_dir) / "report.md"
        if report.exists():
            ap.error(f"{report} exists: give a new directory (a stale run proves nothing), or --report {report}")
        subprocess.run([sys.executable, "-m", "noisystudent", "stage=iterate", f"run_dir={args.run_dir}"], check=True)
    got, want = rows(report.read_text()), rows(readme)
    problems = []
    if set(want) != WANT_ROWS:
        problems.append(f"README shows report rows {sorted(want)}; expected exactly {sorted(WANT_ROWS)}")
    problems += [f"{' '.join(k)}:\n  README: {v}\n  now:    {got.get(k, '(missing)')}" for k, v in want.items()
                 if got.get(k) != v]
    seeds = [s for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] for s in seed_zero(page)]
    if {key for _, key, _ in seeds} != {("0", "teacher"), ("1", "student"), ("2", "student")}:
        problems.append("the seed table (| top-1 on the eval split | seed 0 | ... with the teacher and rounds 1, 2) "
                        "was not found in README.md or docs/")
    for where, (rnd, role), value in seeds:
        now = got.get(("model", rnd, role), "").split("|")
        top1 = now[6].strip() if len(now) > 6 else "(missing)"
        if top1 != value:
            problems.append(f"{where}, seed 0: {value}, now {top1}")
    if not problems:
        print(f"check_demo: {len(want)} README rows and {len(seeds)} seed-0 figures match {report}")
        return 0
    if not here.same_cpu(stated):
        print(f"check_demo: NOT JUDGED: README's figures were measured with CPU kernels {stated.kernels} on "
              f"{stated.processor}, this machine has {here.kernels} on {here.processor}; the students' figures "
              "differ with the CPU:\n"
              + "\n".join(problems), file=sys.stderr)
        return 0
    causes = release_drift()
    if here.threads != stated.threads:
        causes.append(f"  {here.threads} torch threads here, README's figures were measured with {stated.threads} "
                      "(make check-demo sets them)")
    if not causes:
        causes.append(f"  every release as the lock says, CPU kernels {here.kernels} on {here.processor} with "
                      f"{here.threads} threads as README states: the code moved the figures")
    print("check_demo: the seed-0 demo no longer prints README's figures:\n" + "\n".join(problems)
          + "\nWhat the figures depend on here (README, 'What the numbers depend on'):\n" + "\n".join(causes),
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
