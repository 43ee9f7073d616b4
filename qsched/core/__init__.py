"""The bottom layer: the bits grammar, errors and the BitPlan; plain records every other layer uses."""
