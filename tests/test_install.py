"""install.py / lora_train.hosts.install_plan: given the host's package versions, the right installs, never a change
to the host's own packages, and conflicts that say what to do."""
import os
import runpy
import sys
import types

import pytest

from lora_train.hosts import install_plan as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `pip freeze` shows in a fresh AUTOMATIC1111 1.10.1 venv and in Forge (their requirements_versions.txt
# pins, and the hub pip resolves under transformers 4.30.2), before lora_train is installed.
A1111_PINS = ip.read_host_pins("""setuptools==69.5.1  # temp fix
accelerate==0.21.0
gradio==3.41.2
numpy==1.26.2
Pillow==9.5.0
safetensors==0.4.2
torch
transformers==4.30.2
""")
A1111 = {"torch": "2.1.2+cu121", "gradio": "3.41.2", "transformers": "4.30.2", "numpy": "1.26.2",
         "accelerate": "0.21.0", "safetensors": "0.4.2", "Pillow": "9.5.0", "PyYAML": "6.0.1",
         "tqdm": "4.66.1", "huggingface_hub": "0.25.2", "diffusers": None, "peft": None}
FORGE_PINS = ip.read_host_pins("""accelerate==0.31.0
gradio==4.40.0
numpy==1.26.2
Pillow==9.5.0
safetensors==0.4.2
transformers==4.46.1
diffusers==0.31.0
peft==0.13.2
huggingface-hub==0.26.2
tqdm==4.66.1
""")
FORGE = {"torch": "2.3.1", "gradio": "4.40.0", "transformers": "4.46.1", "numpy": "1.26.2", "accelerate": "0.31.0",
         "safetensors": "0.4.2", "pillow": "9.5.0", "pyyaml": "6.0.1", "tqdm": "4.66.1",
         "huggingface-hub": "0.26.2", "diffusers": "0.31.0", "peft": "0.13.2"}


def test_versions_compare():
    assert ip.vcmp("2.1.2+cu121", "2.1.2") == 0
    assert ip.vcmp("0.31.0.dev0", "0.31.0") < 0
    assert ip.vcmp("0.9", "0.10") < 0
    assert ip.vcmp("1.0", "1") == 0
    assert ip.vcmp("0.21.0.post1", "0.21.0") > 0
    assert ip.Range("0.31.0", "0.37").contains("0.36.9") and not ip.Range("0.31.0", "0.37").contains("0.37.1")


def test_a1111_installs_only_what_is_missing_at_known_good_pins():
    p = ip.plan(A1111, A1111_PINS, (3, 10, 6), "AUTOMATIC1111")
    assert p.ok, p.conflicts
    assert p.installs == ["diffusers==0.31.0", "peft==0.13.2"]
    # the host's packages are held where they are while pip resolves ours
    for name, v in [("torch", "2.1.2+cu121"), ("gradio", "3.41.2"), ("transformers", "4.30.2"),
                    ("numpy", "1.26.2"), ("accelerate", "0.21.0"), ("safetensors", "0.4.2"), ("pillow", "9.5.0")]:
        assert p.constraints[name] == v
    assert "torch==2.1.2+cu121\n" in p.constraints_text()
    cmd = p.pip_command("/tmp/c.txt")
    assert cmd == 'install -c "/tmp/c.txt" "diffusers==0.31.0" "peft==0.13.2"'
    assert "torch" not in cmd and "gradio" not in cmd and "transformers" not in cmd


def test_a1111_old_hub_is_raised_but_kept_below_1():
    p = ip.plan({**A1111, "huggingface_hub": "0.20.3"}, A1111_PINS, (3, 10))
    assert "huggingface-hub>=0.23.2,<1" in p.installs
    p = ip.plan({**A1111, "huggingface_hub": None}, A1111_PINS, (3, 10))
    assert "huggingface-hub>=0.23.2,<1" in p.installs


def test_forge_needs_nothing_and_is_left_alone():
    p = ip.plan(FORGE, FORGE_PINS, (3, 10), "Forge")
    assert p.ok and p.installs == [] and p.pip_command() == ""
    assert p.constraints["diffusers"] == "0.31.0" and p.constraints["huggingface-hub"] == "0.26.2"


def test_second_run_installs_nothing():
    p = ip.plan({**A1111, "diffusers": "0.31.0", "peft": "0.13.2"}, A1111_PINS, (3, 10))
    assert p.ok and p.installs == []
    assert "nothing to install" in p.report()


@pytest.mark.parametrize("pkg,version,expect", [
    ("transformers", "4.25.1", "transformers 4.25.1"),
    ("numpy", "1.23.5", "numpy 1.23.5"),
    ("accelerate", "0.18.0", "accelerate 0.18.0"),  # pinned by the host: we never move it
    ("torch", "1.13.1", "torch 1.13.1"),
])
def test_host_package_out_of_range_is_a_conflict_not_an_install(pkg, version, expect):
    p = ip.plan({**A1111, pkg: version}, A1111_PINS, (3, 10), "AUTOMATIC1111")
    assert not p.ok and p.installs == [] and p.pip_command("c.txt") == ""
    msg = " ".join(p.conflicts)
    assert expect in msg and "AUTOMATIC1111" in msg and "update" in msg
    assert "nothing was installed" in p.report()


def test_forge_pinned_diffusers_too_old_is_refused():
    p = ip.plan({**FORGE, "diffusers": "0.27.2"}, {**FORGE_PINS, "diffusers": "0.27.2"}, (3, 10), "Forge")
    assert not p.ok and "diffusers 0.27.2" in p.conflicts[0] and p.installs == []


def test_ours_too_old_is_raised_when_the_host_does_not_pin_it():
    p = ip.plan({**A1111, "diffusers": "0.27.2", "peft": "0.13.2"}, A1111_PINS, (3, 10))
    assert p.ok and p.installs == ["diffusers==0.31.0"]
    assert any("diffusers 0.27.2 is older" in n for n in p.notes)


def test_ours_newer_than_tested_is_left_with_a_note():
    p = ip.plan({**A1111, "diffusers": "0.37.1", "peft": "0.13.2"}, A1111_PINS, (3, 10))
    assert p.ok and p.installs == []
    assert any("diffusers 0.37.1 is newer" in n for n in p.notes)


def test_missing_host_package_and_old_python():
    p = ip.plan({**A1111, "torch": None}, A1111_PINS, (3, 9))
    assert not p.ok
    joined = " ".join(p.conflicts)
    assert "Python 3.9 is too old" in joined and "torch is missing" in joined


def test_current_stack_gets_ranges_not_webui_pins():
    cur = {"torch": "2.13.0", "gradio": "6.0.0", "transformers": "5.2.0", "numpy": "2.2.0", "accelerate": None,
           "diffusers": None, "peft": None, "huggingface-hub": "1.1.0", "safetensors": "0.5.0", "pillow": "11.0",
           "pyyaml": "6.0.2", "tqdm": "4.67"}
    p = ip.plan(cur, {}, (3, 12))
    assert p.ok
    assert p.installs == ["diffusers>=0.31.0", "peft>=0.10.0", "accelerate>=0.21.0"]


def test_install_py_runs_with_the_webui_launch_module(tmp_path, monkeypatch):
    """install.py as the WebUI runs it: `launch.is_installed` / `launch.run_pip` from a fake launch module,
    the host's requirements_versions.txt in the WebUI folder (the cwd)."""
    (tmp_path / "requirements_versions.txt").write_text("transformers==4.30.2\ngradio==3.41.2\n")
    calls = []
    seen_constraints = []

    def run_pip(command, desc=None, live=False):
        calls.append((command, desc))
        cfile = command.split('-c "', 1)[1].split('"', 1)[0]
        with open(cfile) as fh:
            seen_constraints.append(fh.read())

    fake_launch = types.SimpleNamespace(is_installed=lambda name: name not in ("diffusers", "peft"), run_pip=run_pip)
    versions = {ip.canonical(k): v for k, v in A1111.items()}
    monkeypatch.setattr(ip, "installed_versions", lambda names: {ip.canonical(n): versions.get(ip.canonical(n))
                                                                 for n in names})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "modules", raising=False)
    mod = runpy.run_path(os.path.join(ROOT, "install.py"), run_name="lora_train_install")
    plan = mod["main"](fake_launch)
    assert plan.installs == ["diffusers==0.31.0", "peft==0.13.2"]
    assert len(calls) == 1 and calls[0][0].endswith('"diffusers==0.31.0" "peft==0.13.2"')
    assert "diffusers (missing)" in calls[0][1]
    assert "transformers==4.30.2\n" in seen_constraints[0] and "gradio==3.41.2\n" in seen_constraints[0]

    # a conflict: nothing runs
    calls.clear()
    versions["transformers"] = "4.19.0"
    plan = mod["main"](fake_launch)
    assert not plan.ok and calls == []
