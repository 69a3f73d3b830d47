"""clip_skip and 75/150/225-token captions encode as the WebUIs do (hand-computed on the tiny text encoder);
shuffle_caption keeps the first keep_tokens; tag dropout; the trainer uses them."""
import random

import pytest
import torch

from conftest import small_cfg
from lora_train.data.caption_aug import process_caption
from lora_train.models import conditioning, text_chunks
from lora_train.models.tiny import build_tiny, build_tiny_sdxl

WORDS = "red blue green cat dog house tree sky girl boy hat coat river stone cloud".split()


def long_caption(n_tags=60, seed=0):
    r = random.Random(seed)
    return ", ".join(" ".join(r.choice(WORDS) for _ in range(2)) for _ in range(n_tags))


def webui_rule(te, tok, caption, chunks, clip_skip=1):
    """A1111 sd_hijack_clip by hand: 75-token chunks as BOS + tokens + EOS, padded with EOS (SD1 pads with
    id_end), each encoded; layer -clip_skip through final_layer_norm when clip_skip > 1; concatenated."""
    ids = tok(caption, add_special_tokens=False).input_ids[: 75 * chunks]
    outs = []
    for c in range(chunks):
        part = ids[75 * c: 75 * (c + 1)]
        row = [tok.bos_token_id] + part + [tok.eos_token_id] * (76 - len(part))
        o = te(torch.tensor([row]), output_hidden_states=True)
        norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 has no .text_model level
        h = o.last_hidden_state if clip_skip == 1 else norm(o.hidden_states[-clip_skip])
        outs.append(h)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def test_clip_skip_2_is_penultimate_layer_through_final_norm():
    m = build_tiny()
    cap = "a red cat, blue sky"
    plain = conditioning.encode(m, [cap])
    text_chunks.configure(m, 2, 75)
    skipped = conditioning.encode(m, [cap])
    assert skipped.shape == plain.shape == (1, 77, 32)
    assert torch.allclose(skipped, webui_rule(m.text_encoder, m.tokenizer, cap, 1, clip_skip=2), atol=1e-6)
    assert not torch.allclose(skipped, plain, atol=1e-3)
    text_chunks.configure(m, None, 75)
    assert torch.equal(conditioning.encode(m, [cap]), plain)  # the default path is untouched
    assert torch.allclose(plain, webui_rule(m.text_encoder, m.tokenizer, cap, 1), atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("mtl, clip_skip", [(225, None), (225, 2), (150, None)])
def test_long_captions_are_chunked_like_the_webui(mtl, clip_skip):
    m = build_tiny()
    caps = [long_caption(80, 1), "short one"]
    assert len(m.tokenizer(caps[0], add_special_tokens=False).input_ids) > 225  # gets cut at 225
    text_chunks.configure(m, clip_skip, mtl)
    got = conditioning.encode(m, caps)
    chunks = mtl // 75
    assert got.shape == (2, 77 * chunks, 32)
    for i, c in enumerate(caps):
        want = webui_rule(m.text_encoder, m.tokenizer, c, chunks, clip_skip or 1)
        assert torch.allclose(got[i:i + 1], want, atol=1e-5), i


@torch.no_grad()
def test_sdxl_long_captions_pooled_from_first_chunk():
    m = build_tiny_sdxl()
    cap = long_caption(70, 2)
    text_chunks.configure(m, None, 150)
    got = conditioning.encode(m, [cap])
    assert got["hidden"].shape[1] == 154
    tok2, te2 = m.tokenizer_2, m.text_encoder_2
    ids = tok2(cap, add_special_tokens=False).input_ids[:75]
    row = [tok2.bos_token_id] + ids + [tok2.eos_token_id] + [tok2.pad_token_id] * (75 - len(ids))
    o = te2(torch.tensor([row]), output_hidden_states=True)
    assert torch.allclose(got["pooled"], o.text_embeds, atol=1e-5)
    assert torch.allclose(got["hidden"][:, :77, -o.hidden_states[-2].shape[-1]:], o.hidden_states[-2], atol=1e-5)
    assert text_chunks.configure(m, 2, 75)  # a warning: SDXL ignores clip_skip
    assert m.extra["clip_skip"] is None


def test_shuffle_keeps_first_keep_tokens():
    cap = "trigger, 1girl, red hat, blue coat, smile, outdoors"
    tags = [t.strip() for t in cap.split(",")]
    rng = random.Random(3)
    orders = set()
    for _ in range(200):
        out = process_caption(cap, shuffle=True, keep_tokens=2, rng=rng)
        got = [t.strip() for t in out.split(",")]
        assert got[:2] == ["trigger", "1girl"] and sorted(got) == sorted(tags)
        orders.add(tuple(got))
    assert len(orders) > 20  # the other four tags really are shuffled (4! = 24 orders)


def test_keep_tokens_separator_and_tag_dropout():
    cap = "mychar, smiling ||| hat, coat, river, stone ||| masterpiece"
    rng = random.Random(1)
    kept = 0
    for _ in range(400):
        out = process_caption(cap, shuffle=True, keep_tokens=5, keep_tokens_separator="|||", tag_dropout_rate=0.25,
                              rng=rng)
        got = [t.strip() for t in out.split(",")]
        assert got[:2] == ["mychar", "smiling"] and got[-1] == "masterpiece"
        assert set(got[2:-1]) <= {"hat", "coat", "river", "stone"}
        kept += len(got) - 3
    assert 0.70 < kept / 1600 < 0.80  # each flexible tag survives with probability 0.75
    assert process_caption(cap) == cap  # nothing asked: unchanged


@pytest.mark.slow
def test_training_with_clip_skip_long_captions_and_shuffle(demo_data, tmp_path):
    from lora_train.training.trainer import Trainer

    cfg = small_cfg(demo_data, tmp_path / "o", clip_skip=2, max_token_length=150, shuffle_caption=True, keep_tokens=1,
                    caption_tag_dropout_rate=0.1, max_train_steps=2)
    tr = Trainer(cfg)
    res = tr.run()
    assert res.steps == 2 and tr.text_cache is None
    assert tr.model.extra["clip_skip"] == 2
    meta = tr.metadata(1, 2)
    assert meta["ss_clip_skip"] == "2" and meta["ss_max_token_length"] == "150"
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"


@pytest.mark.slow
def test_training_samples_use_the_trained_text_conditioning(demo_data, tmp_path, monkeypatch):
    from lora_train import sampler
    from lora_train.training.trainer import Trainer

    seen = []
    real = sampler.run_pipeline

    def spy(pipe, p, prompt_text=None, **kw):
        seen.append(kw)
        return real(pipe, p, prompt_text, **kw)

    monkeypatch.setattr(sampler, "run_pipeline", spy)
    cfg = small_cfg(demo_data, tmp_path / "o", clip_skip=2, max_token_length=150, max_train_steps=1,
                    sample_every_n_steps=1, sample_prompts=["lrtdemo"], sample_steps=1)
    tr = Trainer(cfg)
    tr.run()
    assert len(seen) == 2  # base and LoRA row of the one prompt
    for kw in seen:
        assert kw["prompt_embeds"].shape == kw["negative_prompt_embeds"].shape == (1, 154, 32)
    text_chunks.configure(tr.model, 2, 150)
    with torch.no_grad():
        want = conditioning.encode(tr.model, ["lrtdemo"])
    assert torch.allclose(seen[0]["prompt_embeds"], want, atol=1e-6)
