"""Per-task metrics and Δm, registered in mmseg's METRICS on import.

Output keys (the prefix defaults to the task name; configs use them for ``save_best``):

- ``MultiTaskIoUMetric`` (task ``semseg`` or ``parts``): ``<task>/mIoU``, ``<task>/aAcc``,
  ``<task>/mAcc`` (percent).
- ``DepthErrorMetric``: ``depth/rmse`` (metres), ``depth/log_rmse``, ``depth/abs_rel``,
  ``depth/delta1`` (percent).
- ``NormalsAngleMetric``: ``normals/mean``, ``normals/median``, ``normals/rmse`` (degrees),
  ``normals/pct_11.25``, ``normals/pct_22.5``, ``normals/pct_30`` (percent).
- ``SaliencyMetric``: ``sal/maxIoU``, ``sal/maxF`` (percent).
- ``EdgeODSMetric``: ``edge/odsF``, ``edge/oisF`` (percent).
- ``MultiTaskDeltaMetric`` (wraps one of the above per task): all their keys plus
  ``multitask/delta_m`` and ``multitask/delta_<task>`` (percent).
"""

from .delta_metric import STL_REFERENCES, MultiTaskDeltaMetric, delta_m, task_metric_configs
from .depth_metric import DepthErrorMetric
from .edge_metric import EdgeODSMetric
from .iou_metric import MultiTaskIoUMetric
from .normals_metric import NormalsAngleMetric
from .saliency_metric import SaliencyMetric

__all__ = [
    "STL_REFERENCES",
    "DepthErrorMetric",
    "EdgeODSMetric",
    "MultiTaskDeltaMetric",
    "MultiTaskIoUMetric",
    "NormalsAngleMetric",
    "SaliencyMetric",
    "delta_m",
    "task_metric_configs",
]
