"""Teachers, the view plan and the teacher-feature stores (no imports from pipeline or jobs).

Import the submodules themselves (``teacher_cache.store``, ``teacher_cache.teachers``, ...): this
package imports nothing, so code that only needs the light ``views`` module does not load timm or zarr.
"""
