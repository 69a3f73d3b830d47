"""Read a ComfyUI workflow (the UI format saved by the frontend / kept in example_workflows/) the way the
frontend does: widget values are assigned in INPUT_TYPES order to the inputs that are widgets, links fill the
others; and turn it into the API format `/prompt` takes. Used by the workflow tests and the real-ComfyUI test.

`defs` maps class_type -> {"input": {"required": {...}, "optional": {...}}, "output": [types]} (the shape of
ComfyUI's /object_info, which is also what our INPUT_TYPES/RETURN_TYPES give)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

# Core nodes the example uses, as ComfyUI 0.8.0's nodes.py defines them (inputs in order, outputs).
CORE_DEFS: Dict[str, Dict[str, Any]] = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["model.safetensors"], {}]}},
                               "output": ["MODEL", "CLIP", "VAE"]},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": []},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}}, "output": []},
    "LoraLoader": {"input": {"required": {"model": ["MODEL", {}], "clip": ["CLIP", {}], "lora_name": [[], {}],
                                          "strength_model": ["FLOAT", {}], "strength_clip": ["FLOAT", {}]}},
                   "output": ["MODEL", "CLIP"]},
}
UI_ONLY = ("Note", "MarkdownNote")


def is_widget(spec: Any) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(t, list) or t in WIDGET_TYPES


def widget_names(defn: Dict[str, Any]) -> List[str]:
    out = []
    for group in ("required", "optional"):
        for name, spec in (defn["input"].get(group) or {}).items():
            if is_widget(spec):
                out.append(name)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if opts.get("control_after_generate"):
                    out.append(None)  # the frontend's extra "control after generate" value
    return out


def input_type(defn: Dict[str, Any], name: str) -> str:
    for group in ("required", "optional"):
        spec = (defn["input"].get(group) or {}).get(name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], list) else spec[0]
    raise KeyError(name)


def to_api(workflow: Dict[str, Any], defs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """UI workflow -> API prompt {node id: {"class_type", "inputs"}}; raises ValueError on any inconsistency."""
    links = {}
    for lk in workflow["links"]:
        lid, src, src_slot, dst, dst_slot, typ = lk
        links[lid] = (src, src_slot, dst, dst_slot, typ)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    api: Dict[str, Dict[str, Any]] = {}
    for nid, node in nodes.items():
        t = node["type"]
        if t in UI_ONLY:
            continue
        if t not in defs:
            raise ValueError(f"node {nid}: unknown type {t}")
        d = defs[t]
        inputs: Dict[str, Any] = {}
        names = widget_names(d)
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise ValueError(f"node {nid} ({t}): {len(values)} widget values for {len(names)} widgets {names}")
        for name, v in zip(names, values):
            if name is not None:
                inputs[name] = v
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src, src_slot, dst, dst_slot, typ = links[inp["link"]]
            if dst != nid:
                raise ValueError(f"link {inp['link']} does not end at node {nid}")
            want = input_type(d, inp["name"])
            if want != typ and not (want == "COMBO" and typ == "STRING"):
                raise ValueError(f"node {nid} ({t}) input {inp['name']} is {want}, link carries {typ}")
            src_node = nodes[src]
            out_types = defs[src_node["type"]]["output"]
            if src_slot >= len(out_types) or out_types[src_slot] != typ:
                raise ValueError(f"link {inp['link']}: output {src_slot} of {src_node['type']} is not {typ}")
            inputs[inp["name"]] = [str(src), src_slot]
        for group in ("required",):
            for name in (d["input"].get(group) or {}):
                if name not in inputs:
                    raise ValueError(f"node {nid} ({t}): required input {name} has no value or link")
        api[str(nid)] = {"class_type": t, "inputs": inputs}
    return api


def defs_from_classes(mappings: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    out = dict(CORE_DEFS)
    for name, cls in mappings.items():
        it = cls.INPUT_TYPES()
        out[name] = {"input": {"required": {k: list(v) for k, v in it.get("required", {}).items()},
                               "optional": {k: list(v) for k, v in it.get("optional", {}).items()}},
                     "output": list(cls.RETURN_TYPES)}
    return out


def node_types(workflow: Dict[str, Any]) -> List[str]:
    return [n["type"] for n in workflow["nodes"]]


def links_of(workflow: Dict[str, Any]) -> List[Tuple]:
    return [tuple(lk) for lk in workflow["links"]]
