"""PostProcessor: top-k over (query, class) pairs, box scaling, label remap, deploy/ONNX form."""
from pathlib import Path

import pytest
import torch

from detector.postprocessor import PostProcessor

REF = Path(__file__).resolve().parents[1] / "fixtures" / "decoder_parity_misc.pt"


def pp_inputs():
    g = torch.Generator().manual_seed(6)
    outputs = {"pred_logits": torch.randn(2, 50, 7, generator=g), "pred_boxes": torch.rand(2, 50, 4, generator=g)}
    return outputs, torch.tensor([[640, 480], [333, 500]])


def hand_case():
    # 3 queries x 2 classes. Scores (sigmoid of logits) ranked: q1/c0 > q0/c1 > q2/c1 > q0/c0 > ...
    logits = torch.tensor([[[0.0, 2.0], [3.0, -5.0], [-1.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    return {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]])  # (w, h)


def test_topk_over_queries_and_classes():
    outputs, sizes = hand_case()
    (res,) = PostProcessor(num_classes=2, num_top_queries=4)(outputs, sizes)
    assert res["labels"].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.0])))
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0],   # query 1: cx .25 cy .75 w .5 h .5 on 200x100
                             [80.0, 30.0, 120.0, 70.0],   # query 0
                             [10.0, 5.0, 30.0, 15.0],     # query 2
                             [80.0, 30.0, 120.0, 70.0]])  # query 0 again, other class
    torch.testing.assert_close(res["boxes"], expected)


def test_category_remap_and_errors():
    outputs, sizes = hand_case()
    (res,) = PostProcessor(2, 4, category_ids=[1, 90])(outputs, sizes)
    assert res["labels"].tolist() == [1, 90, 90, 1]
    with pytest.raises(ValueError, match="category_ids"):
        PostProcessor(2, 4, category_ids=[1, 2, 3])


def test_boxes_are_clipped_to_each_image():
    """A box overhanging the image (cx 0.9, w 0.6 -> x1 = 1.2 w) ends at the image border."""
    outputs = {"pred_logits": torch.tensor([[[2.0], [1.0]]]),
               "pred_boxes": torch.tensor([[[0.9, 0.1, 0.6, 0.4], [0.5, 0.5, 0.2, 0.2]]])}
    sizes = torch.tensor([[200, 100]])
    (res,) = PostProcessor(1, 2)(outputs, sizes)
    torch.testing.assert_close(res["boxes"], torch.tensor([[120.0, 0.0, 200.0, 30.0], [80.0, 40.0, 120.0, 60.0]]))
    _, boxes, _ = PostProcessor(1, 2).deploy()(outputs, sizes)
    torch.testing.assert_close(boxes[0], res["boxes"])
    (raw,) = PostProcessor(1, 2, clip_boxes=False)(outputs, sizes)
    assert raw["boxes"][0, 2] == pytest.approx(240.0) and raw["boxes"][0, 1] == pytest.approx(-10.0)


def test_matches_official_and_deploy_form():
    outputs, sizes = pp_inputs()
    ref = torch.load(REF)["postprocess"]
    results = PostProcessor(7, 30, clip_boxes=False)(outputs, sizes)   # the official code does not clip
    labels, boxes, scores = PostProcessor(7, 30, clip_boxes=False).deploy()(outputs, sizes)
    for key, value in (("labels", labels), ("boxes", boxes), ("scores", scores)):
        assert torch.equal(value, ref[key])
        assert torch.equal(torch.stack([r[key] for r in results]), ref[key])


def test_onnx_export_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    outputs, sizes = pp_inputs()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pp = PostProcessor(7, 30).deploy()

        def forward(self, logits, boxes, sizes):
            return self.pp({"pred_logits": logits, "pred_boxes": boxes}, sizes)

    path = tmp_path / "pp.onnx"
    args = (outputs["pred_logits"], outputs["pred_boxes"], sizes)
    torch.onnx.export(Wrapped(), args, str(path), opset_version=17, dynamo=False,
                      input_names=["pred_logits", "pred_boxes", "orig_target_sizes"],
                      output_names=["labels", "boxes", "scores"],
                      dynamic_axes={n: {0: "N"} for n in ("pred_logits", "pred_boxes", "orig_target_sizes")})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"pred_logits": torch.cat([args[0]] * 2).numpy(), "pred_boxes": torch.cat([args[1]] * 2).numpy(),
            "orig_target_sizes": torch.cat([sizes] * 2).numpy()}
    labels, boxes, scores = session.run(None, feed)
    ref = torch.load(REF)["postprocess"]
    assert labels.shape == (4, 30)
    assert (labels == torch.cat([ref["labels"]] * 2).numpy()).all()
    clipped = torch.minimum(ref["boxes"].clamp(min=0), sizes.repeat(1, 2)[:, None].float())   # official + clip
    torch.testing.assert_close(torch.from_numpy(boxes), torch.cat([clipped] * 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(scores), torch.cat([ref["scores"]] * 2), atol=1e-6, rtol=0)
