callbacks_ui_tabs = []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append((callback, name))


def ui_tabs_callback():
    """What modules/ui.py does: call every registered callback and collect (component, title, elem_id)."""
    res = []
    for cb, _ in callbacks_ui_tabs:
        res += cb() or []
    return res
