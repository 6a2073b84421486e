"""Loader, model, KV cache and tokenizer checked against the real stories260K files."""

from __future__ import annotations

import copy
import struct

import pytest
import torch
from torch import nn

from pl_actsparse.demos.tinystories import load_stories, resolve_data_dir
from pl_actsparse.demos.llama2c import (
    KVCache,
    Llama2cConfig,
    Llama2cModel,
    Llama2cTokenizer,
    apply_rope,
    greedy_generate,
    load_llama2c_checkpoint,
    read_llama2c_config,
    save_llama2c_checkpoint,
)

# The 200-position greedy sample quoted in shared/data/SOURCES.md (llama2.c's test_all.py expected output).
EXPECTED_SAMPLE_PREFIX = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\""
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # A 260K-parameter model gains nothing from threads, and on a shared 2-core box
    # OpenMP spin-waits make it ~10x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data_dir():
    try:
        return resolve_data_dir()
    except FileNotFoundError as exc:  # pragma: no cover
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model(data_dir) -> Llama2cModel:
    return load_llama2c_checkpoint(data_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def tok(data_dir) -> Llama2cTokenizer:
    return Llama2cTokenizer.from_file(data_dir / "tok512.bin")


def small_config(**kw) -> Llama2cConfig:
    base = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=64)
    base.update(kw)
    return Llama2cConfig(**base)


def n_unique_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())  # parameters() already de-duplicates tied weights


# ----------------------------------------------------------------------------- header, structure


def test_header_and_parameter_count(data_dir, model):
    cfg = read_llama2c_config(data_dir / "stories260K.bin")
    assert cfg == Llama2cConfig.stories260k()
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (64, 172, 5, 8, 4)
    assert (cfg.vocab_size, cfg.seq_len, cfg.shared_classifier) == (512, 512, True)
    assert cfg.num_parameters() == 260_032
    assert n_unique_params(model) == 260_032
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.training


def test_hf_style_module_names(model):
    names = dict(model.named_modules())
    for i in range(5):
        for sub, shape in {
            "self_attn.q_proj": (64, 64),
            "self_attn.k_proj": (32, 64),
            "self_attn.v_proj": (32, 64),
            "self_attn.o_proj": (64, 64),
            "mlp.gate_proj": (172, 64),
            "mlp.up_proj": (172, 64),
            "mlp.down_proj": (64, 172),
        }.items():
            lin = names[f"layers.{i}.{sub}"]
            assert isinstance(lin, nn.Linear) and lin.bias is None
            assert tuple(lin.weight.shape) == shape
        assert f"layers.{i}.input_layernorm" in names and f"layers.{i}.post_attention_layernorm" in names
    linear_order = [n.split(".")[-1] for n, mod in model.layers[0].mlp.named_children() if isinstance(mod, nn.Linear)]
    assert linear_order == ["gate_proj", "up_proj", "down_proj"]
    assert {"embed_tokens", "norm", "lm_head"} <= set(names)
    # RoPE tables are not part of the checkpoint state
    assert not any("rope" in k for k in model.state_dict())


def test_weights_land_in_the_right_modules(data_dir, model):
    raw = torch.frombuffer(bytearray((data_dir / "stories260K.bin").read_bytes()), dtype=torch.float32, offset=28)
    emb = raw[: 512 * 64].view(512, 64)
    off = 512 * 64 + 5 * 64  # skip rms_att
    wq = raw[off : off + 5 * 64 * 64].view(5, 64, 64)
    off += 5 * 64 * 64 + 2 * 5 * 32 * 64 + 5 * 64 * 64 + 5 * 64  # wk, wv, wo, rms_ffn
    w1 = raw[off : off + 5 * 172 * 64].view(5, 172, 64)
    w2 = raw[off + 5 * 172 * 64 : off + 2 * 5 * 172 * 64].view(5, 64, 172)
    w3 = raw[off + 2 * 5 * 172 * 64 : off + 3 * 5 * 172 * 64].view(5, 172, 64)
    assert torch.equal(model.embed_tokens.weight, emb)
    assert torch.equal(model.layers[3].self_attn.q_proj.weight, wq[3])
    assert torch.equal(model.layers[2].mlp.gate_proj.weight, w1[2])
    assert torch.equal(model.layers[2].mlp.down_proj.weight, w2[2])
    assert torch.equal(model.layers[2].mlp.up_proj.weight, w3[2])
    # the legacy file's freq_cis tables are exactly our RoPE tables
    n = 512 * 4
    assert torch.equal(model.rope_cos, raw[-2 * n : -n].view(512, 4))
    assert torch.equal(model.rope_sin, raw[-n:].view(512, 4))


