import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.ops import roi_align

from drcl.views import TwoViewTransform, collate_views

# Five rectangles on a 96x96 image: (x1, y1, x2, y2), label, annotation id. The last is small.
RECTS = [
    ((6, 8, 38, 36), 3, 101),
    ((50, 6, 90, 30), 1, 205),
    ((10, 50, 44, 88), 2, 307),
    ((56, 44, 88, 90), 1, 412),
    ((70, 34, 78, 40), 2, 530),
]
NO_COLOUR = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


def synthetic_sample(masks: bool = False):
    """A 96x96 uint8 image of textured rectangles (each one a horizontal ramp in one channel,
    a vertical ramp in another and its own constant in the third, so a flipped or misplaced
    crop shows) and a target shaped like DetectionDataset's."""
    image = torch.full((3, 96, 96), 128.0)
    for k, ((x1, y1, x2, y2), _, _) in enumerate(RECTS):
        w, h = x2 - x1, y2 - y1
        image[k % 3, y1:y2, x1:x2] = torch.linspace(30, 230, w).expand(h, w)
        image[(k + 1) % 3, y1:y2, x1:x2] = torch.linspace(230, 30, h)[:, None].expand(h, w)
        image[(k + 2) % 3, y1:y2, x1:x2] = 20.0 + 50 * k
    boxes = torch.tensor([r[0] for r in RECTS], dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(96, 96)),
        "labels": torch.tensor([r[1] for r in RECTS]),
        "ann_ids": torch.tensor([r[2] for r in RECTS]),
        "image_id": 7,
    }
    if masks:
        target["masks"] = tv_tensors.Mask(torch.zeros((len(RECTS), 96, 96), dtype=torch.uint8))
    return tv_tensors.Image(image.to(torch.uint8)), target


def label_of(ann_id: int) -> int:
    return next(label for _, label, i in RECTS if i == ann_id)


def test_shapes_dtypes_and_pairing_of_ids():
    image, target = synthetic_sample(masks=True)
    transform = TwoViewTransform(size=64)
    torch.manual_seed(0)
    for _ in range(10):
        views = transform(image, target)
        for img, t in views:
            assert type(img) is torch.Tensor and img.shape == (3, 64, 64) and img.dtype == torch.float32
            assert 0.0 <= img.min() and img.max() <= 1.0
            assert set(t) == {"boxes", "labels", "ann_ids", "image_id"} and t["image_id"] == 7  # for the queues' ids
            assert type(t["boxes"]) is torch.Tensor and t["boxes"].dtype == torch.float32
            assert t["labels"].dtype == torch.int64 and t["ann_ids"].dtype == torch.int64
            k = len(t["ann_ids"])
            assert t["boxes"].shape == (k, 4) and t["labels"].shape == (k,)
            b = t["boxes"]
            assert (b >= 0).all() and (b <= 64).all() and (b[:, 2:] - b[:, :2] >= 4.0).all()
            assert set(t["ann_ids"].tolist()) <= {r[2] for r in RECTS}
            assert t["labels"].tolist() == [label_of(i) for i in t["ann_ids"].tolist()]
        assert views[0][1]["ann_ids"].tolist() == views[1][1]["ann_ids"].tolist()
        assert torch.equal(views[0][1]["labels"], views[1][1]["labels"])


def test_image_without_boxes_and_plain_tensor_input():
    image, _ = synthetic_sample()
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    for img, t in TwoViewTransform(size=32)(image.as_subclass(torch.Tensor), target):
        assert img.shape == (3, 32, 32)
        assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["ann_ids"].shape == (0,)


