"""ComfyUI nodes: contract of every node, and the ComfyUI-facing glue run against the fakes in
tests/fake_comfy/ (written from ComfyUI 0.8.0's source). The package is loaded the way ComfyUI's
nodes.load_custom_node loads a custom node folder (spec_from_file_location on the repo's __init__.py)."""
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.frontend  # ComfyUI runs current releases: not part of the WebUI-versions run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_comfy")
PACK = "custom_nodes_lora_train_under_test"
WORKFLOW = os.path.join(ROOT, "example_workflows", "train_and_sweep.json")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import comfy_workflow  # noqa: E402


def _purge_fakes():
    for m in list(sys.modules):
        if m in ("folder_paths", "nodes", "comfy") or m.startswith("comfy.") or m == PACK or m.startswith(PACK + "."):
            del sys.modules[m]


def load_pack(name=PACK):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The fakes on sys.path, a ComfyUI-like folder tree, our package loaded as ComfyUI loads it."""
    _purge_fakes()
    sys.path.insert(0, FAKE)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths

    root = str(tmp_path_factory.mktemp("comfyui"))
    folder_paths.setup(root)
    pack = load_pack()

    class Env:
        pass

    env = Env()
    env.root, env.pack, env.mm, env.sd, env.utils, env.fp = root, pack, mm, comfy.sd, comfy.utils, folder_paths
    env.events = []

    def hook(v, t, preview, node_id=None):  # as main.py's hijack_progress: raises when Cancel was pressed
        mm.throw_exception_if_processing_interrupted()
        env.events.append((v, t, node_id))

    env.hook = hook
    comfy.utils.set_progress_bar_global_hook(hook)
    yield env
    sys.path.remove(FAKE)
    _purge_fakes()


@pytest.fixture(scope="module")
def tiny_parts():
    from ldm_writers import to_original_state_dict
    from lora_train.models.tiny import build_tiny
    from lora_train.networks.sdxl_names import diffusers_to_sgm_path, unet_layout

    tiny = build_tiny()
    sd = {k: v.clone() for k, v in to_original_state_dict(tiny).items()}
    layout = unet_layout(tiny.unet)
    # comfy.lora.model_lora_keys_unet: kohya name of each diffusers module -> the ldm key ComfyUI patches
    key_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): "diffusion_model." + diffusers_to_sgm_path(k, **layout)
               for k in tiny.unet.state_dict() if k.endswith(".weight")}
    return tiny, sd, key_map


@pytest.fixture
def graph(comfy, tiny_parts):
    """MODEL, CLIP, VAE as ComfyUI's checkpoint loader hands them over (SD15 in-memory layout)."""
    _tiny, sd, key_map = tiny_parts
    model, clip, vae, _ = comfy_loaded(comfy, sd, unet_lora_key_map=key_map)
    comfy.mm.current_loaded_models.append(model)
    comfy.mm.interrupt_current_processing(False)
    comfy.mm.CALLS.clear()
    comfy.events.clear()
    return model, clip, vae


def run_node(fn, *args, **kw):
    """Call a node function as ComfyUI's executor does: under torch.inference_mode() (execution.py)."""
    with torch.inference_mode():
        return fn(*args, **kw)


def comfy_loaded(comfy, sd, **kw):
    """The checkpoint loader runs under inference_mode too, so ComfyUI's weights are inference tensors."""
    with torch.inference_mode():
        sd = {k: v.clone() for k, v in sd.items()}
        out = comfy.sd.load_state_dict_guess_config(sd, **kw)
    assert next(iter(out[0].model.state_dict().values())).is_inference()
    return out


def result_of(out):
    return out["result"] if isinstance(out, dict) else out


