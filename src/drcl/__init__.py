"""drcl: 2DRCL pre-training for long-tailed object detection.

The package reads top-down the way data flows:
data -> sampling -> views -> model -> engine -> evaluation/export -> cli.
Imports only point down that list.
"""

__version__ = "0.1.0"
