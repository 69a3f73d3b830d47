"""What the tab's sections share: the JS names, the poll period, error text, the ui-config rule, the namespace."""
from typing import Any, Dict

from .. import jobs

#: name of the JS function (javascript/ of the WebUI extension) that puts its argument into the txt2img prompt
SEND_TO_TXT2IMG_JS = "loraTrainSendToTxt2img"
#: JS function that refreshes the WebUI's Lora cards (extra networks) once per newly published LoRA
REFRESH_CARDS_JS = "loraTrainRefreshCards"
POLL_SECONDS = 1.0
#: the button our page script clicks about once a second while the tab is shown, every 5 s while another tab is
#: (WebUI hosts: no server timer)
POLL_BUTTON_ID = "lora_train_poll"


def keep(c, components: Dict[str, Any]) -> None:
    """A section's components join the tab's namespace `c`, where the wiring of every section finds them."""
    for name, comp in components.items():
        setattr(c, name, comp)


def keep_out_of_ui_config(*components) -> None:
    """Fields whose value changes from run to run (the last LoRA, the loaded checkpoint) are not frozen into
    the WebUI's ui-config.json: its loader skips a component with `do_not_save_to_config`."""
    for comp in components:
        comp.do_not_save_to_config = True


def err(exc: BaseException) -> str:
    """One line for the page: our own errors as 'Cannot do that' with their fix, anything else as an error (its
    traceback goes to the console)."""
    jobs.log_failure("lora_train tab", exc)
    if jobs.is_user_error(exc):
        return f"**Cannot do that:** {exc}"
    return f"**Error:** {jobs.error_text(exc)}"


def has_txt2img(host) -> bool:
    """Whether the host has a txt2img tab to send a prompt to (the WebUI hosts: `Host.has_txt2img`)."""
    return bool(host.has_txt2img)