def check_returns(cls, out):
    """What FUNCTION returned matches RETURN_TYPES (count and kind)."""
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP

    res = result_of(out)
    assert isinstance(res, tuple) and len(res) == len(cls.RETURN_TYPES), (cls.__name__, len(res))
    for typ, val in zip(cls.RETURN_TYPES, res):
        if typ == "IMAGE":
            assert isinstance(val, torch.Tensor) and val.dim() == 4 and val.shape[-1] == 3 and val.dtype == torch.float32
            assert float(val.min()) >= 0.0 and float(val.max()) <= 1.0
        elif typ == "STRING":
            assert isinstance(val, str)
        elif typ == "FLOAT":
            assert isinstance(val, float)
        elif typ == "INT":
            assert isinstance(val, int) and not isinstance(val, bool)
        elif typ == "MODEL":
            assert isinstance(val, ModelPatcher)
        elif typ == "CLIP":
            assert isinstance(val, CLIP)
        elif typ == "CONDITIONING":
            assert isinstance(val, list) and isinstance(val[0][0], torch.Tensor) and isinstance(val[0][1], dict)
        elif typ == "LORA_TRAIN_DATASET":
            assert type(val).__name__ == "DatasetRef"
        else:
            raise AssertionError(f"unchecked type {typ}")
    if isinstance(out, dict):
        assert set(out) <= {"ui", "result"}
    return res


def folder_hash(folder):
    h = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(folder)):
        for n in sorted(files):
            p = os.path.join(root, n)
            with open(p, "rb") as fh:
                h.update(os.path.relpath(p, folder).encode() + fh.read())
    return h.hexdigest()


