"""GCA models: causality, cached decoding and segmented prefill equal the full forward (with
the chunk memory offloaded to CPU or disk), causal retrieval, the retriever learns, save/load."""

from __future__ import annotations

import pytest
import torch

from longreach import LongReachConfig
from longreach.cache.gca import ChunkMemory, parse_memory
from longreach.models.compat import enable_checkpointing
from longreach.models.gca import (
    GCA_DEFAULTS,
    GCAConfig,
    GCAForCausalLM,
    gca_settings,
    select_chunks,
)
from longreach.ops import backend, gca_attention


def tiny_gca(landmark="token", groups=1, chunk=8, top_k=2, seed=0, encoder_layers=1):
    torch.manual_seed(seed)
    cfg = GCAConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mixers=[{"type": "swa", "window": 8, "position": "rope"}] * 2 + [{"type": "gca", "window": 8}] * 2,
        gca={"chunk_size": chunk, "top_k": top_k, "encoder_layers": encoder_layers,
             "landmark": landmark, "retrieval_groups": groups},
    )
    return GCAForCausalLM(cfg).eval()


@pytest.mark.parametrize("landmark", ["token", "cls", "mean"])
def test_causal(landmark):
    model = tiny_gca(landmark)
    ids = torch.randint(0, 256, (1, 70))
    changed = ids.clone()
    changed[0, 40:] = torch.randint(0, 256, (30,))
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        b = model(changed, use_cache=False).logits
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-5)
    assert not torch.allclose(a[:, 40:], b[:, 40:], atol=1e-3)


@pytest.mark.parametrize("landmark,groups", [("token", 1), ("token", 2), ("cls", 1), ("mean", 2)])
def test_decoding_equals_full_forward(landmark, groups):
    model = tiny_gca(landmark, groups)
    ids = torch.randint(0, 256, (2, 53))  # several chunks; T not a multiple of anything
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.model.new_cache()
        steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(53)], 1)
    assert cache.memory.memory.n_chunks >= 5
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("memory", ["cpu", "disk", "device"])
@pytest.mark.parametrize("segment", [5, 8, 13, 64])
def test_segmented_prefill_equals_full_forward(memory, segment, tmp_path):
    model = tiny_gca("token", 2)
    ids = torch.randint(0, 256, (1, 90))
    spec = f"disk:{tmp_path / 'mem'}" if memory == "disk" else memory
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.model.new_cache(memory=spec)
        parts = [model(ids[:, a : a + segment], past_key_values=cache).logits for a in range(0, 90, segment)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)
    if memory == "disk":
        assert any((tmp_path / "mem").iterdir())
        assert cache.memory.memory.offloaded_nbytes() > 0


def test_device_bytes_stay_flat_while_offloaded_memory_grows():
    model = tiny_gca("token")
    sizes = []
    with torch.no_grad():
        cache = model.model.new_cache()
        for length in (896, 2688):  # the same place in a chunk: 128 and 384 whole chunks
            while cache.seen_tokens < length:
                model(torch.randint(0, 256, (1, 128)), past_key_values=cache)
            memory = cache.memory.memory
            landmark_bytes = memory.device_nbytes()  # a growing buffer: at most twice n * hidden
            assert landmark_bytes <= 2 * max(64, memory.n_chunks) * 32 * 4
            sizes.append((cache.nbytes() - landmark_bytes, memory.offloaded_nbytes()))
    (dev_a, off_a), (dev_b, off_b) = sizes
    assert dev_a == dev_b  # everything on the device but the landmarks is bounded
    assert off_b > off_a


