"""The appendix: everything that is not one of the paper's components (see README.md beside this file).

The chapters at the repository's root implement DINO; these files run it as a product: checkpoints and
runs that survive, inference on any input, export, plots, dataset layouts. Importing the package imports
nothing (onnx_detect runs without torch).
"""