# ============================================================================= contract
def test_every_node_contract(comfy):
    maps, names = comfy.pack.NODE_CLASS_MAPPINGS, comfy.pack.NODE_DISPLAY_NAME_MAPPINGS
    assert len(maps) == 8 and set(names) == set(maps)
    assert comfy.pack.WEB_DIRECTORY
    for node_id, cls in maps.items():
        assert cls.__name__ == node_id and "[unavailable]" not in names[node_id]
        assert cls.CATEGORY == "LoRA Train"
        assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
        it = cls.INPUT_TYPES()
        assert set(it) <= {"required", "optional", "hidden"} and it["required"]
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for group in ("required", "optional"):
            for name, spec in it.get(group, {}).items():
                assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node_id, name)
                assert isinstance(spec[0], (str, list)), (node_id, name)
                if isinstance(spec[0], list):
                    assert all(isinstance(x, str) for x in spec[0])
                    if "default" in spec[1]:
                        assert spec[1]["default"] in spec[0], (node_id, name)
                opts = spec[1]
                assert isinstance(opts.get("tooltip"), str) and opts["tooltip"], f"{node_id}.{name} has no tooltip"
                if spec[0] in ("INT", "FLOAT") and "default" in opts:
                    assert opts.get("min", -1e18) <= opts["default"] <= opts.get("max", 1e18), (node_id, name)
                assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
                if group == "optional":
                    assert params[name].default is not inspect.Parameter.empty
        for name in it.get("hidden", {}):
            assert name in params and params[name].default is not inspect.Parameter.empty
        required = {n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
        assert required <= set(it["required"]), (node_id, required - set(it["required"]))
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        if hasattr(cls, "IS_CHANGED"):
            assert isinstance(inspect.getattr_static(cls, "IS_CHANGED"), classmethod)
    assert maps["LoraTrainTrain"].OUTPUT_NODE is True  # it saves a file
    from lora_train.captions import BACKENDS, MODES

    ln = sys.modules[PACK + ".nodes.common"]
    nt = sys.modules[PACK + ".nodes.nodes_train"]
    assert set(ln.CAPTION_BACKENDS) <= set(BACKENDS) and tuple(ln.CAPTION_MODES) == tuple(MODES)
    # one set of defaults: the Train node starts where the config (and the tab) start
    from lora_train.config import PRECISIONS, TrainConfig

    d, req = TrainConfig().validate(), maps["LoraTrainTrain"].INPUT_TYPES()["required"]
    for widget, key in (("learning_rate", "learning_rate"), ("rank", "lora_rank"), ("batch_size", "batch_size"),
                        ("gradient_accumulation", "gradient_accumulation_steps"), ("epochs", "epochs"),
                        ("lr_scheduler", "lr_scheduler"), ("warmup_steps", "lr_warmup_steps"),
                        ("optimizer", "optimizer"), ("training_seed", "seed"),
                        ("save_every_n_epochs", "save_every_n_epochs")):
        assert req[widget][1]["default"] == getattr(d, key), widget
    assert req["alpha"][1]["default"] == 0.0  # = rank, as the config's lora_alpha None
    assert tuple(req["mixed_precision"][0]) == tuple(PRECISIONS) and PRECISIONS[0] == "auto"
    assert req["mixed_precision"][1]["default"] == d.mixed_precision == "auto"
    assert req["lora_name"][1]["default"] == d.output_name
    from types import SimpleNamespace

    # a run with the node's defaults prints no advice to change a default; another batch with the same lr does
    assert not [x for x in nt.advice_lines(SimpleNamespace(findings=[]), d) if "lr note" in x]
    assert [x for x in nt.advice_lines(SimpleNamespace(findings=[]), d.replace(batch_size=4, learning_rate=1e-4))
            if "set learning_rate to 0.0002" in x]


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


LOADER = f"""
import importlib.util, sys
def load():
    spec = importlib.util.spec_from_file_location("cn_pack", {os.path.join(ROOT, '__init__.py')!r})
    m = importlib.util.module_from_spec(spec); sys.modules["cn_pack"] = m; spec.loader.exec_module(m); return m
"""


@pytest.mark.slow
def test_import_touches_no_comfy_module_and_no_heavy_core():
    out = _run(LOADER + """
import lora_train.training.trainer, lora_train.sampler, lora_train.models.single_file, lora_train.captions, lora_train.hosts
bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'gradio', 'modules')]
assert not bad, bad
for m in [m for m in sys.modules if m.startswith('lora_train') or m.startswith('diffusers') or m.startswith('peft')]:
    del sys.modules[m]
m = load()
assert len(m.NODE_CLASS_MAPPINGS) == 8
assert not [x for x in m.NODE_CLASS_MAPPINGS if 'unavailable' in m.NODE_DISPLAY_NAME_MAPPINGS[x]]
bad = [x for x in sys.modules if x.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'diffusers', 'peft',
       'accelerate', 'transformers') or x in ('lora_train.training.trainer', 'lora_train.sampler')]
assert not bad, bad
print('ok', sorted(m.NODE_CLASS_MAPPINGS)[0])
""")
    assert out.startswith("ok")


@pytest.mark.parametrize("block,expect", [("peft", "pip install"), ("lora_train.tuning.advisor", "import failed")])
def test_start_never_fails_placeholders_explain(block, expect):
    out = _run(LOADER + f"""
import logging
logging.basicConfig(level=logging.ERROR)
sys.modules[{block!r}] = None
m = load()
assert len(m.NODE_CLASS_MAPPINGS) == 8
for k, cls in m.NODE_CLASS_MAPPINGS.items():
    assert cls.CATEGORY == 'LoRA Train' and cls.INPUT_TYPES() == {{'required': {{}}, 'optional': {{}}}}
    assert 'unavailable' in m.NODE_DISPLAY_NAME_MAPPINGS[k]
    try:
        getattr(cls(), cls.FUNCTION)()
    except RuntimeError as e:
        msg = str(e)
    else:
        raise AssertionError('placeholder ran')
assert {expect!r} in msg, msg
print('ok', msg)
""")
    assert out.startswith("ok")


# ============================================================================= glue: state dicts
def test_graph_state_dict_is_the_ldm_layout(comfy, tiny_parts, graph):
    ch = sys.modules["lora_train.hosts.comfyui"]
    _tiny, sd, _ = tiny_parts
    model, clip, vae = graph
    assert any(k.startswith("diffusion_model.") for k in model.model.state_dict())  # ComfyUI's in-memory prefix
    assert any(k.startswith("clip_l.transformer.text_model.") for k in clip.get_sd())
    got = ch.graph_state_dict(model, clip, vae)
    want = {k: v for k, v in sd.items() if k != "alphas_cumprod" and not k.endswith("position_ids")}
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a model class without state_dict_for_saving: the glue's own SD1 mapping gives the same dict
    m2, c2, v2, _ = comfy.sd.load_state_dict_guess_config(sd, saving=False)
    assert not hasattr(m2.model, "state_dict_for_saving")
    got2 = ch.graph_state_dict(m2, c2, v2)
    assert set(got2) == set(got) and all(torch.equal(got2[k], got[k]) for k in got)
    with pytest.raises(ch.HostError, match="CLIP"):
        ch.graph_state_dict(model, None, vae)


@pytest.mark.slow
def test_base_model_from_graph_equals_the_checkpoint(comfy, tiny_parts, graph):
    ch = sys.modules["lora_train.hosts.comfyui"]
    tiny = tiny_parts[0]
    base = ch.base_model_from_graph(*graph)
    for a, b in ((base.unet, tiny.unet), (base.vae, tiny.vae), (base.text_encoder, tiny.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert base.tokenizer("a b").input_ids == tiny.tokenizer("a b").input_ids
    assert not any(p.is_inference() for p in base.unet.parameters())
    # fp16 weights (ComfyUI on most GPUs, or --fp16-unet): float32 copies, not inference tensors
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_parts[1].items()}
    m16, c16, v16, _ = comfy_loaded(comfy, sd16)
    b16 = ch.base_model_from_graph(m16, c16, v16)
    for name, p in b16.unet.named_parameters():
        assert p.dtype == torch.float32 and not p.is_inference()
        assert torch.equal(p, tiny.unet.state_dict()[name].half().float())


# ============================================================================= nodes
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("data")), n=4, size=64)


