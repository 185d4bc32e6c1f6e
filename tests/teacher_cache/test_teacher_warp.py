"""Warping a cached grid: exact for the cases where the geometry is exact on the grid."""
import torch

from teacher_cache.warp import crop_box, flip_box, mosaic_box, warp_grid, zoom_out_box


def test_identity_flip_and_aligned_crop_are_exact():
    g = torch.randn(8, 20, 20)
    same, valid = warp_grid(g, (0, 0, 1, 1), (20, 20))
    torch.testing.assert_close(same, g) and valid.all()
    flipped, _ = warp_grid(g, flip_box(), (20, 20))
    torch.testing.assert_close(flipped, g.flip(-1))
    # crop of the left-top quarter (10x10 cells), resized 2x: nearest cells are reproduced at
    # the centres of each 2x2 output block, up to the bilinear blend
    quarter, valid = warp_grid(g, crop_box(0, 0, 320, 320, (640, 640)), (10, 10))
    torch.testing.assert_close(quarter, g[:, :10, :10])
    assert valid.all()


def test_zoom_out_and_mosaic_mark_outside_cells_invalid():
    g = torch.randn(4, 20, 20)
    warped, valid = warp_grid(g, zoom_out_box((640, 640, 0, 0), (640, 640)), (20, 20))
    assert valid[10:, 10:].all() and not valid[:10].any() and not valid[:, :10].any()
    torch.testing.assert_close(warped[:, 10:, 10:], torch.nn.functional.avg_pool2d(g[None], 2)[0])
    tile, valid = warp_grid(g, mosaic_box((0.5, 0.0, 1.0, 0.5)), (20, 20))  # top-right tile
    assert valid[:10, 10:].all() and valid.sum() == 100