# ----------------------------------------------------------------------------- forward pass


def test_greedy_sample_matches_llama2c(model, tok):
    text = greedy_generate(model, tok, "", max_new_tokens=200)
    assert text.startswith(EXPECTED_SAMPLE_PREFIX), text[:400]
    assert len(text) > len(EXPECTED_SAMPLE_PREFIX) + 100


def test_rope_rotates_adjacent_pairs():
    cfg = small_config(dim=8, n_heads=1, n_kv_heads=1)
    m = Llama2cModel(cfg)
    x = torch.zeros(1, 6, 1, 8)
    x[..., 2] = 1.0  # pair i=1 -> frequency theta^(-2/8)
    out = apply_rope(x, m.rope_cos[:6], m.rope_sin[:6])
    angle = torch.arange(6.0) * 10000.0 ** (-2 / 8)
    torch.testing.assert_close(out[0, :, 0, 2], angle.cos())
    torch.testing.assert_close(out[0, :, 0, 3], angle.sin())
    others = out[0, :, 0, [0, 1, 4, 5, 6, 7]]
    assert torch.count_nonzero(others) == 0


@pytest.mark.parametrize("which", ["stories260K", "random_gqa", "random_mha"])
def test_cached_decode_equals_full_forward(which, model):
    torch.manual_seed(0)
    if which == "stories260K":
        m = model
    else:
        m = Llama2cModel(small_config(n_kv_heads=2 if which == "random_gqa" else 4)).eval()
    ids = torch.randint(3, m.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(batch_size=2)
        parts = [m(ids[:, :10], cache=cache, start_pos=0)]  # prompt
        parts.append(m(ids[:, 10:17], cache=cache, start_pos=10))  # a chunk after cached positions
        for p in range(17, 40):  # one token at a time: each Linear sees [B, 1, dim]
            parts.append(m(ids[:, p : p + 1], cache=cache, start_pos=p))
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-5)


def test_generate_equals_uncached_greedy(model):
    ids = torch.tensor([[1, 300, 400]])
    out = model.generate(ids, max_new_tokens=25)
    ref = ids
    with torch.no_grad():
        for _ in range(25):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_stops_at_seq_len_and_stop_ids(model):
    start = torch.ones(1, 500, dtype=torch.long)
    assert model.generate(start, max_new_tokens=100).shape == (1, 513)  # positions 0..511 fed
    with pytest.raises(ValueError, match="seq_len 512"):
        model(torch.ones(1, 513, dtype=torch.long))
    out = model.generate(torch.tensor([[1]]), 5)
    first = int(out[0, 1])
    stopped = model.generate(torch.tensor([[1]]), 5, stop_ids=[first])
    assert stopped.tolist() == [[1, first]]


