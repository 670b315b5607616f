"""Train a latent diffusion model. (Training lands with the training issue.)"""
import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet in this version of sdjax.")