def test_select_chunks_is_causal_property():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        nq = int(torch.randint(1, 9, (1,), generator=gen))
        first = int(torch.randint(0, 12, (1,), generator=gen))
        n = first + nq  # memory may hold chunks up to the newest query chunk
        q = torch.randn(2, nq, 16, generator=gen)
        lm = torch.randn(2, n, 16, generator=gen)
        for gumbel in (False, True):
            idx, w = select_chunks(q, lm, first, top_k=3, gumbel=gumbel)
            for r in range(nq):
                c = first + r
                got = idx[:, r, 0]
                assert ((got < 0) | (got <= c - 2)).all(), (trial, c, got)
                assert ((got >= 0).sum(-1) == min(3, max(0, c - 1))).all()
                assert torch.allclose(w[:, r, 0].sum(-1), torch.tensor(1.0 if c >= 2 else 0.0))


def test_model_never_retrieves_current_or_future_chunk(monkeypatch):
    import longreach.models.gca.retrieval as gca_module

    seen = []
    original = gca_module.select_chunks

    def spy(queries, landmarks, first_chunk, top_k, **options):
        idx, w = original(queries, landmarks, first_chunk, top_k, **options)
        seen.append((first_chunk, idx))
        return idx, w

    monkeypatch.setattr(gca_module, "select_chunks", spy)
    model = tiny_gca("token", top_k=4).train()
    model(torch.randint(0, 256, (2, 120)), labels=torch.randint(0, 256, (2, 120)))
    with torch.no_grad():
        model.eval()
        cache = model.model.new_cache()
        for _ in range(0, 120, 7):
            model(torch.randint(0, 256, (1, 7)), past_key_values=cache)
    assert len(seen) > 5
    for first, idx in seen:
        chunk = first + torch.arange(idx.shape[1])[None, :, None, None]
        assert ((idx < 0) | (idx <= chunk - 2)).all()


def test_gradients_reach_the_retriever():
    model = tiny_gca("token").train()
    ids = torch.randint(0, 256, (2, 64))
    model(ids, labels=ids).loss.backward()
    gca = model.model.gca
    for name, param in [("query norm", gca.query_norms[0].weight), ("landmark token", gca.landmark_embedding.weight),
                        ("encoder k", gca.encoder.k_proj.weight), ("encoder layer", gca.encoder.layers[0].attn.q_proj.weight),
                        ("gca q", model.model.layers[2].mixer.gca_q_proj.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_one_step_changes_which_chunks_are_picked():
    # retrieval-only toy: chunk 0 holds the wanted values, chunk 1 their opposite, chunk 2 noise;
    # the query first picks {0, 1}; one step on the loss must swap chunk 1 out for chunk 2
    d, cs = 4, 4
    landmarks = torch.eye(d)[None, :3] * d**0.5  # score of chunk j = query[j]
    query = torch.tensor([[[1.0, 0.9, 0.8, 0.0]]], requires_grad=True)
    target = torch.ones(1, cs, 1, d)
    v = torch.stack([target[0, 0, 0].expand(cs, d), -target[0, 0, 0].expand(cs, d),
                     torch.randn(cs, d) * 0.1])
    v = v.reshape(1, 3 * cs, 1, d)
    k = torch.zeros_like(v)
    q = torch.randn(1, cs, 1, d)
    opt = torch.optim.SGD([query], lr=5.0)
    picks = []
    for _ in range(2):
        # the query chunk is chunk 4: it may read chunks 0..2
        idx, w = select_chunks(query, landmarks, 4, top_k=2, gumbel=False)
        picks.append(set(idx.flatten().tolist()))
        # the query chunk in the op is chunk 0 of a 4-row call
        o = gca_attention(q, k, v, idx, w, chunk_size=cs)
        loss = (o - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert picks[0] == {0, 1}
    assert picks[1] == {0, 2}


def test_generate_save_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gca("token")
    ids = torch.randint(0, 256, (1, 30))
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 50)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.gca == model.config.gca
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=20, do_sample=False), out)


