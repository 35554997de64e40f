import numpy as np
import pytest

from diffprobe.data import shapes


def test_same_seed_same_bytes():
    first, second = shapes.sample(16, seed=3), shapes.sample(16, seed=3)
    assert first.images.tobytes() == second.images.tobytes()
    assert first.captions == second.captions
    for name in shapes.FACTOR_NAMES:
        np.testing.assert_array_equal(first.factors[name], second.factors[name])


def test_item_does_not_depend_on_n_or_start():
    long, short = shapes.sample(20, seed=5), shapes.sample(7, seed=5)
    np.testing.assert_array_equal(long.images[:7], short.images)
    assert long.captions[:7] == short.captions
    window = shapes.sample(4, seed=5, start=12)
    np.testing.assert_array_equal(long.images[12:16], window.images)
    np.testing.assert_array_equal(long.factors["x"][12:16], window.factors["x"])


def test_different_seeds_and_splits_differ():
    assert shapes.sample(8, seed=0).images.tobytes() != shapes.sample(8, seed=1).images.tobytes()
    train, heldout = shapes.sample(8, split="train"), shapes.sample(8, split="heldout")
    assert train.images.tobytes() != heldout.images.tobytes()


def test_factors_within_ranges():
    sample = shapes.sample(400, seed=1, split="all")
    factors = sample.factors
    assert sample.images.shape == (400, 64, 64, 3) and sample.images.dtype == np.uint8
    assert set(factors) == set(shapes.FACTOR_NAMES)
    assert all(len(values) == 400 for values in factors.values())
    for name, names in [
        ("shape", shapes.SHAPES),
        ("colour", shapes.COLOUR_NAMES),
        ("size", shapes.SIZES),
        ("quadrant", shapes.QUADRANTS),
        ("background", shapes.BACKGROUND_NAMES),
        ("template", shapes.CAPTION_TEMPLATES),
    ]:
        assert factors[name].dtype == np.int64
        assert set(factors[name].tolist()) == set(range(len(names))), name
    assert np.all(np.abs(factors["rotation"]) <= shapes.MAX_ROTATION)
    np.testing.assert_array_equal(
        factors["quadrant"], shapes.quadrant_of(factors["x"], factors["y"])
    )
    gap = shapes.MIDLINE_GAP / shapes.IMAGE_SIZE
    for axis in ("x", "y"):
        assert np.all(np.abs(factors[axis] - 0.5) >= gap - 1e-12)
        assert np.all((factors[axis] > 0) & (factors[axis] < 1))


def test_whole_shape_inside_the_image():
    sample = shapes.sample(300, seed=2, split="all")
    for image, background in zip(sample.images, sample.factors["background"], strict=True):
        ground = np.array(shapes.BACKGROUNDS[shapes.BACKGROUND_NAMES[background]])
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.all(border == ground)


def test_render_draws_the_colour_at_the_centre():
    image = shapes.render("circle", "blue", "large", 0.25, 0.75, "white")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[48, 16]) == shapes.COLOURS["blue"]
    assert tuple(image[16, 48]) == shapes.BACKGROUNDS["white"]
    edge = image[48, 16 - 13 : 16 + 14]  # anti-aliased edge: values between ink and ground
    assert len({tuple(pixel) for pixel in edge}) > 2
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.render("hexagon", "blue", "large", 0.25, 0.75, "white")


def test_heldout_split_is_disjoint_from_train():
    held = shapes.HELDOUT_COMBINATIONS
    combos = shapes.all_combinations()
    assert 0.08 <= len(held) / len(combos) <= 0.15
    assert set(shapes.combinations("train")).isdisjoint(held)
    assert set(shapes.combinations("heldout")) == held
    keys = ("shape", "colour", "size", "quadrant", "background")

    def seen(split):
        factors = shapes.sample(300, seed=4, split=split).factors
        return {tuple(int(factors[k][i]) for k in keys) for i in range(300)}

    assert seen("heldout") <= held
    assert seen("train").isdisjoint(held)
    # A held-out tuple is held out on every background, so even captions that leave out the
    # background never appear in training.
    without_background = {c[:4] for c in held}
    assert all(c[:4] not in without_background for c in shapes.combinations("train"))


def test_captions_name_the_factors():
    sample = shapes.sample(200, seed=6, split="all")
    for i, text in enumerate(sample.captions):
        item = sample.item(i)
        assert shapes.SHAPES[item["shape"]] in text
        assert shapes.COLOUR_NAMES[item["colour"]] in text
        assert shapes.SIZES[item["size"]] in text
        assert shapes.QUADRANTS[item["quadrant"]] in text
        if "{background}" in shapes.CAPTION_TEMPLATES[item["template"]]:
            assert shapes.BACKGROUND_NAMES[item["background"]] in text
    assert len({t for t in sample.factors["template"].tolist()}) == len(shapes.CAPTION_TEMPLATES)


def test_caption_templates():
    item = {"shape": 0, "colour": 1, "size": 0, "x": 0.2, "y": 0.8, "background": 1}
    assert shapes.caption(item) == "a small orange circle in the bottom left"
    assert shapes.caption(item, template=2) == "bottom left: a small orange circle"
    assert shapes.caption(item, template="an {colour} {shape}") == "an orange circle"
    assert (
        shapes.caption(item, template=4) == "an orange circle on white, small, in the bottom left"
    )


@pytest.mark.slow
def test_doc_examples_run():
    import re
    from pathlib import Path

    doc = Path(__file__).parents[1] / "docs" / "shapes_world.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})
