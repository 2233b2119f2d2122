import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from drcl import photometric as P


def _reference(image, p, kernel):
    """One image through torchvision's functionals with the parameters of ``p``."""
    ops = [lambda x: TF.adjust_brightness(x, float(p[P.BRIGHTNESS])),
           lambda x: TF.adjust_contrast(x, float(p[P.CONTRAST])),
           lambda x: TF.adjust_saturation(x, float(p[P.SATURATION])),
           lambda x: TF.adjust_hue(x, float(p[P.HUE]))]
    x = image
    if p[P.JITTER]:
        for op in p[P.ORDER].long().tolist():
            x = ops[op](x)
    if p[P.GRAY]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[P.BLUR]:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p[P.SIGMA])] * 2)
    if p[P.SOLARIZE]:
        x = TF.solarize(x, 0.5)
    return x


@pytest.mark.parametrize("kernel", [7, 17])
def test_a_batch_equals_torchvision_image_by_image(kernel):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 24, 30), generator=g, dtype=torch.uint8)
    images[1] = images[1, :1]  # grey pixels: hue and saturation have nothing to turn
    images[2, :, :4] = 255  # saturated pixels: brightness clamps
    recipe = P.PhotometricRecipe(color_jitter_p=0.7, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3, blur_kernel=kernel)
    worst, seen = 0.0, torch.zeros(P.NUM_PARAMS)
    for _ in range(15):
        params = torch.stack([recipe.draw(g) for _ in range(6)])
        out = P.apply(images, params, kernel)
        ref = torch.stack([_reference(images[b].float() / 255, params[b], kernel) for b in range(6)])
        assert out.dtype == torch.float32 and out.shape == images.shape
        worst = max(worst, float((out - ref).abs().max()))
        seen += (params > 0.5).float().sum(0)
    assert worst < 1e-5
    for flag in (P.JITTER, P.GRAY, P.BLUR, P.SOLARIZE):  # every branch was taken and skipped
        assert 0 < seen[flag] < 90


def test_draws_follow_the_recipe():
    recipe = P.PhotometricRecipe(color_jitter=(0.4, 0.3, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2,
                                 blur_p=0.5, solarize_p=0.1, sigma=(0.1, 2.0))
    g = torch.Generator().manual_seed(1)
    p = torch.stack([recipe.draw(g) for _ in range(2000)])
    for flag, prob in ((P.JITTER, 0.8), (P.GRAY, 0.2), (P.BLUR, 0.5), (P.SOLARIZE, 0.1)):
        assert abs(float(p[:, flag].mean()) - prob) < 0.045  # 4 standard errors
    for i, (lo, hi) in ((P.BRIGHTNESS, (0.6, 1.4)), (P.CONTRAST, (0.7, 1.3)), (P.SATURATION, (0.8, 1.2)),
                        (P.HUE, (-0.1, 0.1)), (P.SIGMA, (0.1, 2.0))):
        assert lo <= float(p[:, i].min()) and float(p[:, i].max()) <= hi
        assert abs(float(p[:, i].mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)  # 4.6 standard errors
    orders = p[:, P.ORDER].long()
    assert (orders.sort(dim=1).values == torch.arange(4)).all()  # permutations
    assert len({tuple(o) for o in orders.tolist()}) == 24


def test_autocast_does_not_lower_the_precision():
    images = torch.rand(2, 3, 16, 16)
    params = torch.stack([P.PhotometricRecipe(blur_p=1.0).draw(torch.Generator().manual_seed(s)) for s in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = P.apply(images, params, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, P.apply(images, params, 7))
