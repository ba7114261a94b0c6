"""The paper's figures, one module each; every function writes a PNG and returns its path."""
