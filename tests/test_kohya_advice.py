"""The advisor and the diagnosis know the kohya options: clip_skip 2 for anime SD1.5 models, reg images for few
character images, tag shuffling, long captions; risky kohya settings are flagged."""
from lora_train.config import TrainConfig
from lora_train.models.tiny import build_tiny
from lora_train.tuning import kohya_advice
from lora_train.tuning.advisor import Diagnoser, check_config, suggest

TAGS = ["lrtdemo, 1girl, red hat, blue coat, smile, outdoors"] * 6


def test_clip_skip_2_for_anime_sd15_models_only():
    s = suggest(12, task="character", base="sd1", vram_gb=12, model_name="animefull-final-pruned.safetensors")
    assert s.value("clip_skip") == 2 and "CLIP skip 2" in s.reason("clip_skip")
    assert "clip_skip" not in suggest(12, base="sd1", vram_gb=12, model_name="v1-5-pruned-emaonly.safetensors").settings
    assert "clip_skip" not in suggest(12, base="sdxl", vram_gb=24, model_name="animagine-xl.safetensors").settings
    assert kohya_advice.wants_clip_skip_2("AnythingV5_v5PrtRE") and kohya_advice.wants_clip_skip_2("meinamix_v11")


def test_reg_images_for_few_character_images_and_tag_shuffle():
    s = suggest(8, task="character", base="sd1", vram_gb=12, captions=TAGS)
    assert any("reg_data_dir" in n and "prior_loss_weight" in n for n in s.notes)
    assert s.value("shuffle_caption") is True and s.value("keep_tokens") == 1
    s2 = suggest(60, task="style", base="sd1", vram_gb=12, captions=["a photo of a cat on a mat"] * 5)
    assert not any("reg_data_dir" in n for n in s2.notes) and "shuffle_caption" not in s2.settings


def test_long_captions_suggest_max_token_length():
    tok = build_tiny().tokenizer
    long = ", ".join(["red hat blue coat"] * 30)
    s = suggest(10, base="sd1", vram_gb=12, captions=[long, "short"], tokenizer=tok)
    assert s.value("max_token_length") in (150, 225) and "tokens" in s.reason("max_token_length")


def test_check_config_flags_risky_kohya_settings():
    cfg = TrainConfig(base_model="tiny", trigger_word="zz", shuffle_caption=True, reg_data_dir="/r",
                      prior_loss_weight=0.0, ema_decay=0.999, max_train_steps=200)
    out = " ".join(check_config(cfg))
    assert "keep_tokens 1" in out and "prior_loss_weight is 0" in out and "ema_decay 0.999" in out


def test_overfitting_finding_names_reg_images():
    d = Diagnoser(TrainConfig(base_model="tiny"), total_steps=200, steps_per_epoch=20)
    found = []
    for step in range(1, 201):
        found += d.update(step, 1.0 - step * 0.004)
        if step % 20 == 0:
            found += d.update(step, None, val_loss=0.5 if step <= 60 else 0.5 + (step - 60) * 0.01)
    over = [f for f in found if f.kind == "overfitting"]
    assert over and "reg_data_dir" in over[0].message
