"""Teachers, the view plan and the teacher-feature store (no imports from pipeline or jobs)."""
from .store import Store, StoreError, StoreMismatch
from .teachers import Teacher, WeightsError, build_teacher
from .views import ViewPlan

__all__ = ["Store", "StoreError", "StoreMismatch", "Teacher", "WeightsError", "build_teacher", "ViewPlan"]
