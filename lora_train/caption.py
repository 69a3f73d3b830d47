"""Compatibility shim: captioning now lives in the package ``lora_train.captions`` (backends, text, table, run).

``from lora_train.caption import X`` keeps working for every name it had; new code imports from
``lora_train.captions``. To be removed by the layout move (#15).
"""
from .captions import *  # noqa: F401,F403
from .captions import __all__  # noqa: F401
from .captions.backends import (_ALIASES, _REPEAT_RE, _TEMPLATE_FIELDS, _cached_file, _download_hint,  # noqa: F401
                                _import_onnxruntime, _looks_like_repo_id, _repo_cache_path)
from .captions.run import _resolve_out  # noqa: F401
from .captions.table import _read_sidecar, _sidecar_bytes  # noqa: F401
from .captions.text import _norm  # noqa: F401
