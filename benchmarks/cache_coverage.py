"""Where every teacher target of a full run comes from, exact store vs budget store (no images, no teacher).

    python -m benchmarks.cache_coverage --size l --images 118287 --world-size 8

Walks every (epoch, global step) of the run's training plan (pipeline/data/plan.py) and prints one
JSON line: for exact mode and for budget mode (``--views K``, default 4) the fractions of teacher
targets served exactly, served as a resized 640-px grid, or left to the online teacher, the views
stored and their bytes (int8, and int4 for exact mode), plus the stream digest of the plan as
seen by world sizes 1, 2, 4, 8 (identical digests: every world size trains on the same batches).
"""
from __future__ import annotations

import argparse
import hashlib
import json

from pipeline.data.plan import PlanSampler, TrainPlan
from pipeline.train.recipe import resolve_recipe
from teacher_cache.quantize import bytes_per_token
from teacher_cache.views import ViewPlan


def stream_digest(plan: TrainPlan, world_size: int, steps: int = 2) -> str:
    """sha256 over what the ranks of ``world_size`` see at the first ``steps`` steps of every epoch:
    the samples (concatenated over ranks in rank order), the step's size and MixUp draw."""
    h = hashlib.sha256()
    samplers = [PlanSampler(plan, r, world_size) for r in range(world_size)]
    for epoch in range(plan.epochs):
        for s in samplers:
            s.set_epoch(epoch)
        iters = [iter(s) for s in samplers]
        for step in range(min(steps, plan.steps_per_epoch)):
            items = [item for it in iters for item in next(it)]
            rec = plan.step_record(epoch, step)
            h.update(json.dumps([[i[3] for i in items], rec.size, rec.mixup, rec.beta]).encode())
    return h.hexdigest()[:16]


def coverage(plan: TrainPlan, views: int, dim: int = 768) -> dict:
    steps = [(e, s) for e in range(plan.epochs) for s in range(plan.steps_per_epoch)]
    total = len(steps) * plan.global_batch
    exact_bytes = {d: 0 for d in ("int8", "int4")}
    exact = {"exact": 0, "resized": 0, "online": 0}
    budget = {"exact": 0, "resized": 0, "online": 0}
    for e, s in steps:
        rec = plan.step_record(e, s)
        # exact store: jobs.cache_teacher writes every slot of the step at the grid of the image it
        # rendered (plan.grid); the trainer needs the grid of the batch it collated (rec.size)
        stored = plan.grid(e, s)
        exact["exact" if stored == (rec.size // 32,) * 2 else "resized"] += plan.global_batch
        for d in exact_bytes:
            exact_bytes[d] += plan.global_batch * stored[0] * stored[1] * bytes_per_token(d, dim)
        # budget store: one 640-px grid per replayed view; MixUp blends two views -> online
        kind = "online" if rec.mixup else "exact" if rec.size == plan.base_size else "resized"
        budget[kind] += plan.global_batch
    vplan = ViewPlan(seed=plan.seed, k=views, epochs=plan.policy.epochs, input_size=(plan.base_size,) * 2)
    base_tokens = (plan.base_size // 32) ** 2
    return {
        "exact": {"exact_fraction": exact["exact"] / total, "resized_fraction": exact["resized"] / total,
                  "online_fraction": exact["online"] / total, "views": total,
                  "bytes": exact_bytes["int8"], "bytes_int4": exact_bytes["int4"],
                  "distinct_views_per_image": plan.epochs},
        f"budget_k{views}": {"exact_fraction": budget["exact"] / total, "resized_fraction": budget["resized"] / total,
                             "online_fraction": budget["online"] / total,
                             "views": plan.num_samples * vplan.num_views,
                             "bytes": plan.num_samples * vplan.num_views * base_tokens * bytes_per_token("int8", dim),
                             "distinct_views_per_image": vplan.num_views},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["s", "m", "l", "x"], default="l")
    p.add_argument("--images", type=int, default=118287, help="training images (COCO train2017: 118287)")
    p.add_argument("--world-size", type=int, default=8, help="the run's world size (checked against the plan)")
    p.add_argument("--epochs", type=int, help="the trainer's --epochs (None: the recipe's)")
    p.add_argument("--global-batch", type=int, help="None: the recipe's total batch")
    p.add_argument("--views", type=int, default=4, help="K of the budget store compared")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--dim", type=int, default=768, help="teacher width (ViT-B: 768)")
    args = p.parse_args(argv)
    recipe = resolve_recipe(args.size, args.epochs)
    plan = TrainPlan.from_recipe(recipe, args.images, args.global_batch or recipe.total_batch_size,
                                 base_size=args.img_size, dataset_hash=f"simulated-{args.images}")
    plan.check_world(args.world_size)
    digests = {w: stream_digest(plan, w) for w in (1, 2, 4, 8) if plan.global_batch % w == 0
               and (plan.global_batch // w) % plan.mixup_group == 0}
    out = {"size": args.size, "images": args.images, "world_size": args.world_size, "plan_hash": plan.hash(),
           "stream_digest_by_world_size": digests, "same_for_all_world_sizes": len(set(digests.values())) == 1,
           "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
           **coverage(plan, args.views, args.dim)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