def test_dataset_caption_suggest_nodes(comfy, dataset_dir):
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    before = folder_hash(dataset_dir)
    dcls = maps["LoraTrainDatasetFromFolder"]
    out = dcls().load(dataset_dir, "zq", 64, 2)
    ref, summary = check_returns(dcls, out)
    assert ref.image_count == 4 and "4 images, 8 samples per epoch" in summary
    assert out["ui"]["images"][0]["type"] == "temp"
    assert os.path.isfile(os.path.join(comfy.fp.get_temp_directory(), out["ui"]["images"][0]["filename"]))
    assert len(ref.load()) == 8
    h1 = dcls.IS_CHANGED(folder=dataset_dir, trigger_word="zq", resolution=64, repeats=2)
    assert h1 == dcls.IS_CHANGED(folder=dataset_dir, trigger_word="zq", resolution=64, repeats=2)
    with pytest.raises(Exception, match="does not exist"):
        dcls().load(os.path.join(dataset_dir, "nope"), "", 64, 1)
    copy = os.path.join(comfy.fp.get_input_directory(), "ds_copy")  # a relative folder is under ComfyUI's input/
    import shutil

    shutil.copytree(dataset_dir, copy)
    h2 = dcls.IS_CHANGED(folder="ds_copy", trigger_word="zq", resolution=64, repeats=2)
    assert result_of(dcls().load("ds_copy", "zq", 64, 2))[0].folder == copy
    first_txt = sorted(n for n in os.listdir(copy) if n.endswith(".txt"))[0]
    with open(os.path.join(copy, first_txt), "a", encoding="utf-8") as fh:
        fh.write(", edited")
    assert dcls.IS_CHANGED(folder="ds_copy", trigger_word="zq", resolution=64, repeats=2) != h2  # caption edit: re-run
    assert dcls.IS_CHANGED(folder="ds_copy", trigger_word="zq", resolution=64, repeats=3) != h2

    ccls = maps["LoraTrainCaptionDataset"]
    out = ccls().caption(ref, "template", "overwrite", "", "{trigger}, {words}", "", False)
    ref2, text = check_returns(ccls, out)
    assert len(ref2.captions) == 4 and all(c.startswith("zq") for c in ref2.captions.values())
    caps = {it.path: it.caption for it in ref2.load().items}
    assert caps == {p: ref2.captions[p] for p in caps}
    assert "in the graph only" in text
    assert folder_hash(dataset_dir) == before  # nothing written without save_captions

    scls = maps["LoraTrainSuggestSettings"]
    res = check_returns(scls, scls().suggest(ref2, "style", "sd1", 8.0, "normal"))
    lr, rank, alpha, batch, accum, epochs, warmup, report = res
    assert 1e-6 < lr < 1e-2 and rank >= 1 and batch >= 1 and epochs >= 1 and "learning_rate" in report


