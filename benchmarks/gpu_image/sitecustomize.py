"""Put this folder first on PYTHONPATH to make the packages the GPU machine's image lacks
unimportable, so a CPU dry run of benchmarks/gpu_suite.py fails where the device run would
(docs/gpu.md): PYTHONPATH=benchmarks/gpu_image:$PWD python -m benchmarks.gpu_suite --dry-run --out DIR"""
import sys

MISSING = {"ray", "imagehash", "s3fs", "moto", "boto3", "botocore", "aiobotocore"}


class _Hiding:
    """A meta-path finder in place of another that finds nothing under the missing names: an import
    raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as where they are absent
    (libraries such as accelerate probe with find_spec)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hiding(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