def test_gradient_checkpointing_matches():
    model = tiny_gca("token").train()
    model.config.gca = {**model.config.gca, "gumbel": False}
    model.model.gca.settings["gumbel"] = False
    ids = torch.randint(0, 256, (2, 40))
    loss_a = model(ids, labels=ids).loss
    enable_checkpointing(model)  # the name this transformers has (the old one warns on 5.2x)
    loss_b = model(ids, labels=ids).loss
    torch.testing.assert_close(loss_a, loss_b)


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="unknown option"):
        gca_settings({"chunk": 64})
    with pytest.raises(ValueError, match="landmark"):
        gca_settings({"landmark": "pool"})
    with pytest.raises(ValueError, match="top_k"):
        gca_settings({"top_k": 0})
    with pytest.raises(ValueError, match="memory"):
        parse_memory("ram")
    with pytest.raises(ValueError, match="top of the stack"):
        GCAConfig(num_hidden_layers=3, mixers=["gca", "swa", "gca"])
    with pytest.raises(ValueError, match="at least one 'gca' layer"):
        GCAConfig(num_hidden_layers=2, mixers=["swa", "swa"], gca={"top_k": 4})
    with pytest.raises(ValueError, match="retrieval_groups"):
        GCAForCausalLM(GCAConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                 mixers=["swa", "gca"], gca={"retrieval_groups": 2}))
    with pytest.raises(ValueError, match="layer 1: window must be a positive integer"):
        GCAConfig(num_hidden_layers=2, mixers=["swa", {"type": "gca", "window": 0}])
    # the generic decoder has no gca layers: they belong to the GCA family
    with pytest.raises(ValueError, match="unknown mixer 'gca'"):
        LongReachConfig(num_hidden_layers=2, mixers=["swa", "gca"])
    assert GCAConfig(num_hidden_layers=2, mixers=["swa", "gca"]).gca == GCA_DEFAULTS
    # transformers builds a default config (to diff against, in generate and save_pretrained)
    assert GCAConfig().mixers == ["swa", "swa", "gca", "gca"]