TRAIN_KW = dict(learning_rate=1e-3, rank=4, alpha=4.0, batch_size=2, gradient_accumulation=1, epochs=2, max_steps=0,
                lr_scheduler="constant", warmup_steps=0, optimizer="AdamW", train_text_encoder=True, training_seed=3,
                save_every_n_epochs=1, mixed_precision="auto")


@pytest.fixture(scope="module")
def trained(comfy, tiny_parts, dataset_dir):
    """One training run through the Train node on the fake graph (2 images x 2 epochs, batch 2 = 4 steps)."""
    _tiny, sd, key_map = tiny_parts
    model, clip, vae, _ = comfy_loaded(comfy, sd, unet_lora_key_map=key_map)
    comfy.mm.current_loaded_models.append(model)
    comfy.mm.CALLS.clear()
    comfy.events.clear()
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    ref = result_of(maps["LoraTrainDatasetFromFolder"]().load(dataset_dir, "zq", 64, 1))[0]
    cls = maps["LoraTrainTrain"]
    comfy.fp.get_filename_list("loras")  # ComfyUI has listed the folder before (cache filled)
    out = run_node(cls().train, model, clip, vae, ref, "my lora", unique_id="7", **TRAIN_KW)
    return dict(out=out, cls=cls, ref=ref, model=model, clip=clip, vae=vae, calls=list(comfy.mm.CALLS),
                events=list(comfy.events))


