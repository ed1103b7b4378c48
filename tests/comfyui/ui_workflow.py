"""Convert a UI-format workflow (what the editor saves and drags in) into an API prompt.

ComfyUI v0.3.64 has no server-side conversion: the frontend's ``graphToPrompt`` does it. This is the
subset our example workflows need, following the frontend's rules:

- widget values are matched to inputs by the node's ``object_info`` input order (required, then
  optional); an input with ``control_after_generate`` or named ``seed``/``noise_seed`` stores one
  extra value (the "randomize"/"fixed" control), a media-upload combo one extra ("upload" button);
  a node saved by an older version with fewer values keeps the defaults of the widgets it lacks
  (the frontend's ``LGraphNode.configure`` assigns only the values present);
- nodes in mode 2 (muted) are dropped; nodes in mode 4 (bypassed) pass their input of the matching
  type through; virtual nodes (Reroute, PrimitiveNode, Note, MarkdownNote) are resolved or dropped,
  a PrimitiveNode's value already sits in its target's widget values;
- subgraphs and group nodes are not supported and raise.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_NAMES = {"seed", "noise_seed"}
UPLOAD_KEYS = ("image_upload", "video_upload", "animated_image_upload")
VIRTUAL_TYPES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowConversionError(ValueError):
    """The workflow cannot be converted; the message names the node and what to fix."""


def _is_widget(name: str, spec: list, ui_input: dict | None) -> bool:
    if ui_input is not None and "widget" in ui_input:
        return True
    io_type, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    if opts.get("forceInput"):
        return False
    return isinstance(io_type, list) or io_type in WIDGET_TYPES or opts.get("widgetType") is not None


def _extra_slots(name: str, spec: list) -> int:
    opts = (spec[1] if len(spec) > 1 else {}) or {}
    extra = 1 if (opts.get("control_after_generate") or name in CONTROL_NAMES) else 0
    return extra + (1 if any(opts.get(k) for k in UPLOAD_KEYS) else 0)


def _input_specs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order", {})
    specs = []
    for group in ("required", "optional"):
        section = info.get("input", {}).get(group, {})
        for name in order.get(group, list(section)):
            specs.append((name, section[name]))
    return specs


def _widget_values(node: dict, info: dict) -> dict[str, Any]:
    """Map the node's widgets_values onto input names; defaults fill inputs it does not store."""
    ui_inputs = {i["name"]: i for i in node.get("inputs", [])}
    specs = _input_specs(info)
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return {name: values[name] for name, _ in specs if name in values}
    values = list(values or [])
    for with_forced in (False, True):
        names, slots = [], 0
        for name, spec in specs:
            forced = bool(((spec[1] if len(spec) > 1 else {}) or {}).get("forceInput"))
            if _is_widget(name, spec, ui_inputs.get(name)) or (with_forced and forced):
                names.append((name, spec, forced))
                slots += 1 + _extra_slots(name, spec)
        if slots == len(values) or not values or (not with_forced and len(values) < slots):
            break
    else:
        raise WorkflowConversionError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values, but object_info gives "
            f"{slots} widget slots ({[n for n, _, _ in names]}); the workflow was saved with another "
            "version of this node: re-save it from the current ComfyUI")
    out: dict[str, Any] = {}
    pos = 0
    for name, spec, forced in names:
        if pos < len(values) and not (with_forced and forced):
            out[name] = values[pos]
        pos += 1 + _extra_slots(name, spec)
    for name, spec in specs:
        opts = (spec[1] if len(spec) > 1 else {}) or {}
        if name not in out and "default" in opts and _is_widget(name, spec, ui_inputs.get(name)):
            out[name] = opts["default"]
    return out


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """UI workflow (``nodes`` + ``links``) -> API prompt ``{id: {"class_type", "inputs"}}``."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowConversionError("workflow uses subgraphs: unpack them in the editor before saving")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source(link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, int] | None:
        """Follow a link through reroutes and bypassed nodes to a real output, or None."""
        if link_id is None or link_id not in links:
            return None
        _, origin_id, origin_slot, _, _, link_type = links[link_id][:6]
        origin = nodes.get(origin_id)
        if origin is None or origin_id in seen:
            return None
        seen = seen | {origin_id}
        if origin["type"] == "Reroute":
            return source(origin["inputs"][0].get("link"), seen)
        if origin["type"] in VIRTUAL_TYPES or origin.get("mode") == MODE_MUTED:
            return None
        if origin.get("mode") == MODE_BYPASS:
            inputs = origin.get("inputs", [])
            same = [origin_slot] if origin_slot < len(inputs) and inputs[origin_slot].get("type") == link_type else []
            for idx in same + [i for i, inp in enumerate(inputs) if inp.get("type") == link_type]:
                found = source(inputs[idx].get("link"), seen)
                if found is not None:
                    return found
            return None
        return str(origin_id), origin_slot

    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowConversionError(
                f"node {node['id']} has type {node['type']!r}, unknown to this ComfyUI (missing custom node "
                "or a group node): install it or rebuild the workflow with known nodes")
        inputs = _widget_values(node, info)
        for ui_input in node.get("inputs", []):
            origin = source(ui_input.get("link"))
            if origin is not None:
                inputs[ui_input["name"]] = [origin[0], origin[1]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
