"""Attribution maths (planted structure, hand computations), the shapes world's masks, token
alignment, the float16 zarr stream, non-square images, output-space maps and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.analysis import attribution as maths
from diffprobe.data import attributes, shapes
from diffprobe.stages.attribution import (
    AttributionError,
    attribute,
    attribute_prompt,
    prompt_tokens,
    word_positions,
)
from diffprobe.stages.attribution_store import MapStore
from diffprobe.testing.cases import dummy_cases

# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize(
    ("tokens", "height", "width", "grid"),
    [(4096, 512, 512, (64, 64)), (24, 64, 96, (4, 6)), (24, 96, 64, (6, 4)),
     (1200, 768, 1024, (30, 40)),
     (16, 64, 64, (4, 4)), (7, 64, 64, (1, 7))],
)  # fmt: skip
def test_token_grid_follows_the_aspect_ratio(tokens, height, width, grid):
    assert maths.token_grid(tokens, height, width) == grid


def test_to_grid_is_row_major_and_upsample_keeps_the_blob():
    rows, columns, text = 4, 6, 3
    maps = torch.zeros(rows * columns, text)
    maps[1 * columns + 4, 2] = 1.0  # token of text 2 lights up at row 1, column 4
    grid = maths.to_grid(maps, (rows, columns))
    assert grid.shape == (text, rows, columns)
    assert grid[2, 1, 4] == 1 and grid.sum() == 1
    big = maths.upsample(grid, (40, 60))
    assert big.shape == (text, 40, 60)
    x, y = maths.centre_of_mass(big[2].numpy())
    assert abs(x - 4.5 / 6) < 0.03 and abs(y - 1.5 / 4) < 0.03


def test_common_grid_resizes_to_the_finest():
    coarse, fine = torch.ones(2, 4, 4), torch.ones(2, 8, 8) * 3
    stacked, grid = maths.to_common_grid([coarse, fine])
    assert grid == (8, 8) and stacked.shape == (2, 2, 8, 8)
    assert torch.allclose(stacked[0], torch.ones(2, 8, 8))


def test_locate_tokens_finds_every_occurrence_and_pieces():
    assert maths.locate_tokens([0, 5, 6, 9, 5, 6, 1], [5, 6]) == [1, 2, 4, 5]
    assert maths.locate_tokens([0, 5, 1], [7]) == []
    maps = torch.arange(12.0).reshape(3, 2, 2)
    assert torch.equal(maths.word_map(maps, [0, 2]), maps[0] + maps[2])


def test_iou_and_threshold_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    values = np.zeros((4, 4))
    values[:2, :3] = 1.0  # 6 px predicted, 4 of them in the 4-px mask
    assert maths.iou(values >= 0.5, mask) == pytest.approx(4 / 6)
    assert maths.mean_iou(values[None], mask[None], 0.4) == pytest.approx(4 / 6)
    taus, curve = maths.threshold_sweep(values[None], mask[None], [0.2, 0.9])
    assert list(taus) == [0.2, 0.9] and np.allclose(curve, 4 / 6)
    for bad in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(maths.ThresholdError, match="between 0 and 1"):
            maths.mean_iou(values[None], mask[None], bad)


def test_gaussian_baseline_and_concept_maps():
    gauss = maths.centred_gaussian(8, 12)
    assert gauss.shape == (8, 12) and np.unravel_index(gauss.argmax(), gauss.shape) in [
        (3, 5), (3, 6), (4, 5), (4, 6)
    ]  # fmt: skip
    scores = torch.randn(2, 10, 5)
    concept = maths.concept_maps(scores, [[0], [1, 2], [4]])
    assert concept.shape == (2, 3, 10)
    assert torch.allclose(concept.sum(1), torch.ones(2, 10))
    expected = torch.stack([scores[..., 0], scores[..., 1] + scores[..., 2], scores[..., 4]], -1)
    assert torch.allclose(concept, expected.softmax(-1).transpose(1, 2))


def test_layer_groups_and_ranges():
    assert maths.layer_group("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "up"
    assert maths.layer_group("unet.mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert maths.layer_group("transformer.single_transformer_blocks.3.attn") == "single"
    assert maths.layer_group("transformer.transformer_blocks.3.attn") == "joint"
    assert [maths.timestep_range(p) for p in (0.9, 0.5, 0.1)] == ["early", "middle", "late"]


def _planted(sites: list[str]):
    """A PromptAttribution whose site i holds the constant map 10**i at every call, so a
    mean over sites reads off which sites were averaged."""
    from diffprobe.stages.attribution import PromptAttribution, Token

    maps = np.zeros((2, len(sites), 3, 4, 4), dtype=np.float32)
    for index in range(len(sites)):
        maps[:, index] = 10.0**index
    return PromptAttribution(
        prompt="a", seed=0, image=np.zeros((8, 8, 3), np.uint8),
        tokens=[Token(0, "<s>", "text_encoder", True), Token(1, "a</w>", "text_encoder", False)],
        sites=sites, noise_levels=np.array([0.9, 0.5, 0.1]), maps=maps,
    )  # fmt: skip


def test_default_layers_leave_out_the_unet_mid_block_as_daam():
    unet = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2",  # 1
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2",  # 10
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2",  # 100
    ]
    result = _planted(unet)
    assert maths.default_sites(unet) == [unet[0], unet[2]]
    assert np.allclose(result.token_maps(), (1 + 100) / 2)  # default: mid left out
    assert np.allclose(result.token_maps("all"), (1 + 10 + 100) / 3)
    assert np.allclose(result.token_maps(["all"]), (1 + 10 + 100) / 3)
    assert np.allclose(result.token_maps(["mid"]), 10)
    assert np.allclose(result.token_maps(["down", "up"], ["late"]), (1 + 100) / 2)
    dit = ["transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0.attn"]
    assert maths.default_sites(dit) == dit  # no mid block: every site
    assert np.allclose(_planted(dit).token_maps(), (1 + 10) / 2)
    only_mid = [unet[1]]
    assert maths.default_sites(only_mid) == only_mid


def test_cli_layer_choices_default_all_and_groups():
    from diffprobe.cli.attribution import _choices

    groups = ("down", "mid", "up")
    assert _choices("--layers", "default", groups, default="default") is None
    assert _choices("--layers", "all", groups, default="default") == ["all"]
    assert _choices("--layers", "down,up", groups, default="default") == ["down", "up"]
    assert _choices("--timesteps", "all", ("early", "late")) is None
    with pytest.raises(AttributionError, match="'default', 'all' or comma-separated"):
        _choices("--layers", "middle", groups, default="default")


# ----------------------------------------------------------------------------- masks


def test_shapes_masks_come_from_the_generators_geometry():
    sample = shapes.sample(24, seed=5, split="all")
    masks = sample.masks
    assert masks.shape == (24, 64, 64) and masks.dtype == bool
    ground = np.array([shapes.BACKGROUNDS[shapes.BACKGROUND_NAMES[b]]
                       for b in sample.factors["background"]], dtype=float)  # fmt: skip
    ink = np.array([shapes.COLOURS[shapes.COLOUR_NAMES[c]] for c in sample.factors["colour"]],
                   dtype=float)  # fmt: skip
    # inside the mask a pixel is nearer the ink than the background, outside nearer the ground
    pixels = sample.images.astype(float)
    to_ink = np.linalg.norm(pixels - ink[:, None, None], axis=-1)
    to_ground = np.linalg.norm(pixels - ground[:, None, None], axis=-1)
    assert np.array_equal(masks, to_ink < to_ground) or (
        (masks != (to_ink < to_ground)).mean() < 0.002
    )
    # the mask's centroid is the item's centre (x, y), the generator's definition
    x, y = maths.centre_of_mass(masks.astype(float))
    assert np.abs(x - sample.factors["x"]).max() < 0.01
    assert np.abs(y - sample.factors["y"]).max() < 0.01
    # the reader's segmentation of clean images agrees with the geometry
    assert maths.iou(attributes.foreground_masks(sample.images), masks).mean() > 0.97


# ----------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tiny():
    return diffprobe.load("tiny")


def test_words_map_to_tokens_and_missing_words_list_the_prompt(tiny):
    prompt = "a large red circle in the top left"
    tokens = prompt_tokens(tiny, prompt)
    assert tokens[0].special and tokens[-1].special  # start and end tokens are marked
    assert word_positions(tiny, prompt, "top left") == [7, 8]
    assert word_positions(tiny, "a red circle, a red star", "red") == [2, 6]
    with pytest.raises(AttributionError, match="'star' is not in the prompt.*circle</w>"):
        word_positions(tiny, prompt, "star")


def test_sd3_words_are_found_in_the_clip_and_the_t5_segments():
    case = next(c for c in dummy_cases("sd3") if c.name == "sd3")
    model = diffprobe.from_pipeline(case.build(0), name="dummy-sd3")
    positions = word_positions(model, "a red circle", "circle")
    clip = [p for p in positions if p < 77]
    t5 = [p for p in positions if p >= 77]
    assert len(clip) >= 1 and len(t5) >= 1, positions
    encoders = {t.encoder for t in prompt_tokens(model, "a red circle")}
    assert encoders == {"text_encoder", "text_encoder_3"}


# ----------------------------------------------------------------------------- stage


@pytest.mark.slow
def test_maps_stream_to_zarr_as_float16(sd_model, tmp_path):
    import zarr

    prompts = ["a red circle", "a blue star in the top left"]
    kept = attribute(sd_model, prompts, steps=2, progress=False)
    store = MapStore(tmp_path, len(prompts))
    assert attribute(sd_model, prompts, steps=2, store=store, progress=False) is None
    group = zarr.open_group(str(tmp_path / "maps.zarr"), mode="r")
    maps = group["maps"]
    assert maps.dtype == np.float16
    assert maps.shape[0] == 2 and maps.shape[2:] == kept[0].maps.shape[1:]
    for index, result in enumerate(kept):
        positions = [t.position for t in result.tokens]
        stored = maps[index][positions].astype(np.float32)
        np.testing.assert_allclose(stored, result.maps, rtol=2e-3, atol=1e-4)
        padding = sorted(set(range(maps.shape[1])) - set(positions))
        assert np.isnan(maps[index][padding]).all()
    assert group.attrs["prompts"][1]["prompt"] == prompts[1]


def test_non_square_images_give_non_square_maps(sd_model):
    result = attribute_prompt(sd_model, "a red circle", steps=1, size=(32, 64))
    assert result.image.shape[:2] == (32, 64)
    rows, columns = result.maps.shape[-2:]
    assert columns == 2 * rows
    assert result.word_map("circle", sd_model).shape == (32, 64)


def test_flux_gives_output_space_maps_beside_cross_attention():
    case = next(c for c in dummy_cases("flux") if c.name == "flux")
    model = diffprobe.from_pipeline(case.build(0), name="dummy-flux")
    result = attribute_prompt(model, "a red circle", steps=1, size=case.resolution)
    assert result.outputs is not None
    assert {maths.layer_group(s) for s in result.sites} == {"joint", "single"}
    concept = result.concept_maps(["red", "circle"], model)
    total = concept["red"] + concept["circle"]
    assert np.allclose(total, 1.0, atol=1e-4)  # softmax over the concepts, per pixel
    cross = result.word_map("circle", model)
    assert cross.shape == concept["circle"].shape


@pytest.mark.slow
def test_cli_writes_daam_folders_and_evaluates_them(tmp_path, capsys):
    from diffprobe.cli import main

    out = tmp_path / "attr"
    code = main(["attribution", "--model", "tiny", "--prompt", "a large red circle in the top left",
                 "--words", "circle,red,top left", "--steps", "3", "--masks", "reader",
                 "--store", "--out", str(out), "--quiet"])  # fmt: skip
    assert code in (0, None)
    folder = out / "000"
    for name in ("prompt.txt", "seed.txt", "output.png", "circle.heat_map.png",
                 "top_left.heat_map.png", "circle.gt.png", "red.overlay.png", "comparison.png"):  # fmt: skip
        assert (folder / name).is_file(), name
    summary = json.loads((out / "attribution.json").read_text())
    assert set(summary["prompts"][0]["iou"]) == {"circle", "red"}
    capsys.readouterr()
    main(["attribution-eval", str(out), "--sweep", "--threshold", "0.4"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["pairs"] == 2
    # the PNG round trip (8-bit maps) keeps the IoU of the summary
    assert evaluated["mIoU"] == pytest.approx(summary["mIoU"], abs=0.03)
    assert len(evaluated["sweep"]["mIoU"]) == 19