def test_chunk_memory_gather_matches_device_store(tmp_path):
    torch.manual_seed(0)
    k = torch.randn(2, 300, 4, 2, 8)  # crosses a storage block boundary (256 chunks)
    v = torch.randn(2, 300, 4, 2, 8)
    lm = torch.randn(2, 300, 16)
    stores = {kind: ChunkMemory(kind) for kind in ("cpu", "device", f"disk:{tmp_path}")}
    for store in stores.values():
        store.append(k[:, :100], v[:, :100], lm[:, :100])
        store.append(k[:, 100:], v[:, 100:], lm[:, 100:])
    ids = torch.tensor([0, 5, 255, 256, 299])
    for store in stores.values():
        gk, gv = store.gather(ids)
        assert torch.equal(gk, k[:, ids].reshape(2, -1, 2, 8))
        assert torch.equal(gv, v[:, ids].reshape(2, -1, 2, 8))
        assert torch.equal(store.landmarks, lm)
    (folder,) = tmp_path.iterdir()  # a folder of its own inside PATH
    assert sorted(f.name for f in folder.iterdir()) == ["k000000.bin", "k000001.bin",
                                                         "v000000.bin", "v000001.bin"]
    other = ChunkMemory(f"disk:{tmp_path}")  # a second memory on the same PATH: its own files
    other.append(k[:, :10] + 1, v[:, :10] + 1, lm[:, :10])
    assert len(list(tmp_path.iterdir())) == 2
    assert torch.equal(stores[f"disk:{tmp_path}"].gather(ids)[0], k[:, ids].reshape(2, -1, 2, 8))
    stores[f"disk:{tmp_path}"].close()
    del other  # collected without close(): its folder goes too
    import gc

    gc.collect()
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    not backend.interpreting(),
    reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1",
)
def test_decoding_with_the_triton_kernels_equals_the_reference(monkeypatch):
    """The model's two GCA paths (chunked prefill: gca_attention; one chunk: gca_decode) run
    the Triton kernels and agree with a full forward on the reference."""
    model = tiny_gca("token", 2)
    ids = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        monkeypatch.setenv("LONGREACH_KERNELS", "reference")
        reference = model(ids, use_cache=False).logits
        monkeypatch.setenv("LONGREACH_KERNELS", "triton")
        full = model(ids, use_cache=False).logits
        cache = model.model.new_cache()
        prefill = model(ids[:, :20], past_key_values=cache).logits
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 37)]
    torch.testing.assert_close(full, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gca-token", "gca-cls"])
def test_checkpoints_saved_before_the_gca_family_give_the_same_logits(name):
    """tests/models/legacy/*: tiny GCA models saved (model_type "longreach" with gca layers) by
    the code before GCA had a model family of its own, with the logits that code computed."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(__file__).parent / "legacy" / name
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is GCAConfig and config.model_type == "longreach-gca"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is GCAForCausalLM
    expected = load_file(folder / "expected.safetensors")
    ids = expected["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected["logits"], atol=1e-5, rtol=1e-5)
        out = model(ids[:, :20], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        for s in range(20, ids.shape[1], 5):
            out = model(ids[:, s : s + 5], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(parts, 1), expected["cached_logits"], atol=1e-5, rtol=1e-5)


def test_the_shipped_gca_tiny_is_a_gca_model():
    from transformers import AutoModelForCausalLM

    from longreach.checkpoints import checkpoint_path

    model = AutoModelForCausalLM.from_pretrained(checkpoint_path("gca-tiny"))
    assert type(model) is GCAForCausalLM and model.config.gca["top_k"] == 4


def test_loss_weights_weigh_labelled_tokens():
    model = tiny_gca("cls")
    ids = torch.randint(0, 256, (2, 40))
    labels = ids.clone()
    labels[0, :30] = -100
    with torch.no_grad():
        plain = model(ids, labels=labels).loss
        ones = model(ids, labels=labels, loss_weights=torch.ones(2, 40)).loss
        logits = model(ids).logits[:, :-1].float()
    torch.testing.assert_close(ones, plain)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
        reduction="none").view(2, 39)
    w = torch.tensor([5.0, 1.0])[:, None].expand(2, 40)
    mask = (labels[:, 1:] != -100).float()
    expected = (ce * w[:, 1:] * mask).sum() / (w[:, 1:] * mask).sum()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels, loss_weights=w).loss, expected)
    with pytest.raises(ValueError, match="loss_weights shape"):
        model(ids, labels=labels, loss_weights=torch.ones(2, 39))


def test_bypass_adds_the_read_to_the_residual_stream():
    base = tiny_gca("cls")
    torch.manual_seed(0)
    cfg = GCAConfig.from_dict({**base.config.to_dict(), "gca": {**base.config.gca, "bypass": True}})
    bypass = GCAForCausalLM(cfg).eval()
    bypass.load_state_dict(base.state_dict())  # no new weights: only the wiring differs
    ids = torch.randint(0, 256, (1, 50))
    with torch.no_grad():
        a, b = base(ids).logits, bypass(ids).logits
    # the first two chunks retrieve nothing, so they agree; later chunks read and differ
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 24:], b[:, 24:], atol=1e-4)
    with pytest.raises(ValueError, match="gca.bypass"):
        gca_settings({"bypass": "yes"})


def test_gumbel_scale():
    torch.manual_seed(0)
    q, lm = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    exact = select_chunks(q, lm, 0, 2, gumbel=False)
    torch.manual_seed(1)
    zero = select_chunks(q, lm, 0, 2, gumbel=True, gumbel_scale=0.0)
    assert all(torch.equal(x, y) for x, y in zip(exact, zero))
    picks = set()
    for seed in range(20):
        torch.manual_seed(seed)
        picks.add(tuple(select_chunks(q, lm, 0, 2, gumbel=True, gumbel_scale=5.0)[0][0, -1, 0].tolist()))
    assert len(picks) > 1  # strong noise explores other chunks
    for bad in (-1, "1", True):
        with pytest.raises(ValueError, match="gumbel_scale"):
            gca_settings({"gumbel_scale": bad})
    assert gca_settings({"gumbel_scale": 2})["gumbel_scale"] == 2.0
