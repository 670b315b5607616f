"""The autoencoder stage (config `stage = "autoencoder"`): the KL autoencoder against a PatchGAN."""