@pytest.mark.parametrize(
    "dtype, max_abs, min_agree, max_rel_ppl",
    [(torch.bfloat16, 1.0, 0.97, 5e-3), (torch.float16, 0.2, 0.99, 2e-3)],
)
def test_half_precision_close_to_fp32(model, tok, dtype, max_abs, min_agree, max_rel_ppl):
    from pl_actsparse.demos.tinystories import TokenWindows
    from pl_actsparse.tuning.objectives import perplexity

    windows = TokenWindows(load_stories(stop=12), tok, 256)
    x = torch.stack([windows[i] for i in range(len(windows))])
    low = copy.deepcopy(model).to(dtype)
    assert low.layers[0].mlp.down_proj.weight.dtype == dtype
    assert low.lm_head.weight is low.embed_tokens.weight
    assert low.rope_cos.dtype == torch.float32  # tables are rebuilt, not rounded
    assert torch.equal(low.rope_cos, model.rope_cos)
    with torch.no_grad():
        ref = model(x)
        out = low(x)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < max_abs
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > min_agree
    assert abs(perplexity(low, windows) / perplexity(model, windows) - 1) < max_rel_ppl
    with torch.no_grad():  # the KV-cache path also works in low precision
        step = low.generate(x[:1, :5], 3)
    assert step.shape == (1, 8)


# ----------------------------------------------------------------------------- random configs


def test_random_config_model_builds_and_runs():
    cfg = small_config(shared_classifier=False)
    torch.manual_seed(0)
    m = Llama2cModel(cfg)
    assert m.lm_head.weight is not m.embed_tokens.weight
    assert n_unique_params(m) == cfg.num_parameters()
    logits = m(torch.randint(0, 40, (3, 11)))
    assert logits.shape == (3, 11, 40) and torch.isfinite(logits).all()


def test_tinyllama_shapes_on_meta_device():
    cfg = Llama2cConfig.tinyllama_1b()
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        2048, 5632, 22, 32, 4, 32000,
    )
    m = Llama2cModel(cfg, device="meta")
    assert n_unique_params(m) == cfg.num_parameters() == 1_100_048_384
    assert tuple(m.layers[21].self_attn.k_proj.weight.shape) == (256, 2048)
    assert tuple(m.layers[0].mlp.down_proj.weight.shape) == (2048, 5632)


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        small_config(dim=30)
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        small_config(vocab_size=0)


def test_kv_cache_bounds():
    cfg = small_config()
    cache = KVCache(cfg, batch_size=1, max_len=8)
    m = Llama2cModel(cfg).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="max_len 8"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len must be in"):
        KVCache(cfg, max_len=65)


# ----------------------------------------------------------------------------- checkpoint files


def test_v0_round_trip_is_byte_identical(data_dir, model, tmp_path):
    out = tmp_path / "v0.bin"
    save_llama2c_checkpoint(model, out, version=0)
    assert out.read_bytes() == (data_dir / "stories260K.bin").read_bytes()


def test_v1_round_trip(model, tmp_path):
    out = tmp_path / "v1.bin"
    save_llama2c_checkpoint(model, out, version=1)
    raw = out.read_bytes()
    assert len(raw) == 256 + 4 * 260_032
    magic, version = struct.unpack_from("<Ii", raw, 0)
    assert (magic, version) == (0x616B3432, 1)
    assert struct.unpack_from("<7iB", raw, 8) == (64, 172, 5, 8, 4, 512, 512, 1)
    assert set(raw[37:256]) == {0}
    reloaded = load_llama2c_checkpoint(out)
    assert reloaded.config == model.config
    assert reloaded.lm_head.weight is reloaded.embed_tokens.weight
    sd, ref = reloaded.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


@pytest.mark.parametrize("version", [0, 1])
def test_unshared_classifier_round_trip(version, tmp_path):
    cfg = small_config(shared_classifier=False)
    torch.manual_seed(1)
    m = Llama2cModel(cfg)
    out = tmp_path / f"unshared_v{version}.bin"
    save_llama2c_checkpoint(m, out, version=version)
    raw = out.read_bytes()
    if version == 0:
        assert struct.unpack_from("<7i", raw, 0)[5] == -40  # negative vocab = separate wcls
    else:
        assert raw[36] == 0
    back = load_llama2c_checkpoint(out)
    assert back.config == cfg
    assert back.lm_head.weight is not back.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))


