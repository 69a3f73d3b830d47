"""What `install.py` installs into a WebUI (AUTOMATIC1111 / Forge) environment: pure Python, no imports of
torch, the WebUI or anything pip-installed, so it runs before anything is there and tests run it anywhere.

Rules
- Only what is missing (or too old and not the host's own) is installed; nothing is ever uninstalled.
- The host's own packages are never upgraded or downgraded: torch, torchvision, gradio, transformers, numpy,
  and every package the host pins in its `requirements_versions.txt` (A1111 1.10 pins accelerate 0.21.0,
  safetensors 0.4.2, Pillow 9.5.0; Forge also pins diffusers 0.31.0, peft 0.13.2, huggingface-hub 0.26.2).
  When one of them is outside what lora_train works with, the plan holds a conflict that says what and
  what to do, and nothing is installed.
- Pins are chosen from the host's versions (known to work, see the README support matrix):
  transformers < 4.41 (A1111 1.10: 4.30.2) and < 5 (Forge: 4.46.1): diffusers 0.31.0, peft 0.13.2;
  huggingface_hub stays < 1 there (transformers 4.x and gradio 4.40 break beside huggingface_hub 1.x).
- The pip command carries a constraints file holding the installed versions of the host's packages, so
  pip's resolver cannot move them as a side effect either.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Never touched by us, whatever the host pins.
ALWAYS_HOST = ("torch", "torchvision", "gradio", "transformers", "numpy")
MIN_PYTHON = (3, 10)


def canonical(name: str) -> str:
    """PEP 503 name: `Pillow` -> `pillow`, `huggingface_hub` -> `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def parse_version(v: str) -> Tuple:
    """A sortable key for a version string: release numbers, then pre-releases before the release.
    `2.1.2+cu121` -> (2, 1, 2); `0.31.0.dev0` < `0.31.0`; good enough for the versions pip reports."""
    v = v.strip().lower().split("+", 1)[0]
    m = re.match(r"v?(\d+(?:\.\d+)*)(.*)$", v)
    if not m:
        raise ValueError(f"not a version: {v!r}")
    nums = [int(x) for x in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    rest = m.group(2).lstrip(".-_")
    if not rest or rest.startswith("post"):
        tag = (1, rest)
    else:  # a, b, rc, dev: before the release
        tag = (0, rest)
    return tuple(nums), tag


def vcmp(a: str, b: str) -> int:
    ka, kb = parse_version(a), parse_version(b)
    na, nb = list(ka[0]), list(kb[0])
    n = max(len(na), len(nb))
    na += [0] * (n - len(na))
    nb += [0] * (n - len(nb))
    if na != nb:
        return -1 if na < nb else 1
    if ka[1] != kb[1]:
        return -1 if ka[1] < kb[1] else 1
    return 0


@dataclass
class Range:
    minimum: Optional[str] = None  # inclusive
    below: Optional[str] = None    # exclusive

    def contains(self, version: str) -> bool:
        if self.minimum and vcmp(version, self.minimum) < 0:
            return False
        if self.below and vcmp(version, self.below) >= 0:
            return False
        return True

    def spec(self) -> str:
        parts = []
        if self.minimum:
            parts.append(f">={self.minimum}")
        if self.below:
            parts.append(f"<{self.below}")
        return ",".join(parts)


@dataclass
class Need:
    """One package lora_train needs: the versions it works with and the pip requirement to install."""
    name: str
    works: Range
    install: str  # pip requirement used when it is missing or must move, e.g. "diffusers==0.31.0"
    why: str = ""


@dataclass
class Plan:
    installs: List[str] = field(default_factory=list)
    conflicts: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    constraints: Dict[str, str] = field(default_factory=dict)  # host package -> installed version

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def constraints_text(self) -> str:
        return "".join(f"{n}=={v}\n" for n, v in sorted(self.constraints.items()))

    def pip_command(self, constraints_file: Optional[str] = None) -> str:
        """The arguments for `launch.run_pip` (it adds `python -m pip` in front); empty if nothing to do."""
        if not self.installs or not self.ok:
            return ""
        c = f' -c "{constraints_file}"' if constraints_file else ""
        return "install" + c + " " + " ".join(f'"{r}"' for r in self.installs)

    def report(self) -> str:
        lines = []
        for c in self.conflicts:
            lines.append(f"[lora_train] CONFLICT: {c}")
        for n in self.notes:
            lines.append(f"[lora_train] {n}")
        if self.ok:
            lines.append("[lora_train] installing: " + ", ".join(self.installs) if self.installs
                         else "[lora_train] all requirements are present; nothing to install.")
        else:
            lines.append("[lora_train] nothing was installed, so your WebUI is unchanged; the LoRA Train tab will say "
                         "what is missing.")
        return "\n".join(lines)


def read_host_pins(text: str) -> Dict[str, str]:
    """`name==version` lines of a requirements file (the host's requirements_versions.txt)."""
    pins: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
        else:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*$", line)
            if m:  # unpinned (A1111 lists `torch` bare): still the host's
                pins.setdefault(canonical(m.group(1)), "")
    return pins


def needs_for(installed: Mapping[str, Optional[str]]) -> List[Need]:
    """The packages lora_train needs, with ranges and pins chosen from the host's installed versions."""
    inst = {canonical(k): v for k, v in installed.items() if v}
    tf = inst.get("transformers")
    gradio = inst.get("gradio")
    old_stack = tf is not None and vcmp(tf, "5") < 0  # the WebUIs: transformers 4.x
    hub_cap = "1" if old_stack or (gradio is not None and vcmp(gradio, "5") < 0) else None
    if old_stack:
        diffusers = Need("diffusers", Range("0.31.0", "0.37"), "diffusers==0.31.0",
                         "0.31.0 works with transformers 4.30.2 and 4.46.1; 0.27.2 and 0.37.1 do not import there")
        peft = Need("peft", Range("0.10.0", "0.14"), "peft==0.13.2",
                    "peft 0.13.2 works with accelerate 0.21.0; newer peft needs a newer accelerate")
        accelerate = Need("accelerate", Range("0.21.0"), "accelerate==0.21.0")
    else:
        diffusers = Need("diffusers", Range("0.31.0"), "diffusers>=0.31.0")
        peft = Need("peft", Range("0.10.0"), "peft>=0.10.0")
        accelerate = Need("accelerate", Range("0.21.0"), "accelerate>=0.21.0")
    hub = Need("huggingface-hub", Range("0.23.2", hub_cap),
               "huggingface-hub" + Range("0.23.2", hub_cap).spec(),
               "diffusers 0.31 needs >= 0.23.2" + ("; transformers 4.x and gradio 4.x break beside 1.x" if hub_cap else ""))
    return [
        Need("torch", Range("2.0"), "torch", "install the torch build for your GPU with the WebUI"),
        Need("transformers", Range("4.30.2"), "transformers>=4.30.2"),
        Need("numpy", Range("1.26"), "numpy>=1.26"),
        diffusers, peft, accelerate, hub,
        Need("safetensors", Range("0.4.2"), "safetensors>=0.4.2"),
        Need("pillow", Range("9.5.0"), "pillow>=9.5.0"),
        Need("pyyaml", Range("6.0"), "pyyaml>=6.0"),
        Need("tqdm", Range("4.64"), "tqdm>=4.64"),
    ]


def plan(installed: Mapping[str, Optional[str]], host_pins: Optional[Mapping[str, str]] = None,
         python: Sequence[int] = (3, 10), host_name: str = "the WebUI") -> Plan:
    """installed: {distribution name: version or None}; host_pins: the host's requirements_versions.txt pins
    (`read_host_pins`); python: the host's sys.version_info. Returns what to install and what conflicts."""
    inst = {canonical(k): v for k, v in installed.items() if v}
    pins = {canonical(k): v for k, v in (host_pins or {}).items()}
    host_owned = set(ALWAYS_HOST) | set(pins)
    p = Plan()
    for name in sorted(host_owned):
        if name in inst:
            p.constraints[name] = inst[name]
    if tuple(python[:2]) < MIN_PYTHON:
        p.conflicts.append(f"Python {python[0]}.{python[1]} is too old: lora_train needs Python >= "
                           f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}. Run {host_name} with Python 3.10 or 3.11.")
    for need in needs_for(inst):
        have = inst.get(need.name)
        owned = need.name in host_owned
        if have is not None and need.works.contains(have):
            continue
        why = f" ({need.why})" if need.why else ""
        if owned:
            if have is None:
                p.conflicts.append(f"{need.name} is missing, and it is {host_name}'s own package, which lora_train "
                                   f"never installs: start {host_name} once normally so it installs its "
                                   f"requirements, then restart.")
            else:
                p.conflicts.append(
                    f"{host_name} has {need.name} {have}, lora_train works with {need.name}{need.works.spec()}{why}. "
                    f"lora_train does not change {host_name}'s own packages: update {host_name} (or install a "
                    f"matching {need.name} into its venv yourself if you know it is safe), then restart.")
            continue
        if have is not None and need.works.minimum and vcmp(have, need.works.minimum) >= 0:
            # newer than we know to work and not the host's: leave it (another extension may need it), say so
            p.notes.append(f"{need.name} {have} is newer than the versions tested with this WebUI "
                           f"({need.works.spec()}); it is left as it is. If the tab fails to load, run: "
                           f"pip install \"{need.install}\" in the WebUI's venv.")
            continue
        p.installs.append(need.install)
        if have is not None:
            p.notes.append(f"{need.name} {have} is older than lora_train needs; installing {need.install}{why}.")
    if p.conflicts:
        p.installs = []
    return p


def installed_versions(names: Iterable[str]) -> Dict[str, Optional[str]]:
    """Versions of the given distributions in this Python (None when missing), via importlib.metadata."""
    import importlib.metadata as md

    out: Dict[str, Optional[str]] = {}
    for n in names:
        try:
            out[canonical(n)] = md.version(n)
        except md.PackageNotFoundError:
            out[canonical(n)] = None
    return out


def all_names(host_pins: Optional[Mapping[str, str]] = None) -> List[str]:
    names = {n.name for n in needs_for({})} | set(ALWAYS_HOST) | set(host_pins or {})
    return sorted(names)


def current_plan(webui_root: Optional[str] = None, host_name: str = "the WebUI") -> Plan:
    """The plan for this Python, reading the host's requirements_versions.txt under webui_root if given."""
    import os

    pins: Dict[str, str] = {}
    if webui_root:
        f = os.path.join(webui_root, "requirements_versions.txt")
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                pins = read_host_pins(fh.read())
    return plan(installed_versions(all_names(pins)), pins, tuple(sys.version_info[:2]), host_name)


def requirement_name(requirement: str) -> str:
    """`diffusers==0.31.0` -> `diffusers`."""
    return re.split(r"[=<>!~ \[;]", requirement.strip(), 1)[0]
