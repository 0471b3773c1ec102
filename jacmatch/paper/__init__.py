"""The paper's experiments on Fashion-MNIST: its protocol and sections (``jacmatch experiment``)."""
