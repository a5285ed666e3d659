"""cptoy: multi-token prediction with CP heads, taught and run.

``import cptoy`` stays light: it pulls in torch only. Plotting, widgets and tensorly
are imported by the modules that need them.
"""

__version__ = "0.1.0"