def box_crops(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(K, 3, 8, 8) RoIAlign crops of the inner 70% of each box (box edges are blurred by
    resampling); ``image`` float in [0, 1]."""
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * 0.35
    inner = torch.cat([centre - half, centre + half], dim=1)
    return roi_align(image[None], [inner], output_size=8, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def test_box_pixels_follow_crops_and_flips():
    """Without colour ops, each surviving box shows the same pixels in either view as in the
    original image (up to resampling and that view's flip); a wrong pairing does not."""
    image, target = synthetic_sample()
    original = box_crops(image.float() / 255, target["boxes"].as_subclass(torch.Tensor))
    index = {i: k for k, (_, _, i) in enumerate(RECTS)}
    transform = TwoViewTransform(size=64, **NO_COLOUR)
    tol, checked, flips, wrong_pairs = 0.03, 0, set(), []
    torch.manual_seed(1)
    for _ in range(20):
        for img, t in transform(image, target):
            b = t["boxes"]
            whole = ((b > 0.5) & (b < 63.5)).all(dim=1)  # not clipped by the crop
            if whole.sum() == 0:
                continue
            crops = box_crops(img, b[whole])
            ref = original[[index[i] for i in t["ann_ids"][whole].tolist()]]
            err = (crops - ref).abs().mean(dim=(1, 2, 3))
            err_flipped = (crops - ref.flip(-1)).abs().mean(dim=(1, 2, 3))
            flipped = err_flipped < err
            assert flipped.all() or not flipped.any(), "one flip per view"
            assert torch.minimum(err, err_flipped).max() < tol
            assert torch.maximum(err, err_flipped).min() > 2 * tol  # the texture shows a flip
            flips.add(bool(flipped[0]))
            checked += len(crops)
            if len(crops) > 1:  # negative control: pair each box with its neighbour's id
                shifted = ref.roll(1, dims=0)
                wrong_pairs.append(
                    torch.minimum((crops - shifted).abs(), (crops - shifted.flip(-1)).abs()).mean(dim=(1, 2, 3))
                )
    assert checked >= 20 and flips == {True, False}
    assert wrong_pairs and torch.cat(wrong_pairs).min() > 3 * tol


def test_box_cropped_out_of_one_view_is_dropped_from_both():
    image, target = synthetic_sample()
    tight = dict(size=48, scale=(0.08, 0.3), **NO_COLOUR)
    transform, keep_all = TwoViewTransform(min_box_size=4.0, **tight), TwoViewTransform(min_box_size=0.0, **tight)
    one_sided = 0
    for seed in range(150):
        torch.manual_seed(seed)
        (_, t1), (_, t2) = transform(image, target)
        torch.manual_seed(seed)  # same draws: every box in both views, however small
        (_, a1), (_, a2) = keep_all(image, target)
        assert a1["ann_ids"].tolist() == a2["ann_ids"].tolist() == [r[2] for r in RECTS]
        big1, big2 = [((a["boxes"][:, 2:] - a["boxes"][:, :2]) >= 4.0).all(dim=1) for a in (a1, a2)]
        keep = big1 & big2
        assert t1["ann_ids"].tolist() == t2["ann_ids"].tolist() == a1["ann_ids"][keep].tolist()
        assert torch.equal(t1["boxes"], a1["boxes"][keep]) and torch.equal(t2["boxes"], a2["boxes"][keep])
        one_sided += int((big1 ^ big2).sum())
    assert one_sided > 0  # some box was in one view only and was dropped from both


def test_deterministic_under_seed():
    image, target = synthetic_sample()
    transform = TwoViewTransform(size=48)

    def run(seed):
        torch.manual_seed(seed)
        return transform(image, target)

    def same(u, v):
        pairs = [(x, y) for (xi, xt), (yi, yt) in zip(u, v) for x, y in [(xi, yi)] + [(xt[k], yt[k]) for k in xt]]
        return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in pairs)

    assert same(run(0), run(0))
    assert not same(run(0), run(1))


def test_dataloader_batches_and_reproducible_workers():
    image, target = synthetic_sample()
    transform = TwoViewTransform(size=32)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return transform(image, target)

    def batches():
        loader = DataLoader(Items(), batch_size=2, num_workers=2, collate_fn=collate_views,
                            generator=torch.Generator().manual_seed(3))
        return list(loader)

    first, second = batches(), batches()
    images1, images2, targets1, targets2 = first[0]
    assert images1.shape == images2.shape == (2, 3, 32, 32)
    assert len(targets1) == len(targets2) == 2
    assert all(t1["ann_ids"].tolist() == t2["ann_ids"].tolist() for t1, t2 in zip(targets1, targets2))
    for a, b in zip(first, second):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first[0][0][0], first[1][0][0])  # the two workers draw differently


