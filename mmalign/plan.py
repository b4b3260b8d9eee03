"""The stage plan of ``make pipeline MODEL=<name> BASE=<checkpoint>``: check, print, then run.

``make pipeline`` calls ``python -m mmalign.plan --model M --base B --run runs/M [--dry-run] --
make demo MODEL=M BASE=B ...``. The plan is read from make itself (``make -n``), not from a
second copy of the stage graph, so what it prints is exactly what would run:

* ``make -n -B`` lists every stage command; ``make -n`` lists those whose outputs are missing or
  older than their inputs. Stage commands are recognised by the ``mmalign.timed`` wrapper every
  Makefile recipe runs through (its ``--target`` names the stage).
* Every training command (``mmalign.cli fit ...``) is parsed and type-checked with its layered
  ``--config`` files and overrides, without loading a model, so a typo in a model overlay fails
  here rather than an hour into a GPU run.
* Without ``--dry-run`` the base checkpoint must exist; then make runs the stages.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.timed import split_command, stage_name


@dataclass
class Step:
    stage: str
    command: list[str]
    todo: bool = True
    problem: str = ""
    notes: list[str] = field(default_factory=list)


def recipe_lines(text: str) -> list[str]:
    """``make -n`` output as one line per shell command (backslash continuations joined)."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def parse_steps(text: str) -> list[Step]:
    """The stage commands in ``make -n`` output, in order (each once)."""
    steps, seen = [], set()
    for line in recipe_lines(text):
        if "mmalign.timed" not in line:
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        i = words.index("--") if "--" in words else -1
        if i < 0:
            continue
        head, command = words[:i], words[i + 1:]
        opts = dict(zip(head, head[1:] + [""]))  # each option -> the word after it
        stage = stage_name(opts.get("--target", command[0]), opts.get("--root", ""))
        if stage in seen:
            continue
        seen.add(stage)
        steps.append(Step(stage, command))
    return steps


def fit_problem(command: list[str]) -> str:
    """Parse a ``mmalign.cli fit`` command's arguments (configs layered in order, then the
    overrides) without instantiating anything; '' when they type-check, else the error."""
    from jsonargparse import ActionConfigFile, ArgumentError
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    args = command[command.index("fit") + 1:]
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool, default=0)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    try:
        parser.parse_args(args)
    except (ArgumentError, ValueError, TypeError, ImportError) as e:  # all mean "this config is wrong"
        return " ".join(str(e).split())[:400]
    return ""


def make_dry(make_cmd: list[str], always: bool) -> str:
    cmd = [make_cmd[0], "-n", *(["-B"] if always else []), *make_cmd[1:]]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    return proc.stdout


def plan(make_cmd: list[str], check_configs: bool = True) -> list[Step]:
    steps = parse_steps(make_dry(make_cmd, always=True))
    todo = {s.stage for s in parse_steps(make_dry(make_cmd, always=False))}
    for s in steps:
        s.todo = s.stage in todo
        if check_configs and "mmalign.cli" in s.command and "fit" in s.command:
            s.problem = fit_problem(s.command)
            configs = [s.command[i + 1] for i, w in enumerate(s.command[:-1]) if w == "--config"]
            s.notes.append("configs: " + " + ".join(configs))
    return steps


def render(steps: list[Step], model: str, base: str, run: str, verbose: bool = False) -> str:
    lines = [f"Pipeline plan: MODEL={model} BASE={base or '(unset)'} -> {run}/", ""]
    width = max((len(s.stage) for s in steps), default=10)
    for i, s in enumerate(steps, 1):
        state = "run" if s.todo else "up to date"
        check = " | config ERROR" if s.problem else (" | config ok" if s.notes else "")
        lines.append(f"{i:3d}. {s.stage:<{width}}  [{state}{check}]")
        for n in s.notes:
            lines.append(f"       {n}")
        if s.problem:
            lines.append(f"       {s.problem}")
        if verbose:
            lines.append("       $ " + " ".join(shlex.quote(w) for w in s.command))
    n_todo = sum(s.todo for s in steps)
    lines += ["", f"{len(steps)} stages, {n_todo} to run, {len(steps) - n_todo} up to date."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    split = split_command(argv, "python -m mmalign.plan --model M [--base B] [--run R] [--dry-run] -- make demo ...")
    if split is None:
        return 2
    opts, make_cmd = split
    ap = argparse.ArgumentParser(prog="python -m mmalign.plan",
                                 description="Check and print the stage plan of `make pipeline`, then run it "
                                             "(unless --dry-run).")
    ap.add_argument("--model", required=True, help="the model profile: configs/models/<model>/")
    ap.add_argument("--base", default="", help="the base checkpoint folder SFT starts from")
    ap.add_argument("--run", default="", help="the run folder (for the printout)")
    ap.add_argument("--dry-run", action="store_true", help="check the configs and print the plan; run nothing")
    ap.add_argument("--verbose", action="store_true", help="print every stage's full command")
    args = ap.parse_args(opts)
    if not args.base:
        msg = "BASE is unset: point it at the checkpoint folder (e.g. BASE=checkpoints/llava-1.5-7b-hf)"
    elif not (Path(args.base) / "config.json").is_file():
        msg = f"BASE={args.base}: no config.json there (a local Hugging Face checkpoint folder is expected)"
    else:
        msg = ""
    if msg and not args.dry_run:  # before the plan: nothing can run without the checkpoint
        print(f"mmalign.plan: {msg}", file=sys.stderr)
        return 2
    try:
        steps = plan(make_cmd)
    except RuntimeError as e:
        print(f"mmalign.plan: {e}", file=sys.stderr)
        return 2
    print(render(steps, args.model, args.base, args.run, verbose=args.verbose or args.dry_run))
    bad = [s.stage for s in steps if s.problem]
    if bad:
        print(f"\nmmalign.plan: {len(bad)} training config(s) do not parse: {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\ndry run: nothing was run." + (f" Note: {msg}." if msg else ""))
        return 0
    sys.stdout.flush()
    os.execvp(make_cmd[0], make_cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