@pytest.mark.slow
def test_train_node_trains_on_the_graph_weights(comfy, trained, caplog):
    from safetensors import safe_open

    name, path, plot, report = check_returns(trained["cls"], trained["out"])
    loras = comfy.fp.get_folder_paths("loras")[0]
    assert name == "my_lora.safetensors" and path == os.path.join(loras, name) and os.path.isfile(path)
    assert os.path.isfile(os.path.join(loras, "my_lora-000001.safetensors"))  # epoch file for the sweep
    assert name in comfy.fp.get_filename_list("loras") and "my_lora-000001.safetensors" in comfy.fp.get_filename_list("loras")
    assert not [n for n in os.listdir(loras) if n.startswith(".tmp")]
    assert trained["calls"][:2] == ["unload_all_models", "soft_empty_cache"]
    assert trained["model"].unloaded == 1
    steps = [(v, t) for v, t, node in trained["events"] if node == "7"]
    assert steps[-1] == (4, 4) and len(steps) >= 4
    with safe_open(path, framework="pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and meta["ss_sd_model_name"] == "comfyui:SD15"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert "4 steps, 2 epoch(s)" in report and "loss: first" in report
    assert "diagnosis:" in report  # the live diagnosis summary
    # batch 2 with lr 1e-3: the report offers the table's start for batch 2 (1.5e-4)
    assert "lr note: effective batch 2 x 1 = 2" in report and "set learning_rate to 0.00015" in report
    run_dir = os.path.join(comfy.fp.get_output_directory(), "lora_train", "my_lora")
    assert os.path.isfile(os.path.join(run_dir, "my_lora.yaml"))
    # ComfyUI's loader (fake: kohya key map of the same model) takes every key of the file
    caplog.set_level(logging.WARNING)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    m2, c2 = comfy.sd.load_lora_for_models(trained["model"], trained["clip"], lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(m2.patches) > 0 and len(c2.patcher.patches) > 0


@pytest.mark.slow
def test_train_node_never_overwrites(comfy, trained, graph):
    first = trained["out"]["result"][1]
    with open(first, "rb") as fh:
        before = hashlib.sha256(fh.read()).hexdigest()
    kw = dict(TRAIN_KW, epochs=1, max_steps=1, save_every_n_epochs=0, train_text_encoder=False)
    out = run_node(trained["cls"]().train, *graph, trained["ref"], "my_lora", **kw)
    name, path, _plot, _report = check_returns(trained["cls"], out)
    assert name == "my_lora_v2.safetensors" and os.path.isfile(path)
    with open(first, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == before


@pytest.mark.slow
def test_train_node_network_types(comfy, trained, graph):
    """The optional network inputs (issue 17): a LoHa with ResNet convs, loaded by ComfyUI's (fake) loader."""
    from safetensors import safe_open

    opt = trained["cls"].INPUT_TYPES()["optional"]
    assert opt["network_type"][0] == ["lora", "locon", "loha", "lokr", "dora"]
    kw = dict(TRAIN_KW, epochs=1, max_steps=1, save_every_n_epochs=0, train_text_encoder=False)
    out = run_node(trained["cls"]().train, *graph, trained["ref"], "my_loha", network_type="loha", conv_rank=2,
                   loraplus_lr_ratio=4.0, **kw)
    name, path, _plot, _report = check_returns(trained["cls"], out)
    with safe_open(path, framework="pt") as fh:
        meta, keys = fh.metadata(), list(fh.keys())
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "2",
                                                   "loraplus_lr_ratio": "4"}
    assert any(k.endswith(".hada_w1_a") for k in keys) and any("_resnets_" in k for k in keys)
    # (the fake loader reads lora_down/lora_up only; the real ComfyUI's LoHa loader: tests/test_networks_real_hosts.py)


@pytest.mark.slow
@pytest.mark.parametrize("race", [False, True])
def test_train_node_stops_on_interrupt_and_keeps_what_it_trained(comfy, trained, graph, monkeypatch, race):
    """Cancel during step 2. race=True: the flag is set between our check and the next progress call, so
    ComfyUI's progress hook is what raises InterruptProcessingException (seen in the real ComfyUI)."""
    from safetensors import safe_open

    if race:
        ch = sys.modules["lora_train.hosts.comfyui"]
        monkeypatch.setattr(ch.ComfyUIHost, "interrupted", lambda self: False)

    def hook(v, t, preview, node_id=None):
        comfy.hook(v, t, preview, node_id)  # raises on the call after Cancel, as ComfyUI's hook does
        if v >= 1:
            comfy.mm.interrupt_current_processing()  # the user pressed Cancel during step 2

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        kw = dict(TRAIN_KW, epochs=50, save_every_n_epochs=0)
        with pytest.raises(comfy.mm.InterruptProcessingException):
            run_node(trained["cls"]().train, *graph, trained["ref"], f"stopped{int(race)}", **kw)
    finally:
        comfy.utils.set_progress_bar_global_hook(comfy.hook)
    assert comfy.mm.processing_interrupted() is False  # the flag is consumed like ComfyUI's own nodes do
    path = os.path.join(comfy.fp.get_folder_paths("loras")[0], f"stopped{int(race)}.safetensors")
    assert os.path.isfile(path)
    with safe_open(path, framework="pt") as fh:
        assert 1 <= int(fh.metadata()["ss_steps"]) <= 2  # stopped long before the 100 steps of 50 epochs


@pytest.mark.slow
def test_apply_and_prompt_nodes_use_comfyui_loader(comfy, trained, graph):
    model, clip, _vae = graph
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    acls = maps["LoraTrainApplyLora"]
    assert "my_lora.safetensors" in acls.INPUT_TYPES()["required"]["lora_name"][0]
    m, c = check_returns(acls, run_node(acls().apply, model, clip, "my_lora.safetensors", 0.5, 0.25))
    strengths_m = {p[0] for plist in m.patches.values() for p in plist}
    strengths_c = {p[0] for plist in c.patcher.patches.values() for p in plist}
    assert strengths_m == {0.5} and strengths_c == {0.25} and not model.patches  # the input is not modified
    m0, c0 = acls().apply(model, clip, "my_lora.safetensors", 0.0, 0.0)
    assert m0 is model and c0 is clip
    m3, _ = acls().apply(model, clip, "my_lora.safetensors", 1.0, 1.0, lora_override="my_lora_v2.safetensors")
    assert m3.patches

    pcls = maps["LoraTrainPromptWithTags"]
    m, c, text, cond = check_returns(pcls, run_node(pcls().apply, model, clip, "a zq cat, <lora:my_lora:0.7>, blue"))
    assert text == "a zq cat, blue"
    assert {p[0] for plist in m.patches.values() for p in plist} == {0.7}
    assert not torch.equal(cond[0][0], comfy.sd.CLIP.encode_from_tokens_scheduled(clip, clip.tokenize(text))[0][0])
    with pytest.raises(Exception, match="unknown LoRA 'nope'"):
        pcls().apply(model, clip, "x <lora:nope:1>")


@pytest.mark.slow
def test_sweep_grid_base_column_is_the_no_lora_sample(comfy, trained, graph):
    import nodes as comfy_nodes

    model, clip, vae = graph
    scls = comfy.pack.NODE_CLASS_MAPPINGS["LoraTrainStrengthSweep"]
    assert scls.INPUT_TYPES()["required"]["sampler_name"][0][0] == "euler"  # ComfyUI's own list
    out = run_node(scls().sweep, model, clip, vae, "my_lora.safetensors", "a zq picture", "blurry", "1.0, 2", "1, 2", 3,
                   5.0, "euler", "normal", 64, 64, False)
    grid, cells, info = check_returns(scls, out)
    assert cells.shape == (6, 64, 64, 3) and grid.shape[1] > 128 and grid.shape[2] > 192
    assert "base (0)" in info

    def plain(seed):  # what CLIPTextEncode + KSampler + VAEDecode give without any LoRA
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a zq picture"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
        (lat,) = comfy_nodes.common_ksampler(model, seed, 3, 5.0, "euler", "normal", pos, neg,
                                             {"samples": torch.zeros(1, 4, 8, 8)})
        img = vae.decode(lat["samples"])
        return torch.from_numpy(__import__("numpy").asarray(sys.modules["lora_train.hosts.comfyui"].image_to_pil(img),
                                                            dtype="float32") / 255.0)

    assert torch.equal(cells[0], plain(1)) and torch.equal(cells[3], plain(2))  # base column, both seeds
    assert not torch.equal(cells[1], cells[0]) and not torch.equal(cells[2], cells[1])  # the LoRA changes them
    assert not model.patches  # the graph's model was not modified

    out = scls().sweep(model, clip, vae, "my_lora", "a zq picture", "", "1", "1", 2, 5.0, "euler", "normal", 64, 64, True)
    grid, cells, info = check_returns(scls, out)
    assert "epoch 1" in info and "final" in info and cells.shape[0] == 4  # 2 rows (epoch 1, final) x 2 columns
    assert torch.equal(cells[0], cells[2])  # the base column does not depend on the epoch
    with pytest.raises(ValueError, match="not a number"):
        scls().sweep(model, clip, vae, "my_lora", "p", "", "1, x", "1", 2, 5.0, "euler", "normal", 64, 64, False)


@pytest.mark.slow
def test_host_refresh_and_lists(comfy, trained):
    ch = sys.modules["lora_train.hosts.comfyui"]
    host = ch.ComfyUIHost()
    assert host.lora_dirs() == comfy.fp.get_folder_paths("loras")
    comfy.fp.get_filename_list("loras")
    assert "loras" in comfy.fp.filename_list_cache
    host.refresh_loras()
    assert "loras" not in comfy.fp.filename_list_cache
    assert host.resolve_lora("my_lora") == host.resolve_lora("my_lora.safetensors")
    with pytest.raises(ch.HostError, match="unknown LoRA"):
        host.resolve_lora("does_not_exist")


# ============================================================================= example workflow
def test_example_workflow_is_valid_and_uses_only_known_nodes(comfy):
    with open(WORKFLOW, encoding="utf-8") as fh:
        wf = json.load(fh)
    ours = set(comfy.pack.NODE_CLASS_MAPPINGS)
    types = set(comfy_workflow.node_types(wf))
    assert types <= ours | set(comfy_workflow.CORE_DEFS) | set(comfy_workflow.UI_ONLY), types
    assert {"LoraTrainTrain", "LoraTrainStrengthSweep", "CheckpointLoaderSimple"} <= types
    assert wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] >= max(lk[0] for lk in wf["links"])
    for node in wf["nodes"]:  # every link id a node lists exists, with matching ends
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = next(lk for lk in wf["links"] if lk[0] == inp["link"])
                assert lk[3] == node["id"] and lk[5] == inp["type"]
        for slot, outp in enumerate(node.get("outputs", [])):
            for lid in outp.get("links") or []:
                lk = next(lk for lk in wf["links"] if lk[0] == lid)
                assert lk[1] == node["id"] and lk[2] == slot and lk[5] == outp["type"]
    api = comfy_workflow.to_api(wf, comfy_workflow.defs_from_classes(comfy.pack.NODE_CLASS_MAPPINGS))
    train = next(v for v in api.values() if v["class_type"] == "LoraTrainTrain")
    sweep = next(v for v in api.values() if v["class_type"] == "LoraTrainStrengthSweep")
    assert sweep["inputs"]["lora_name"][0] == next(k for k, v in api.items() if v is train)
    assert train["inputs"]["optimizer"] in comfy.pack.NODE_CLASS_MAPPINGS["LoraTrainTrain"].INPUT_TYPES()["required"]["optimizer"][0]


# ============================================================================= registry / web
def test_pyproject_has_the_comfy_registry_fields_and_web_dir_exists(comfy):
    import re

    try:
        import tomllib  # novermin
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        data = tomllib.load(fh)
    proj, tool = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([._-][A-Za-z0-9]+)*", proj["name"]) and len(proj["name"]) < 100
    assert "comfyui" not in proj["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", proj["version"]) and proj["description"]
    assert isinstance(proj["license"], dict) and ("text" in proj["license"] or "file" in proj["license"])
    assert proj["urls"]["Repository"].startswith("https://")
    assert tool["PublisherId"] and tool["DisplayName"] and "Icon" in tool
    web = os.path.join(ROOT, comfy.pack.WEB_DIRECTORY)
    js = [n for n in os.listdir(web) if n.endswith(".js")]
    assert js
    with open(os.path.join(web, js[0]), encoding="utf-8") as fh:
        src = fh.read()
    assert all(k in src for k in ("LoraTrainTrain", "registerExtension", "serialize = false"))


@pytest.mark.slow
def test_train_node_trains_a_family_without_converter_in_place(comfy, dataset_dir):
    """A Wan MODEL (no converter reads it): the node trains it in place (tests/test_comfyui_inplace.py has the
    details), leaves its weights as they were and checks the file with ComfyUI's own key map."""
    import inplace_fakes

    mp, clip, vae = inplace_fakes.graph("wan", "flow")
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    ref = result_of(maps["LoraTrainDatasetFromFolder"]().load(dataset_dir, "zq", 64, 1))[0]
    cls = maps["LoraTrainTrain"]
    out = run_node(cls().train, mp, clip, vae, ref, "wan lora", unique_id="9",
                   **dict(TRAIN_KW, train_text_encoder=False, save_every_n_epochs=0))
    name, path, _plot, report = check_returns(cls, out)
    assert name == "wan_lora.safetensors" and "ComfyUI applies 20 of 20 LoRA modules" in report
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    assert {k.split(".")[0] for k in sd} >= {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_1_ffn_2"}
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not getattr(m, "weight_function", []) for m in mp.model.diffusion_model.modules())


def test_caption_node_with_a_vision_language_model(comfy, dataset_dir, tmp_path):
    """The Caption node's vlm backend: a local chat VLM (a tiny LLaVA here) asked in the family's style; the
    captions stay in the graph and the caption checks are in its text."""
    from tiny_vlm import write_tiny_llava

    folder = write_tiny_llava(str(tmp_path / "tiny-llava"))
    maps = comfy.pack.NODE_CLASS_MAPPINGS
    ref = result_of(maps["LoraTrainDatasetFromFolder"]().load(dataset_dir, "zq", 64, 1))[0]
    ccls = maps["LoraTrainCaptionDataset"]
    out = ccls().caption(ref, "vlm", "overwrite", "", "", folder, False, style="auto", family="flux",
                         concept="")
    ref2, text = check_returns(ccls, out)
    assert len(ref2.captions) == 4 and all(c.startswith("zq") for c in ref2.captions.values())
    assert "in the graph only" in text
    assert "vlm" in ccls.INPUT_TYPES()["required"]["backend"][0]