@pytest.mark.parametrize("view", [0, 1])
def test_solarize_inverts_bright_pixels(view):
    image, target = synthetic_sample()
    solarize_p = (1.0, 0.0) if view == 0 else (0.0, 1.0)
    plain = TwoViewTransform(size=48, **NO_COLOUR)
    solar = TwoViewTransform(size=48, **{**NO_COLOUR, "solarize_p": solarize_p})
    torch.manual_seed(5)
    p = plain(image, target)
    torch.manual_seed(5)
    s = solar(image, target)
    x = p[view][0]
    assert (x >= 0.5).any()
    torch.testing.assert_close(s[view][0], torch.where(x >= 0.5, 1.0 - x, x))
    assert torch.equal(s[1 - view][0], p[1 - view][0])


def test_blur_kernel_is_capped_without_changing_the_blur():
    from torchvision.transforms.v2 import functional as TF

    from drcl.views import MAX_BLUR_KERNEL

    kernels = {s: TwoViewTransform(size=s).reference[0].transforms[3].transforms[0].kernel_size[0] for s in (64, 160, 800)}
    assert kernels == {64: 7, 160: 17, 800: MAX_BLUR_KERNEL}  # MoCo v2's 10 % of the size, capped
    assert {s: TwoViewTransform(size=s, photometric="device").kernel for s in kernels} == kernels
    # at the largest sigma the capped kernel blurs as the 10 % one (81 px at 800) does
    image = torch.rand(3, 120, 120, generator=torch.Generator().manual_seed(0))
    wide = TF.gaussian_blur(image, [81, 81], [2.0, 2.0])
    capped = TF.gaussian_blur(image, [MAX_BLUR_KERNEL] * 2, [2.0, 2.0])
    assert (wide - capped)[:, 40:80, 40:80].abs().max() < 1e-3  # away from the reflected borders


# --------------------------------------------------------------------------- the device path


def _hue_angle(x: torch.Tensor):
    """Hue angle and chroma of each pixel of (N, 3, S, S)."""
    r, g, b = x.unbind(1)
    u, v = 2 * r - g - b, 3**0.5 * (g - b)
    return torch.atan2(v, u), (u * u + v * v).sqrt() / 2


def _stats(views: torch.Tensor, plain: torch.Tensor) -> dict:
    """Per-view statistics of (N, 3, S, S) float views: what each photometric step moves.
    ``plain`` are the same views before it (the same geometric draws): the hue turn is
    measured against them."""
    chroma = views.amax(1) - views.amin(1)
    angle, strength = _hue_angle(views)
    angle0, strength0 = _hue_angle(plain)
    coloured = ((strength > 0.05) & (strength0 > 0.05)).float()
    turn = (angle - angle0 + torch.pi).remainder(2 * torch.pi) - torch.pi
    high = ((views[..., 1:] - views[..., :-1]) ** 2).mean((1, 2, 3)) + ((views[..., 1:, :] - views[..., :-1, :]) ** 2).mean((1, 2, 3))
    return {
        "mean": views.mean((1, 2, 3)),
        "std": views.std((1, 2, 3)),
        "chroma": chroma.mean((1, 2)),
        "hue_turn": (turn.abs() * coloured).sum((1, 2)) / coloured.sum((1, 2)).clamp(min=1),
        "high_frequency": high / (views.var((1, 2, 3)) + 1e-4),  # per unit of contrast: what blur moves
        "grey": (chroma.amax((1, 2)) < 1e-6).float(),
        "solarized": (views.amax((1, 2, 3)) <= 0.5).float(),
    }


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    fb = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((fa - fb).abs().max())


def _differences(ref: dict, dev: dict) -> list[str]:
    """The statistics whose distributions differ: KS above its 0.1 % critical value
    (1.95 sqrt(2 / N)), fractions (grey, solarized) more than 4 standard errors apart."""
    n = len(ref["mean"])
    out = []
    for k in ref:
        if k in ("grey", "solarized"):
            p = float((ref[k].mean() + dev[k].mean()) / 2)
            if abs(float(ref[k].mean() - dev[k].mean())) > 4 * max(p * (1 - p), 1 / n) ** 0.5 * (2 / n) ** 0.5:
                out.append(f"{k}: {float(ref[k].mean()):.3f} vs {float(dev[k].mean()):.3f}")
        elif _ks(ref[k], dev[k]) > 1.95 * (2 / n) ** 0.5:
            out.append(f"{k}: KS {_ks(ref[k], dev[k]):.3f}")
    return out


