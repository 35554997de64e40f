"""SAE training: the sparse backward equals dense autograd, a planted dictionary is recovered,
a fixed seed gives the same weights, a resumed run ends where an uninterrupted one does, and
runs, arrays and iterators all train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffprobe.sae import SAEError, SAETrainer, TopKSAE, TrainConfig, load_sae, train_sae
from diffprobe.sae.sources import ArraySource, ShuffleBuffer, batch_stream
from diffprobe.sae.train import batch_topk_select


@pytest.mark.parametrize("batch_topk", [False, True])
@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("dense_backward", [False, True], ids=["sparse-cpu", "dense-gpu-path"])
def test_sparse_step_gradients_equal_dense_autograd(batch_topk, aux, dense_backward):
    """Both backward paths of the encoder (sparse products, the CPU's; a scattered dense
    matrix, the GPU's, here in float32) equal autograd through the dense loss."""
    sae = TopKSAE(16, 64, 4, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    trainer = SAETrainer(sae, TrainConfig(k=4, batch_topk=batch_topk, dead_tokens=1,
                                          aux_alpha=0.5 if aux else 0.0, k_aux=6))  # fmt: skip
    trainer.dense_backward = dense_backward
    if aux:
        trainer.tokens_since_fired[:40] = 5  # latents 0-39 are dead
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    loss, _, _ = trainer.loss(x)
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    # the same loss written densely, differentiated by autograd
    hidden = F.linear(x - sae.b_dec, sae.encoder, sae.b_enc)
    if batch_topk:
        chosen = torch.zeros(hidden.numel(), dtype=torch.bool)
        chosen[hidden.reshape(-1).topk(32 * 4).indices] = True
        chosen = chosen.view_as(hidden)
    else:
        chosen = torch.zeros_like(hidden, dtype=torch.bool).scatter_(
            -1, hidden.topk(4, -1).indices, True
        )
    error = x - (torch.where(chosen, hidden.relu(), 0) @ sae.W_dec + sae.b_dec)
    variance = (x - x.mean(0)).pow(2).sum()
    dense = error.pow(2).sum() / variance
    if aux:
        dead = trainer.tokens_since_fired >= 1
        top_dead = hidden.masked_fill(~dead, -torch.inf).topk(6, -1).indices
        chosen_aux = torch.zeros_like(chosen).scatter_(-1, top_dead, True)
        aux_recon = torch.where(chosen_aux, hidden.relu(), 0) @ sae.W_dec
        scale = min(int(dead.sum()) / 6, 1.0)
        dense = dense + 0.5 * scale * (aux_recon - error.detach()).pow(2).sum() / variance
    dense.backward()
    torch.testing.assert_close(loss, dense)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-5, atol=1e-6)


def test_batch_topk_candidates_equal_the_full_search():
    g = torch.Generator().manual_seed(0)
    for heavy in (False, True):
        hidden = torch.randn(64, 500, generator=g)
        if heavy:  # one token holds many of the batch's largest values: the fallback
            hidden[3] += 10
        values, rows, cols = batch_topk_select(hidden, 5)
        expected = hidden.reshape(-1).topk(64 * 5).indices
        assert sorted((rows * 500 + cols).tolist()) == sorted(expected.tolist())
        assert torch.equal(values, hidden[rows, cols])
        assert bool((rows[1:] >= rows[:-1]).all())


def test_decoder_rows_stay_unit_norm_and_the_parallel_gradient_is_removed():
    sae = TopKSAE(8, 32, 2)
    sae.W_dec.grad = torch.randn(32, 8)
    sae.remove_parallel_gradient_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    trainer = SAETrainer(sae, TrainConfig(k=2, lr=0.1))
    for _ in range(3):
        trainer.step(torch.randn(64, 8))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


# ---------------------------------------------------------------------- planted dictionary


def _planted(d_in: int, n: int, seed: int = 0):
    """``n`` vectors, each the sum of 8 of 512 random unit atoms with coefficients in [1, 2],
    plus Gaussian noise (std 0.01 per channel)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(512, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, 512, generator=g).argsort(dim=1)[:, :8]
    coefficients = torch.rand(n, 8, generator=g) + 1
    x = torch.zeros(n, d_in).index_add_(
        0,
        torch.arange(n).repeat_interleave(8),
        coefficients.reshape(-1, 1) * atoms[chosen.reshape(-1)],
    )
    return atoms, x + 0.01 * torch.randn(n, d_in, generator=g)


def _fvu(sae: TopKSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((x - sae(x).reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


PLANTED = dict(d_sae=512, k=8, batch_size=512, epochs=12, lr=1e-2, batch_topk=False,
               dead_tokens=5000, device="cpu", progress=False)  # fmt: skip


def _true_dictionary_sae(atoms: torch.Tensor, x: torch.Tensor, train: bool) -> TopKSAE:
    """A TopK SAE (k 8) whose decoder is the true dictionary. Untrained, its encoder is the
    dictionary too (no biases); trained, the encoder and biases are fitted the way the
    planted tests train (decoder frozen): the best a TopK SAE can do with the true atoms."""
    reference = TopKSAE(atoms.shape[1], len(atoms), 8)
    with torch.no_grad():
        reference.W_dec.copy_(atoms)
        reference.encoder.copy_(atoms)
        reference.b_enc.zero_()
        reference.b_dec.zero_()
    if not train:
        return reference
    reference.W_dec.requires_grad_(False)
    trainer = SAETrainer(reference, TrainConfig(k=8, batch_topk=False, aux_alpha=0, lr=1e-2))
    trainer.step_count = 1  # keep b_dec at 0: the atoms have mean ~0
    steps = 12 * (len(x) // 512)
    order = torch.Generator().manual_seed(1)
    for step in range(steps):
        trainer.step(
            x[torch.randint(0, len(x), (512,), generator=order)], 1e-2 * (1 - step / steps)
        )
    return reference


@pytest.mark.slow
def test_planted_dictionary_is_recovered():
    """d_in 256 (the issue's 512 atoms, 8 active, noise; only d_in differs from its example):
    >= 90 % of the atoms have a decoder row at cosine >= 0.9, and FVU < 0.1. The setting is
    one where FVU < 0.1 is attainable: even the untrained true dictionary (encoder = decoder =
    the atoms) reaches it here (0.054; at d_in 64 it gets 0.71, and the best trained encoder
    for it 0.225, see the next test)."""
    atoms, x = _planted(256, 30000)
    assert _fvu(_true_dictionary_sae(atoms, x, train=False), x) < 0.1
    sae = train_sae(x, **PLANTED)
    best = (atoms @ sae.W_dec.detach().T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.9
    assert _fvu(sae, x) < 0.1


@pytest.mark.slow
def test_planted_dictionary_at_d_in_64_reaches_the_true_dictionarys_fvu():
    """d_in 64 (the issue's example: 8 active atoms of 512 interfere more): the atoms are still
    recovered, and the FVU is that of the best encoder for the *true* dictionary, trained the
    same way (a TopK SAE's linear encoder cannot explain interference away, so neither gets
    below ~0.2: FVU < 0.1 is out of reach at this setting)."""
    atoms, x = _planted(64, 40000)
    sae = train_sae(x, **{**PLANTED, "d_sae": 1024})
    best = (atoms @ sae.W_dec.detach().T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.9
    reference = _fvu(_true_dictionary_sae(atoms, x, train=True), x)
    assert reference > 0.1
    assert _fvu(sae, x) <= 1.05 * reference


# ------------------------------------------------------------------- seeds, checkpoints, resume


def _small_data(n: int = 3000, d_in: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d_in)).astype(np.float32)


SMALL = dict(expansion=4, k=4, batch_size=256, epochs=2, lr=3e-3, dead_tokens=600,
             device="cpu", progress=False)  # fmt: skip


def test_same_seed_same_weights_other_seed_other_weights():
    data = _small_data()
    first, second = train_sae(data, **SMALL), train_sae(data, **SMALL)
    other = train_sae(data, **SMALL, seed=1)
    for name, param in first.named_parameters():
        assert torch.equal(param, getattr(second, name)), name
    assert not torch.equal(first.W_dec, other.W_dec)


def test_resumed_training_ends_with_the_uninterrupted_weights(tmp_path):
    data = _small_data()
    straight = train_sae(data, tmp_path / "straight", checkpoint_every=3, **SMALL)
    assert not (tmp_path / "straight" / "checkpoint").exists()  # dropped at the end
    record = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert record["done"] and record["steps"] == 2 * (3000 // 256)
    assert {"fvu", "l0", "dead_fraction"} <= set(record["history"][-1])

    stopped = train_sae(data, tmp_path / "resumed", checkpoint_every=3, until_step=7, **SMALL)
    assert not (tmp_path / "resumed" / "training.json").exists()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7
    assert len(list((tmp_path / "resumed" / "checkpoint").glob("step-*.safetensors"))) == 1
    assert not torch.equal(stopped.W_dec, straight.W_dec)
    resumed = train_sae(data, tmp_path / "resumed", checkpoint_every=3, **SMALL)
    for name, param in straight.named_parameters():
        assert torch.equal(param, getattr(resumed, name)), name
    # the folder is a loadable SAE in the SAELens layout, and a rerun changes nothing
    loaded = load_sae(tmp_path / "resumed")
    assert torch.equal(loaded.W_dec, straight.W_dec)
    again = train_sae(data, tmp_path / "resumed", checkpoint_every=3, **SMALL)
    assert torch.equal(again.W_dec, straight.W_dec)


def test_a_folder_of_another_training_is_refused_before_any_work(tmp_path):
    data = _small_data()
    train_sae(data, tmp_path / "a", until_step=2, **SMALL)
    with pytest.raises(SAEError, match="holds an SAE training with other settings"):
        train_sae(data, tmp_path / "a", **{**SMALL, "k": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    from diffprobe.io import OutputError

    with pytest.raises(OutputError, match="files diffprobe did not write"):
        train_sae(data, tmp_path / "b", **SMALL)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]


def test_bad_options_are_one_line():
    data = _small_data(100)
    with pytest.raises(SAEError, match="unknown training option 'topk'"):
        train_sae(data, topk=4, progress=False)
    with pytest.raises(SAEError, match="100 tokens, less than one batch of 4096"):
        train_sae(data, progress=False)
    with pytest.raises(SAEError, match="k 64 is larger than d_sae 48"):
        train_sae(data, expansion=4, k=64, batch_size=10, progress=False)
    with pytest.raises(SAEError, match="lr -1 must be a finite number > 0"):
        train_sae(data, lr=-1, batch_size=10, progress=False)


# ---------------------------------------------------------------------------------- sources


def test_shuffle_buffer_hands_out_every_token_once_and_mixes_blocks():
    blocks = [(torch.full((50, 1), float(b)), None) for b in range(20)]
    buffer = ShuffleBuffer(200, torch.Generator().manual_seed(0))
    batches = [batch for batch, _ in buffer.batches(iter(blocks), 40)]
    seen = torch.cat(batches).reshape(-1)
    assert len(seen) == 1000 and sorted(seen.tolist()) == sorted(
        float(b) for b in range(20) for _ in range(50)
    )
    assert all(len(batch.unique()) > 1 for batch in batches)  # no batch is one block


def test_array_epochs_are_seeded_permutations():
    data = np.arange(40, dtype=np.float32).reshape(20, 2)
    source = ArraySource(data)
    first = [b for b, _ in batch_stream(source, 5, seed=3, buffer_tokens=0, epochs=2)]
    again = [b for b, _ in batch_stream(source, 5, seed=3, buffer_tokens=0, epochs=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    epoch = torch.cat(first[:4])[:, 0].tolist()
    assert sorted(epoch) == list(range(0, 40, 2)) and epoch != list(range(0, 40, 2))


def test_iterators_train_with_a_token_budget():
    def batches():
        g = torch.Generator().manual_seed(0)
        for step in range(6):
            # generation capture: (items, channels, height, width) maps with their timestep
            yield torch.randn(2, 12, 4, 4, generator=g), 999 - 100 * (step % 3)

    with pytest.raises(SAEError, match="no length: give the number of training tokens"):
        train_sae(batches, **{**SMALL, "batch_size": 32})
    sae = train_sae(batches, **{**SMALL, "batch_size": 32, "tokens": 128})
    assert sae.d_in == 12
    once = iter(list(batches()))
    sae = train_sae(once, **{**SMALL, "batch_size": 32, "tokens": 128, "epochs": 1})
    assert sae.d_in == 12


@pytest.mark.slow
def test_training_on_a_spatial_run_records_where_the_activations_came_from(sd_model, tmp_path):
    from diffprobe.data.sources import open_source
    from diffprobe.extract import Condition, ExtractionPlan, extract
    from diffprobe.sae import evaluate_sae, run_source

    site = "unet.mid_block"
    plan = ExtractionPlan(sites=[site], noise_levels=[0.2, 0.6], pooling="none", chunk_items=4,
                          conditions=[Condition("cap", "captions", guidance_scale=2.0)])  # fmt: skip
    extract(sd_model, open_source("shapes:8"), plan, tmp_path / "run", batch_size=4,
            progress=False)  # fmt: skip
    source = run_source(tmp_path / "run", site)
    channels, height, width = source.arrays[0].shape[1:]
    assert source.n_tokens == 2 * 8 * height * width and source.d_in == channels
    assert source.groups == ["p0.2", "p0.6"]
    sae = train_sae(source, tmp_path / "sae", expansion=2, k=4, batch_size=16, epochs=2,
                    buffer_tokens=64, device="cpu", progress=False)  # fmt: skip
    meta = load_sae(tmp_path / "sae").metadata
    assert meta["site"] == site and meta["hook_name"] == site
    assert meta["branch"] == "cond" and meta["site_semantics"] == "output"
    assert meta["noise_keys"] == ["p0.2", "p0.6"] and len(meta["timesteps"]) == 2
    result = evaluate_sae(sae, source)
    assert set(result.groups) == {"p0.2", "p0.6"}
    assert sum(g["tokens"] for g in result.groups.values()) == result.tokens == source.n_tokens
    pooled = tmp_path / "pooled"
    extract(sd_model, open_source("shapes:4"), ExtractionPlan(sites=[site], noise_levels=[0.2]),
            pooled, batch_size=4, progress=False)  # fmt: skip
    with pytest.raises(SAEError, match="--pooling mean: one vector per item"):
        run_source(pooled, site)


def test_a_zarr_array_of_maps_trains_on_every_spatial_token():
    import zarr

    maps = np.random.default_rng(1).standard_normal((6, 12, 4, 4)).astype(np.float32)
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=maps.shape, chunks=(2, 12, 4, 4),
                              dtype="float32")  # fmt: skip
    array[:] = maps
    sae = train_sae(array, **{**SMALL, "batch_size": 32, "buffer_tokens": 48})
    assert sae.d_in == 12
    from diffprobe.sae import as_source

    source = as_source(array)
    assert source.n_tokens == 6 * 16
    tokens = torch.cat([b for b, _ in source.blocks(0, 0, shuffle=False)])
    expected = torch.from_numpy(maps).permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.equal(tokens, expected)  # channels-last tokens, item by item
    array[3] = np.nan  # an unfinished item
    with pytest.raises(SAEError, match=r"items 2-3 hold NaN"):
        train_sae(array, **{**SMALL, "batch_size": 32})


def test_an_iterator_that_runs_out_early_is_an_error(tmp_path):
    batches = [torch.randn(32, 12) for _ in range(3)]
    with pytest.raises(SAEError, match="ran out after 3 of 4 steps"):
        train_sae(iter(batches), tmp_path / "out", **{**SMALL, "batch_size": 32, "tokens": 128})
