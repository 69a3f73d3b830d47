"""What users bring from kohya sd-scripts / kohya_ss / SD-Trainer: their TOML (and kohya_ss JSON) configs, and the
training options with kohya's names (captions, reg images, loss types, noise, block weights, EMA, logging).

  toml_config   kohya training-argument TOMLs, dataset_config TOMLs and kohya_ss .json -> TrainConfig (+ one
                warning listing every key not used), and TrainConfig -> kohya TOML (export-config --kohya)
"""