PARITY_SEEDS = range(300)
PARITY_SIZE = 32


def _parity_sample():
    """The synthetic sample with a fine texture (noise, +-60 grey levels) around its
    rectangles, so that blur shows in the high frequencies."""
    image, target = synthetic_sample()
    noise = torch.randint(-60, 61, (1, 96, 96), generator=torch.Generator().manual_seed(0))
    background = (image == 128).all(0, keepdim=True)
    image = torch.where(background, (128 + noise).clamp(0, 255).to(torch.uint8), image)
    return tv_tensors.Image(image), target


def _batch_of(transform: TwoViewTransform, seeds):
    """The parity sample's two views under each seed, collated."""
    image, target = _parity_sample()
    items = []
    for seed in seeds:
        torch.default_generator.manual_seed(seed)
        items.append(transform(image, target))
    return collate_views(items)


@pytest.fixture(scope="module")
def parity():
    """The reference's views, the device path's batch (uint8 views and parameters) and each
    view's photometric seed, all under the same sample seeds."""
    reference = TwoViewTransform(size=PARITY_SIZE)
    device = TwoViewTransform(size=PARITY_SIZE, photometric="device")
    view_seeds = []
    for seed in PARITY_SEEDS:  # what the transform draws first, to seed each view's photometric draws
        torch.default_generator.manual_seed(seed)
        view_seeds.append(torch.randint(0, 2**62, (2,)).tolist())
    return reference.finish(_batch_of(reference, PARITY_SEEDS)), device, _batch_of(device, PARITY_SEEDS), view_seeds


def test_device_path_matches_the_reference_views(parity):
    (ref1, ref2, ref_t1, ref_t2), device, batch, _ = parity
    dev1, dev2, dev_t1, dev_t2 = device.finish(batch)
    assert batch[0].dtype == torch.uint8 and dev1.dtype == torch.float32 and dev1.shape == ref1.shape
    # the same geometric draw: the same boxes, to the bit
    for a, b in zip(ref_t1 + ref_t2, dev_t1 + dev_t2):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["ann_ids"], b["ann_ids"])
    for view, (ref, dev) in enumerate(((ref1, dev1), (ref2, dev2))):
        plain = batch[view].float() / 255  # the views before their photometric half
        s_ref, s_dev = _stats(ref, plain), _stats(dev, plain)
        assert _differences(s_ref, s_dev) == []
        assert abs(float(s_dev["grey"].mean()) - device.recipes[view].grayscale_p) < 0.1  # the recipe's fraction


@pytest.mark.parametrize("view,change", [
    (0, {"grayscale_p": 0.4}),
    (1, {"solarize_p": 0.4}),
    (1, {"blur_p": 0.5}),
    (0, {"sigma": (0.1, 1.0)}),
    (0, {"color_jitter": (0.8, 0.4, 0.4, 0.1)}),
    (0, {"color_jitter": (0.4, 0.4, 0.4, 0.3)}),
    (1, {"color_jitter_p": 0.4}),
])
def test_a_device_path_that_draws_differently_fails_the_comparison(parity, view, change):
    import dataclasses

    from drcl.photometric import apply

    reference, device, batch, view_seeds = parity
    recipe = dataclasses.replace(device.recipes[view], **change)
    params = torch.stack([recipe.draw(torch.Generator().manual_seed(seeds[view])) for seeds in view_seeds])
    # the draws it replaces are the device path's own (the parity test's)
    assert torch.equal(torch.stack([device.recipes[view].draw(torch.Generator().manual_seed(seeds[view]))
                                    for seeds in view_seeds]), batch[4 + view])
    plain = batch[view].float() / 255
    wrong = apply(batch[view], params, device.kernel)
    assert _differences(_stats(reference[view], plain), _stats(wrong, plain)) != []


def test_device_path_views_are_a_function_of_the_seed():
    image, target = synthetic_sample()
    device = TwoViewTransform(size=48, photometric="device")
    out = []
    for _ in range(2):
        torch.default_generator.manual_seed(5)
        out.append(device(image, target))
    for (img_a, t_a), (img_b, t_b) in zip(*out):
        assert img_a.dtype == torch.uint8 and torch.equal(img_a, img_b)
        assert torch.equal(t_a["photometric"], t_b["photometric"])
