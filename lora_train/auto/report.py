"""The one-page auto-mode report: `report.md` in the run folder (Markdown: readable as text, rendered by the
tab, by GitHub and by any Markdown viewer; pictures linked by paths relative to the run folder)."""
from __future__ import annotations

import os
from typing import Tuple

from ..io_utils import atomic_write_text
from . import choose as choose_mod


def _rel(path: str, start: str) -> str:
    try:
        return os.path.relpath(path, start).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return path


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render(result, folder: str) -> str:
    r, ec, cfg = result, result.epoch_choice, result.config
    run = r.run_dir
    lines = [f"# Auto LoRA report: {r.name}", ""]
    lines += [f"Use it with **`{r.tag}`** (suggested strength {r.strength:g}).", "",
              f"- LoRA: `{r.lora_path}` (epoch {r.chosen_epoch}); the other epochs are published beside it as "
              f"`{r.name}-00000E.safetensors`", f"- run folder: `{run}`", ""]
    res = r.train_result
    lines += ["## Data", "",
              f"- folder: `{folder}`",
              f"- images: {len(r.captions_written) + len(r.captions_kept)}; captions written: "
              f"{len(r.captions_written)}; kept as they were: {len(r.captions_kept)}",
              f"- validation: {cfg.validation_split:.3g} of the images held out (seed {cfg.validation_seed})", ""]
    if r.captions_written:
        lines += ["Captions written:", ""] + [f"- `{os.path.basename(p)}`" for p in r.captions_written[:20]] + [""]
    lines += ["## Every choice", "", "| step | setting | value | why |", "|---|---|---|---|"]
    for c in r.choices:
        why = ("**your choice** " if c.user and c.reason != "your choice" else "") + c.reason
        lines.append(f"| {c.step} | `{c.key}` | {_cell(c.value)} | {_cell(why)} |")
    lines += ["", "Any of these can be overridden with the same flags or fields as a normal run "
                  "(`--key value` on the command line).", ""]
    lines += ["## Loss and validation curves", ""]
    if res is not None and res.loss_png and os.path.isfile(res.loss_png):
        lines += [f"![loss]({_rel(res.loss_png, run)})", ""]
    if res is not None:
        lines += [f"{res.steps} steps, {res.epochs_done} epochs in {res.seconds:.0f} s; loss log: "
                  f"`{_rel(res.loss_csv, run)}`", ""]
    lines += ["| epoch | validation loss | file | |", "|---|---|---|---|"]
    for e, v in choose_mod.pairs(ec.losses):
        mark = "**chosen**" if e == ec.chosen else ("runner-up" if e == ec.runner_up else "")
        lines.append(f"| {e} | {v:.6g} | {'yes' if e in ec.candidates else '-'} | {mark} |")
    lines += ["", "## Diagnosis", ""]
    if r.findings:
        for f in r.findings:
            lines.append(f"- [{f.get('severity')}] {f.get('kind')} at step {f.get('step')}: {f.get('message')} -> "
                         f"{f.get('suggestion')}")
    else:
        lines.append("- nothing unusual in the loss curve.")
    for w in r.warnings:
        lines.append(f"- warning: {w}")
    lines += ["", "## The chosen epoch", "",
              f"Epoch **{ec.chosen}**: {ec.why}.", "",
              f"Rule: {choose_mod.RULE}. Noise sigma {ec.sigma:.3g}, tolerance {ec.tolerance:.3g} "
              f"(lowest loss: epoch {ec.best_loss_epoch}).", ""]
    lines += ["## A/B grid", ""]
    if r.grid_path:
        lines += ["Rows: the chosen epoch and the last one, per seed; columns: base (strength 0) and the strengths.",
                  "", f"![grid]({_rel(r.grid_path, run)})", ""]
    else:
        lines += ["(no grid: this host cannot generate here)", ""]
    lines += ["## Prompt tag", "", f"`{r.tag}` (trigger word: `{cfg.trigger_word}`)", ""]
    return "\n".join(lines)


def write_report(result, folder: str) -> Tuple[str, str]:
    text = render(result, folder)
    path = os.path.join(result.run_dir, "report.md")
    atomic_write_text(path, text)
    return path, text
