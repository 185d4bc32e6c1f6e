"""A run with ``--cache`` and the same run without it start from bit-identical weights: the online
teacher's bf16 precision probe draws from its own generator, not from the global RNG the student is
initialised from (before the fix the uncached student differed), so the two runs differ only by the
int8 rounding of the cached targets (benchmarks/recipe_parity.py --sides ours cached)."""
import json
import shutil

import torch

from jobs import cache_teacher
from pipeline.data import synthetic
from pipeline.train.trainer import TrainConfig, Trainer


def _tiny(root):
    src = synthetic.ensure_generated("train")
    d = json.loads((src / "annotations" / "instances_train.json").read_text())
    images = d["images"][:4]
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in images:
        shutil.copy(src / "train" / i["file_name"], root / "train" / i["file_name"])
    ann = root / "annotations" / "instances_train.json"
    ids = {i["id"] for i in images}
    anns = [a for a in d["annotations"] if a["image_id"] in ids]
    ann.write_text(json.dumps({**d, "images": images, "annotations": anns}))
    return str(ann)


def test_cached_and_online_runs_start_from_the_same_weights(tmp_path):
    data = _tiny(tmp_path / "tiny")
    store = tmp_path / "store"
    assert cache_teacher.main(["--vfm", "dinov3_vits", "--data", data, "--out", str(store), "--size", "s",
                               "--epochs", "1", "--input-size", "64", "--global-batch", "2", "--no-ray",
                               "--quiet"]) == 0
    common = dict(size="s", epochs=1, img_size=64, batch_size=2, vfm="dinov3_vits", data=data, val_data="synthetic",
                  workers=0)
    cached = Trainer(TrainConfig(cache=str(store), out=str(tmp_path / "cached"), **common))
    online = Trainer(TrainConfig(out=str(tmp_path / "online"), **common))
    assert cached.data.store is not None and online.data.store is None and online.data.teacher is not None
    a, b = cached.student.state_dict(), online.student.state_dict()
    assert list(a) == list(b) and any(k.startswith("dsi.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