def test_bad_file_size_is_rejected(data_dir, tmp_path):
    good = (data_dir / "stories260K.bin").read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(good[:-4])
    with pytest.raises(ValueError, match=r"file is 1,056,536 bytes .* implies 1,056,540 bytes"):
        load_llama2c_checkpoint(short)
    long = tmp_path / "long.bin"
    long.write_bytes(good + b"\0" * 8)
    with pytest.raises(ValueError, match=r"file is 1,056,548 bytes"):
        load_llama2c_checkpoint(long)
    unshared_header = tmp_path / "unshared.bin"  # claims a wcls that is not there
    unshared_header.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, -512, 512) + good[28:])
    with pytest.raises(ValueError, match="shared_classifier=False"):
        load_llama2c_checkpoint(unshared_header)


def test_bad_headers_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + b"\0" * 100)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        load_llama2c_checkpoint(garbage)
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1).ljust(256, b"\0"))
    with pytest.raises(ValueError, match="version 2 is not supported"):
        load_llama2c_checkpoint(v2)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="too short"):
        load_llama2c_checkpoint(tiny)


# ----------------------------------------------------------------------------- tokenizer


def naive_encode(tok: Llama2cTokenizer, text: str, bos: bool = True) -> list[int]:
    """Reference BPE straight from SOURCES.md: whole text, no chunking, no caching."""
    vocab = {p: i for i, p in reversed(list(enumerate(tok.pieces)))}
    ids = [1] if bos else []
    if not text:
        return ids
    syms: list[int] = []
    for ch in " " + text:
        b = ch.encode("utf-8")
        syms.extend([vocab[b]] if b in vocab else [x + 3 for x in b])
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = vocab.get(tok.pieces[syms[i]] + tok.pieces[syms[i + 1]])
            if j is not None and (best is None or tok.scores[j] > tok.scores[best[1]]):
                best = (i, j)
        if best is None:
            break
        syms[best[0] : best[0] + 2] = [best[1]]
    return ids + syms


EDGE_TEXTS = [
    "Hello world",
    "  two leading spaces and  double  spaces  ",
    "new\nlines\n\nand\ttabs",
    "unicode: café, naïve, 🙂 and 東京",
    "x",
    " ",
    "<0x41> looks like a byte piece",
]


def test_tokenizer_file_facts(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.max_token_length) == (512, 1, 2, 7)
    assert tok.pieces[1] == b"\n<s>\n" and tok.pieces[2] == b"\n</s>\n"
    assert tok.pieces[3 + 0x41] == b"<0x41>" and tok.pieces[259] == b" t"
    assert tok.chunked  # no tok512 piece has a space after its first byte


def test_tokenizer_matches_naive_reference(tok):
    stories = load_stories(stop=10) + load_stories(start=443, stop=448)  # 443.. contain non-ASCII
    for text in stories + EDGE_TEXTS:
        assert tok.encode(text) == naive_encode(tok, text), text[:60]
    assert tok.encode("") == [1]
    assert tok.encode("", bos=False) == []
    assert tok.encode("hi", bos=False, eos=True) == naive_encode(tok, "hi", bos=False) + [2]
    emoji = tok.encode("🙂", bos=False)
    assert [i - 3 for i in emoji if 3 <= i < 259] == list("🙂".encode("utf-8"))


def test_tokenizer_falls_back_when_a_piece_spans_a_space(tok):
    # a piece with an inner space makes chunking at spaces wrong; the tokenizer must notice
    pieces = tok.pieces + [b"y t"]
    scores = tok.scores + [1000.0]
    odd = Llama2cTokenizer(pieces, scores)
    assert not odd.chunked
    text = "my tree is happy today"
    ids = odd.encode(text)
    assert 512 in ids  # the cross-space merge happened
    assert ids == naive_encode(odd, text)
    assert odd.decode(ids) == text


def test_decode_round_trip_and_byte_fallback(tok):
    for text in load_stories(stop=300) + EDGE_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1, 3 + 0xC3, 3 + 0xA9]) == "é"  # byte pieces are joined into UTF-8
    assert tok.decode(tok.encode("x", bos=False)) == " x"  # the dummy space is only dropped after BOS
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])
