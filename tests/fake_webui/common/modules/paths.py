from modules.paths_internal import data_path, models_path, script_path, extensions_dir  # noqa: F401
