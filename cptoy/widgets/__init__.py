"""Interactive panels (ipywidgets + plotly ``FigureWidget``) for the notebooks and the dashboard.

One panel per module, on the shared base in :mod:`cptoy.widgets.base`:

* :func:`cp_explorer` (``joint_fits``): rank-r CP fits of a joint, slices and curves vs rank;
* :func:`expert_weights` (``experts``): CP heads as a mixture of experts on typed text;
* :func:`acceptance_explorer` (``acceptance``): decoding with drafts accepted and rejected;
* :func:`speculative_stepper` (``stepper``): one verification forward at a time.

Each function returns a small dataclass with ``.widget`` (the ipywidgets box to display),
handles to its controls and ``.figures`` (name -> ``FigureWidget``), so tests and notebooks can
drive it from Python; a cell that ends with it displays the panel. Panels take the width of the
output area they are shown in, use fonts of at least 14 px, raise ``ValueError``/``TypeError``
for bad arguments and show errors inside callbacks as a ⚠ message in the panel.

ipywidgets and plotly are imported inside the functions: ``import cptoy.widgets`` is cheap.
plotly 6+ ``FigureWidget`` needs the ``anywidget`` package.
"""

from cptoy.widgets.acceptance import EXPLORER_DRAFTERS, AcceptanceExplorer, acceptance_explorer
from cptoy.widgets.base import ARRIVAL_COLORS, FONT_SIZE, MIN_FONT
from cptoy.widgets.experts import ExpertWeights, expert_weights
from cptoy.widgets.joint_fits import MAX_ENTRIES, CPExplorer, cp_explorer
from cptoy.widgets.stepper import SpeculativeStepper, speculative_stepper

__all__ = ["ARRIVAL_COLORS", "EXPLORER_DRAFTERS", "FONT_SIZE", "MAX_ENTRIES", "MIN_FONT",
           "AcceptanceExplorer", "CPExplorer", "ExpertWeights", "SpeculativeStepper",
           "acceptance_explorer", "cp_explorer", "expert_weights", "speculative_stepper"]
