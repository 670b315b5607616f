"""Generate images with Stable Diffusion in JAX. (Sampling lands with the sampling issue.)"""
import sys

if __name__ == "__main__":
    sys.exit("sample.py: sampling is not implemented yet in this version of sdjax; "
             "model import works: see `sdjax.weights.load_pretrained` in the README.")
