"""Put this folder first on PYTHONPATH to make the packages the GPU machine's image lacks
unimportable, so a CPU dry run of benchmarks/gpu_suite.py fails where the device run would
(docs/gpu.md): PYTHONPATH=benchmarks/gpu_image:$PWD python -m benchmarks.gpu_suite --dry-run --out DIR"""
import importlib.abc
import sys

MISSING = {"ray", "imagehash", "s3fs", "moto", "boto3", "botocore", "aiobotocore"}


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the GPU image)", name=name)
        return None


sys.meta_path.insert(0, _Missing())
